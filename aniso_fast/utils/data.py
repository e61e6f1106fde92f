"""Image data: Fashion-MNIST (IDX files), image folders, npz arrays; range conversion; a resumable sampler.

Every loader returns uint8 images `[N, C, H, W]` and int64 labels `[N]` (or None). The model sees
`to_model_range(u8) = u8 / 127.5 - 1` in [-1, 1] (docs/METHOD.md §1.1); samples go back with EDM's
`to_uint8(x) = uint8(clamp(x * 127.5 + 128, 0, 255))` (docs/METHOD.md §6), which inverts `to_model_range` exactly.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "FASHION_MNIST_CLASSES", "read_idx", "load_fashion_mnist", "load_image_folder", "load_npz",
    "to_model_range", "to_uint8", "ImageDataset", "LoadedDataset", "load_dataset", "InfiniteBatchSampler",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "ANISO_FAST_FMNIST_DIR"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# IDX type codes (http://yann.lecun.com/exdb/mnist/); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ------------------------------------------------------------------------------------------- IDX files

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array in native byte order.

    Header: two zero bytes, a type code, the number of dims, then one big-endian uint32 per dim. The payload
    must be exactly prod(dims) items long; anything else raises ValueError naming the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes, the header needs 4)")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD with type code "
                         f"TT in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and DD the number of dims)")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dims need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: dims {dims} of {dtype.name} need {expected} payload bytes, "
                         f"found {got}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, name: str) -> Path:
    for candidate in (root / (name + ".gz"), root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {root}. Install the dataset with "
        f"`apt-get install -y dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}), or point "
        f"${FASHION_MNIST_ENV} or root= at a folder holding the four IDX files.")


@functools.lru_cache(maxsize=2)
def _read_fashion_mnist(image_path: Path, label_path: Path, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{label_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: labels must be in 0..9, found {int(labels.max())}")
    return images, labels


def fashion_mnist_files(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(images, labels) IDX paths of a Fashion-MNIST split; FileNotFoundError saying how to install it."""
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root if root is not None else os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    image_name, label_name = _FASHION_MNIST_FILES[split]
    return _find_idx(root, image_name), _find_idx(root, label_name)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as (images uint8 [N, 1, 28, 28], labels int64 [N]); N = 60000 (train) or 10000 (test).

    `root` defaults to $ANISO_FAST_FMNIST_DIR, else /usr/share/datasets/fashion-mnist (Debian package
    `dataset-fashion-mnist`). The two most recently parsed splits stay in memory; callers get fresh tensors.
    """
    image_path, label_path = fashion_mnist_files(split, root)
    # (mtime, size) in the cache key: a replaced file is read again.
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (image_path, label_path))
    images, labels = _read_fashion_mnist(image_path.resolve(), label_path.resolve(), stamp)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------------------- image folders

def _image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def _list_images(folder: Path, extensions: set[str]) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in extensions
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _resolution_hw(resolution) -> tuple[int, int] | None:
    if resolution is None:
        return None
    hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ValueError(f"resolution must be a positive int or an (H, W) pair of them, got {resolution!r}")
    return hw


def load_image_folder(path: str | os.PathLike, resolution: int | tuple[int, int] | None = None,
                      channels: int | None = None) -> tuple[Tensor, Tensor | None, list[str] | None]:
    """A folder of images -> (images uint8 [N, C, H, W], labels int64 [N] or None, class names or None).

    Layouts: image files directly in `path` (no labels), or one subfolder per class (searched recursively;
    label = index of the subfolder name in sorted order). Hidden files and non-image files are ignored.
    `channels` (1 or 3) defaults to 1 if every image is grayscale, else 3. Without `resolution` all images
    must share one size; with it (int or (H, W)) each image is resized with Lanczos, aspect ratio not kept.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    hw = _resolution_hw(resolution)
    extensions = _image_extensions()
    top_files = [p for p in sorted(root.iterdir())
                 if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")]
    class_dirs = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    class_dirs = [d for d in class_dirs if _list_images(d, extensions)] if top_files else class_dirs
    if top_files and class_dirs:
        raise ValueError(f"image folder {root} mixes images at the top level with class subfolders "
                         f"({class_dirs[0].name}/ ...); use one layout")
    if top_files:
        files, labels, class_names = top_files, None, None
    else:
        files, label_list, class_names = [], [], []
        for d in class_dirs:
            found = _list_images(d, extensions)
            if not found:
                raise ValueError(f"class subfolder {d} of image folder {root} holds no images")
            label_list += [len(class_names)] * len(found)
            files += found
            class_names.append(d.name)
        labels = torch.tensor(label_list, dtype=torch.int64)
    if not files:
        raise ValueError(f"image folder {root} holds no images (extensions understood by Pillow, "
                         f"e.g. .png, .jpg)")

    pil_images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                pil_images.append(im.copy())
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"cannot read image {f}: {e}") from e
    if channels is None:
        channels = 1 if all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in pil_images) else 3
    mode = "L" if channels == 1 else "RGB"
    size0 = pil_images[0].size
    arrays = []
    for f, im in zip(files, pil_images):
        if hw is not None:
            im = im.resize((hw[1], hw[0]), Image.Resampling.LANCZOS) if im.size != (hw[1], hw[0]) else im
        elif im.size != size0:
            raise ValueError(f"image {f} is {im.size[0]}x{im.size[1]} (WxH) but {files[0]} is "
                             f"{size0[0]}x{size0[1]}; pass resolution= to resize them to one size")
        arrays.append(np.asarray(im.convert(mode), dtype=np.uint8).reshape(im.size[1], im.size[0], channels))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, labels, class_names


# ------------------------------------------------------------------------------------------------- npz

def _pick_key(keys, names: tuple[str, ...], path: Path, required: bool) -> str | None:
    present = [k for k in names if k in keys]
    if len(present) > 1:
        raise ValueError(f"{path}: holds both {present[0]!r} and {present[1]!r}; keep one")
    if required and not present:
        raise ValueError(f"{path}: no image array; expected key 'images' or 'x', found keys {sorted(keys)}")
    return present[0] if present else None


def load_npz(path: str | os.PathLike) -> tuple[Tensor, Tensor | None]:
    """An .npz file -> (images uint8 [N, C, H, W], labels int64 [N] or None).

    Images under 'images' (or 'x'): [N, H, W], [N, H, W, C] or [N, C, H, W] with C in {1, 3} (a 4-D array is
    read as NCHW when dim 1 is 1 or 3, else as NHWC). Dtype uint8, another integer type with values in 0..255,
    or floating point in [-1, 1] (quantized with `to_uint8`). Labels under 'labels' (or 'y'): integer [N], class
    indices 0..K-1 with K = max label + 1, at least half of the K classes present (so a stray large label cannot
    make a network with a million classes; sparse labels must be renumbered).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable npz file ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single .npy array, not an npz archive of named arrays")
    with npz:
        image_key = _pick_key(npz.files, ("images", "x"), path, required=True)
        label_key = _pick_key(npz.files, ("labels", "y"), path, required=False)
        arrays = {}
        for key in filter(None, (image_key, label_key)):
            try:
                arrays[key] = npz[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise ValueError(f"{path}[{key!r}]: cannot read array ({e})") from e
    x, y = arrays[image_key], arrays.get(label_key)

    name = f"{path}[{image_key!r}]"
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3):
            if x.shape[3] not in (1, 3):
                raise ValueError(f"{name}: shape {x.shape} has no channel axis of size 1 or 3 "
                                 f"(expected [N, H, W], [N, H, W, C] or [N, C, H, W])")
            x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{name}: expected [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {x.shape}")
    if x.shape[0] == 0 or min(x.shape[2:]) == 0:
        raise ValueError(f"{name}: empty image array of shape {x.shape}")
    if x.dtype == np.uint8:
        images = torch.from_numpy(np.ascontiguousarray(x))
    elif np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise ValueError(f"{name}: integer images must lie in 0..255, found range [{x.min()}, {x.max()}]")
        images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: floating-point images contain NaN or inf")
        if x.min() < -1 or x.max() > 1:
            raise ValueError(f"{name}: floating-point images must lie in [-1, 1], found range "
                             f"[{x.min():.4g}, {x.max():.4g}]; clamp them or save uint8")
        images = to_uint8(torch.from_numpy(np.ascontiguousarray(x)))
    else:
        raise ValueError(f"{name}: images must be uint8, integer in 0..255 or float in [-1, 1], got {x.dtype}")

    labels = None
    if y is not None:
        lname = f"{path}[{label_key!r}]"
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{lname}: labels must be integers, got {y.dtype}")
        if y.shape != (images.shape[0],):
            raise ValueError(f"{lname}: expected shape ({images.shape[0]},) to match the images, got {y.shape}")
        if y.min() < 0:
            raise ValueError(f"{lname}: labels must be >= 0, found {y.min()}")
        present, k = len(np.unique(y)), int(y.max()) + 1
        if k > 2 * present:
            raise ValueError(f"{lname}: expected class indices 0..K-1 with at least half of the K classes present, "
                             f"got K = max label + 1 = {k} with {present} distinct labels; renumber them "
                             f"0..{present - 1}")
        labels = torch.from_numpy(y.astype(np.int64))
    return images, labels


# -------------------------------------------------------------------------------------------- ranges

def to_model_range(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [-1, 1]: `x / 127.5 - 1` (docs/METHOD.md §1.1)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 tensor, got {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 with EDM's `clamp(x * 127.5 + 128, 0, 255)` (truncating; docs/METHOD.md §6)."""
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------ dataset + specs

class ImageDataset(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] (+ optional int64 labels [N]) served as float32 in [-1, 1].

    With `xflip=True` the dataset has 2N items and item i >= N is item i - N mirrored left-right (EDM's
    deterministic flip), so the augmentation is a function of the index and resumes exactly with the sampler.
    Items are `(image [C, H, W], label)`; label is -1 when the dataset has no labels.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, xflip: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels is not None and (labels.dtype != torch.int64 or labels.shape != images.shape[:1]):
            raise ValueError(f"labels must be int64 [{images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
        self.images, self.labels, self.xflip = images, labels, bool(xflip)

    def __len__(self) -> int:
        return len(self.images) * (2 if self.xflip else 1)

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        """Vectorised items: (images float32 [B, C, H, W], labels int64 [B] or None)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        n = len(self.images)
        if indices.numel() and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        base = indices % n
        x = to_model_range(self.images[base])
        flip = indices >= n
        x[flip] = x[flip].flip(-1)
        return x, (self.labels[base] if self.labels is not None else None)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.get_batch(torch.tensor([int(index)]))
        return x[0], (y[0] if y is not None else torch.tensor(-1))


class LoadedDataset(NamedTuple):
    images: Tensor                  # uint8 [N, C, H, W]
    labels: Tensor | None           # int64 [N]
    num_classes: int                # 0 when unlabeled
    class_names: list[str] | None


def load_dataset(spec: str, resolution: int | tuple[int, int] | None = None,
                 channels: int | None = None) -> LoadedDataset:
    """Load by spec: 'fashion-mnist' (train split), 'fashion-mnist:train', 'fashion-mnist:test',
    a path to an image folder, or a path to an .npz file. `resolution`/`channels` apply to folders only.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec must be a non-empty string, got {spec!r}")
    name, _, split = spec.partition(":")
    if name.lower() == "fashion-mnist":
        images, labels = load_fashion_mnist(split or "train")
        return LoadedDataset(images, labels, len(FASHION_MNIST_CLASSES), list(FASHION_MNIST_CLASSES))
    path = Path(spec)
    if path.suffix.lower() == ".npz":
        images, labels = load_npz(path)
        num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
        return LoadedDataset(images, labels, num_classes, None)
    if path.is_dir():
        images, labels, names = load_image_folder(path, resolution=resolution, channels=channels)
        return LoadedDataset(images, labels, len(names) if names else 0, names)
    raise FileNotFoundError(f"dataset spec {spec!r} is neither 'fashion-mnist[:train|:test]', an existing image "
                            f"folder, nor an .npz file")


# ------------------------------------------------------------------------------------------- sampler

class InfiniteBatchSampler:
    """Endless batches of indices in [0, n): each epoch is a fresh permutation, a function of (seed, epoch).

    Batches run across epoch boundaries (every batch has `batch_size` indices). The whole state is
    (epoch, position), so `load_state_dict(state_dict())` resumes the exact same stream. Use it with
    `ImageDataset.get_batch(next(sampler))`, or as a DataLoader `batch_sampler` with num_workers=0 (workers
    prefetch, which would put the saved state ahead of the consumed batches).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if not (isinstance(n, int) and n > 0):
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            if self.shuffle:
                # SeedSequence mixes (seed, epoch) so that nearby seeds give unrelated epochs.
                epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
                self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed))
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        parts, need = [], self.batch_size
        while need:
            take = min(need, self.n - self.position)
            parts.append(self._permutation(self.epoch)[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "batch_size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}")
        if not (0 <= state["position"] < self.n and state["epoch"] >= 0):
            raise ValueError(f"sampler state has epoch={state['epoch']}, position={state['position']} "
                             f"outside [0, {self.n})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
