"""The one rule for a `--device` option: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N' that
this torch can use."""
from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | None, name: str = "device") -> torch.device:
    """The device a run asks for ('auto' or None: cuda if available, else cpu); ValueError naming `name` (the
    caller's word for the argument, e.g. '--device') for any other device type ('meta', 'mps', a typo) or a missing
    GPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: expected a device this torch can use, got {device!r}, but torch "
                         f"{torch.__version__} sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: expected one of the {torch.cuda.device_count()} CUDA GPUs, got {device!r}")
    return dev
