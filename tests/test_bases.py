"""Bases: orthonormality, projector identities, agreement with dense matrix functions, bad input."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from aniso_fast.geometry.bases import DCTBasis, IsotropicBasis, PCABasis, basis_from_config, cluster_classes, dct_matrix

f64 = torch.float64


@pytest.mark.parametrize("n", [8, 28, 32, 64, 20])
def test_dct_matrix_orthonormal(n):
    C = dct_matrix(n)
    assert torch.allclose(C @ C.T, torch.eye(n, dtype=f64), atol=1e-13)
    # METHOD §7.1: alpha_0 = sqrt(1/d), alpha_{>0} = sqrt(2/d), x is the spatial index
    assert math.isclose(C[0, 3].item(), math.sqrt(1 / n), rel_tol=1e-12)
    assert math.isclose(C[2, 1].item(), math.sqrt(2 / n) * math.cos(3 * 2 * math.pi / (2 * n)), rel_tol=1e-12)


def _dense_projectors(basis, C, group=0):
    return [basis.projector_matrix(k, C, group) for k in range(basis.num_subspaces)]


def _check_projectors(Ps, dims):
    n = Ps[0].shape[0]
    assert torch.allclose(sum(Ps), torch.eye(n, dtype=f64), atol=1e-12)
    for P, dim in zip(Ps, dims):
        assert torch.allclose(P @ P, P, atol=1e-12)
        assert torch.allclose(P, P.T, atol=1e-12)
        assert round(torch.trace(P).item()) == dim
    for i in range(len(Ps)):
        for j in range(i + 1, len(Ps)):
            assert (Ps[i] @ Ps[j]).abs().max() < 1e-12


@pytest.mark.parametrize("H,W,bands,C", [(8, 8, (3,), 1), (12, 20, (3, 7), 2), (6, 10, (2, 5, 8), 1), (10, 7, (4,), 3)])
def test_dct_projector_identities(H, W, bands, C):
    b = DCTBasis(H, W, bands)
    Ps = _dense_projectors(b, C)
    _check_projectors(Ps, b.subspace_dims(C))
    # subspace 0 is the square low-frequency block max(u, v) < b_1 (METHOD §7.1)
    assert b.subspace_dims(C)[0] == C * min(bands[0], H) * min(bands[0], W)


def test_paper_cifar_dct_block():
    b = DCTBasis(32, 32, bands=16)
    assert b.num_subspaces == 2
    assert b.subspace_dims(3) == [768, 3072 - 768]  # METHOD §7.1: rank of P = 768 of 3072
    assert b.band.shape == (16, 16)  # the kernels only touch the 16x16 block


def _random_scalars(B, K, gen):
    return torch.rand(B, K, generator=gen, dtype=f64) * 3 - 1


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 4), C=st.integers(1, 3), H=st.integers(4, 12), W=st.integers(4, 12),
       nb=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_dct_combine_and_dot_equal_dense(B, C, H, W, nb, seed):
    gen = torch.Generator().manual_seed(seed)
    edges = sorted(set(int(e) for e in torch.randint(1, max(H, W), (nb,), generator=gen)))
    b = DCTBasis(H, W, edges)
    K = b.num_subspaces
    Ps = _dense_projectors(b, C)
    u, v, base = (torch.randn(B, C, H, W, generator=gen, dtype=f64) for _ in range(3))
    a, c = _random_scalars(B, K, gen), _random_scalars(B, K, gen)
    y = b.combine(u, a, v, c, base)
    for i in range(B):
        dense = sum(a[i, k] * Ps[k] for k in range(K)) @ u[i].flatten() + \
            sum(c[i, k] * Ps[k] for k in range(K)) @ v[i].flatten() + base[i].flatten()
        assert torch.allclose(y[i].flatten(), dense, atol=1e-11)
        d = b.dot(u, v)[i]
        assert torch.allclose(d, torch.stack([u[i].flatten() @ P @ v[i].flatten() for P in Ps]), atol=1e-10)


def test_matrix_functions_through_scale():
    """M^p, (M + cI)^p and M^{1/2} eps through one scale equal the dense matrix functions (float64)."""
    gen = torch.Generator().manual_seed(0)
    b = DCTBasis(6, 6, (2, 4))
    Ps = _dense_projectors(b, 1)
    g = torch.rand(1, 3, generator=gen, dtype=f64) * 5 + 0.1
    M = sum(g[0, k] * Ps[k] for k in range(3))
    evals, evecs = torch.linalg.eigh(M)
    x = torch.randn(1, 1, 6, 6, generator=gen, dtype=f64)
    for p, c in [(0.5, 0.0), (-0.5, 0.25), (-1.0, 0.25), (2.0, 0.0)]:
        dense = evecs @ torch.diag((evals + c) ** p) @ evecs.T
        got = b.scale(x, (g + c) ** p).flatten()
        assert torch.allclose(got, dense @ x.flatten(), atol=1e-10), (p, c)


def _images(N, C, H, W, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # correlated images so PCA has structure
    basis = torch.randn(5, C, H, W, generator=gen)
    return (torch.randn(N, 5, generator=gen) @ basis.flatten(1)).reshape(N, C, H, W) + 0.1 * torch.randn(
        N, C, H, W, generator=gen)


@pytest.mark.parametrize("per", ["global", "class", "cluster"])
@pytest.mark.parametrize("joint", [False, True])
def test_pca_fit_orthonormal_and_projectors(per, joint):
    imgs = _images(400, 2, 5, 6)
    labels = torch.arange(400) % 4
    b = PCABasis.fit(imgs, labels, rank=7, per=per, num_clusters=2, band_sizes=(3, 4), joint=joint)
    G = {"global": 1, "class": 4, "cluster": 2}[per]
    assert b.num_groups == G
    V = b.V64
    assert torch.allclose(V @ V.transpose(1, 2), torch.eye(7, dtype=f64).expand(G, -1, -1), atol=1e-12)
    for group in range(G):
        _check_projectors(_dense_projectors(b, 2, group), b.subspace_dims(2))


def test_pca_first_direction_is_top_principal_component():
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(1, 1, 4, 4, generator=gen, dtype=f64)
    direction /= direction.norm()
    imgs = 3 * torch.randn(500, 1, 1, 1, generator=gen, dtype=f64) * direction + 0.05 * torch.randn(
        500, 1, 4, 4, generator=gen, dtype=f64)
    b = PCABasis.fit(imgs, rank=2)
    assert abs(float(b.V64[0, 0] @ direction.flatten())) > 0.999


def test_per_sample_ids_one_call_equals_per_group():
    imgs = _images(300, 1, 4, 4)
    labels = torch.arange(300) % 3
    b = PCABasis.fit(imgs, labels, rank=5, per="class")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 4, 4, generator=gen, dtype=f64)
    lab = torch.tensor([2, 0, 1, 1, 0, 2])
    s = _random_scalars(6, 2, gen)
    ids = b.group_ids(lab)
    mixed = b.scale(x, s, ids=ids)
    for i in range(6):
        single = PCABasis(b.V64[lab[i]], (1, 4, 4)).scale(x[i:i + 1], s[i:i + 1])
        assert torch.allclose(mixed[i], single[0], atol=1e-12)


def test_cluster_classes_groups_identical_subspaces():
    gen = torch.Generator().manual_seed(0)
    A = torch.linalg.qr(torch.randn(20, 3, generator=gen, dtype=f64))[0].T
    B = torch.linalg.qr(torch.randn(20, 3, generator=gen, dtype=f64))[0].T
    assign = cluster_classes([A, B, A.clone(), B.clone(), A.clone()], 2)
    assert assign.tolist() == [0, 1, 0, 1, 0]


def test_isotropic_basis():
    b = IsotropicBasis((4, 4))
    x = torch.randn(3, 2, 4, 4, dtype=f64)
    s = torch.tensor([[2.0], [3.0], [0.5]], dtype=f64)
    assert torch.allclose(b.scale(x, s), s[:, :, None, None] * x)
    assert torch.allclose(b.sqnorms(x)[:, 0], x.flatten(1).pow(2).sum(1))


def test_regroup_and_config_roundtrip():
    b = DCTBasis(12, 12, (2, 5, 9))
    assert b.regroup([0, 0, 1, 1]).bands == [5]
    assert basis_from_config(b.config()).bands == b.bands
    imgs = _images(200, 1, 4, 4)
    p = PCABasis.fit(imgs, torch.arange(200) % 2, rank=6, per="class", band_sizes=(2, 4))
    q = basis_from_config(p.config(), p.state_dict())
    assert torch.equal(q.V64, p.V64) and q.band_sizes == p.band_sizes
    assert p.regroup([0, 1, 1]).band_sizes == [2]


def test_bad_inputs():
    b = DCTBasis(8, 8, (3,))
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="image size"):
        b.scale(torch.randn(2, 1, 8, 9), torch.ones(2, 2))
    # scale(x, s) names its own arguments, not combine's internal u / a (issue 10, defect 9)
    with pytest.raises(ValueError, match="^s: expected"):
        b.scale(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="^s: expected"):
        b.scale(x, torch.ones(3, 2))
    with pytest.raises(ValueError, match="^x: expected"):
        b.scale(torch.randn(2, 8, 8), torch.ones(2, 2))
    with pytest.raises(ValueError, match="^x: expected"):
        b.sqnorms(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="^a: expected"):
        b.combine(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="v and c"):
        b.combine(x, torch.ones(2, 2), v=x)
    with pytest.raises(ValueError, match="base"):
        b.combine(x, torch.ones(2, 2), base=torch.randn(2, 1, 8, 7))
    with pytest.raises(ValueError, match="u: expected"):
        b.combine(torch.randn(2, 8, 8), torch.ones(2, 2))
    with pytest.raises(ValueError, match="bands"):
        DCTBasis(8, 8, (3, 3))
    with pytest.raises(ValueError, match="bands"):
        DCTBasis(8, 8, (8,))
    with pytest.raises(ValueError, match="bands"):
        DCTBasis(8, 8, (0, 3))
    with pytest.raises(ValueError, match="V: the basis dimension"):
        PCABasis(torch.linalg.qr(torch.randn(10, 3))[0].T, (1, 4, 4))
    with pytest.raises(ValueError, match="orthonormal"):
        PCABasis(torch.randn(3, 16), (1, 4, 4))
    with pytest.raises(ValueError, match="band_sizes"):
        PCABasis(torch.linalg.qr(torch.randn(16, 3))[0].T, (1, 4, 4), band_sizes=(1, 1))
    with pytest.raises(ValueError, match="rank"):
        PCABasis.fit(torch.randn(3, 1, 4, 4), rank=5)
    p = PCABasis.fit(_images(100, 1, 4, 4), torch.arange(100) % 2, rank=3, per="class")
    with pytest.raises(ValueError, match="labels"):
        p.group_ids(None)
    with pytest.raises(ValueError, match="ids"):
        p.scale(torch.randn(2, 1, 4, 4), torch.ones(2, 2))
    with pytest.raises(ValueError, match="per"):
        PCABasis.fit(_images(100, 1, 4, 4), rank=3, per="bogus")
    bad = _images(50, 1, 4, 4)
    bad[3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="images: contains NaN"):
        PCABasis.fit(bad, rank=3)
    with pytest.raises(ValueError, match="cfg"):
        basis_from_config({"type": "wavelet"})


@pytest.mark.parametrize("bad", [-1, 2, 99])
def test_group_ids_refuse_labels_out_of_range(bad):
    """issue 10, defect 5: a negative label used to wrap to the last class, a large one raised a bare IndexError."""
    p = PCABasis.fit(_images(100, 1, 4, 4), torch.arange(100) % 2, rank=3, per="class")
    with pytest.raises(ValueError, match="^labels: expected class labels in \\[0, 2\\)"):
        p.group_ids(torch.tensor([0, bad]))
    with pytest.raises(ValueError, match="^labels"):
        p.group_ids(torch.tensor([0.0, 1.0]))
    assert p.group_ids(torch.tensor([1, 0])).tolist() == [1, 0]
