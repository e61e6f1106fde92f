"""Sample-quality metrics: sliced Wasserstein, Frechet distance, endpoint error, and a Fashion-MNIST classifier
whose penultimate features stand in for Inception's in a Frechet distance on 28x28 grayscale images.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import ot
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..utils.data import to_model_range, to_uint8
from ..utils.atomic import atomic_write_bytes

__all__ = [
    "sliced_wasserstein", "feature_statistics", "frechet_distance", "frechet_distance_from_statistics",
    "EndpointError", "endpoint_error", "FashionMNISTClassifier", "train_classifier", "evaluate_classifier",
    "save_classifier", "load_classifier", "FrechetClassifierDistance",
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


# ---------------------------------------------------------------------------------------- classifier

class FashionMNISTClassifier(nn.Module):
    """Small CNN for [B, 1, 28, 28] images in [-1, 1]: three 3x3 conv-BN-ReLU-maxpool blocks with
    width, 2 width, 4 width channels (28 -> 14 -> 7 -> 3), a fully connected BN-ReLU layer of `feature_dim`
    (the features) and a linear layer to the logits.
    """

    def __init__(self, width: int = 16, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = {"width": int(width), "feature_dim": int(feature_dim), "num_classes": int(num_classes)}

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(1, width), *block(width, 2 * width), *block(2 * width, 4 * width),
                                  nn.Flatten(), nn.Linear(4 * width * 3 * 3, feature_dim, bias=False),
                                  nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations [B, feature_dim] (used for the Frechet distance)."""
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"x must be [B, 1, 28, 28] images in [-1, 1], got shape {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _model_input(images: Tensor) -> Tensor:
    return to_model_range(images) if images.dtype == torch.uint8 else images.to(torch.float32)


def _check_labelled(images: Tensor, labels: Tensor) -> None:
    if images.ndim != 4 or images.shape[1:] != (1, 28, 28):
        raise ValueError(f"images must be [N, 1, 28, 28], got shape {tuple(images.shape)}")
    if labels.shape != images.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 4, batch_size: int = 128, lr: float = 3e-3,
                     seed: int = 0, progress: bool = True, width: int = 16,
                     feature_dim: int = 128) -> FashionMNISTClassifier:
    """Train a `FashionMNISTClassifier(width, feature_dim)` with AdamW, a one-cycle learning rate and label
    smoothing 0.1. `images` are uint8 [N, 1, 28, 28] (or float in [-1, 1]). Deterministic in `seed` on one
    device; the global RNG state is left untouched. Returns the model in eval mode.
    """
    _check_labelled(images, labels)
    x_all = _model_input(images)
    n = x_all.shape[0]
    steps_per_epoch = -(-n // batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FashionMNISTClassifier(width=width, feature_dim=feature_dim)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        model.train()
        bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", disable=not progress)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(model(x_all[idx]), labels[idx], label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    return model.eval()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` (in eval mode, restored afterwards) on uint8 or [-1, 1] images."""
    _check_labelled(images, labels)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(_model_input(images[i:i + batch_size]).to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def _config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_classifier(model: FashionMNISTClassifier, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write weights to `path` (.safetensors) and the config to the same name with .json, each atomically.

    The JSON holds the constructor config, the weights' SHA-256 (checked on load) and `metadata` (e.g. accuracy).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save_safetensors_bytes(tensors)
    config = {"class": "FashionMNISTClassifier", "format_version": 1, "config": model.config,
              "weights_sha256": hashlib.sha256(blob).hexdigest(), "metadata": metadata or {}}
    atomic_write_bytes(path, blob)
    atomic_write_bytes(_config_path(path), (json.dumps(config, indent=2) + "\n").encode())


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FashionMNISTClassifier:
    """Inverse of `save_classifier`: the model in eval mode; its JSON's `metadata` is at `model.metadata`."""
    path = Path(path)
    config_path = _config_path(path)
    if not path.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"classifier needs both {path} and {config_path}")
    config = json.loads(config_path.read_text())
    if config.get("class") != "FashionMNISTClassifier" or config.get("format_version") != 1:
        raise ValueError(f"{config_path}: not a FashionMNISTClassifier config (format_version 1)")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != config["weights_sha256"]:
        raise ValueError(f"{path}: weights do not match the SHA-256 recorded in {config_path}")
    model = FashionMNISTClassifier(**config["config"])
    model.load_state_dict(load_safetensors_bytes(blob), strict=True)
    model.metadata = config["metadata"]
    return model.to(map_location).eval()


class FrechetClassifierDistance:
    """Frechet distance in the features of a Fashion-MNIST classifier, against fixed reference statistics.

    Images are uint8 [N, 1, 28, 28] or floats in [-1, 1]; floats are first quantized with `to_uint8`, as saved
    samples are, so scoring a tensor or its saved PNGs gives the same number.
    """

    def __init__(self, classifier: FashionMNISTClassifier, reference_images: Tensor, batch_size: int = 1000):
        self.classifier, self.batch_size = classifier.eval(), batch_size
        self.mu, self.sigma = feature_statistics(self.features(reference_images))

    @torch.no_grad()
    def features(self, images: Tensor) -> np.ndarray:
        """Classifier features [N, feature_dim] (float64 numpy)."""
        images = images if images.dtype == torch.uint8 else to_uint8(images)
        device = next(self.classifier.parameters()).device
        out = [self.classifier.features(to_model_range(images[i:i + self.batch_size]).to(device)).cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).to(torch.float64).numpy()

    def score(self, generated_images: Tensor) -> float:
        return frechet_distance_from_statistics(*feature_statistics(self.features(generated_images)),
                                                self.mu, self.sigma)
