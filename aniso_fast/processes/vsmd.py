"""The VSMD process family (Variational Schrödinger Momentum Diffusion, docs/METHOD.md §12) on an
engine basis, and its velocity-score network.

Phase space z = (x, v), images of C channels each. Forward SDE (VSMD's `LinearMomentumSchrodingerBridge`), with
a, c diagonal in a basis (one pair (a_k, c_k) per subspace) and a constant beta:

    dx = 1/2 beta v dt,    dv = 1/2 beta [-x - gamma v + 2 gamma (a x + c v)] dt + sqrt(gamma beta) dW.

Only c is learned; a is tied to it by VSMD's damping transform a = (1 - p^2 / (4 zeta)) / (2 gamma) with
p = gamma (1 - 2c), so each subspace's 2x2 drift block is (beta/2) N, N = [[0, 1], [-q, -p]], q = p^2 / (4 zeta):
zeta = 1 gives a repeated eigenvalue -p/2 (critical damping), zeta < 1 the complex pair -p/2 +- i omega,
omega = kappa p with kappa = sqrt(1/zeta - 1) / 2 (under-damped). With s = beta t / 2 and x = p s, the transition
z_t = E z_0 + L eps is closed-form per subspace (C = cos(kappa x), S = s sinc(kappa x); C = 1, S = s at zeta = 1):

    E = e^{-x/2} [[C + p S / 2, S], [-q S, C - p S / 2]]                           (= expm(s N))
    Sigma_xx = 2 gamma s^3 K(x),  K(x) = int_0^1 w^2 sinc^2(kappa x w) e^{-x w} dw
    Sigma_xv = gamma e^{-x} S^2,  Sigma_vv = 2 gamma e^{-x} S C + q Sigma_xx

and L its lower Cholesky factor. VSMD's code gets E and Sigma from [N, 4, 4] matrix exponentials (§2.4); here
they are a few elementwise ops on [B, K]. Defaults as VSMD's code: gamma = 2, beta = 10 (its beta_max; VSMD
returns it for every t), T = 1, zeta = 1, c = 0 (then a = 0 and N(0, I) is the stationary law), the velocity
prior v_0 ~ N(0, prior_v I) with prior_v = 1, and t0 = 1e-3 (its delta: the loss's and the samplers' end time).

The network (§2.3, `velocity.py`): VSMD trains a velocity-only score, `velocity.VelocityScoreNet` (2C channels in,
C out) inside `velocity.VSMDPrecond`, score_v = -net(z, 999 t) / L_vv per subspace. The engine's default is the
denoiser head (`phase_space.VSMDDenoiser`: the same velocity score, exactly, from a C-channel VE denoiser); both
heads share the loss, the c-update and the samplers here.

Learning, VSMD's alternating rule (§2.5): `dsm_loss` for the network with c frozen, then `forward_sb_loss` for c
on paths that `simulate_backward` draws from the current model. Sampling, the sample being x:
`phase_space.sample_ode` (the PF-ODE, Heun with a last Euler step as VSMD's sampler, iPNDM, or the phase-space
DPM-Solver++(2M)) or `sample_em` (the reverse SDE).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ..geometry.bases import SubspaceBasis
from ..utils.checks import (
    check_in_range,
    check_int,
    check_number,
    check_subspace_values,
)
from .process import ContractingProcess, Trajectories, check_steps, path_integral, time_column
from ..sampling.grids import step_indices
from ..sampling.noise import SeedStreams, check_labels, check_seeds

__all__ = ["VSMDProcess", "lower_cholesky", "check_image_batch", "Trajectories", "dsm_loss",
           "simulate_backward", "sample_em", "forward_score", "forward_score_divergence", "forward_sb_loss",
           "sampling_inputs", "velocity_score", "prior"]

_F64 = torch.float64


def _moment(n: int, x: Tensor) -> Tensor:
    """J_n(x) = int_0^1 w^n e^{-x w} dw for x >= 0, without cancellation: the positive series
    e^{-x} sum_k x^k / ((n+1)...(n+k+1)) below 1, n! P(n+1, x) / x^{n+1} (regularised incomplete gamma) above."""
    small = x < 1
    xs = torch.where(small, x, torch.zeros_like(x))  # each branch sees only safe values: no nan in the gradient
    term = torch.full_like(x, 1.0 / (n + 1))
    total = term
    for k in range(1, 24):  # x < 1: the k-th term is below 1/k!
        term = term * xs / (n + 1 + k)
        total = total + term
    xl = torch.where(small, torch.ones_like(x), x)
    large = math.factorial(n) * torch.special.gammainc(torch.tensor(n + 1.0, dtype=x.dtype, device=x.device), xl) \
        / xl ** (n + 1)
    return torch.where(small, torch.exp(-xs) * total, large)


def _sinc2_moment(x: Tensor, kappa: float) -> Tensor:
    """K(x) = int_0^1 w^2 sinc^2(kappa x w) e^{-x w} dw (J_2 at kappa = 0). Near kappa x = 0 the closed form
    (J_0(x) - int e^{-x w} cos(2 kappa x w) dw) / (2 (kappa x)^2) cancels, so there the series
    sum_m (-1)^{m+1} 2^{2m-1} / (2m)! (kappa x)^{2m-2} J_{2m}(x) (each ratio below (2 kappa x)^2 / ((2m+1)(2m+2)))."""
    if kappa == 0:
        return _moment(2, x)
    y = kappa * x
    near = 2 * y < 1
    ys = torch.where(near, y, torch.zeros_like(y))
    series = torch.zeros_like(x)
    for m in range(1, 11):
        series = series + (-1) ** (m + 1) * 2.0 ** (2 * m - 1) / math.factorial(2 * m) * ys ** (2 * m - 2) \
            * _moment(2 * m, x)
    xf = torch.where(near, torch.full_like(x, 1 / kappa), x)
    yf, decay = kappa * xf, torch.exp(-xf)
    cosine = (1 - decay * torch.cos(2 * yf) + 2 * kappa * decay * torch.sin(2 * yf)) / (xf * (1 + 4 * kappa ** 2))
    return torch.where(near, series, (_moment(0, xf) - cosine) / (2 * yf ** 2))


def _check_c(c: Any, shape: tuple[int, int]) -> Tensor:
    return check_subspace_values("c", c, shape, "damping values",
                                 "finite c_k with 1 - 2 c_k > 0 (the drift's eigenvalues have real part "
                                 "-beta gamma (1 - 2 c_k) / 4: at 1/2 the process stops contracting, above it "
                                 "explodes)", lambda v: 1 - 2 * v > 0)


def check_image_batch(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: expected images [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x


def lower_cholesky(cov: Tensor) -> Tensor:
    """The lower Cholesky factor of 2x2 blocks [..., 2, 2], zero where a block is singular (Sigma(0) = 0)."""
    xx, xv, vv = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
    positive = xx > 0
    lxx = torch.where(positive, xx, torch.ones_like(xx)).sqrt()
    lvx = torch.where(positive, xv / lxx, torch.zeros_like(xv))
    lxx = torch.where(positive, lxx, torch.zeros_like(lxx))
    rest = (vv - lvx ** 2).clamp_min(0)
    lvv = torch.where(rest > 0, rest, torch.ones_like(rest)).sqrt() * (rest > 0)
    return torch.stack([torch.stack([lxx, torch.zeros_like(lxx)], -1), torch.stack([lvx, lvv], -1)], -2)


class VSMDProcess(ContractingProcess):
    """VSMD's forward process with learnable damping values c [S, K] (S = num_classes, 1 if None), K subspaces.

    Parameterisation: `log_damping = ln(1 - 2c)`, unconstrained, so c < 1/2 (every eigenvalue has real part
    -beta gamma (1 - 2c) / 4 < 0) whatever the optimiser does. The block methods take t [B] or a scalar in
    [0, T] and labels [B] (or None) and return float64 [B, K, 2, 2] ([1, K, 2, 2] for a scalar t without
    labels), the first index for x, the second for v; gradients reach c.
    """

    def __init__(self, num_subspaces: int, num_classes: int | None = None, c: Any = 0.0, *, zeta: float = 1.0,
                 gamma: float = 2.0, beta: float = 10.0, T: float = 1.0, prior_v: float = 1.0, t0: float = 1e-3):
        super().__init__()
        check_int("num_subspaces", num_subspaces)
        check_int("num_classes", num_classes, optional=True)
        self.zeta = check_number("zeta", zeta, "a number in (0, 1] (1: critically damped, below: under-damped)",
                                 lambda v: 0 < v <= 1)
        self.gamma = check_number("gamma", gamma, "a finite number > 0", lambda v: v > 0)
        self.beta = check_number("beta", beta, "a finite number > 0 (beta < 0 reverses the drift)", lambda v: v > 0)
        self.T = check_number("T", T, "a finite number > 0", lambda v: v > 0)
        self.prior_v = check_number("prior_v", prior_v, "a finite variance > 0 (v_0 ~ N(0, prior_v I))",
                                    lambda v: v > 0)
        self.t0 = check_number("t0", t0, f"a finite number in (0, T={self.T:g})", lambda v: 0 < v < self.T)
        self.kappa = math.sqrt(1 / self.zeta - 1) / 2  # omega / p
        self.num_subspaces, self.num_classes = num_subspaces, num_classes
        values = _check_c(c, (num_classes or 1, num_subspaces))
        self._c_init = float(c) if isinstance(c, (int, float)) else torch.as_tensor(c).tolist()
        self.log_damping = self.contracting_parameter(values)

    @property
    def c(self) -> Tensor:
        """c [S, K]."""
        return self.contracting_values(self.log_damping)

    def config(self) -> dict:
        """JSON-able constructor arguments; the trained c lives in `state_dict()`."""
        return {"num_subspaces": self.num_subspaces, "num_classes": self.num_classes, "c": self._c_init,
                "zeta": self.zeta, "gamma": self.gamma, "beta": self.beta, "T": self.T, "prior_v": self.prior_v,
                "t0": self.t0}

    @property
    def a(self) -> Tensor:
        """a [S, K], tied to c: a = (1 - (gamma - 2 gamma c)^2 / (4 zeta)) / (2 gamma)."""
        return self._tied_a(self.gamma * self.log_damping.exp())

    def _tied_a(self, p: Tensor) -> Tensor:
        return (1 - p ** 2 / (4 * self.zeta)) / (2 * self.gamma)

    def forward_coefficients(self, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(a, c) [B, K] ([1, K] without labels): the variational score a x + c v per subspace; gradients reach c."""
        _, p = self._damping(None, labels)
        return self._tied_a(p), (1 - p / self.gamma) / 2

    @property
    def velocity_std(self) -> float:
        """sqrt(prior_v): the velocity prior v_0 ~ N(0, prior_v I) that pairs with the data at t = 0."""
        return math.sqrt(self.prior_v)

    def sample_velocity(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """v_0 ~ N(0, prior_v I) like x0 (VSMD's `augment_data`)."""
        x0 = check_image_batch("x0", x0)
        return self.velocity_std * torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)

    def _damping(self, t: Any, labels: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """t [B] float64 in [0, T] (None when t is None) and p = gamma (1 - 2c) [B, K] (or [1, K])."""
        log_damping = self.log_damping
        # a state dict can carry non-finite values past the constructor's check
        check_in_range("c", log_damping.detach(), -math.inf, math.inf, "finite values with 1 - 2 c > 0")
        t, log_damping = self.per_sample(log_damping, t, labels, "c")
        return t, self.gamma * log_damping.exp()

    def drift_blocks(self, labels: Tensor | None = None) -> Tensor:
        """(beta/2) [[0, 1], [-(1 - 2 gamma a), -gamma (1 - 2c)]] = (beta/2) [[0, 1], [-q, -p]] [B, K, 2, 2]."""
        _, p = self._damping(None, labels)
        q = p ** 2 / (4 * self.zeta)
        zero, one = torch.zeros_like(p), torch.ones_like(p)
        return self.beta / 2 * torch.stack([torch.stack([zero, one], -1), torch.stack([-q, -p], -1)], -2)

    def _transition(self, t: Any, labels: Tensor | None) -> tuple[Tensor, ...]:
        """s = beta t / 2 [B, 1], p, q, x = p s, C, S and e^{-x} [B, K] (the module docstring's names)."""
        t, p = self._damping(t, labels)
        s = (self.beta / 2 * t)[:, None]
        x = p * s
        C = torch.cos(self.kappa * x)
        S = s * torch.sinc(self.kappa * x / math.pi)
        return s, p, p ** 2 / (4 * self.zeta), x, C, S, torch.exp(-x)

    def mean_blocks(self, t: Any, labels: Tensor | None = None) -> Tensor:
        """E(t) = expm(t (beta/2) N) [B, K, 2, 2]: E[0, 0] x0 + E[0, 1] v0 is the mean of x_t, row 1 that of v_t."""
        _, p, q, x, C, S, _ = self._transition(t, labels)
        half = torch.exp(-x / 2)
        return half[..., None, None] * torch.stack([torch.stack([C + p * S / 2, S], -1),
                                                    torch.stack([-q * S, C - p * S / 2], -1)], -2)

    def cov_blocks(self, t: Any, labels: Tensor | None = None) -> Tensor:
        """Sigma(t) = int_0^t e^{F r} Q e^{F^T r} dr [B, K, 2, 2], Q = gamma beta e_v e_v^T: the covariance of
        z_t given (x0, v0)."""
        s, _, q, x, C, S, decay = self._transition(t, labels)
        xx = 2 * self.gamma * s ** 3 * _sinc2_moment(x, self.kappa)
        xv = self.gamma * decay * S ** 2
        vv = 2 * self.gamma * decay * S * C + q * xx  # int (g')^2 by parts, g'' = -p g' - q g
        return torch.stack([torch.stack([xx, xv], -1), torch.stack([xv, vv], -1)], -2)

    def chol_blocks(self, t: Any, labels: Tensor | None = None) -> Tensor:
        """L(t) [B, K, 2, 2], lower triangular with L L^T = Sigma(t) (zero at t = 0); L[..., 1, 1] is VSMD's L_vv."""
        return lower_cholesky(self.cov_blocks(t, labels))

    def checkcheck_image_batch(self, basis: SubspaceBasis, **images: Tensor) -> int:
        """The images' batch size, after checking the basis's K and that the images are alike [B, C, H, W]."""
        if not isinstance(basis, SubspaceBasis):
            raise ValueError(f"basis: expected a SubspaceBasis, got {type(basis).__name__}")
        if basis.num_subspaces != self.num_subspaces:
            raise ValueError(f"basis: expected {self.num_subspaces} subspaces (one c each), got a basis with "
                             f"{basis.num_subspaces}")
        first = None
        for name, x in images.items():
            x = check_image_batch(name, x)
            if first is not None and x.shape != first.shape:
                raise ValueError(f"{name}: expected the shape of the other images {tuple(first.shape)}, got "
                                 f"{tuple(x.shape)}")
            first = x
        return first.shape[0]

    def _fit(self, basis: SubspaceBasis, blocks: Tensor, **images: Tensor) -> Tensor:
        """blocks expanded to the images' batch, after `check_images`."""
        B = self.checkcheck_image_batch(basis, **images)
        if blocks.shape[0] not in (1, B):
            raise ValueError(f"t: batch size {blocks.shape[0]} does not match the images' {B}")
        return blocks.expand(B, -1, -1, -1)

    def perturb(self, basis: SubspaceBasis, x0: Tensor, v0: Tensor, eps_x: Tensor, eps_v: Tensor, t: Any,
                labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x_t, v_t) = E(t) (x0, v0) + L(t) (eps_x, eps_v) per subspace: two `block_combine` calls."""
        E = self._fit(basis, self.mean_blocks(t, labels), x0=x0, v0=v0, eps_x=eps_x, eps_v=eps_v)
        L = self.chol_blocks(t, labels).expand_as(E)
        ids = basis.group_ids(labels)
        mean_x, mean_v = basis.block_combine(x0, v0, E, ids=ids)
        return basis.block_combine(eps_x, eps_v, L, mean_x, mean_v, ids=ids)

    def prior_sample(self, basis: SubspaceBasis, eps_x: Tensor, eps_v: Tensor,
                     labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z_T = L(T) (eps_x, eps_v): VSMD's prior N(0, Sigma(T)), the transition from z = 0 (the data's share
        E(T) Sigma_0 E(T)^T is left out, as in VSMD's `prior_sampling`)."""
        L = self._fit(basis, self.chol_blocks(self.T, labels), eps_x=eps_x, eps_v=eps_v)
        return basis.block_combine(eps_x, eps_v, L, ids=basis.group_ids(labels))

    def extra_repr(self) -> str:
        return (f"num_subspaces={self.num_subspaces}, num_classes={self.num_classes}, zeta={self.zeta}, "
                f"gamma={self.gamma}, beta={self.beta}, T={self.T}, prior_v={self.prior_v}, t0={self.t0}")


def velocity_score(precond, x: Tensor, v: Tensor, t: Any, labels: Tensor | None) -> Tensor:
    """The model's velocity score at z = (x, v), stacked on channels as VSMD's network reads it."""
    return precond(torch.cat([x, v], dim=1), t, labels)


def dsm_loss(process: VSMDProcess, precond, x0: Tensor, labels: Tensor | None = None,
             generator: torch.Generator | None = None, *, t: Tensor | None = None,
             noise: Sequence[Tensor] | None = None) -> Tensor:
    """VSMD's `linear_sb_loss`: denoising score matching on the velocity block with closed-form labels, c frozen.

    t ~ U(t0, T) (`process.t0` = VSMD's delta = 1e-3 of T=1), v0 ~ N(0, prior_v I), (x_t, v_t) = E (x0, v0) +
    L (eps_x, eps_v) per subspace; loss = |sum_k P_k L_vv,k s + eps_v|^2 over pixels, mean over the batch, with s
    the model's velocity score: for `VSMDPrecond` (s = sum_k P_k (-net / L_vv,k)) that is |eps_v - net|^2. Its
    minimum, at the exact score, is E Var(eps_v | z_t) > 0. Only the model gets gradient. Random draws, in order,
    from `generator`: t [B], v0, eps_x, eps_v (each like x0); `t` and `noise` = (v0, eps_x, eps_v) override them.
    """
    x0 = check_image_batch("x0", x0)
    B = x0.shape[0]
    if t is None:
        t = process.t0 + (process.T - process.t0) * torch.rand(B, generator=generator, dtype=_F64, device=x0.device)
    if noise is None:
        v0 = process.sample_velocity(x0, generator)
        eps_x = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        eps_v = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif isinstance(noise, (tuple, list)) and len(noise) == 3:
        v0, eps_x, eps_v = noise
    else:
        raise ValueError(f"noise: expected (v0, eps_x, eps_v), three images like x0, got {type(noise).__name__}")
    basis = precond.basis
    with torch.no_grad():
        x_t, v_t = process.perturb(basis, x0, v0, eps_x, eps_v, t, labels)
        lvv = process.chol_blocks(t, labels)[..., 1, 1].expand(B, -1)
    score = velocity_score(precond, x_t, v_t, t, labels)
    residual = basis.combine(score, lvv, base=eps_v, ids=basis.group_ids(labels), names={"u": "score", "base": "eps_v"})
    return residual.square().flatten(1).sum(1).to(_F64).mean()


def sampling_inputs(process: VSMDProcess, precond, seeds: Sequence[int], labels: Tensor | None,
                     image_shape: Sequence[int] | None, device) -> tuple[list[int], Tensor | None, tuple[int, ...]]:
    """Checked seeds, labels (`sampling.check_labels`: one per seed, drawn when the model or the process is
    class-conditional and none are given) and image shape (C, H, W) (the model's when None)."""
    seeds = check_seeds(seeds)
    classes = [n for n in (process.num_classes, getattr(precond, "num_classes", None)) if n]
    labels = check_labels(labels, seeds, min(classes) if classes else None, device)
    if image_shape is None:
        image_shape = getattr(precond, "image_shape", None)
        if image_shape is None:
            raise ValueError("image_shape: required, the model reports no image shape")
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list, torch.Size)) else ()
    if len(shape) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"image_shape: expected (C, H, W), three ints >= 1, got {image_shape!r}")
    return seeds, labels, shape


def prior(process: VSMDProcess, basis: SubspaceBasis, streams: SeedStreams, shape: tuple[int, ...],
           labels: Tensor | None, device, dtype) -> tuple[Tensor, Tensor]:
    """z_T = L(T) (eps_x, eps_v): eps_x is each seed's first draw (`sampling.seeded_noise`'s), eps_v its second."""
    eps_x = streams.draw(shape, dtype, device)
    return process.prior_sample(basis, eps_x, streams.draw(shape, dtype, device), labels)


def simulate_backward(process: VSMDProcess, precond, seeds: Sequence[int], steps: int = 100,
                      labels: Tensor | None = None, image_shape: Sequence[int] | None = None, dtype=torch.float32,
                      record: bool = True, progress: bool = False) -> Trajectories:
    """The reverse SDE of the phase space, Euler-Maruyama on `steps` uniform steps from T to t0, one path per seed,
    from VSMD's prior N(0, Sigma(T)). Only v is noised: per step h, z <- (I - h F) z + (0, h gamma beta s +
    sqrt(h gamma beta) xi), F the drift blocks and s the model's velocity score (one `block_combine`).

    Per seed one generator: eps_x (`sampling.seeded_noise`'s draw, so `phase_space.sample_ode` starts from the same
    point), eps_v, then the step noises: a path depends on its seed only, never on the rest of the batch.
    """
    steps = check_steps(steps)
    device = process.log_damping.device
    seeds, labels, shape = sampling_inputs(process, precond, seeds, labels, image_shape, device)
    basis, B = precond.basis, len(seeds)
    ids = basis.group_ids(labels)
    streams = SeedStreams(seeds)
    g2 = process.gamma * process.beta  # G G^T on the v block
    ts = torch.linspace(process.T, process.t0, steps + 1, dtype=_F64)
    xs, vs, zs = [], [], []
    with torch.no_grad():
        x, v = prior(process, basis, streams, shape, labels, device, dtype)
        F, eye = process.drift_blocks(labels).expand(B, -1, -1, -1), torch.eye(2, dtype=_F64, device=device)
        for i in step_indices(steps, progress):
            h = float(ts[i] - ts[i + 1])
            s = velocity_score(precond, x, v, time_column(ts[i], B, device), labels)
            if record:
                xs.append(x)
                vs.append(v)
                zs.append(math.sqrt(g2) * s)
            noise = math.sqrt(h * g2) * streams.draw(shape, dtype, device)
            x, v = basis.block_combine(x, v, eye - h * F, base_v=h * g2 * s + noise, ids=ids)
    empty = x.new_zeros((0, *x.shape))
    return Trajectories(t=ts[:-1], dt=-ts.diff(), x=torch.stack(xs) if record else empty,
                        v=torch.stack(vs) if record else empty, z_b=torch.stack(zs) if record else empty,
                        final=x, final_v=v, labels=labels)


def sample_em(process: VSMDProcess, precond, seeds: Sequence[int], steps: int = 100, labels: Tensor | None = None,
              image_shape: Sequence[int] | None = None, dtype=torch.float32,
              progress: bool = False) -> tuple[Tensor, Tensor | None, dict]:
    """The reverse SDE by Euler-Maruyama (`simulate_backward` without recording), per-seed deterministic.
    Returns (x at t0 [B, C, H, W], labels, info) like `sampling.sample`."""
    paths = simulate_backward(process, precond, seeds, steps, labels, image_shape, dtype, record=False,
                              progress=progress)
    return paths.final, paths.labels, {"nfe": steps, "steps": steps, "solver": "euler_maruyama"}


def forward_score(process: VSMDProcess, basis: SubspaceBasis, x: Tensor, v: Tensor,
                  labels: Tensor | None = None) -> Tensor:
    """VSMD's forward policy on the v block, z_f = sqrt(gamma beta) sum_k P_k (a_k x + c_k v) (its
    `alternate_sb_loss`: sqrt(beta) forward_score times sqrt(gamma)); gradients reach c, and a through c."""
    B = process.checkcheck_image_batch(basis, x=x, v=v)
    a, c = process.forward_coefficients(labels)
    if a.shape[0] not in (1, B):
        raise ValueError(f"labels: expected one label per image ({B}), got {a.shape[0]}")
    g = math.sqrt(process.gamma * process.beta)
    return basis.combine(x, (g * a).expand(B, -1), v, (g * c).expand(B, -1), ids=basis.group_ids(labels),
                         names={"u": "x", "v": "v"})


def forward_score_divergence(process: VSMDProcess, basis: SubspaceBasis, image_shape: Sequence[int],
                             labels: Tensor | None = None) -> Tensor:
    """div_v (g z_f) = gamma beta sum_k n_k c_k [B] ([1] without labels), n_k = dim P_k; exact: z_f is linear in
    v and fixed in the basis, so VSMD's Hutchinson probe is not needed (docs/METHOD.md §11.4, §12.4)."""
    C, H, W = image_shape
    dims = basis.subspace_dims(C)
    if sum(dims) != C * H * W:
        raise ValueError(f"basis: its subspaces span {sum(dims)} dimensions, not the images' C*H*W = {C * H * W} "
                         f"(an IsotropicBasis needs image_size)")
    _, c = process.forward_coefficients(labels)
    return process.gamma * process.beta * (c * torch.tensor(dims, dtype=_F64, device=c.device)).sum(1)


def forward_sb_loss(process: VSMDProcess, basis: SubspaceBasis, paths: Trajectories,
                    zeta_sb: float = 1.0) -> Tensor:
    """VSMD's forward (c) update, its `alternate_sb_loss` on backward paths (docs/METHOD.md §12.4):

        L = sum_i dt_i mean_b [ z_f . (1/2 z_f + z_b) + zeta_sb div_v(g z_f) ],  g = sqrt(gamma beta) on v,

    with the divergence exact (`forward_score_divergence`). Only c gets gradient (paths are data). zeta_sb is
    VSDM's `interact_coef`; VSMD's code has none (1). z_b is VSMD's frozen policy sqrt(gamma beta) score_v, i.e.
    g grad_v log p, not VSDM's g grad log p - z_f (`vsdm.Trajectories`): at zeta_sb = 1 on exact marginals the
    expectation is then 1/2 E|z_f|^2 (by parts, E[g grad log p . z_f] = -E[div(g z_f)]).
    """
    zeta_sb = check_number("zeta_sb", zeta_sb, "a finite number", lambda v: True)
    if not isinstance(paths, Trajectories) or paths.x.shape[0] == 0 or paths.v is None:
        raise ValueError("paths: expected Trajectories recorded by vsmd.simulate_backward(record=True)")
    N = paths.x.shape[0]
    labels = None if paths.labels is None else paths.labels.repeat(N)
    x, v = paths.x.flatten(0, 1), paths.v.flatten(0, 1)
    z_f = forward_score(process, basis, x, v, labels)
    return path_integral(paths, z_f, forward_score_divergence(process, basis, x.shape[1:], labels), zeta_sb)
