"""The subspace ops per op, basis, size, device and implementation, side by side in one run.

op:    scale `sum_k s_k P_k x` (combine(u, a)); heun: combine(u, a, v, c, base) (the Heun update); dot;
       block: block_combine(x, v, B) (DESIGN.md op 3, VSMD's phase-space step; no bases).
impl:  the backends (reference, cpp, cuda, triton), `authors` (baselines.authors_*: the authors' formulation,
       K = 2 bases only, not block) and `grouped` (baselines.grouped_lowrank_*: class-conditional PCA only).
       For block, `reference` and `grouped` are two such combine calls (the best plain-PyTorch composition) and
       `pair` is two fused combine calls on the device's default backend.
Every implementation is first checked against the device's default fused backend on the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from aniso_fast import ops
from bench import baselines, common

OPS = ("scale", "heun", "dot", "block")
IMPLS = ("authors", "reference", "grouped", "pair", "cpp", "cuda", "triton")


@dataclass(frozen=True)
class OpCase:
    op: str
    basis: str
    size: tuple
    batch: int
    device: str
    impl: str

    @property
    def group(self) -> str:
        return f"{self.op}-{self.basis}-{common.size_name(self.size)}-B{self.batch}-{self.device}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.impl}"


def _applies(op: str, basis: str, impl: str) -> bool:
    if impl == "pair":
        return op == "block"
    if impl == "authors":
        if op == "block":
            return False
        return basis != "dct4"  # the authors' formulation has one projector and its complement
    if impl == "grouped":
        return basis == "pca_class"
    return True


# case outermost and implementation innermost: the implementations of one case run next to each other in time
CASES = [OpCase(op, basis, size, B, device, impl)
         for op in OPS for basis in common.BASES for size in common.SIZES for B in common.BATCHES
         for device in common.DEVICES for impl in IMPLS if _applies(op, basis, impl)]


def _inputs(case: OpCase):
    _, H, W = case.size
    basis = common.make_basis(case.basis, H, W, case.device)
    imgs = common.make_images(case.size, case.batch, case.device)
    a, c = common.make_scalars(case.batch, basis.num_subspaces, case.device)
    ids = basis.group_ids(imgs["labels"])
    return basis, imgs, a, c, ids


def _block_call(case: OpCase, impl: str):
    """block_combine(u, v, B) with B[:, :, 0] = (a, c) and B[:, :, 1] = (a', c') (a second draw)."""
    basis, imgs, a, c, ids = _inputs(case)
    a1, c1 = common.make_scalars(case.batch, basis.num_subspaces, case.device, seed=1)
    u, v = imgs["u"], imgs["v"]
    if impl in ("reference", "pair"):
        backend = "reference" if impl == "reference" else ops.backends()[case.device]
        return lambda: (basis.combine(u, a, v, c, ids=ids, backend=backend),
                        basis.combine(u, a1, v, c1, ids=ids, backend=backend))
    if impl in common.BACKENDS:
        B = torch.stack([torch.stack([a, c], -1), torch.stack([a1, c1], -1)], -2)
        return lambda: basis.block_combine(u, v, B, ids=ids, backend=impl)
    if impl == "grouped":
        V, vband = basis.V32, basis.vband
        return lambda: (baselines.grouped_lowrank_combine(u, a, v, c, V=V, vband=vband, ids=ids),
                        baselines.grouped_lowrank_combine(u, a1, v, c1, V=V, vband=vband, ids=ids))
    raise AssertionError(impl)


def _call(case: OpCase, impl: str):
    """A zero-argument function running `impl` on the case's inputs (everything else prepared outside)."""
    if case.op == "block":
        return _block_call(case, impl)
    basis, imgs, a, c, ids = _inputs(case)
    u, v, base = imgs["u"], imgs["v"], imgs["base"]
    if impl in common.BACKENDS:
        if case.op == "dot":
            return lambda: basis.dot(u, v, ids=ids, backend=impl)
        if case.op == "scale":
            return lambda: basis.scale(u, a, ids=ids, backend=impl)
        return lambda: basis.combine(u, a, v, c, base, ids=ids, backend=impl)
    if impl == "authors":
        V = baselines.authors_basis_images(basis)
        a32, c32 = a.to(u.dtype), c.to(u.dtype)
        if case.op == "dot":
            return lambda: baselines.authors_dot(u, v, V=V, ids=ids)
        if case.op == "scale":
            return lambda: baselines.authors_combine(u, a32, V=V, ids=ids)
        return lambda: baselines.authors_combine(u, a32, v, c32, base, V=V, ids=ids)
    if impl == "grouped":
        V, vband = basis.V32, basis.vband
        if case.op == "dot":
            return lambda: baselines.grouped_lowrank_dot(u, v, V=V, vband=vband, K=basis.num_subspaces, ids=ids)
        if case.op == "scale":
            return lambda: baselines.grouped_lowrank_combine(u, a, V=V, vband=vband, ids=ids)
        return lambda: baselines.grouped_lowrank_combine(u, a, v, c, base, V=V, vband=vband, ids=ids)
    raise AssertionError(impl)


def _check(case: OpCase, out: torch.Tensor) -> None:
    default = ops.backends()[case.device]
    if case.impl == default:
        return
    expected = _call(case, default)()
    if case.op == "block":
        for o, e in zip(out, expected):
            torch.testing.assert_close(o, e, rtol=1e-4, atol=float(1e-5 * e.abs().max()),
                                       msg=lambda m: f"{case.id} disagrees with the {default} backend: {m}")
        return
    if case.op == "dot":
        imgs = common.make_images(case.size, case.batch, case.device)
        scale = (imgs["u"] * imgs["v"]).abs().flatten(1).sum(1).max()  # bound on the summed magnitudes
    else:
        scale = expected.abs().max()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=float(1e-5 * scale),
                               msg=lambda m: f"{case.id} disagrees with the {default} backend: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op(benchmark, case: OpCase, opts: common.Options):
    why = common.why_unavailable(case.impl, case.device)
    if why is not None:
        pytest.skip(why)
    _, H, W = case.size
    basis = common.make_basis(case.basis, H, W, case.device)
    gather = common.reference_gather_bytes(basis, case.batch)
    if case.impl == "reference" and gather > common.REFERENCE_GATHER_LIMIT and not opts.full:
        pytest.skip(f"the reference gathers V[ids] into [B, r, d] ({gather / 2 ** 30:.2f} GiB, over the "
                    f"{common.REFERENCE_GATHER_LIMIT >> 20} MiB default limit): run with --aniso-full")
    u = common.make_images(case.size, case.batch, case.device)["u"]
    K = basis.num_subspaces
    if case.op == "block":  # reads x, v and writes x', v': twice scale's bytes; two analyses and two syntheses
        scale = common.op_cost(case.basis, case.size, case.batch, "scale", basis)
        out_bytes, scalar_bytes = 2 * common.tensor_bytes(u), 16 * case.batch * K  # the fp32 cast of B [B, K, 2, 2]
        cost = {"bytes": 2 * scale["bytes"], "flops": 2 * scale["flops"]}
    else:
        out_bytes = 4 * case.batch * K if case.op == "dot" else common.tensor_bytes(u)
        scalar_bytes = common.scalar_cast_bytes(case.op, case.batch, K)
        cost = common.op_cost(case.basis, case.size, case.batch, case.op, basis)
    benchmark.group = case.group
    benchmark.extra_info.update(suite="ops", op=case.op, basis=case.basis, size=common.size_name(case.size),
                                batch=case.batch, impl=case.impl, K=K, in_bytes=common.tensor_bytes(u),
                                out_bytes=out_bytes, scalar_bytes=scalar_bytes, **cost)
    common.measure(benchmark, _call(case, case.impl), case.device, opts, check=lambda out: _check(case, out))
