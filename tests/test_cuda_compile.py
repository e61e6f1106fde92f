"""Compile-only check of the CUDA kernels (csrc/cuda/*.cu): `nvcc -c` against the installed torch headers.

Nothing CUDA runs here; this catches what a machine without a GPU can: syntax, templates, the ATen dispatch and
the declarations in csrc/subspace.h. A compile error fails the test; no nvcc skips it.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ENTRY_POINTS = ["separable_combine_cuda", "separable_dot_cuda", "lowrank_combine_cuda", "lowrank_dot_cuda",
                "separable_block_combine_cuda", "lowrank_block_combine_cuda"]


def find_nvcc():
    if cpp_extension.CUDA_HOME and (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_command(nvcc, source, obj):
    includes = [*cpp_extension.include_paths(), str(ROOT / "csrc")]
    if cpp_extension.CUDA_HOME:
        includes.append(os.path.join(cpp_extension.CUDA_HOME, "include"))  # nvcc adds its own include dir anyway
    flags = ["-c", str(source), "-o", str(obj), "-std=c++17", "-arch=sm_80",
             *cpp_extension.COMMON_NVCC_FLAGS,  # the __CUDA_NO_HALF_* flags a CUDAExtension build passes
             "-Xcompiler", "-O0"]               # host code unoptimised to save time; ptxas still optimises
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # CPU wheels ship the c10/cuda headers without this generated file (CUDA builds define only an export
        # macro there); c10/cuda/CUDAMacros.h offers this switch to skip it.
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [nvcc, *flags, *(f"-I{p}" for p in includes)]


@pytest.mark.slow
def test_cuda_sources_compile(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither CUDA_HOME/bin/nvcc nor on PATH): the CUDA kernels cannot be compiled")
    assert CUDA_SOURCES, "no csrc/cuda/*.cu files"
    defined = set()
    for source in CUDA_SOURCES:  # one translation unit today: one nvcc run
        obj = tmp_path / (source.stem + ".o")
        proc = subprocess.run(nvcc_command(nvcc, source, obj), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-6000:]}"
        nm = shutil.which("nm")
        if nm:
            symbols = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
            defined |= {name for name in ENTRY_POINTS if f" T {name}(" in symbols}
    if shutil.which("nm"):
        assert defined == set(ENTRY_POINTS), f"entry points not defined: {set(ENTRY_POINTS) - defined}"
