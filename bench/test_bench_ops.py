"""The subspace ops per op, basis, size, device and implementation, side by side in one run.

op:    scale `sum_k s_k P_k x` (combine(u, a)); heun: combine(u, a, v, c, base) (the Heun update); dot.
impl:  the backends (reference, cpp, cuda, triton), `authors` (baselines.authors_*: the authors' formulation,
       K = 2 bases only) and `grouped` (baselines.grouped_lowrank_*: class-conditional PCA only).
Every implementation is first checked against the device's default fused backend on the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from aniso_fast import ops
from bench import baselines, common

OPS = ("scale", "heun", "dot")
IMPLS = ("authors", "reference", "grouped", "cpp", "cuda", "triton")


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


def _applies(basis: str, impl: str) -> bool:
    if impl == "authors":
        return basis != "dct4"  # the authors' formulation has one projector and its complement
    if impl == "grouped":
        return basis == "pca_class"
    return True


# case outermost and implementation innermost: the implementations of one case run next to each other in time
CASES = [OpCase(op, basis, size, B, device, impl)
         for op in OPS for basis in common.BASES for size in common.SIZES for B in common.BATCHES
         for device in common.DEVICES for impl in IMPLS if _applies(basis, impl)]


def _inputs(case: OpCase):
    _, H, W = case.size
    basis = common.make_basis(case.basis, H, W, case.device)
    imgs = common.make_images(case.size, case.batch, case.device)
    a, c = common.make_scalars(case.batch, basis.num_subspaces, case.device)
    ids = basis.group_ids(imgs["labels"])
    return basis, imgs, a, c, ids


def _call(case: OpCase, impl: str):
    """A zero-argument function running `impl` on the case's inputs (everything else prepared outside)."""
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
    out_bytes = 4 * case.batch * basis.num_subspaces if case.op == "dot" else common.tensor_bytes(u)
    benchmark.group = case.group
    benchmark.extra_info.update(suite="ops", op=case.op, basis=case.basis, size=common.size_name(case.size),
                                batch=case.batch, impl=case.impl, K=basis.num_subspaces,
                                in_bytes=common.tensor_bytes(u), out_bytes=out_bytes,
                                scalar_bytes=common.scalar_cast_bytes(case.op, case.batch, basis.num_subspaces),
                                **common.op_cost(case.basis, case.size, case.batch, case.op, basis))
    common.measure(benchmark, _call(case, case.impl), case.device, opts, check=lambda out: _check(case, out))
