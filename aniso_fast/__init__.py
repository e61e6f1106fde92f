"""aniso_fast: anisotropic diffusion schedules with fused subspace kernels.

    from aniso_fast import DCTBasis, MatrixSchedule, AnisoPrecond, GaussianMixture, sample, backends
"""
from .bases import DCTBasis, IsotropicBasis, PCABasis, SubspaceBasis
from .gmm import GaussianMixture
from .ops import backends
from .precond import AnisoPrecond
from .schedules import KnotSchedule, MatrixSchedule, karras_sigmas
from .solvers import euler, heun, sample

__version__ = "0.1.0"
__all__ = [
    "AnisoPrecond", "DCTBasis", "GaussianMixture", "IsotropicBasis", "KnotSchedule", "MatrixSchedule", "PCABasis",
    "SubspaceBasis", "backends", "euler", "heun", "karras_sigmas", "sample",
]
