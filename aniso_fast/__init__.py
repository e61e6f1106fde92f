"""aniso_fast: anisotropic diffusion schedules with fused subspace kernels."""
__version__ = "0.1.0"
