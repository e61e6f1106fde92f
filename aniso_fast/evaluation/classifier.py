"""The Fashion-MNIST classifier whose penultimate features stand in for Inception's in the Frechet distance of the
results table on 28x28 grayscale images: the network, its training and evaluation, and its shipping (weights +
JSON with a SHA-256, `python -m aniso_fast.evaluate classifier`, `docs/classifier.md`)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..store.manifest import ASSET_DIR
from ..utils.atomic import atomic_write_bytes, atomic_write_text
from ..utils.data import load_fashion_mnist, to_model_range
from ..utils.machine import machine_description

__all__ = ["CLASSIFIER_ASSET", "FashionMNISTClassifier", "train_classifier", "evaluate_classifier", "save_classifier",
           "load_classifier", "train_fmnist_classifier", "classifier_markdown"]

CLASSIFIER_ASSET = ASSET_DIR / "fmnist_classifier.safetensors"
REPO = Path(__file__).resolve().parents[2]


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


def train_fmnist_classifier(out: str | os.PathLike = CLASSIFIER_ASSET, doc: str | os.PathLike | None = "docs/classifier.md",
                            *, epochs: int = 4, batch_size: int = 128, lr: float = 3e-3, width: int = 16,
                            feature_dim: int = 128, seed: int = 0, min_accuracy: float = 0.9,
                            progress: bool = True, command: str = "") -> dict:
    """Train the Frechet-distance classifier on the 60k training images, measure it on the 10k test images and,
    if it reaches `min_accuracy`, ship it (weights + JSON, atomically) and write its Markdown report."""
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
        f"(`aniso_fast/evaluation/classifier.py`), {info['parameters']:,} parameters; the Frechet distance of `docs/RESULTS.md` "
        f"uses its {s['feature_dim']}-d penultimate features.",
        f"- Training: `train_classifier` on the {info['train_images']:,} training images, {s['epochs']} epochs, "
        f"batch {s['batch_size']}, AdamW with a one-cycle learning rate (peak {s['lr']:g}), label smoothing 0.1, "
        f"seed {s['seed']}.",
        f"- Wall time: {info['wall_seconds']:.0f} s in all ({info['train_seconds']:.0f} s training).",
        f"- Machine: {info['machine']}.",
        f"- Files: `{shown}` and its `.json` (config, SHA-256 of the weights, this metadata).", ""])
