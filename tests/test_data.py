import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aniso_fast.utils import data
from aniso_fast.utils.data import (FASHION_MNIST_CLASSES, ImageDataset, InfiniteBatchSampler, load_dataset,
                             load_fashion_mnist, load_image_folder, load_npz, read_idx, to_model_range, to_uint8)

needs_fmnist = pytest.mark.skipif(not (Path(data.FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist")

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file written independently of the parser under test (struct for the header)."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[big.dtype], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + big.tobytes()


def write(path: Path, raw: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fmnist(root: Path, n: int = 5, image_shape=(28, 28), n_labels=None, max_label=9) -> tuple:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
    labels = rng.integers(0, max_label + 1, size=n_labels or n, dtype=np.uint8)
    labels[0] = max_label
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        write(root / f"{split}-images-idx3-ubyte.gz", idx_bytes(images), True)
        write(root / f"{split}-labels-idx1-ubyte.gz", idx_bytes(labels), True)
    return images, labels


# ------------------------------------------------------------------------------------ Fashion-MNIST

@needs_fmnist
def test_fashion_mnist_real_files():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_fashion_mnist(split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) == 0 and int(y.max()) == 9
        assert torch.equal(torch.bincount(y), torch.full((10,), n // 10))  # FMNIST is balanced
        assert int(x.min()) == 0 and int(x.max()) == 255
        assert int(y[0]) == 9  # the first image of both splits is an ankle boot
    x[0] = 0
    assert load_fashion_mnist("test")[0][0].any(), "callers must get fresh tensors, not the cached arrays"


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, dtype, compress):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(np.dtype(dtype))
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(arr), compress))
    assert out.shape == (3, 4, 5) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_truncated_and_trailing(tmp_path, compress):
    raw = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    with pytest.raises(ValueError, match=r"short\.idx.*truncated"):
        read_idx(write(tmp_path / "short.idx", raw[:-1], compress))
    with pytest.raises(ValueError, match=r"long\.idx.*trailing"):
        read_idx(write(tmp_path / "long.idx", raw + b"\0", compress))
    with pytest.raises(ValueError, match=r"head\.idx.*truncated IDX header"):
        read_idx(write(tmp_path / "head.idx", raw[:9], compress))


def test_read_idx_rejects_truncated_gzip(tmp_path):
    gz = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        read_idx(write(tmp_path / "cut.gz", gz[: len(gz) // 2], False))


@pytest.mark.parametrize("header", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"\x00\x00"])
def test_read_idx_rejects_bad_magic(tmp_path, header):
    with pytest.raises(ValueError, match=r"bad\.idx"):
        read_idx(write(tmp_path / "bad.idx", header + struct.pack(">I", 1) + b"\0", False))


def test_fashion_mnist_root_and_env(tmp_path, monkeypatch):
    images, labels = write_fmnist(tmp_path / "fm")
    x, y = load_fashion_mnist("test", root=tmp_path / "fm")
    assert torch.equal(x[:, 0], torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())
    monkeypatch.setenv("ANISO_FAST_FMNIST_DIR", str(tmp_path / "fm"))
    assert load_fashion_mnist("train")[0].shape == (5, 1, 28, 28)
    monkeypatch.setenv("ANISO_FAST_FMNIST_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path / "fm")


@pytest.mark.parametrize("kwargs, match", [({"image_shape": (27, 28)}, "28, 28"), ({"n_labels": 4}, "4 labels"),
                                           ({"max_label": 10}, "0..9")])
def test_fashion_mnist_validates_contents(tmp_path, kwargs, match):
    write_fmnist(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=match):
        load_fashion_mnist("train", root=tmp_path)


# ------------------------------------------------------------------------------------ image folders

def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_flat_folder_gray(tmp_path):
    rng = np.random.default_rng(2)
    arrs = [rng.integers(0, 256, (6, 8), dtype=np.uint8) for _ in range(3)]
    for name, a in zip(["b.png", "a.png", "c.png"], arrs):
        save_png(tmp_path / name, a)
    (tmp_path / "notes.txt").write_text("not an image")
    images, labels, names = load_image_folder(tmp_path)
    assert labels is None and names is None
    assert images.shape == (3, 1, 6, 8) and images.dtype == torch.uint8
    for i, j in enumerate([1, 0, 2]):  # sorted by file name
        assert torch.equal(images[i, 0], torch.from_numpy(arrs[j]))


def test_class_subfolders_rgb(tmp_path):
    rng = np.random.default_rng(3)
    files = {"dog/x.png": 1, "cat/y.png": 0, "cat/deeper/z.png": 0, "dog/w.png": 1}
    arrs = {f: rng.integers(0, 256, (5, 5, 3), dtype=np.uint8) for f in files}
    for f, a in arrs.items():
        save_png(tmp_path / f, a)
    (tmp_path / "dataset.json").write_text("{}")
    images, labels, names = load_image_folder(tmp_path)
    assert names == ["cat", "dog"]
    assert images.shape == (4, 3, 5, 5)
    order = ["cat/deeper/z.png", "cat/y.png", "dog/w.png", "dog/x.png"]
    assert labels.tolist() == [files[f] for f in order]
    for i, f in enumerate(order):
        assert torch.equal(images[i], torch.from_numpy(arrs[f]).permute(2, 0, 1))
    gray, _, _ = load_image_folder(tmp_path, channels=1)
    assert gray.shape == (4, 1, 5, 5)


def test_folder_sizes_and_resolution(tmp_path):
    save_png(tmp_path / "a.png", np.full((6, 6), 200, np.uint8))
    save_png(tmp_path / "b.png", np.full((8, 10), 200, np.uint8))
    with pytest.raises(ValueError, match=r"b\.png.*resolution"):
        load_image_folder(tmp_path)
    images, _, _ = load_image_folder(tmp_path, resolution=4)
    assert images.shape == (2, 1, 4, 4) and (images == 200).all()
    images, _, _ = load_image_folder(tmp_path, resolution=(3, 5), channels=3)
    assert images.shape == (2, 3, 3, 5)
    with pytest.raises(ValueError, match="resolution"):
        load_image_folder(tmp_path, resolution=0)
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, channels=2)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    save_png(tmp_path / "bad" / "ok.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_image_folder(tmp_path / "bad")
    save_png(tmp_path / "mixed" / "top.png", np.zeros((4, 4), np.uint8))
    save_png(tmp_path / "mixed" / "cls" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="mixes"):
        load_image_folder(tmp_path / "mixed")
    save_png(tmp_path / "cls" / "a" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "cls" / "b").mkdir()
    with pytest.raises(ValueError, match=r"class subfolder .*b .*no images"):
        load_image_folder(tmp_path / "cls")


# ------------------------------------------------------------------------------------------------ npz

@pytest.fixture
def u8():
    return np.random.default_rng(4).integers(0, 256, (5, 3, 6, 7), dtype=np.uint8)  # NCHW


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("keys", [("images", "labels"), ("x", "y")])
def test_npz_layouts(tmp_path, u8, layout, keys):
    arr = u8 if layout == "NCHW" else u8.transpose(0, 2, 3, 1)
    labels = np.array([0, 2, 1, 2, 0], dtype=np.int32)
    np.savez(tmp_path / "d.npz", **{keys[0]: arr, keys[1]: labels})
    images, y = load_npz(tmp_path / "d.npz")
    assert torch.equal(images, torch.from_numpy(u8)) and y.dtype == torch.int64 and y.tolist() == labels.tolist()


def test_npz_gray_int_and_float(tmp_path, u8):
    gray = u8[:, 0]
    for name, arr in [("nhw", gray), ("nchw1", gray[:, None]), ("nhwc1", gray[..., None]),
                      ("int64", gray.astype(np.int64)), ("float", to_model_range(torch.from_numpy(gray)).numpy())]:
        np.savez(tmp_path / f"{name}.npz", images=arr)
        images, labels = load_npz(tmp_path / f"{name}.npz")
        assert labels is None
        assert torch.equal(images, torch.from_numpy(gray)[:, None]), name


@pytest.mark.parametrize("arrays, match", [
    ({"pixels": np.zeros((2, 4, 4), np.uint8)}, "'images' or 'x'.*pixels"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "x": np.zeros((2, 4, 4), np.uint8)}, "both"),
    ({"images": np.full((2, 4, 4), 1.5, np.float32)}, r"\['images'\].*\[-1, 1\]"),
    ({"x": np.full((2, 4, 4), np.nan, np.float32)}, r"\['x'\].*NaN"),
    ({"images": np.full((2, 4, 4), 300, np.int32)}, r"\['images'\].*0\.\.255"),
    ({"images": np.zeros((2, 4, 4), bool)}, r"\['images'\].*bool"),
    ({"images": np.zeros((2, 5, 5, 5), np.uint8)}, r"\['images'\].*channel"),
    ({"images": np.zeros((2, 1, 4, 4, 1), np.uint8)}, r"\['images'\].*shape"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.float32)}, r"\['labels'\].*integers"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, r"\['y'\].*\(2,\)"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, -1])}, r"\['labels'\].*>= 0"),
    # issue 10, defect 3: a stray large label made a 1,000,001-class data set
    ({"images": np.zeros((4, 4, 4), np.uint8), "labels": np.array([0, 1, 2, 1_000_000])},
     r"\['labels'\]: expected class indices 0\.\.K-1 .*K = max label \+ 1 = 1000001 with 4 distinct"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 5], np.uint8)}, r"\['y'\].*K = .* = 6 with 2"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([2 ** 64 - 1, 0], np.uint64)}, r"0\.\.K-1"),
])
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz(tmp_path / "bad.npz")


def test_npz_unreadable(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 nonsense")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        load_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match=r"obj\.npz"):
        load_npz(tmp_path / "obj.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------- ranges

def test_range_conversions():
    u = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(u)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(to_uint8(x), u) and torch.equal(to_uint8(x.double()), u) and torch.equal(to_uint8(x.half()), u)
    y = torch.linspace(-1.3, 1.3, 1001, dtype=torch.float64)
    expected = np.clip(y.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)  # EDM's formula, in numpy
    assert torch.equal(to_uint8(y), torch.from_numpy(expected))
    assert to_uint8(torch.tensor([-5.0]))[0] == 0 and to_uint8(torch.tensor([5.0]))[0] == 255
    with pytest.raises(TypeError):
        to_model_range(x)
    with pytest.raises(TypeError):
        to_uint8(u)


# --------------------------------------------------------------------------------- dataset + specs

def test_image_dataset_xflip_and_labels():
    images = torch.randint(0, 256, (4, 1, 3, 5), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 0, 2])
    ds = ImageDataset(images, labels, xflip=True)
    assert len(ds) == 8
    x, y = ds[1]
    assert torch.equal(x, to_model_range(images[1])) and int(y) == 1
    x, y = ds[5]
    assert torch.equal(x, to_model_range(images[1]).flip(-1)) and int(y) == 1
    bx, by = ds.get_batch(torch.tensor([5, 0, 7]))
    assert torch.equal(bx, torch.stack([ds[i][0] for i in (5, 0, 7)])) and by.tolist() == [1, 3, 2]
    plain = ImageDataset(images)
    assert len(plain) == 4 and int(plain[2][1]) == -1 and plain.get_batch(torch.tensor([0]))[1] is None
    with pytest.raises(IndexError):
        plain.get_batch(torch.tensor([4]))
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images.float())
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(images, labels[:3])


def test_load_dataset_specs(tmp_path, monkeypatch):
    write_fmnist(tmp_path / "fm", n=6)
    monkeypatch.setenv("ANISO_FAST_FMNIST_DIR", str(tmp_path / "fm"))
    d = load_dataset("fashion-mnist:test")
    assert d.images.shape == (6, 1, 28, 28) and d.num_classes == 10 and d.class_names == FASHION_MNIST_CLASSES
    np.savez(tmp_path / "s.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 4, 1]))
    d = load_dataset(str(tmp_path / "s.npz"))
    assert d.images.shape == (3, 1, 4, 4) and d.num_classes == 5 and d.class_names is None
    save_png(tmp_path / "f" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    save_png(tmp_path / "f" / "b" / "0.png", np.zeros((4, 4), np.uint8))
    images, labels, num_classes, names = load_dataset(str(tmp_path / "f"), resolution=2)
    assert images.shape == (2, 1, 2, 2) and num_classes == 2 and names == ["a", "b"]
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="split"):
        load_dataset("fashion-mnist:val")


# --------------------------------------------------------------------------------------------- sampler

def stream(sampler, n_batches):
    return [next(sampler) for _ in range(n_batches)]


def test_sampler_epochs_are_permutations():
    s = InfiniteBatchSampler(10, 4, seed=7)
    flat = torch.cat(stream(s, 15))  # 60 indices = 6 epochs, batches straddle epoch ends
    epochs = flat.view(6, 10)
    assert all(torch.equal(e.sort().values, torch.arange(10)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) == 6
    assert all(b.shape == (4,) and b.dtype == torch.int64 for b in stream(s, 3))
    same = torch.cat(stream(InfiniteBatchSampler(10, 4, seed=7), 15))
    other = torch.cat(stream(InfiniteBatchSampler(10, 4, seed=8), 15))
    assert torch.equal(flat, same) and not torch.equal(flat, other)
    assert torch.equal(torch.cat(stream(InfiniteBatchSampler(10, 5, shuffle=False), 2)), torch.arange(10))


@pytest.mark.parametrize("k", [1, 7, 12])
def test_sampler_resume_is_bit_identical(k):
    a = InfiniteBatchSampler(37, 8, seed=3)
    stream(a, k)
    state = json.loads(json.dumps(a.state_dict()))  # plain data, survives a checkpoint file
    assert state["position"] != 0
    expected = stream(a, 20)
    b = InfiniteBatchSampler(37, 8, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(stream(b, 20), expected))
    with pytest.raises(ValueError, match="seed"):
        InfiniteBatchSampler(37, 8, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        InfiniteBatchSampler(37, 9, seed=3).load_state_dict(state)


def test_sampler_as_dataloader_batch_sampler():
    ds = ImageDataset(torch.randint(0, 256, (6, 1, 2, 2), dtype=torch.uint8), torch.arange(6), xflip=True)
    sampler = InfiniteBatchSampler(len(ds), 5, seed=0)
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler))
    ref = InfiniteBatchSampler(len(ds), 5, seed=0)
    for _ in range(4):
        x, y = next(loader)
        ex, ey = ds.get_batch(next(ref))
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert sampler.state_dict() == ref.state_dict()
