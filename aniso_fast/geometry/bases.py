"""Subspace bases: orthogonal partitions P_0..P_{K-1} of image space (METHOD §1.2-1.3, §7).

Every basis exposes the same two operations, both routed through `aniso_fast.ops` (the fused kernels):

    combine(u, a, v, c, base) = base + sum_k P_k (a[:, k] u + c[:, k] v)     a, c: [B, K]
    dot(u, v)[b, k]           = <P_k u_b, v_b>

and every matrix function of M = sum_k g_k P_k is one `combine` (e.g. `M^{1/2} eps = combine(eps, g.sqrt())`).
The last subspace K-1 is always the orthogonal complement of the others (docs/DESIGN.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import ops
from ..utils.checks import check_index
from ..ops.reference import compute_dtype


def _compute_dtype(u) -> torch.dtype | None:
    return compute_dtype(u.dtype) if isinstance(u, Tensor) else None  # not a tensor: ops reports it

__all__ = [
    "SubspaceBasis",
    "IsotropicBasis",
    "DCTBasis",
    "PCABasis",
    "dct_matrix",
    "basis_from_config",
]


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal DCT-II matrix C[u, x] = alpha_u cos((2x+1) u pi / (2n)) (METHOD §7.1)."""
    x = torch.arange(n, dtype=torch.float64)
    u = x[:, None]
    C = torch.cos((2 * x[None, :] + 1) * u * math.pi / (2 * n)) * math.sqrt(2.0 / n)
    C[0] = math.sqrt(1.0 / n)
    return C.to(dtype)


class SubspaceBasis(nn.Module):
    """Common interface. Subclasses set `num_subspaces` and implement `_combine`, `_dot`, `subspace_dims`."""

    num_subspaces: int
    image_size: tuple[int, int] | None = None  # (H, W) the basis is built for; None = any

    # ---- validation: only what is basis-specific (image size, K); `ops` checks shapes, dtypes and devices ----
    def _check_fit(self, x, s, names: dict[str, str]) -> None:
        if isinstance(x, Tensor) and x.dim() == 4 and self.image_size is not None \
                and tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"{names['u']}: image size {tuple(x.shape[-2:])} does not match the basis "
                             f"({self.image_size[0]}x{self.image_size[1]})")
        if isinstance(s, Tensor) and s.dim() == 2 and s.shape[1] != self.num_subspaces:
            raise ValueError(f"{names['a']}: expected one scalar per subspace, shape [B, {self.num_subspaces}], "
                             f"got {tuple(s.shape)}")

    def combine(self, u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                base: Tensor | None = None, *, ids: Tensor | None = None, backend: str | None = None,
                names: dict[str, str] | None = None) -> Tensor:
        """base + sum_k P_k (a[:, k] u + c[:, k] v). `names`: the caller's argument names for error messages."""
        names = {"u": "u", "a": "a", "v": "v", "c": "c", "base": "base", **(names or {})}
        self._check_fit(u, a, names)
        if c is not None:
            self._check_fit(None, c, {**names, "a": names["c"]})
        return self._combine(u, a, v, c, base, ids, backend, names)

    def block_combine(self, x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                      base_v: Tensor | None = None, *, ids: Tensor | None = None,
                      backend: str | None = None) -> tuple[Tensor, Tensor]:
        """(x', v') = base + sum_k P_k (B[:, k] [x; v]) with B [B, K, 2, 2]: one 2x2 block per sample and subspace
        on the phase-space pair (x, v) (docs/DESIGN.md, op 3)."""
        self._check_fit(x, None, {"u": "x"})
        if isinstance(B, Tensor) and B.dim() == 4 and B.shape[1] != self.num_subspaces:
            raise ValueError(f"B: expected one 2x2 block per subspace, shape [B, {self.num_subspaces}, 2, 2], "
                             f"got {tuple(B.shape)}")
        return self._block_combine(x, v, B, base_x, base_v, ids, backend)

    def scale(self, x: Tensor, s: Tensor, *, ids: Tensor | None = None, backend: str | None = None) -> Tensor:
        """sum_k s[:, k] P_k x."""
        return self.combine(x, s, ids=ids, backend=backend, names={"u": "x", "a": "s"})

    def dot(self, u: Tensor, v: Tensor, *, ids: Tensor | None = None, backend: str | None = None) -> Tensor:
        """[B, K]: <P_k u, v>."""
        names = {"u": "u", "v": "v"}
        self._check_fit(u, None, names)
        return self._dot(u, v, ids, backend, names)

    def sqnorms(self, x: Tensor, *, ids: Tensor | None = None, backend: str | None = None) -> Tensor:
        """[B, K]: ||P_k x||^2."""
        self._check_fit(x, None, {"u": "x"})
        return self._dot(x, x, ids, backend, {"u": "x", "v": "x"})

    def project(self, x: Tensor, k: int, *, ids: Tensor | None = None) -> Tensor:
        """P_k x (convenience; one combine with one-hot scalars)."""
        if not 0 <= k < self.num_subspaces:
            raise ValueError(f"k: expected a subspace index in [0, {self.num_subspaces}), got {k}")
        s = torch.zeros(x.shape[0], self.num_subspaces, dtype=torch.float64, device=x.device)
        s[:, k] = 1
        return self.scale(x, s, ids=ids)

    # ---- class-conditional bases ----
    @property
    def num_groups(self) -> int:
        return 1

    def group_ids(self, labels: Tensor | None) -> Tensor | None:
        """Per-sample basis ids for class labels (None for a basis shared by all classes)."""
        return None

    # ---- dense matrices for tests on small sizes ----
    def projector_matrix(self, k: int, channels: int, group: int = 0) -> Tensor:
        """The dense [n, n] float64 matrix of P_k for images [channels, H, W] (small sizes only)."""
        H, W = self.image_size if self.image_size is not None else (1, 1)
        n = channels * H * W
        eye = torch.eye(n, dtype=torch.float64).reshape(n, channels, H, W)
        s = torch.zeros(n, self.num_subspaces, dtype=torch.float64)
        s[:, k] = 1
        ids = torch.full((n,), group, dtype=torch.long) if self.num_groups > 1 else None
        return self.scale(eye, s, ids=ids, backend="reference").reshape(n, n).T

    def subspace_dims(self, channels: int) -> list[int]:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def _combine(self, u, a, v, c, base, ids, backend, names):
        raise NotImplementedError

    def _dot(self, u, v, ids, backend, names):
        raise NotImplementedError

    def _block_combine(self, x, v, B, base_x, base_v, ids, backend):
        raise NotImplementedError


class IsotropicBasis(SubspaceBasis):
    """K = 1: P_0 = I (the degenerate case; isotropic EDM)."""

    num_subspaces = 1

    def __init__(self, image_size: tuple[int, int] | None = None):
        super().__init__()
        self.image_size = tuple(image_size) if image_size is not None else None

    def _combine(self, u, a, v, c, base, ids, backend, names):
        return ops.isotropic_combine(u, a, v, c, base, names=names)

    def _dot(self, u, v, ids, backend, names):
        return ops.isotropic_dot(u, v, names=names)

    def _block_combine(self, x, v, B, base_x, base_v, ids, backend):
        return ops.isotropic_block_combine(x, v, B, base_x, base_v)

    def subspace_dims(self, channels: int) -> list[int]:
        H, W = self.image_size if self.image_size is not None else (0, 0)
        return [channels * H * W]

    def config(self) -> dict:
        return {"type": "isotropic", "image_size": list(self.image_size) if self.image_size else None}


def _check_parent(parent: Sequence[int], K: int) -> list[int]:
    parent = [int(p) for p in parent]
    if len(parent) != K or parent[0] != 0 or any(q - p not in (0, 1) for p, q in zip(parent, parent[1:])):
        raise ValueError(f"parent: expected a non-decreasing map of the {K} subspaces onto 0..K'-1 in steps of "
                         f"0 or 1, got {parent}")
    return parent


def _parse_bands(bands, name: str) -> list[int]:
    if isinstance(bands, (int, np.integer)):
        bands = [int(bands)]
    bands = [int(b) for b in bands]
    if not bands or any(b2 <= b1 for b1, b2 in zip(bands, bands[1:])) or bands[0] < 1:
        raise ValueError(f"{name}: expected strictly increasing positive integers, got {bands}")
    return bands


class DCTBasis(SubspaceBasis):
    """Orthonormal 2-D DCT-II per channel, partitioned by frequency (METHOD §7.1).

    `bands=(b_1, ..., b_{K-1})`: subspace k holds the frequencies (u, v) with b_k <= max(u, v) < b_{k+1}
    (b_0 = 0); the last subspace holds max(u, v) >= b_{K-1}. `bands=16` on 32x32 is the paper's CIFAR basis
    (k = 256 low frequencies in a square block, and the complement).
    """

    def __init__(self, height: int, width: int | None = None, bands: int | Sequence[int] = 16):
        super().__init__()
        width = height if width is None else width
        if height < 2 or width < 2:
            raise ValueError(f"height, width: expected at least 2x2 images, got {height}x{width}")
        self.bands = _parse_bands(bands, "bands")
        if self.bands[-1] >= max(height, width):
            raise ValueError(f"bands: the last band edge {self.bands[-1]} must be below max(height, width) = "
                             f"{max(height, width)} so that every subspace is non-empty")
        self.image_size = (height, width)
        self.num_subspaces = len(self.bands) + 1
        u = torch.arange(height)[:, None].expand(height, width)
        v = torch.arange(width)[None, :].expand(height, width)
        freq = torch.maximum(u, v)
        full_band = torch.bucketize(freq, torch.tensor(self.bands), right=True)  # number of edges <= max(u, v)
        # kernels only touch the box of frequencies below the last edge: the rest is the complement
        h, w = min(height, self.bands[-1]), min(width, self.bands[-1])
        CH, CW = dct_matrix(height), dct_matrix(width)
        self.register_buffer("full_band", full_band, persistent=False)
        self.register_buffer("band", full_band[:h, :w].contiguous(), persistent=False)
        self.register_buffer("CH64", CH[:h].contiguous(), persistent=False)
        self.register_buffer("CW64", CW[:w].contiguous(), persistent=False)
        self.register_buffer("CH32", CH[:h].float().contiguous(), persistent=False)
        self.register_buffer("CW32", CW[:w].float().contiguous(), persistent=False)

    def _mats(self, u):
        """The basis copy in u's compute dtype (no cast per call)."""
        return (self.CH64, self.CW64) if _compute_dtype(u) == torch.float64 else (self.CH32, self.CW32)

    def _combine(self, u, a, v, c, base, ids, backend, names):
        CH, CW = self._mats(u)
        return ops.separable_combine(u, a, v, c, base, CH=CH, CW=CW, band=self.band, backend=backend, names=names)

    def _dot(self, u, v, ids, backend, names):
        CH, CW = self._mats(u)
        return ops.separable_dot(u, v, CH=CH, CW=CW, band=self.band, K=self.num_subspaces, backend=backend,
                                 names=names)

    def _block_combine(self, x, v, B, base_x, base_v, ids, backend):
        CH, CW = self._mats(x)
        return ops.separable_block_combine(x, v, B, base_x, base_v, CH=CH, CW=CW, band=self.band, backend=backend)

    def subspace_dims(self, channels: int) -> list[int]:
        counts = torch.bincount(self.full_band.flatten(), minlength=self.num_subspaces)
        return [channels * int(n) for n in counts]

    def regroup(self, parent: Sequence[int]) -> "DCTBasis":
        """A coarser basis: subspace k of this one becomes subspace parent[k] (contiguous, in order)."""
        parent = _check_parent(parent, self.num_subspaces)
        edges = [b for k, b in enumerate(self.bands) if parent[k + 1] > parent[k]]
        return DCTBasis(*self.image_size, bands=edges)

    def config(self) -> dict:
        return {"type": "dct", "height": self.image_size[0], "width": self.image_size[1], "bands": self.bands}


class PCABasis(SubspaceBasis):
    """Principal subspaces fitted from data (METHOD §7.2-7.4), optionally one basis per class or per cluster.

    `V [G, r, d]`: G groups of r orthonormal directions; d = H*W (spatial basis, applied per channel, the
    paper's choice) or C*H*W (one basis over all channels). `band_sizes` splits the r directions into K-1
    bands (default: one band); the last subspace is the complement. `class_to_group [num_classes]` maps class
    labels to basis groups (identity for per-class bases, cluster ids for per-cluster bases).
    """

    def __init__(self, V: Tensor, image_shape: Sequence[int], band_sizes: Sequence[int] | None = None,
                 class_to_group: Tensor | None = None):
        super().__init__()
        if V.dim() == 2:
            V = V[None]
        if V.dim() != 3 or not V.is_floating_point():
            raise ValueError(f"V: expected a floating tensor [G, r, d], got {tuple(V.shape)}")
        C, H, W = (int(s) for s in image_shape)
        G, r, d = V.shape
        if d not in (H * W, C * H * W):
            raise ValueError(f"V: the basis dimension d = {d} matches neither H*W = {H * W} (spatial) nor "
                             f"C*H*W = {C * H * W} (joint) for image_shape {(C, H, W)}")
        if not 1 <= r < d:
            raise ValueError(f"V: expected 1 <= rank r < d = {d} so that the complement is non-empty, got r = {r}")
        band_sizes = [r] if band_sizes is None else [int(b) for b in band_sizes]
        if any(b < 1 for b in band_sizes) or sum(band_sizes) != r:
            raise ValueError(f"band_sizes: expected positive sizes summing to the rank {r}, got {band_sizes}")
        if class_to_group is not None:
            class_to_group = torch.as_tensor(class_to_group, dtype=torch.long)
            if class_to_group.dim() != 1 or class_to_group.min() < 0 or class_to_group.max() >= G:
                raise ValueError(f"class_to_group: expected a 1-D map of classes to group ids in [0, {G})")
        elif G > 1:
            raise ValueError(f"class_to_group: required when V has {G} groups")
        V64 = V.to(torch.float64)
        if not bool(torch.isfinite(V64).all()):
            raise ValueError("V: contains NaN or infinite values")
        err = (V64 @ V64.transpose(1, 2) - torch.eye(r, dtype=torch.float64)).abs().max()
        if err > 1e-6:
            raise ValueError(f"V: rows must be orthonormal within each group (max |V V^T - I| = {float(err):.2e})")
        self.image_size = (H, W)
        self.channels = C
        self.joint = d == C * H * W and C > 1
        self.band_sizes = band_sizes
        self.num_subspaces = len(band_sizes) + 1
        vband = torch.repeat_interleave(torch.arange(len(band_sizes)), torch.tensor(band_sizes))
        self.register_buffer("V64", V64.contiguous())
        self.register_buffer("V32", V64.float().contiguous(), persistent=False)
        self.register_buffer("vband", vband, persistent=False)
        self.register_buffer("class_to_group", class_to_group if class_to_group is not None
                             else torch.zeros(0, dtype=torch.long))

    @property
    def num_groups(self) -> int:
        return self.V64.shape[0]

    @property
    def num_classes(self) -> int | None:
        return self.class_to_group.numel() or None

    def group_ids(self, labels: Tensor | None) -> Tensor | None:
        if self.num_groups == 1:
            return None
        if labels is None:
            raise ValueError("labels: required for a class-conditional PCA basis (one basis per class or cluster)")
        return self.class_to_group[check_index("labels", labels, self.class_to_group.numel(), "class labels")]

    def _check_fit(self, x, s, names):
        super()._check_fit(x, s, names)
        if self.joint and isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] != self.channels:
            raise ValueError(f"{names['u']}: a joint PCA basis over {self.channels} channels got {x.shape[1]} "
                             f"channels")

    def _resolve_ids(self, ids):
        if self.num_groups == 1:
            return None
        if ids is None:
            raise ValueError("ids: this PCA basis has one group per class/cluster; pass ids=basis.group_ids(labels)")
        return ids

    def _V(self, u):
        """The basis copy in u's compute dtype (no cast per call)."""
        return self.V64 if _compute_dtype(u) == torch.float64 else self.V32

    def _combine(self, u, a, v, c, base, ids, backend, names):
        return ops.lowrank_combine(u, a, v, c, base, V=self._V(u), vband=self.vband, ids=self._resolve_ids(ids),
                                   backend=backend, names=names)

    def _dot(self, u, v, ids, backend, names):
        return ops.lowrank_dot(u, v, V=self._V(u), vband=self.vband, K=self.num_subspaces,
                               ids=self._resolve_ids(ids), backend=backend, names=names)

    def _block_combine(self, x, v, B, base_x, base_v, ids, backend):
        return ops.lowrank_block_combine(x, v, B, base_x, base_v, V=self._V(x), vband=self.vband,
                                         ids=self._resolve_ids(ids), backend=backend)

    def projector_matrix(self, k: int, channels: int, group: int = 0) -> Tensor:
        if not self.joint:
            return super().projector_matrix(k, channels, group)
        return super().projector_matrix(k, self.channels, group)

    def subspace_dims(self, channels: int) -> list[int]:
        mult = 1 if self.joint else channels
        H, W = self.image_size
        total = (self.channels if self.joint else channels) * H * W
        dims = [mult * b for b in self.band_sizes]
        return dims + [total - sum(dims)]

    def regroup(self, parent: Sequence[int]) -> "PCABasis":
        """A coarser basis with the same directions: band k of this basis goes to subspace parent[k].

        parent has one entry per subspace (the complement's parent must be the new complement); the bands
        mapped to each new subspace must be contiguous and in order.
        """
        parent = _check_parent(parent, self.num_subspaces)
        Kc = parent[-1] + 1
        sizes = [0] * (Kc - 1)
        for k, b in enumerate(self.band_sizes):
            if parent[k] == Kc - 1:
                break
            sizes[parent[k]] += b
        r = sum(sizes)
        return PCABasis(self.V64[:, :r], (self.channels, *self.image_size), sizes,
                        self.class_to_group if self.num_groups > 1 else None)

    def config(self) -> dict:
        return {"type": "pca", "image_shape": [self.channels, *self.image_size], "band_sizes": self.band_sizes,
                "num_groups": self.num_groups, "rank": int(self.V64.shape[1]), "d": int(self.V64.shape[2])}

    # ---- fitting ----
    @classmethod
    def pixels(cls, image_shape: Sequence[int]) -> "PCABasis":
        """Every pixel and channel its own subspace, K = C*H*W (VSDM's image code: one OU rate per pixel): the
        identity's first d - 1 rows as one-direction bands, the last coordinate as the complement."""
        C, H, W = (int(s) for s in image_shape)
        d = C * H * W
        if d < 2:
            raise ValueError(f"image_shape: expected at least 2 pixels, got {(C, H, W)}")
        return cls(torch.eye(d, dtype=torch.float64)[:-1], (C, H, W), [1] * (d - 1))

    @classmethod
    def fit(cls, images: Tensor, labels: Tensor | None = None, *, rank: int, per: str = "global",
            num_clusters: int | None = None, band_sizes: Sequence[int] | None = None, joint: bool = False,
            max_per_group: int | None = None, seed: int = 0) -> "PCABasis":
        """Fit principal subspaces from images [N, C, H, W] (uint8 or float in [-1, 1]).

        per: "global" (one basis), "class" (one per class, METHOD §7.2), "cluster" (classes grouped into
        `num_clusters` clusters of similar class subspaces, one basis per cluster: the paper's ImageNet
        variant, METHOD §7.3, whose construction the authors did not publish; ours is described in
        `cluster_classes`). Spatial bases (joint=False) are fitted on the channel mean (grayscale), as the
        paper does, and applied per channel.
        """
        if images.dim() != 4:
            raise ValueError(f"images: expected [N, C, H, W], got {tuple(images.shape)}")
        if per not in ("global", "class", "cluster"):
            raise ValueError(f"per: expected 'global', 'class' or 'cluster', got {per!r}")
        N, C, H, W = images.shape
        x = images.to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images: contains NaN or infinite values")
        if images.dtype == torch.uint8:
            x = x / 127.5 - 1
        X = x.reshape(N, C * H * W) if joint else x.mean(1).reshape(N, H * W)
        d = X.shape[1]
        if not 1 <= rank < d:
            raise ValueError(f"rank: expected 1 <= rank < {d}, got {rank}")
        gen = torch.Generator().manual_seed(seed)

        def top_directions(rows: Tensor, k: int, what: str) -> Tensor:
            if max_per_group is not None and rows.shape[0] > max_per_group:
                rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_per_group]]
            if rows.shape[0] < k:
                raise ValueError(f"rank: {what} has {rows.shape[0]} images, fewer than the rank {k}")
            rows = rows - rows.mean(0)
            _, _, Vh = torch.linalg.svd(rows, full_matrices=False)
            return Vh[:k]

        if per == "global":
            V = top_directions(X, rank, "the data set")[None]
            return cls(V, (C, H, W), band_sizes)
        if labels is None:
            raise ValueError(f"labels: required for per={per!r}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (N,):
            raise ValueError(f"labels: expected shape [{N}], got {tuple(labels.shape)}")
        num_classes = int(labels.max()) + 1
        per_class = [top_directions(X[labels == y], rank, f"class {y}") for y in range(num_classes)]
        if per == "class":
            return cls(torch.stack(per_class), (C, H, W), band_sizes, torch.arange(num_classes))
        if num_clusters is None or not 1 <= num_clusters <= num_classes:
            raise ValueError(f"num_clusters: expected 1..{num_classes} for per='cluster', got {num_clusters}")
        class_to_group = cluster_classes(per_class, num_clusters)
        V = torch.stack([top_directions(X[(class_to_group[labels] == gi)], rank, f"cluster {gi}")
                         for gi in range(num_clusters)])
        return cls(V, (C, H, W), band_sizes, class_to_group)


def cluster_classes(class_bases: Sequence[Tensor], num_clusters: int) -> Tensor:
    """Group classes whose principal subspaces are close (the clustering the paper's ImageNet basis needs).

    Similarity of classes i, j: the mean squared cosine of the principal angles between their subspaces,
    ||V_i V_j^T||_F^2 / r (1 for equal subspaces, r/d for random ones). Average-linkage agglomerative
    clustering (scipy) on the distance 1 - similarity, cut into `num_clusters` groups; ids ordered by the
    smallest class in each cluster.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = len(class_bases)
    if num_clusters == n:
        return torch.arange(n)
    Vs = torch.stack(class_bases)  # [n, r, d]
    r = Vs.shape[1]
    sim = torch.einsum("ird,jsd->ijrs", Vs, Vs).pow(2).sum((2, 3)) / r
    dist = (1 - sim).clamp_min(0).numpy()
    np.fill_diagonal(dist, 0.0)
    dist = (dist + dist.T) / 2
    assignment = fcluster(linkage(squareform(dist, checks=False), method="average"), num_clusters, "maxclust")
    # relabel clusters 0..G-1 by first appearance
    order: dict[int, int] = {}
    out = [order.setdefault(int(a), len(order)) for a in assignment]
    if len(order) != num_clusters:
        raise ValueError(f"num_clusters: the class subspaces split into {len(order)} clusters, not {num_clusters}")
    return torch.tensor(out, dtype=torch.long)


def basis_from_config(cfg: dict, state: dict[str, Tensor] | None = None) -> SubspaceBasis:
    """Rebuild a basis from `basis.config()` and (for PCA) its state_dict tensors."""
    kind = cfg.get("type")
    if kind == "isotropic":
        return IsotropicBasis(cfg.get("image_size"))
    if kind == "dct":
        return DCTBasis(cfg["height"], cfg["width"], cfg["bands"])
    if kind == "pca":
        if state is None or "V64" not in state:
            raise ValueError("state: a PCA basis needs its tensors (V64, class_to_group) from the checkpoint")
        c2g = state.get("class_to_group")
        return PCABasis(state["V64"], cfg["image_shape"], cfg["band_sizes"],
                        c2g if c2g is not None and c2g.numel() else None)
    raise ValueError(f"cfg: unknown basis type {kind!r} (expected 'isotropic', 'dct' or 'pca')")
