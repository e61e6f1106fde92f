"""The compiled extension `aniso_fast._C`, the one place that imports or builds it.

It is built ahead of time by setup.py when the build sees torch (`pip install --no-build-isolation .`, as
scripts/setup.sh does). A wheel built without torch in sight (`pip install .` with build isolation) carries the C++
sources instead, and the extension is built just in time on first use with `torch.utils.cpp_extension.load`
(ninja), cached per torch version under `$ANISO_FAST_CACHE` (default `~/.cache/aniso_fast`). Where neither works
the ops fall back to the plain PyTorch backend with a warning. `ANISO_FAST_JIT=0` turns the just-in-time build off.
"""
from __future__ import annotations

import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["load_extension", "source_folder"]

_PACKAGE = Path(__file__).resolve().parent.parent


def source_folder() -> Path | None:
    """The C++/CUDA sources: `csrc/` beside the package in a source checkout, `aniso_fast/_csrc` in a wheel."""
    for folder in (_PACKAGE.parent / "csrc", _PACKAGE / "_csrc"):
        if (folder / "bindings.cpp").is_file():
            return folder
    return None


def _cache_folder() -> Path:
    root = Path(os.environ.get("ANISO_FAST_CACHE") or Path.home() / ".cache" / "aniso_fast")
    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"
    return root / tag


def _build(folder: Path) -> ModuleType:
    from torch.utils import cpp_extension

    sources = [folder / "bindings.cpp", *sorted((folder / "cpu").glob("*.cpp"))]
    cflags = ["-O3", "-g0", "-fopenmp"]  # OpenMP: at::parallel_for runs serially without it
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if cuda:
        sources += sorted((folder / "cuda").glob("*.cu"))
        cflags.append("-DWITH_CUDA")
    build_dir = _cache_folder()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / "aniso_fast_C.so").exists():  # built once; later loads only let ninja check the sources
        print(f"aniso_fast: building the C++ kernels for torch {torch.__version__} (once; cached in {build_dir})",
              file=sys.stderr)
    return cpp_extension.load(name="aniso_fast_C", sources=[str(s) for s in sources], extra_cflags=cflags,
                              extra_cuda_cflags=["-O3", "-DWITH_CUDA"] if cuda else None,
                              extra_ldflags=["-fopenmp"], extra_include_paths=[str(folder)],
                              build_directory=str(build_dir), verbose=False)


def load_extension() -> tuple[ModuleType | None, str | None]:
    """(the extension, None), or (None, why it is unavailable) after warning that the reference backend runs."""
    try:
        from .. import _C

        return _C, None
    except ImportError as exc:
        why = f"aniso_fast._C is not built ({exc})"
    folder = source_folder()
    if os.environ.get("ANISO_FAST_JIT") == "0" or folder is None:
        return None, why + ("; ANISO_FAST_JIT=0" if folder is not None else "; no C++ sources to build it from")
    try:
        return _build(folder), None
    except Exception as exc:  # no compiler, no ninja, a failed build: the ops still run, in plain PyTorch
        why = f"aniso_fast._C could not be built just in time ({type(exc).__name__}: {str(exc).strip()[:300]})"
        warnings.warn(f"{why}; the subspace ops run on the plain PyTorch backend", RuntimeWarning, stacklevel=2)
        return None, why
