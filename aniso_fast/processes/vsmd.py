"""The VSMD process family (Variational Schrödinger Momentum Diffusion, ../shared/RELATED.md §2, §3.2) on an
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

The network (§2.3): VSMD trains a velocity-only score, `VelocityScoreNet` (2C channels in, C out) inside
`VSMDPrecond`, score_v = -net(z, 999 t) / L_vv per subspace. The engine's default is the denoiser head
(`phase_space.VSMDDenoiser`: the same velocity score, exactly, from a C-channel VE denoiser); both heads share the
loss, the c-update and the samplers here.

Learning, VSMD's alternating rule (§2.5): `dsm_loss` for the network with c frozen, then `forward_sb_loss` for c
on paths that `simulate_backward` draws from the current model. Sampling, the sample being x: `sample_ode` (the
PF-ODE, Heun with a last Euler step as VSMD's sampler, or iPNDM) or `sample_em` (the reverse SDE).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..geometry.bases import SubspaceBasis
from ..utils.checks import (
    check_in_range,
    check_index,
    check_int,
    check_number,
    check_subspace_values,
)
from ..sampling.multistep import AB_WEIGHTS
from ..networks.unet import SongUNet
from .process import ProcessFamily, check_steps, time_column
from ..geometry.schedules import as_time
from ..sampling.noise import check_seeds, seeded_labels
from ..sampling.spec import resolve_sampler

__all__ = ["VSMDProcess", "VelocityScoreNet", "VelocityModel", "VSMDPrecond", "Trajectories", "ODE_SOLVERS", "dsm_loss",
           "simulate_backward", "sample_em", "sample_ode", "forward_score", "forward_score_divergence",
           "forward_sb_loss"]

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


def _images(name: str, x: Any) -> Tensor:
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


class VSMDProcess(ProcessFamily):
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
        x0 = _images("x0", x0)
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

    def check_images(self, basis: SubspaceBasis, **images: Tensor) -> int:
        """The images' batch size, after checking the basis's K and that the images are alike [B, C, H, W]."""
        if not isinstance(basis, SubspaceBasis):
            raise ValueError(f"basis: expected a SubspaceBasis, got {type(basis).__name__}")
        if basis.num_subspaces != self.num_subspaces:
            raise ValueError(f"basis: expected {self.num_subspaces} subspaces (one c each), got a basis with "
                             f"{basis.num_subspaces}")
        first = None
        for name, x in images.items():
            x = _images(name, x)
            if first is not None and x.shape != first.shape:
                raise ValueError(f"{name}: expected the shape of the other images {tuple(first.shape)}, got "
                                 f"{tuple(x.shape)}")
            first = x
        return first.shape[0]

    def _fit(self, basis: SubspaceBasis, blocks: Tensor, **images: Tensor) -> Tensor:
        """blocks expanded to the images' batch, after `check_images`."""
        B = self.check_images(basis, **images)
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


class VelocityScoreNet(nn.Module):
    """A SongUNet on the phase space: z = (x, v) [B, 2C, H, W] in, C channels out (VSMD's `get_model('unet')`).

    `forward(z, noise_labels, class_labels=None)` has SongUNet's signature. `from_edm(net)` starts from an EDM
    network on x (C in, C out): every weight copied, the v input channels zero, so its output on (x, v) is the
    EDM network's on x.
    """

    def __init__(self, net: SongUNet):
        super().__init__()
        if not isinstance(net, SongUNet):
            raise ValueError(f"net: expected a SongUNet, got {type(net).__name__}")
        cfg = net.config()
        if cfg["in_channels"] != 2 * cfg["out_channels"]:
            raise ValueError(f"in_channels: expected 2 x out_channels = {2 * cfg['out_channels']} (the phase space "
                             f"z = (x, v)), got {cfg['in_channels']}")
        self.net = net
        self.channels = cfg["out_channels"]
        self.label_dim = cfg["label_dim"]

    def config(self) -> dict:
        return self.net.config()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the x half: the output channels and resolution."""
        cfg = self.net.config()
        return cfg["out_channels"], cfg["img_resolution"], cfg["img_resolution"]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "VelocityScoreNet":
        return cls(SongUNet.from_config(dict(cfg)))

    @classmethod
    def from_edm(cls, net: SongUNet) -> "VelocityScoreNet":
        """The phase-space net whose start is `net` (e.g. `models.build_model(...)[0].net` of `fmnist-edm`)."""
        if not isinstance(net, SongUNet):
            raise ValueError(f"net: expected an EDM SongUNet, got {type(net).__name__}")
        cfg = net.config()
        C = cfg["out_channels"]
        if cfg["in_channels"] != C:
            raise ValueError(f"in_channels: expected an EDM network with as many input as output channels "
                             f"({C}), got {cfg['in_channels']}")
        phase = SongUNet(**dict(cfg, in_channels=2 * C))
        source = net.state_dict()
        state = {}
        for name, value in phase.state_dict().items():
            src = source[name]
            if value.shape == src.shape:
                state[name] = src.clone()
            else:  # a layer that reads the raw input (first conv; skip/residual encoder taps): v columns zero
                state[name] = torch.cat([src, torch.zeros_like(src)], dim=1)
        phase.load_state_dict(state)
        ref = next(net.parameters())
        return cls(phase.to(device=ref.device, dtype=ref.dtype)).train(net.training)

    def forward(self, z: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != 2 * self.channels:
            raise ValueError(f"z: expected the phase space [B, {2 * self.channels}, H, W] (x and v stacked on "
                             f"channels), got {tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        return self.net(z, noise_labels, class_labels, augment_labels)


class VelocityModel(nn.Module):
    """What VSMD's loss and samplers read from a velocity-score model (`VSMDPrecond`, `phase_space.VSMDDenoiser`):
    `num_classes`, `image_shape` (C, H, W) of the x half, `basis`, `process`, and its one check of the inputs."""
    label_dim: int
    _image_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int | None:
        return self.label_dim or None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the samples."""
        return self._image_shape

    def set_network(self, net: nn.Module) -> None:
        """Call `net` in place of the network (the trainer's DistributedDataParallel wrapper of the same one)."""
        self.net = net

    def _inputs(self, z: Tensor, t: Any) -> Tensor:
        """t as float64 [B] or [] after checking it lies in (0, T] and that z is the phase space [B, 2C, H, W]."""
        tt = as_time(t, self.process.log_damping.device)
        check_in_range("t", tt, torch.finfo(_F64).tiny, self.process.T,
                       f"finite times in (0, T={self.process.T:g}] (the velocity score is singular at t = 0)")
        C, H, W = self._image_shape
        if _images("z", z).shape[1:] != (2 * C, H, W):
            raise ValueError(f"z: expected the phase space [B, {2 * C}, {H}, {W}] (x and v stacked on channels), "
                             f"got {tuple(z.shape)}")
        return tt


class VSMDPrecond(VelocityModel):
    """VSMD's preconditioning (`PrecondGeneral`, RELATED.md §2.3): the velocity score

        grad_v log p_t(z) = sum_k P_k (-net(z, time_scale t) / L_vv,k(t)),

    so the network regresses the velocity noise (VSMD's loss |L_vv s + eps_v|^2 makes net -> eps_v). The noise
    label is VSMD's 999 t, not EDM's c_noise = ln(sigma)/4: a net from `VelocityScoreNet.from_edm` starts as
    the EDM function of x, but under noise labels it never saw. t in (0, T] (L_vv(0) = 0).

    `net` is a `VelocityScoreNet` or any module with the same contract that reports `label_dim` and
    `image_shape` (C, H, W) of the x half (e.g. the toy study's point MLP); z must be [B, 2C, H, W].

    `sigma_data` (None: VSMD's form above) adds a Gaussian skip, CLD's mixed score: the velocity score of z_t if
    x0 were N(0, sigma_data^2 I), -(M^{-1} z)_v with M = E diag(sigma_data^2, prior_v) E^T + Sigma(t) per
    subspace (one `block_combine`), plus -net / L_vv. The net then learns the data's departure from a Gaussian:
    zero once the data are forgotten (large t) and at small t, where v is the prior's. With VSMD's form a short
    fine-tune leaves the net's large-t score short of the restoring -v and the PF-ODE diverges (docs/DESIGN.md).
    """

    def __init__(self, net: nn.Module, process: VSMDProcess, basis: SubspaceBasis,
                 time_scale: float = 999.0, sigma_data: float | None = None):
        super().__init__()
        shape = getattr(net, "image_shape", None) if isinstance(net, nn.Module) else None
        label_dim = getattr(net, "label_dim", None)
        if (not isinstance(shape, tuple) or len(shape) != 3
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
                or isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 0):
            raise ValueError(f"net: expected a VelocityScoreNet (or a module reporting label_dim and image_shape "
                             f"(C, H, W)), got {type(net).__name__}")
        if not isinstance(process, VSMDProcess):
            raise ValueError(f"process: expected a VSMDProcess, got {type(process).__name__}")
        if not isinstance(basis, SubspaceBasis) or basis.num_subspaces != process.num_subspaces:
            raise ValueError(f"basis: expected a SubspaceBasis with the process's {process.num_subspaces} "
                             f"subspaces, got {basis!r}")
        self.net, self.process, self.basis = net, process, basis
        self.time_scale = check_number("time_scale", time_scale, "a finite number > 0", lambda v: v > 0)
        self.sigma_data = None if sigma_data is None else check_number(
            "sigma_data", sigma_data, "a finite number > 0 or None (VSMD's form)", lambda v: v > 0)
        # kept here: the trainer may swap .net for its DistributedDataParallel wrapper, which has neither
        self.label_dim, self._image_shape = label_dim, shape

    def forward(self, z: Tensor, t: Any, labels: Tensor | None = None) -> Tensor:
        """z [B, 2C, H, W], t [B] or a scalar in (0, T] -> the velocity score [B, C, H, W] (z's dtype)."""
        tt = self._inputs(z, t)
        with torch.no_grad():
            cov = self.process.cov_blocks(tt, labels)
            lvv = lower_cholesky(cov)[..., 1, 1]
        C = self._image_shape[0]
        B = z.shape[0]
        if lvv.shape[0] not in (1, B):
            raise ValueError(f"t: batch size {lvv.shape[0]} does not match z's {B}")
        onehot = None
        if self.label_dim:
            if labels is None:
                raise ValueError(f"labels: the network is class-conditional ({self.label_dim} classes); "
                                 f"pass labels")
            onehot = nn.functional.one_hot(labels, self.label_dim).to(torch.float32)
        noise = (self.time_scale * tt).expand(B).to(torch.float32)
        out = self.net(z.to(torch.float32), noise, onehot).to(z.dtype)
        ids = self.basis.group_ids(labels)
        if self.sigma_data is None:
            return self.basis.scale(out, (-1 / lvv).expand(B, -1), ids=ids)
        with torch.no_grad():
            skip = self._gaussian_score_blocks(tt, labels, cov).expand(B, -1, -1, -1)
            _, gaussian = self.basis.block_combine(z[:, :C], z[:, C:], skip, ids=ids)
        return self.basis.combine(out, (-1 / lvv).expand(B, -1), base=gaussian, ids=ids)

    def _gaussian_score_blocks(self, t: Tensor, labels: Tensor | None, cov: Tensor) -> Tensor:
        """-M^{-1} [B, K, 2, 2], M = E diag(sigma_data^2, prior_v) E^T + Sigma(t) (`cov`): the score of z_t per
        subspace for Gaussian data (its v row is the skip)."""
        E = self.process.mean_blocks(t, labels)
        D = torch.tensor([self.sigma_data ** 2, self.process.prior_v], dtype=E.dtype, device=E.device)
        M = (E * D) @ E.transpose(-1, -2) + cov
        return -torch.linalg.inv(M)


def _velocity_score(precond, x: Tensor, v: Tensor, t: Any, labels: Tensor | None) -> Tensor:
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
    x0 = _images("x0", x0)
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
    score = _velocity_score(precond, x_t, v_t, t, labels)
    residual = basis.combine(score, lvv, base=eps_v, ids=basis.group_ids(labels), names={"u": "score", "base": "eps_v"})
    return residual.square().flatten(1).sum(1).to(_F64).mean()


@dataclass
class Trajectories:
    """Backward Euler-Maruyama paths of the phase space (the forward rule's training data, RELATED.md §2.5).

    t [N] process times, descending from T; dt [N] their step sizes; x, v [N, B, C, H, W] the states at t and
    z_b [N, B, C, H, W] the frozen policy there, sqrt(gamma beta) score_v (detached); final, final_v: (x, v) at t0.
    x, v and z_b are empty ([0, ...]) when the paths were not recorded.
    """
    t: Tensor
    dt: Tensor
    x: Tensor
    v: Tensor
    z_b: Tensor
    final: Tensor
    final_v: Tensor
    labels: Tensor | None


def _sampling_inputs(process: VSMDProcess, precond, seeds: Sequence[int], labels: Tensor | None,
                     image_shape: Sequence[int] | None, device) -> tuple[list[int], Tensor | None, tuple[int, ...]]:
    """Checked seeds, labels (one per seed: drawn by `solvers.seeded_labels` when the model or the process is
    class-conditional and none are given) and image shape (C, H, W) (the model's when None)."""
    seeds = check_seeds(seeds)
    classes = [n for n in (process.num_classes, getattr(precond, "num_classes", None)) if n]
    if labels is None and classes:
        labels = seeded_labels(seeds, min(classes), device)
    elif labels is not None:
        if not classes:
            raise ValueError("labels: the model and the process are unconditional; pass no labels")
        if not isinstance(labels, Tensor) or labels.shape != (len(seeds),):
            raise ValueError(f"labels: expected one class label per seed, shape ({len(seeds)},), got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        labels = check_index("labels", labels, min(classes), "class labels").to(device)
    if image_shape is None:
        image_shape = getattr(precond, "image_shape", None)
        if image_shape is None:
            raise ValueError("image_shape: required, the model reports no image shape")
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list, torch.Size)) else ()
    if len(shape) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"image_shape: expected (C, H, W), three ints >= 1, got {image_shape!r}")
    return seeds, labels, shape


def _draw(gens: list[torch.Generator], shape: tuple[int, ...], device, dtype) -> Tensor:
    """One standard normal image per seed, each from its seed's generator (in float64, as `solvers.seeded_noise`)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=_F64) for g in gens]).to(device, dtype)


def _prior(process: VSMDProcess, basis: SubspaceBasis, gens: list[torch.Generator], shape: tuple[int, ...],
           labels: Tensor | None, device, dtype) -> tuple[Tensor, Tensor]:
    """z_T = L(T) (eps_x, eps_v): eps_x is each seed's first draw (`solvers.seeded_noise`'s), eps_v its second."""
    eps_x = _draw(gens, shape, device, dtype)
    return process.prior_sample(basis, eps_x, _draw(gens, shape, device, dtype), labels)


def simulate_backward(process: VSMDProcess, precond, seeds: Sequence[int], steps: int = 100,
                      labels: Tensor | None = None, image_shape: Sequence[int] | None = None, dtype=torch.float32,
                      record: bool = True, progress: bool = False) -> Trajectories:
    """The reverse SDE of the phase space, Euler-Maruyama on `steps` uniform steps from T to t0, one path per seed,
    from VSMD's prior N(0, Sigma(T)). Only v is noised: per step h, z <- (I - h F) z + (0, h gamma beta s +
    sqrt(h gamma beta) xi), F the drift blocks and s the model's velocity score (one `block_combine`).

    Per seed one generator: eps_x (`solvers.seeded_noise`'s draw, so `sample_ode` starts from the same point), eps_v,
    then the step noises: a path depends on its seed only, never on the rest of the batch.
    """
    steps = check_steps(steps)
    device = process.log_damping.device
    seeds, labels, shape = _sampling_inputs(process, precond, seeds, labels, image_shape, device)
    basis, B = precond.basis, len(seeds)
    ids = basis.group_ids(labels)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    g2 = process.gamma * process.beta  # G G^T on the v block
    ts = torch.linspace(process.T, process.t0, steps + 1, dtype=_F64)
    xs, vs, zs = [], [], []
    with torch.no_grad():
        x, v = _prior(process, basis, gens, shape, labels, device, dtype)
        F, eye = process.drift_blocks(labels).expand(B, -1, -1, -1), torch.eye(2, dtype=_F64, device=device)
        for i in tqdm(range(steps), disable=not progress, desc="Euler-Maruyama", leave=False):
            h = float(ts[i] - ts[i + 1])
            s = _velocity_score(precond, x, v, time_column(ts[i], B, device), labels)
            if record:
                xs.append(x)
                vs.append(v)
                zs.append(math.sqrt(g2) * s)
            noise = math.sqrt(h * g2) * _draw(gens, shape, device, dtype)
            x, v = basis.block_combine(x, v, eye - h * F, base_v=h * g2 * s + noise, ids=ids)
    empty = x.new_zeros((0, *x.shape))
    return Trajectories(t=ts[:-1], dt=-ts.diff(), x=torch.stack(xs) if record else empty,
                        v=torch.stack(vs) if record else empty, z_b=torch.stack(zs) if record else empty,
                        final=x, final_v=v, labels=labels)


def sample_em(process: VSMDProcess, precond, seeds: Sequence[int], steps: int = 100, labels: Tensor | None = None,
              image_shape: Sequence[int] | None = None, dtype=torch.float32,
              progress: bool = False) -> tuple[Tensor, Tensor | None, dict]:
    """The reverse SDE by Euler-Maruyama (`simulate_backward` without recording), per-seed deterministic.
    Returns (x at t0 [B, C, H, W], labels, info) like `solvers.sample`."""
    paths = simulate_backward(process, precond, seeds, steps, labels, image_shape, dtype, record=False,
                              progress=progress)
    return paths.final, paths.labels, {"nfe": steps, "steps": steps, "solver": "euler_maruyama"}


ODE_SOLVERS = ("heun", "ipndm", "dpmpp-2m")


def _heun(flow, x: Tensor, v: Tensor, ts: Tensor, progress: bool) -> tuple[Tensor, Tensor]:
    """Heun on the grid ts, the last step Euler (VSMD's sampler; EDM's convention): 2N - 1 calls for N steps."""
    N = len(ts) - 1
    for i in tqdm(range(N), disable=not progress, desc="Heun", leave=False):
        h = float(ts[i + 1] - ts[i])
        dx, dv = flow(x, v, ts[i])
        x_e, v_e = x + h * dx, v + h * dv  # Euler step
        if i == N - 1:
            x, v = x_e, v_e
        else:
            dx_e, dv_e = flow(x_e, v_e, ts[i + 1])
            x, v = x + h / 2 * (dx + dx_e), v + h / 2 * (dv + dv_e)  # trapezoidal correction
    return x, v


def _ipndm(flow, x: Tensor, v: Tensor, ts: Tensor, order: int, progress: bool) -> tuple[Tensor, Tensor]:
    """Adams-Bashforth on the uniform grid ts, orders warming up 1, 2, .. `order` (iPNDM): one call per step."""
    hist: list[tuple[Tensor, Tensor]] = []
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc="iPNDM", leave=False):
        h = float(ts[i + 1] - ts[i])
        hist = [flow(x, v, ts[i])] + hist[:order - 1]
        weights = AB_WEIGHTS[len(hist)]
        x = x + h * sum(w * d[0] for w, d in zip(weights, hist))
        v = v + h * sum(w * d[1] for w, d in zip(weights, hist))
    return x, v


def sample_ode(process: VSMDProcess, precond, seeds: Sequence[int], nfe: int = 9, *, solver: str = "heun",
               grid: str = "uniform_t", order: int | None = None, labels: Tensor | None = None,
               image_shape: Sequence[int] | None = None, dtype=torch.float32, device: torch.device | str | None = None,
               progress: bool = False) -> tuple[Tensor, Tensor | None, dict]:
    """VSMD's sampler: the probability-flow ODE dz = [F z - 1/2 G G^T grad log p] dt (G nonzero on v only, so
    dv gets -1/2 gamma beta score_v) on a uniform t grid from T to t0, from VSMD's prior; the sample is x.

    solver 'heun' (VSMD's `sample(prob_flow=True)`: Heun, last step Euler, nfe = 2 steps - 1), 'ipndm'
    (Adams-Bashforth of `order` <= 4 on the same grid, nfe = steps), both on the uniform t grid, or 'dpmpp-2m',
    the phase-space exponential integrator (`phase_space.dpmpp_2m`, nfe = steps) on `grid` (uniform_t, logsnr or
    edm_sigma), for a model with a `denoise` (the denoiser head, `phase_space.VSMDDenoiser`). The engine's other
    multistep solvers (UniPC, DEIS) are exponential integrators of the VE form and do not apply here. The NFE
    rule is `solvers.resolve_sampler`'s. Seeds as `simulate_backward` (the same start point). Returns (x at t0
    [B, C, H, W], labels, info with the NFE spent) like `solvers.sample`.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(ODE_SOLVERS)} (the phase-space ODE solvers), "
                         f"got {solver!r}")
    from .families import check_sampler

    plan = resolve_sampler(solver, grid, "end" if solver == "heun" else None, nfe, order)
    check_sampler("vsmd", plan)
    if solver == "dpmpp-2m" and not callable(getattr(precond, "denoise", None)):
        raise ValueError(f"solver: dpmpp-2m needs the denoiser head (phase_space.VSMDDenoiser, a data prediction), "
                         f"got {type(precond).__name__}")
    device = process.log_damping.device if device is None else torch.device(device)
    seeds, labels, shape = _sampling_inputs(process, precond, seeds, labels, image_shape, device)
    basis, B = precond.basis, len(seeds)
    ids = basis.group_ids(labels)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        x, v = _prior(process, basis, gens, shape, labels, device, dtype)
        if solver == "dpmpp-2m":
            from .phase_space import dpmpp_2m, sigma_grid

            grid_t = sigma_grid(process, grid, plan.steps, B, labels)
            x, v = dpmpp_2m(process, precond, x, v, grid_t, labels, order=plan.order, progress=progress)
        else:
            F, half_g2 = process.drift_blocks(labels).expand(B, -1, -1, -1), process.gamma * process.beta / 2

            def flow(x: Tensor, v: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
                s = _velocity_score(precond, x, v, time_column(t, B, device), labels)
                return basis.block_combine(x, v, F, base_v=-half_g2 * s, ids=ids)

            ts = torch.linspace(process.T, process.t0, plan.steps + 1, dtype=_F64)
            if solver == "heun":
                x, v = _heun(flow, x, v, ts, progress)
            else:
                x, v = _ipndm(flow, x, v, ts, plan.order, progress)
    return x, labels, {"nfe": plan.nfe, "steps": plan.steps, "solver": solver, "order": plan.order, "grid": grid}


def forward_score(process: VSMDProcess, basis: SubspaceBasis, x: Tensor, v: Tensor,
                  labels: Tensor | None = None) -> Tensor:
    """VSMD's forward policy on the v block, z_f = sqrt(gamma beta) sum_k P_k (a_k x + c_k v) (its
    `alternate_sb_loss`: sqrt(beta) forward_score times sqrt(gamma)); gradients reach c, and a through c."""
    B = process.check_images(basis, x=x, v=v)
    a, c = process.forward_coefficients(labels)
    if a.shape[0] not in (1, B):
        raise ValueError(f"labels: expected one label per image ({B}), got {a.shape[0]}")
    g = math.sqrt(process.gamma * process.beta)
    return basis.combine(x, (g * a).expand(B, -1), v, (g * c).expand(B, -1), ids=basis.group_ids(labels),
                         names={"u": "x", "v": "v"})


def forward_score_divergence(process: VSMDProcess, basis: SubspaceBasis, image_shape: Sequence[int],
                             labels: Tensor | None = None) -> Tensor:
    """div_v (g z_f) = gamma beta sum_k n_k c_k [B] ([1] without labels), n_k = dim P_k; exact: z_f is linear in
    v and fixed in the basis, so VSMD's Hutchinson probe is not needed (RELATED.md §3.2)."""
    C, H, W = image_shape
    dims = basis.subspace_dims(C)
    if sum(dims) != C * H * W:
        raise ValueError(f"basis: its subspaces span {sum(dims)} dimensions, not the images' C*H*W = {C * H * W} "
                         f"(an IsotropicBasis needs image_size)")
    _, c = process.forward_coefficients(labels)
    return process.gamma * process.beta * (c * torch.tensor(dims, dtype=_F64, device=c.device)).sum(1)


def forward_sb_loss(process: VSMDProcess, basis: SubspaceBasis, paths: Trajectories,
                    zeta_sb: float = 1.0) -> Tensor:
    """VSMD's forward (c) update, its `alternate_sb_loss` on backward paths (RELATED.md §2.5):

        L = sum_i dt_i mean_b [ z_f . (1/2 z_f + z_b) + zeta_sb div_v(g z_f) ],  g = sqrt(gamma beta) on v,

    with the divergence exact (`forward_score_divergence`). Only c gets gradient (paths are data). zeta_sb is
    VSDM's `interact_coef`; VSMD's code has none (1). z_b is VSMD's frozen policy sqrt(gamma beta) score_v, i.e.
    g grad_v log p, not VSDM's g grad log p - z_f (`vsdm.Trajectories`): at zeta_sb = 1 on exact marginals the
    expectation is then 1/2 E|z_f|^2 (by parts, E[g grad log p . z_f] = -E[div(g z_f)]).
    """
    zeta_sb = check_number("zeta_sb", zeta_sb, "a finite number", lambda v: True)
    if not isinstance(paths, Trajectories) or paths.x.shape[0] == 0:
        raise ValueError("paths: expected Trajectories recorded by vsmd.simulate_backward(record=True)")
    N, B = paths.x.shape[:2]
    labels = None if paths.labels is None else paths.labels.repeat(N)
    x, v, z_b = paths.x.flatten(0, 1), paths.v.flatten(0, 1), paths.z_b.flatten(0, 1)
    z_f = forward_score(process, basis, x, v, labels)
    energy = (z_f * (0.5 * z_f + z_b)).flatten(1).sum(1).to(_F64)
    div = forward_score_divergence(process, basis, x.shape[1:], labels)
    per_time = (energy + zeta_sb * div).reshape(N, B).mean(1)
    return (paths.dt.to(per_time.device) * per_time).sum()
