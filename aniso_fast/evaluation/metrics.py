"""Sample-quality metrics: sliced Wasserstein, Frechet distance, endpoint error (the feature spaces are in
evaluation.features, the Fashion-MNIST classifier in evaluation.classifier)."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import ot
import scipy.linalg
import torch
from torch import Tensor


__all__ = [
    "sliced_wasserstein", "feature_statistics", "frechet_distance", "frechet_distance_from_statistics",
    "EndpointError", "endpoint_error",
]


def _as_float64_2d(x, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [N, ...], got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


# -------------------------------------------------------------------------------- distribution metrics

def sliced_wasserstein(x, y, n_projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance SW_2 between two sample sets (POT's `ot.sliced_wasserstein_distance`).

    Samples are flattened to vectors; SW_2 = (E_theta W_2^2(theta#x, theta#y))^(1/2) over `n_projections`
    random directions drawn from `seed`, so two calls with one seed use the same directions (symmetric in x, y).
    """
    x, y = _as_float64_2d(x, "x"), _as_float64_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features per sample, got {x.shape[1]} "
                         f"and {y.shape[1]}")
    if not (isinstance(n_projections, int) and n_projections > 0):
        raise ValueError(f"n_projections must be a positive int, got {n_projections!r}")
    return float(ot.sliced_wasserstein_distance(x, y, n_projections=n_projections, p=2, seed=seed))


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    feats = _as_float64_2d(feats, "feats")
    if feats.shape[0] < 2:
        raise ValueError(f"feats needs at least 2 samples for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2, imag_tol: float = 1e-3) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64):

        ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)),

    with the square root by `scipy.linalg.sqrtm`. Rounding gives it a small imaginary part when a covariance is
    singular (fewer samples than features: about 1e-5 relative); that is dropped when below `imag_tol` times the
    largest real entry, and raises ValueError otherwise (e.g. a covariance that is not positive semidefinite).
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, m in (("mu1", mu1), ("mu2", mu2)):
        if m.shape != (d,):
            raise ValueError(f"{name} must be a vector [D] matching mu1, got shape {m.shape}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [D, D] = [{d}, {d}], got shape {s.shape}")
    with warnings.catch_warnings():
        # Singular covariances are common (dead features, N < D); the result is checked below instead.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # A singular product can defeat the Schur method; a tiny ridge (as pytorch-fid does) fixes that.
            ridge = 1e-6 * np.eye(d)
            covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        scale = max(np.abs(covmean.real).max(), np.finfo(np.float64).tiny)
        if imag > imag_tol * scale:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary part {imag:.3g} (relative {imag / scale:.3g}"
                             f" > imag_tol={imag_tol}); are both covariances symmetric positive semidefinite?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(feat_a, feat_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_distance_from_statistics(*feature_statistics(feat_a), *feature_statistics(feat_b))


class EndpointError(NamedTuple):
    per_sample: Tensor   # float64 [B]: RMS over all non-batch dims
    mean: float
    max: float


def endpoint_error(x: Tensor, x_ref: Tensor) -> EndpointError:
    """Per-sample RMS difference sqrt(mean((x - x_ref)^2)) over C, H, W (float64), with its mean and max."""
    if x.shape != x_ref.shape or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x and x_ref must be non-empty batches of one shape, got {tuple(x.shape)} and "
                         f"{tuple(x_ref.shape)}")
    diff = x.detach().to(torch.float64) - x_ref.detach().to(device=x.device, dtype=torch.float64)
    rms = diff.reshape(diff.shape[0], -1).square().mean(dim=1).sqrt().cpu()
    return EndpointError(rms, float(rms.mean()), float(rms.max()))
