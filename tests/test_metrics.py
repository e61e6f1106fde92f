import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aniso_fast.utils.data import to_model_range
from aniso_fast.evaluation.features import FrechetScorer
from aniso_fast.evaluation.classifier import (FashionMNISTClassifier, evaluate_classifier, load_classifier,
                                             save_classifier, train_classifier)
from aniso_fast.evaluation.metrics import (endpoint_error, feature_statistics, frechet_distance,
                                          frechet_distance_from_statistics, sliced_wasserstein)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def fd_by_eigh(mu1, s1, mu2, s2):
    """Closed form computed another way: tr (S1 S2)^(1/2) = tr (R S2 R)^(1/2) with R = S1^(1/2) (symmetric)."""
    w, q = np.linalg.eigh(s1)
    r = (q * np.sqrt(w)) @ q.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def stripes(n, seed=0):
    """An easy 10-class problem: class k is a bright band at rows 2k+4..2k+5 over noise (uint8 [n, 1, 28, 28])."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = torch.randint(0, 90, (n, 1, 28, 28), generator=g)
    for k in range(10):
        x[labels == k, :, 2 * k + 4:2 * k + 6] += 160
    return x.clamp(0, 255).to(torch.uint8), labels


# ------------------------------------------------------------------------------------ sliced Wasserstein

def test_sliced_wasserstein_basic_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 1, 4, 4))
    y = rng.standard_normal((300, 1, 4, 4))
    assert sliced_wasserstein(x, x) < 1e-12
    assert sliced_wasserstein(x, y) == pytest.approx(sliced_wasserstein(y, x), rel=1e-12)
    shifts = [0.25, 0.5, 1.0, 2.0]
    sw = [sliced_wasserstein(x, x + c) for c in shifts]
    assert all(a < b for a, b in zip(sw, sw[1:]))
    # A shift by c in every one of d coordinates projects to |<theta, c 1>|, whose RMS over the sphere is c.
    for c, value in zip(shifts, sw):
        assert value == pytest.approx(c, rel=0.15)
    assert sliced_wasserstein(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(sliced_wasserstein(x, y))
    assert sliced_wasserstein(x, y, seed=1) != sliced_wasserstein(x, y, seed=2)
    with pytest.raises(ValueError, match="features"):
        sliced_wasserstein(x, rng.standard_normal((10, 15)))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(x, y, n_projections=0)


# ------------------------------------------------------------------------------------ Frechet distance

def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(1)
    mu, s = rng.standard_normal(16), random_spd(rng, 16)
    assert abs(frechet_distance_from_statistics(mu, s, mu, s)) < 1e-9
    f = rng.standard_normal((200, 8))
    assert abs(frechet_distance(f, f)) < 1e-9


@pytest.mark.parametrize("d", [1, 5, 32])
def test_frechet_matches_closed_forms(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, scale=3.0)
    value = frechet_distance_from_statistics(mu1, s1, mu2, s2)
    assert value == pytest.approx(fd_by_eigh(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)  # diagonal: sum (sqrt a - sqrt b)^2
    diag = frechet_distance_from_statistics(mu1, np.diag(a), mu2, np.diag(b))
    assert diag == pytest.approx(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-10)


def test_frechet_matches_torchmetrics():
    fid = pytest.importorskip("torchmetrics.image.fid")
    compute = getattr(fid, "_compute_fid", None)
    if compute is None:
        pytest.skip("torchmetrics no longer exposes _compute_fid")
    rng = np.random.default_rng(5)
    fa, fb = rng.standard_normal((500, 24)), rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24)) + 0.5
    mu1, s1 = feature_statistics(fa)
    mu2, s2 = feature_statistics(fb)
    t = [torch.from_numpy(v) for v in (mu1, s1, mu2, s2)]
    assert frechet_distance(fa, fb) == pytest.approx(float(compute(*t)), rel=1e-8)


def test_feature_statistics_and_errors():
    rng = np.random.default_rng(6)
    f = rng.standard_normal((50, 7))
    mu, s = feature_statistics(torch.from_numpy(f).float())
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)
    np.testing.assert_allclose(s, torch.cov(torch.from_numpy(f).T).numpy(), atol=1e-6)
    # Fewer samples than features: singular covariances still give a finite, near-nonnegative distance.
    value = frechet_distance(rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.1)
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance_from_statistics(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance_from_statistics(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="2 samples"):
        feature_statistics(np.zeros((1, 3)))


# ------------------------------------------------------------------------------------ endpoint error

def test_endpoint_error():
    c = torch.tensor([0.5, -2.0, 1.0])
    x = c[:, None, None, None].expand(3, 2, 4, 4).float()
    err = endpoint_error(x, torch.zeros(3, 2, 4, 4))
    assert torch.allclose(err.per_sample, c.abs().double()) and err.per_sample.dtype == torch.float64
    assert err.mean == pytest.approx(7 / 6) and err.max == pytest.approx(2.0)
    x2 = torch.zeros(2, 1, 2, 2)
    x2[0, 0, 0, 0] = 2.0  # RMS over 4 entries = 1
    assert endpoint_error(x2, torch.zeros_like(x2)).per_sample.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        endpoint_error(x, torch.zeros(3, 2, 4, 5))


# ---------------------------------------------------------------------------------------- classifier

def test_classifier_shapes():
    model = FashionMNISTClassifier().eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 128)
    assert torch.equal(model(x), model.head(model.features(x)))
    assert FashionMNISTClassifier(width=8, feature_dim=32).features(x).shape == (5, 32)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        model(torch.zeros(2, 3, 28, 28))


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    images, labels = stripes(40)
    x = to_model_range(images)
    model = FashionMNISTClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_train_classifier_tiny_and_deterministic():
    images, labels = stripes(192)
    kwargs = dict(epochs=3, batch_size=16, lr=3e-3, progress=False, width=8, feature_dim=32)
    rng_state = torch.random.get_rng_state()
    a = train_classifier(images, labels, seed=0, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), rng_state), "training must not move the global RNG"
    b = train_classifier(images, labels, seed=0, **kwargs)
    c = train_classifier(images, labels, seed=1, **kwargs)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training
    test_images, test_labels = stripes(200, seed=1)
    assert evaluate_classifier(a, test_images, test_labels) > 0.8  # chance is 0.1


def test_evaluate_classifier_counts_correctly():
    model = FashionMNISTClassifier().train()
    images, _ = stripes(30)
    with torch.no_grad():
        predicted = model.eval()(to_model_range(images)).argmax(1)
    model.train()
    labels = predicted.clone()
    labels[:12] = (labels[:12] + 1) % 10
    assert evaluate_classifier(model, images, labels, batch_size=7) == pytest.approx(18 / 30)
    assert model.training, "the caller's mode is restored"
    with pytest.raises(ValueError, match="labels"):
        evaluate_classifier(model, images, labels[:5])


def test_save_load_classifier_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = FashionMNISTClassifier(width=8, feature_dim=16)
    model.train()(torch.randn(8, 1, 28, 28))  # move the BatchNorm running statistics off their defaults
    model.eval()
    path = tmp_path / "clf.safetensors"
    save_classifier(model, path, metadata={"test_accuracy": 0.9})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.json", "clf.safetensors"]  # no temp files left
    config = json.loads((tmp_path / "clf.json").read_text())
    assert config["config"] == {"width": 8, "feature_dim": 16, "num_classes": 10}
    loaded = load_classifier(path)
    assert loaded.metadata == {"test_accuracy": 0.9} and not loaded.training
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded(x), model(x))
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        load_classifier(path)
    (tmp_path / "clf.json").unlink()
    with pytest.raises(FileNotFoundError, match="clf.json"):
        load_classifier(path)
    with pytest.raises(ValueError, match="safetensors"):
        save_classifier(model, tmp_path / "clf.pt")


def test_frechet_distance_in_classifier_features():
    """The results table's scorer (features.FrechetScorer) in a classifier's features."""
    torch.manual_seed(0)
    classifier = FashionMNISTClassifier(width=8, feature_dim=32).eval()  # untrained features can compare sets
    real, _ = stripes(600, seed=0)
    fcd = FrechetScorer(lambda u8: classifier.features(to_model_range(u8)).numpy(), real[:300], id="clf",
                        batch_size=128)
    assert abs(fcd.score(real[:300])) < 1e-6
    same_distribution = fcd.score(real[300:])
    shifted = fcd.score((real[300:].int() // 2).to(torch.uint8))
    assert 0 < same_distribution < shifted
    assert fcd.score(to_model_range(real[300:])) == pytest.approx(same_distribution, rel=1e-12)
