"""Build script for aniso_fast.

Native extensions are added by the kernels work (csrc/); `kernels/` (Triton) ships as `aniso_fast.kernels`.
torch is required as torch>=2.4 and is never pulled by the build: install it first, then
`pip install --no-build-isolation -e .`.
"""
from setuptools import setup

setup(
    name="aniso_fast",
    version="0.1.0",
    description="Anisotropic diffusion schedules: learned matrix noise paths, fused subspace kernels, fast low-NFE solvers",
    packages=["aniso_fast", "aniso_fast.kernels"],
    package_dir={"aniso_fast": "aniso_fast", "aniso_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "pillow", "safetensors", "matplotlib", "pot"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "pytest-xdist"],
        "metrics": ["torchmetrics"],
    },
)
