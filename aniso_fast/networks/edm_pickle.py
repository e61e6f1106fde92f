"""Safe loader for NVlabs/edm network pickles (METHOD §3.1): the base U-Net without running the pickle's code.

An EDM network pickle is `pickle.dump({'ema': EDMPrecond, ...})` where every EDM class is a
`torch_utils.persistence` persistent class: each instance pickles as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = {type: 'class', version, module_src, class_name, state}`, `state` being the module's `__dict__`
(`_parameters`, `_buffers`, `_modules`, `_init_args`, `_init_kwargs`, ...). EDM's own loader `exec`s `module_src`.

Here a restricted unpickler resolves only an explicit allow-list of globals (tensor and storage rebuild helpers,
`OrderedDict`, numpy scalars, torch module containers as inert stand-ins); the persistence hook is replaced by a
function that returns the captured meta untouched, so `module_src` is kept as a string and never executed. The
`EDMPrecond` settings and the inner `SongUNet`'s constructor arguments are read from the captured metas, our
`aniso_fast.networks.SongUNet` is built from them and the weights are loaded strictly.
"""
from __future__ import annotations

import collections
import inspect
import io
import math
import os
import pickle
import warnings
from typing import Any, BinaryIO

import numpy
import torch

from .unet import SongUNet

try:  # numpy >= 2 pickles scalars as numpy._core.multiarray.scalar, numpy 1.x as numpy.core.multiarray.scalar
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as _np_scalar

__all__ = ["EDMPickleError", "load_edm_network"]


class EDMPickleError(pickle.UnpicklingError, ValueError):
    """The file is not an EDM network pickle this loader accepts (refused global, damaged file, unsupported net)."""


class _Persistent:
    """What `_reconstruct_persistent_obj(meta)` would have rebuilt, kept as data: class name, source text, state."""

    def __init__(self, meta: Any):
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise EDMPickleError("persistent object without a meta dict holding a 'state' dict")
        if meta.get("type") != "class":
            raise EDMPickleError(f"persistent object of type {meta.get('type')!r}; only 'class' is known")
        self.class_name = str(meta.get("class_name"))
        self.version = meta.get("version")
        self.module_src = meta.get("module_src")  # source text of the EDM module: stored, never executed
        self.state = meta["state"]


class _TorchContainer:
    """Inert stand-in for `torch.nn.ModuleDict`/`ModuleList`/`Sequential`: pickle's BUILD hands it the module state."""

    class_name = "Module"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise EDMPickleError(f"torch.nn.{self.class_name} with a state that is not a dict")
        self.state = state


_CONTAINERS = {name: type(name, (_TorchContainer,), {"class_name": name})
               for name in ("ModuleDict", "ModuleList", "Sequential")}


class _EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict with attribute access); only its items matter here."""


def _load_storage_from_bytes(data: bytes):
    # torch pickles a storage as torch.save() bytes; torch's own hook loads them with weights_only=False.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    # protocol 2 writes bytes as _codecs.encode(<str>, 'latin1'); allow exactly that and nothing else of _codecs
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise EDMPickleError("_codecs.encode is allowed only as protocol 2's bytes encoding (str, 'latin1')")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol 2 names builtins the Python 2 way
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): numpy.dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    **{("torch.nn.modules.container", name): cls for name, cls in _CONTAINERS.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise EDMPickleError(f"refusing to load global '{module}.{name}': it is not on the EDM network-pickle "
                                 f"allow-list (tensors, storages, OrderedDict, numpy scalars, torch containers, "
                                 f"torch_utils persistent objects)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise EDMPickleError(f"refusing persistent id {pid!r}: EDM network pickles contain none")


# EDMPrecond.__init__(img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=inf,
# sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs) in NVlabs/edm training/networks.py.
_PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data",
                 "model_type")
_PRECOND_DEFAULTS = dict(label_dim=0, use_fp16=False, sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5,
                         model_type="DhariwalUNet")
_SONGUNET_ARGS = tuple(p for p in inspect.signature(SongUNet.__init__).parameters if p != "self")


def _constructor_kwargs(obj: _Persistent, positional_names: tuple[str, ...]) -> dict[str, Any] | None:
    """The recorded constructor call of a persistent object as keyword arguments, or None if it was not recorded."""
    args, kwargs = obj.state.get("_init_args"), obj.state.get("_init_kwargs")
    if args is None and kwargs is None:
        return None
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    if len(args) > len(positional_names):
        raise EDMPickleError(f"{obj.class_name} was constructed with {len(args)} positional arguments; "
                             f"at most {len(positional_names)} are known")
    for name, value in zip(positional_names, args):
        if name in kwargs:
            raise EDMPickleError(f"{obj.class_name}: argument {name!r} recorded both positionally and by keyword")
        kwargs[name] = value
    return kwargs


def _collect_tensors(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Flatten a captured module tree into a state dict, in torch's order and with torch's rules (None and
    non-persistent buffers are left out)."""
    if not isinstance(node, (_Persistent, _TorchContainer)):
        raise EDMPickleError(f"expected a module at '{prefix[:-1] or '<root>'}', found {type(node).__name__}")
    state = node.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (state.get(kind) or {}).items():
            if tensor is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise EDMPickleError(f"'{prefix}{name}' is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


def _unpickle(path: str | os.PathLike | BinaryIO) -> Any:
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as f:
            return _unpickle(f)
    try:
        return _RestrictedUnpickler(path).load()
    except EDMPickleError:
        raise
    except Exception as e:  # truncated or not a pickle at all: EOFError, UnpicklingError, struct errors, ...
        name = getattr(path, "name", "<file object>")
        raise EDMPickleError(f"{name}: not a readable EDM network pickle ({type(e).__name__}: {e})") from e


def load_edm_network(path: str | os.PathLike | BinaryIO) -> tuple[SongUNet, dict[str, Any]]:
    """Load the EMA network of an EDM network pickle (e.g. `edm-cifar10-32x32-cond-vp.pkl`) without executing it.

    Returns `(net, info)`: `net` is our `SongUNet` (fp32, CPU, eval mode) holding the pickle's `ema.model` weights;
    `info` has the `EDMPrecond` settings `img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max,
    sigma_data, model_type`, plus `model_config` (`net.config()`), `pickle_keys` and `persistence_version`.
    Raises `EDMPickleError` (a `pickle.UnpicklingError` and a `ValueError`) for a global outside the allow-list,
    a damaged or non-pickle file, a pickle without `ema`, or a network other than `EDMPrecond` around `SongUNet`.
    """
    data = _unpickle(path)
    if not isinstance(data, dict) or "ema" not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise EDMPickleError(f"an EDM network pickle is a dict with key 'ema' (the EMA network); found {found}")
    ema = data["ema"]
    if not isinstance(ema, _Persistent):
        raise EDMPickleError(f"'ema' is a {type(ema).__name__}, not an EDM persistent network object")
    if ema.class_name != "EDMPrecond":
        raise EDMPickleError(f"'ema' is a {ema.class_name}; only EDMPrecond networks are supported "
                             f"(VPPrecond/VEPrecond/iDDPMPrecond baselines are not)")

    model = (ema.state.get("_modules") or {}).get("model")
    model_name = model.class_name if isinstance(model, _Persistent) else type(model).__name__
    precond_kwargs = _constructor_kwargs(ema, _PRECOND_ARGS)
    if precond_kwargs is None:  # init args not recorded: fall back to the attributes EDMPrecond stores
        precond_kwargs = {k: ema.state[k] for k in _PRECOND_ARGS if k in ema.state}
        precond_kwargs["model_type"] = model_name
    settings = dict(_PRECOND_DEFAULTS, **{k: v for k, v in precond_kwargs.items() if k in _PRECOND_ARGS})
    missing = [k for k in ("img_resolution", "img_channels") if k not in settings]
    if missing:
        raise EDMPickleError(f"EDMPrecond settings {missing} not found in the pickle")

    if model_name != "SongUNet" or settings["model_type"] != "SongUNet":
        name = model_name if model_name != "SongUNet" else settings["model_type"]
        raise EDMPickleError(f"the network is a {name}; only SongUNet (DDPM++/NCSN++) is supported yet")

    model_kwargs = _constructor_kwargs(model, _SONGUNET_ARGS)
    if model_kwargs is None:  # EDMPrecond passes these to the model, plus the rest of its own kwargs
        model_kwargs = dict(img_resolution=settings["img_resolution"], in_channels=settings["img_channels"],
                            out_channels=settings["img_channels"], label_dim=settings["label_dim"],
                            **{k: v for k, v in precond_kwargs.items() if k not in _PRECOND_ARGS})
    unknown = sorted(set(model_kwargs) - set(_SONGUNET_ARGS))
    if unknown:
        raise EDMPickleError(f"SongUNet arguments {unknown} in the pickle are not supported by aniso_fast's SongUNet")

    state_dict: dict[str, torch.Tensor] = {}
    _collect_tensors(model, "", state_dict)
    try:
        with torch.random.fork_rng(devices=[]):  # the throw-away random init leaves the caller's RNG alone
            net = SongUNet(**model_kwargs)
        net.load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise EDMPickleError(f"the pickle's SongUNet weights do not fit SongUNet({model_kwargs}): {e}") from e
    net = net.float().eval()

    info = {k: settings[k] for k in _PRECOND_ARGS}
    info.update(model_config=net.config(), pickle_keys=sorted(map(str, data)), persistence_version=ema.version)
    return net, info
