"""aniso_fast: anisotropic diffusion schedules with fused subspace kernels.

    import aniso_fast
    images = aniso_fast.load().sample(16, nfe=9).images   # the `sample` CLI's defaults, from Python

    from aniso_fast import DCTBasis, MatrixSchedule, AnisoPrecond, GaussianMixture, backends
    from aniso_fast.sampling import sample, resolve_sampler, SOLVERS, seeded_noise

(`aniso_fast.sample` is the command-line module `python -m aniso_fast.sample`.)
"""
from .geometry.bases import DCTBasis, IsotropicBasis, PCABasis, SubspaceBasis
from .networks.gmm import GaussianMixture
from .ops import backends
from .networks.precond import AnisoPrecond
from .pipeline import Pipeline, load
from .geometry.schedules import KnotSchedule, MatrixSchedule, karras_sigmas

__version__ = "0.1.0"
__all__ = [
    "AnisoPrecond", "DCTBasis", "GaussianMixture", "IsotropicBasis", "KnotSchedule", "MatrixSchedule", "PCABasis",
    "Pipeline", "SubspaceBasis", "backends", "karras_sigmas", "load",
]
