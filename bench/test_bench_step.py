"""One full anisotropic Heun step without the network: `aniso_fast.sampling.ode.heun` over a one-step grid.

The model is a stand-in whose flow returns precomputed tensors (F_a, then F_s), so the step is the two
`basis.combine` calls of METHOD §6.2 (Euler predictor, then the corrector) plus the solver's scalar algebra.
Backends are chosen with ANISO_FAST_BACKEND (the solver passes no backend); `authors` is
`baselines.authors_heun_step` (the same step with the authors' scale, K = 2 bases only).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from aniso_fast import ops
from aniso_fast.sampling.grids import Grid
from aniso_fast.sampling.ode import heun
from bench import baselines, common

IMPLS = ("authors", "reference", "cpp", "cuda", "triton")


@dataclass(frozen=True)
class StepCase:
    basis: str
    size: tuple
    batch: int
    device: str
    impl: str

    @property
    def group(self) -> str:
        return f"heun_step-{self.basis}-{common.size_name(self.size)}-B{self.batch}-{self.device}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.impl}"


CASES = [StepCase(basis, size, B, device, impl)
         for basis in common.BASES for size in common.SIZES for B in common.BATCHES for device in common.DEVICES
         for impl in IMPLS if not (impl == "authors" and basis == "dct4")]


class StandInFlow:
    """What `heun` needs of a model: `.basis` and `.flow(x, g, labels)`; the flows are precomputed, in turn."""

    def __init__(self, basis, flows):
        self.basis, self.flows, self.calls = basis, flows, 0

    def flow(self, x, g, labels=None):
        F = self.flows[self.calls % len(self.flows)]
        self.calls += 1
        return F


def _grid(K: int, device: str) -> Grid:
    """One step from g_a to g_b (end-point Heun: the secondary point is g_b), different in every subspace."""
    g_a = torch.linspace(4.0, 1.0, K, dtype=torch.float64)
    return Grid(g=torch.stack([g_a, g_a / 3])[None].to(device))


def _step(case: StepCase, impl: str, monkeypatch):
    _, H, W = case.size
    basis = common.make_basis(case.basis, H, W, case.device)
    imgs = common.make_images(case.size, case.batch, case.device)
    x, F_a, F_s, labels = imgs["base"], imgs["u"], imgs["v"], imgs["labels"]
    labels = labels if basis.num_groups > 1 else None
    grid = _grid(basis.num_subspaces, case.device)
    if impl == "authors":
        V = baselines.authors_basis_images(basis)
        ids = basis.group_ids(labels)
        B = case.batch
        g_a, g_b = grid.g[0, 0].expand(B, -1), grid.g[0, 1].expand(B, -1)
        return lambda: baselines.authors_heun_step(x, F_a, F_s, g_a, g_b, g_b, V=V, ids=ids)
    monkeypatch.setenv(ops.ENV_VAR, impl)
    model = StandInFlow(basis, (F_a, F_s))

    def step():
        with torch.no_grad():
            return heun(model, x, grid, labels, final_euler=False)
    return step


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_heun_step(benchmark, case: StepCase, opts: common.Options, monkeypatch):
    why = common.why_unavailable(case.impl, case.device)
    if why is not None:
        pytest.skip(why)
    _, H, W = case.size
    basis = common.make_basis(case.basis, H, W, case.device)
    gather = common.reference_gather_bytes(basis, case.batch)
    if case.impl == "reference" and gather > common.REFERENCE_GATHER_LIMIT and not opts.full:
        pytest.skip(f"the reference gathers V[ids] into [B, r, d] ({gather / 2 ** 30:.2f} GiB, over the "
                    f"{common.REFERENCE_GATHER_LIMIT >> 20} MiB default limit): run with --aniso-full")
    default = ops.backends()[case.device]

    def check(out):
        if case.impl == default:
            return
        with monkeypatch.context() as m:
            expected = _step(case, default, m)()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=float(1e-5 * expected.abs().max()),
                                   msg=lambda msg: f"{case.id} disagrees with the {default} backend: {msg}")

    u = common.make_images(case.size, case.batch, case.device)["u"]
    benchmark.group = case.group
    benchmark.extra_info.update(suite="step", op="heun_step", basis=case.basis, size=common.size_name(case.size),
                                batch=case.batch, impl=case.impl, K=basis.num_subspaces,
                                in_bytes=common.tensor_bytes(u), out_bytes=common.tensor_bytes(u))
    common.measure(benchmark, _step(case, case.impl, monkeypatch), case.device, opts, check=check)
