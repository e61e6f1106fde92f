"""The vsmd family: VSMD's phase-space process (`vsmd.VSMDProcess`) with one of two heads (`--vsmd-head`, stored
as `precond_config['head']`): the denoiser head, a C-channel network in `AnisoPrecond` inside
`phase_space.VSMDDenoiser` (the velocity score exactly from a VE denoiser), or VSMD's velocity head
(`velocity.VelocityScoreNet`, 2C channels in, inside `velocity.VSMDPrecond`; the head of stored models without one).
Learned by the alternating rule (`vsmd.dsm_loss`, then `vsmd.forward_sb_loss`); sampled by `vsmd.sample_em` or
`phase_space.sample_ode` (Heun / iPNDM on uniform t, the phase-space DPM-Solver++(2M) on uniform t, logsnr or
edm_sigma)."""
from __future__ import annotations

import math

from ..utils import figures
from ..sampling.spec import EM
from . import phase_space, velocity, vsmd
from .family import ALTERNATING_OPTIONS, LossFunction, Option
from .vsdm_family import BETA_MAX, AlternatingFamily, check_alternating_options, check_beta_max

__all__ = ["VSMDFamily", "VSMD_HEADS"]

VSMD_HEADS = ("denoiser", "velocity")


class VSMDFamily(AlternatingFamily):
    name = "vsmd"
    help = "VSMD's phase-space process with a velocity-score network; c learned by the alternating rule"
    variant = "vsmd_head"
    process_class, rule = vsmd.VSMDProcess, vsmd
    options = (
        Option("vsmd_head", "vsmd: denoiser (default: a C-channel EDM network inside AnisoPrecond gives the velocity "
                            "score exactly through the phase_space denoiser view; an EDM network starts it "
                            "unchanged) or velocity (VSMD's own: a 2C-channel network regresses the velocity noise)",
               choices=VSMD_HEADS, example=("velocity",)),
        Option("zeta", "vsmd: the damping ratio, in (0, 1] (1: critically damped, VSMD's default; below: "
                       "under-damped)", float, example=("0.5",)),
        Option("sigma_data", "vsmd --vsmd-head velocity: the data std of the velocity score's Gaussian skip (CLD's "
                             "mixed score; the net learns the departure from Gaussian data), 0 for VSMD's own form "
                             "(default 0.5)", float, example=("0.5",)),
        BETA_MAX, *ALTERNATING_OPTIONS,
    )

    def resolve_variant(self, cfg):
        cfg.vsmd_head = cfg.vsmd_head or "denoiser"

    def option_defaults(self, cfg):
        out = {"beta_max": 10.0, "zeta": 1.0, "forward_every": 50, "forward_paths": None, "forward_path_steps": 50,
               "forward_steps": 10, "sb_zeta": 1.0, "glr": 1e-3}
        if cfg.vsmd_head == "velocity":
            out["sigma_data"] = 0.5  # EDM's sigma_data: images in [-1, 1]
        return out

    def check_options(self, cfg):
        check_beta_max(cfg)
        check_alternating_options(cfg)
        if not (math.isfinite(cfg.zeta) and 0 < cfg.zeta <= 1):
            raise ValueError(f"--zeta: expected a damping ratio in (0, 1] (1: critically damped), got {cfg.zeta}")
        if cfg.sigma_data is not None and not (math.isfinite(cfg.sigma_data) and cfg.sigma_data >= 0):
            raise ValueError(f"--sigma-data: expected a finite number >= 0 (0: VSMD's own form), got "
                             f"{cfg.sigma_data}")

    def preview_sampler(self, cfg, nfe):
        """The phase-space DPM-Solver++(2M) on the logsnr grid for the denoiser head, else VSMD's Heun."""
        if cfg.vsmd_head == "denoiser":
            return self.resolve_sampler("dpmpp-2m", "logsnr", None, nfe)
        return self.resolve_sampler("heun", "uniform_t", None, nfe)

    def upgrade_args(self, args):
        """Checkpoints from before --vsmd-head hold VSMD's velocity head."""
        return {"vsmd_head": "velocity", **args}

    def new_process(self, cfg, num_subspaces, num_classes):
        """c at 0: the stationary N(0, I) law."""
        return vsmd.VSMDProcess(num_subspaces, num_classes, zeta=cfg.zeta, beta=cfg.beta_max)

    def network_channels(self, cfg, channels):
        return 2 * channels if cfg.vsmd_head == "velocity" else channels  # VSMD's own network reads z = (x, v)

    def new_network(self, cfg, net_config):
        if cfg.vsmd_head == "velocity":  # the phase space z = (x, v) in, the velocity score out
            from ..networks.unet import SongUNet

            return velocity.VelocityScoreNet(SongUNet(**dict(net_config, in_channels=2 * net_config["in_channels"])))
        return super().new_network(cfg, net_config)

    def network_from_config(self, net_config):
        """VSMD's velocity head reads 2C input channels, its denoiser head C."""
        if net_config["in_channels"] == 2 * net_config["out_channels"]:
            return velocity.VelocityScoreNet.from_config(net_config)
        return super().network_from_config(net_config)

    def from_core_network(self, cfg, net):
        """The velocity head's phase-space twin of an EDM network (the velocity inputs start at zero)."""
        return velocity.VelocityScoreNet.from_edm(net) if cfg.vsmd_head == "velocity" else net

    def precond_config(self, cfg):
        """The head, and the velocity head's Gaussian skip (0: VSMD's own form)."""
        return {"head": "denoiser"} if cfg.vsmd_head == "denoiser" else {"sigma_data": cfg.sigma_data or None}

    def wrap(self, net, basis, process, precond_config=None):
        """`phase_space.VSMDDenoiser` around AnisoPrecond (`head: denoiser`) or `velocity.VSMDPrecond` (VSMD's velocity
        head: its Gaussian skip `sigma_data`; absent: VSMD's own form)."""
        from ..networks.precond import AnisoPrecond

        config = dict(precond_config or {})
        if config.pop("head", "velocity") == "denoiser":
            return phase_space.VSMDDenoiser(AnisoPrecond(net, basis, **config), process)
        return velocity.VSMDPrecond(net, process, basis, **config)

    def alternating(self, cfg):
        return True

    def loss(self, cfg, model, process) -> LossFunction:
        return lambda x0, labels, gen: (vsmd.dsm_loss(process, model, x0, labels, gen), {})

    def plot_process(self, process, path, title, class_names=None):
        figures.plot_subspace_values(process.c.detach(), path, title, "c_k (VSMD damping value)",
                                     class_names=class_names)

    def check_sampler(self, plan):
        phase_space.check_sampler(plan)

    def default_sampler(self, solver=None, grid=None):
        """The phase-space DPM-Solver++(2M) on the logsnr grid (docs/families/RESULTS.md: FD 2.32 at NFE 9, Heun
        on uniform t needs NFE 35 for 7.17), else Heun on the uniform t grid."""
        if solver in (None, "dpmpp-2m") and grid in (None, "logsnr", "edm_sigma"):
            return "dpmpp-2m", grid or "logsnr"
        return super().default_sampler(solver, grid)

    def resolve_sampler(self, solver="heun", grid="uniform_t", secondary=None, nfe=9, order=None):
        """VSMD's Heun steps to the end point."""
        if solver == "heun" and secondary is None:
            secondary = "end"
        return super().resolve_sampler(solver, grid, secondary, nfe, order)

    def run_sampler(self, model, process, plan, seeds, labels, *, fitted, device, progress):
        if plan.solver == EM:
            x, labels, info = vsmd.sample_em(process, model, seeds, plan.steps, labels, progress=progress)
        else:
            x, labels, info = phase_space.sample_ode(process, model, seeds, plan.nfe, solver=plan.solver,
                                                     grid=plan.grid, order=plan.order, labels=labels, device=device,
                                                     progress=progress)
        return x, labels, {**info, "solver": plan.solver, "grid": plan.grid}
