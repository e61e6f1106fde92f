"""VSMD's velocity-score models (docs/METHOD.md §12.3): the phase-space network `VelocityScoreNet`, the contract every
velocity-score model keeps for VSMD's loss and samplers (`VelocityModel`), and VSMD's own preconditioning
`VSMDPrecond` (the velocity head; the denoiser head is `phase_space.VSMDDenoiser`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..geometry.bases import SubspaceBasis
from ..geometry.schedules import as_time
from ..networks.unet import SongUNet
from ..utils.checks import check_in_range, check_number
from .vsmd import VSMDProcess, check_image_batch, lower_cholesky

__all__ = ["VelocityScoreNet", "VelocityModel", "VSMDPrecond"]

_F64 = torch.float64


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
        if check_image_batch("z", z).shape[1:] != (2 * C, H, W):
            raise ValueError(f"z: expected the phase space [B, {2 * C}, {H}, {W}] (x and v stacked on channels), "
                             f"got {tuple(z.shape)}")
        return tt


class VSMDPrecond(VelocityModel):
    """VSMD's preconditioning (`PrecondGeneral`, docs/METHOD.md §12.3): the velocity score

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
