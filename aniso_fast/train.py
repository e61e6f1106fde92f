"""Training CLI: `python -m aniso_fast.train --stage edm|iso|aniso --data ... --out DIR` (METHOD §2.2, §4, §8, §9).

Stages (METHOD §2.2 chain: edm -> iso -> aniso, each `--init-from` the previous checkpoint):
- `edm`: train or fine-tune the network alone. The loss is `iso_loss` (§4.1, c = 1, batch mean) under the
  Karras-initialised tied schedule (§2.2) with its parameters frozen: t ~ U(0, T) on that schedule, i.e. EDM's
  rho = 7 noise levels visited uniformly, weighted by gdot^2 / (g^2 (g + c)). It is not EDM's log-normal loss.
- `iso`: learn an isotropic schedule (tied MatrixSchedule) jointly with the network, `iso_loss` (§4.1).
- `aniso`: learn one schedule per subspace of the basis, `trajectory_loss` with the schedule-gradient estimator
  (§4.2, §5), c = 0.5 and a batch sum by default.

One optimiser step = one global batch of `--batch` images, split into `--grad-accum` micro-batches per rank and
sharded over ranks: `grad_accum x world_size` chunks. The step's gradient is the mean over chunks of each chunk's
loss (iso: chunk mean, so the global-batch mean; aniso: chunk sum, the reference's `loss / grad_accum`, §4.4), the
same whatever the split into ranks and accumulation. Every random draw of a chunk (t, noise, estimator direction,
dropout) is seeded from (seed, step, chunk), so a run resumes bit-identically and a 2-rank run sees the same noise
as 1 rank with twice the accumulation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .bases import DCTBasis, IsotropicBasis, PCABasis, SubspaceBasis, basis_from_config
from .data import ImageDataset, InfiniteBatchSampler, load_dataset, to_uint8
from .ema import EMA, ema_beta
from .networks import SongUNet
from .precond import AnisoPrecond
from .schedules import MatrixSchedule

__all__ = ["STAGES", "ClassMaskedAdam", "lr_factor", "build_parser", "parse_args", "loss_function", "Trainer",
           "run", "main"]

STAGES = ("edm", "iso", "aniso")
_STAGE_DEFAULTS = {  # (loss c, loss reduction, schedule lr): METHOD §9 table
    "edm": (1.0, "mean", 0.0),
    "iso": (1.0, "mean", 1e-2),
    "aniso": (0.5, "sum", 1e-4),
}
# options that may change between a run and its --resume (everything else must match the checkpoint)
_RESUME_FREE = {"out", "resume", "kimg", "steps", "snapshot_every", "keep", "sample_every", "sample_n",
                "sample_nfe", "plot_every", "progress", "device"}


# ------------------------------------------------------------------------------------ optimisation


def lr_factor(nimg: int, rampup_kimg: float, decay_start_kimg: float, decay_halflife_kimg: float) -> float:
    """Learning-rate factor after `nimg` images (this step's batch included): linear warm-up over
    `rampup_kimg` to 1, held, then halved every `decay_halflife_kimg` after `decay_start_kimg` (METHOD §9, with
    a warm-up that completes, unlike the reference's §10.3)."""
    f = min(nimg / (rampup_kimg * 1000.0), 1.0) if rampup_kimg > 0 else 1.0
    over = nimg - decay_start_kimg * 1000.0
    if over > 0:
        f *= 0.5 ** (over / (decay_halflife_kimg * 1000.0))
    return f


class ClassMaskedAdam(torch.optim.Optimizer):
    """Adam on schedule parameters `psi [S, ...]` run as S independent Adams, one per class row (METHOD §8).

    `step(present)` updates only rows s with `present[s]`: an absent class keeps its parameters, both moments and
    its own step count bit for bit (the reference keeps one optimiser per class and steps those in the batch).
    With every row present this is `torch.optim.Adam` (per-row step counts are then all equal).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, present: Tensor | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                S = p.shape[0]
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(S, dtype=torch.float64, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                mask = (torch.ones(S, dtype=torch.bool, device=p.device) if present is None
                        else present.to(device=p.device, dtype=torch.bool))
                if mask.shape != (S,):
                    raise ValueError(f"present: expected a bool mask of shape [{S}], got {tuple(mask.shape)}")
                rows = mask.view(S, *([1] * (p.dim() - 1)))
                grad = p.grad
                # Optimizer.load_state_dict leaves "step" on the CPU (torch's convention for Adam's step)
                state["step"] = state["step"].to(p.device)
                step = torch.where(mask, state["step"] + 1, state["step"])
                exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                n = step.clamp_min(1).view(rows.shape)
                step_size = group["lr"] / (1 - beta1 ** n)
                denom = (exp_avg_sq.sqrt() / (1 - beta2 ** n).sqrt()).add_(group["eps"])
                new_p = p - (step_size * (exp_avg / denom)).to(p.dtype)
                p.copy_(torch.where(rows, new_p, p))
                state["exp_avg"] = torch.where(rows, exp_avg, state["exp_avg"])
                state["exp_avg_sq"] = torch.where(rows, exp_avg_sq, state["exp_avg_sq"])
                state["step"] = step


def _sanitize_(tensors: Sequence[Tensor]) -> Tensor:
    """NaN -> 0, +-inf -> +-1e5 in place (METHOD §4.4); returns the number of non-finite entries (a tensor)."""
    bad = torch.zeros((), dtype=torch.int64, device=tensors[0].device if tensors else "cpu")
    for t in tensors:
        bad = bad + (~torch.isfinite(t)).sum()
        torch.nan_to_num_(t, nan=0.0, posinf=1e5, neginf=-1e5)
    return bad


def _norm(tensors: Sequence[Tensor]) -> Tensor:
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors]))


def _chunk_seed(seed: int, step: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help text does not already explain it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aniso_fast.train",
        description="Train an EDM network with a learned isotropic or anisotropic (matrix) noise schedule. "
                    "Typical chain: --stage edm -> --stage iso --init-from ... -> --stage aniso --init-from ... "
                    "Outputs in --out: log.jsonl, checkpoint-*.safetensors, samples-*.png, schedule-*.png.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", required=True, choices=STAGES,
                   help="edm: network only, with EDM's loss (log-normal sigma; the schedule stays the frozen Karras "
                        "initialisation); iso: learn a "
                        "tied (isotropic) schedule + network with iso_loss (METHOD 4.1); aniso: learn one schedule "
                        "per subspace with trajectory_loss + estimator (METHOD 4.2, 5)")
    g.add_argument("--data", required=True,
                   help="'fashion-mnist' (train split), a path to an .npz (images [N,H,W(,C)] or [N,C,H,W], "
                        "optional labels) or an image folder (one subfolder per class)")
    g.add_argument("--xflip", action="store_true", help="augment with left-right flips (doubles the data set)")
    g.add_argument("--out", required=True, help="output folder (created); refuses to reuse one holding "
                                                "checkpoints unless --resume")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from CKPT, or (no value) from the newest checkpoint in --out; the other "
                        "options must match the checkpoint, except output cadence and --kimg/--steps")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a new stage from a checkpoint of a previous one, or from a shipped model (its name "
                        "or file) (METHOD 2.2): the network and its EMA start from the source's EMA network (see "
                        "--init-weights); a tied schedule is copied to every subspace, a global one to every class")
    g.add_argument("--init-weights", default="ema", choices=("ema", "net"),
                   help="with --init-from a training checkpoint: start the trained network from its EMA (the "
                        "paper fine-tunes the published EMA network) or from its raw network")
    g.add_argument("--edm-pickle", default=None, metavar="PKL",
                   help="start the network (and its EMA) from an NVlabs/edm network pickle")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and noise")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available; under torchrun "
                                                  "each rank takes cuda:LOCAL_RANK)")

    g = p.add_argument_group("network (when not loaded from --init-from / --edm-pickle)")
    g.add_argument("--cond", action=argparse.BooleanOptionalAction, default=None,
                   help="class-conditional network (default: when the data has labels)")
    g.add_argument("--model-channels", type=int, default=32, help="SongUNet base channels")
    g.add_argument("--channel-mult", type=_int_list, default=[1, 2, 2], help="channel multiplier per level")
    g.add_argument("--num-blocks", type=int, default=1, help="residual blocks per level")
    g.add_argument("--attn-resolutions", type=str, default=None,
                   help="resolutions with self-attention, comma-separated, or 'none' (default: the lowest)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout probability")

    g = p.add_argument_group("basis (subspaces of the matrix schedule)")
    g.add_argument("--basis", choices=("iso", "dct", "pca"), default=None,
                   help="iso: one subspace; dct: DCT frequency bands (METHOD 7.1); pca: principal subspaces "
                        "(METHOD 7.2-7.3). Default: iso for the edm/iso stages, dct for aniso")
    g.add_argument("--dct-bands", type=_int_list, default=None,
                   help="band edges: '14' = frequencies max(u,v)<14 vs the rest (K=2); '7,14' gives K=3. "
                        "Default: half the image size")
    g.add_argument("--pca-rank", type=_int_list, default=None,
                   help="PCA rank R (K=2: top-R directions vs the rest), or band sizes 'R1,R2' (K=3)")
    g.add_argument("--pca-per", choices=("global", "class", "cluster"), default="global",
                   help="one PCA basis, one per class, or one per cluster of classes")
    g.add_argument("--pca-clusters", type=int, default=None, help="number of clusters for --pca-per cluster")
    g.add_argument("--pca-max-per-group", type=int, default=None, help="images per PCA fit (default: all)")

    g = p.add_argument_group("schedule and loss")
    g.add_argument("--class-schedules", action="store_true",
                   help="one schedule per class (METHOD 8); a class's schedule and its Adam state move only on "
                        "steps whose global batch contains the class")
    g.add_argument("--num-knots", type=int, default=32, help="knots of each schedule (METHOD 2.1)")
    g.add_argument("--loss-c", type=float, default=None,
                   help="constant c of the loss weight gdot^2/(g(g+c)) (default: 1 for edm/iso, 0.5 for aniso; "
                        "METHOD 10.2)")
    g.add_argument("--reduction", choices=("mean", "sum"), default=None,
                   help="loss reduction over a chunk (default: mean for edm/iso, sum for aniso; METHOD 4.4)")
    g.add_argument("--no-estimator", action="store_true",
                   help="aniso: backpropagate through the network's conditioning instead of the schedule-gradient "
                        "estimator of METHOD 5")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=64, help="global batch size (images per optimiser step)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank and step")
    g.add_argument("--kimg", type=float, default=200.0, help="training length in thousands of images")
    g.add_argument("--steps", type=int, default=None, help="training length in optimiser steps (overrides --kimg)")
    g.add_argument("--lr", type=float, default=1e-4, help="network learning rate (the paper fine-tunes at 1e-5)")
    g.add_argument("--glr", type=float, default=None,
                   help="schedule learning rate (default: 1e-2 for iso, 1e-4 for aniso; METHOD 9)")
    g.add_argument("--rampup-kimg", type=float, default=10.0, help="linear learning-rate warm-up length (0: none)")
    g.add_argument("--decay-start-kimg", type=float, default=None,
                   help="learning-rate decay starts here (default: half the run; 'inf': never)")
    g.add_argument("--decay-halflife-kimg", type=float, default=None,
                   help="learning-rate half-life after the decay start (default: an eighth of the run)")
    g.add_argument("--ema-halflife-kimg", type=float, default=500.0, help="EMA half-life in thousands of images")
    g.add_argument("--ema-rampup-ratio", type=float, default=None,
                   help="EMA ramp-up: half-life <= ratio x images seen (EDM's ema_rampup_ratio; default: off)")

    g = p.add_argument_group("outputs")
    g.add_argument("--snapshot-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept in --out (0: all)")
    g.add_argument("--sample-every", type=int, default=500,
                   help="sample grid (EMA network) every N steps and at the end (0: never)")
    g.add_argument("--sample-n", type=int, default=20, help="images in a sample grid")
    g.add_argument("--sample-nfe", type=int, default=9, help="network calls per sample (uniform-t midpoint Heun)")
    g.add_argument("--plot-every", type=int, default=None,
                   help="schedule plot every N steps and at the end (default: --sample-every; 0: never)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _resolve_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def _resolve_args(args: argparse.Namespace) -> None:
    """Fill stage-dependent defaults and check the options that need no data."""
    c, reduction, glr = _STAGE_DEFAULTS[args.stage]
    args.loss_c = c if args.loss_c is None else args.loss_c
    args.reduction = reduction if args.reduction is None else args.reduction
    args.glr = glr if args.glr is None else args.glr
    args.basis = args.basis or ("dct" if args.stage == "aniso" else "iso")
    for name in ("batch", "grad_accum", "num_knots", "sample_n", "sample_nfe", "model_channels", "num_blocks"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.kimg <= 0:
        raise ValueError(f"--kimg must be > 0, got {args.kimg}")
    if args.stage == "edm" and args.class_schedules:
        raise ValueError("--class-schedules: the edm stage has no learned schedule")
    if args.init_from and args.edm_pickle:
        raise ValueError("--init-from and --edm-pickle are exclusive: pick where the network comes from")
    if args.basis == "pca" and args.pca_rank is None:
        raise ValueError("--basis pca needs --pca-rank")
    if args.basis == "pca" and args.pca_per == "cluster" and args.pca_clusters is None:
        raise ValueError("--pca-per cluster needs --pca-clusters")
    if args.lr < 0 or args.glr < 0:
        raise ValueError("--lr and --glr must be >= 0")
    if args.loss_c <= 0:
        raise ValueError(f"--loss-c must be > 0, got {args.loss_c}")
    if args.ema_halflife_kimg <= 0:
        raise ValueError(f"--ema-halflife-kimg must be > 0, got {args.ema_halflife_kimg}")
    for name in ("snapshot_every", "sample_every", "keep"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    args.plot_every = args.sample_every if args.plot_every is None else args.plot_every
    # the length and the lr schedule are resolved here so that a resume compares the actual values
    args.steps = args.steps or max(1, math.ceil(args.kimg * 1000 / args.batch))
    args.kimg = args.steps * args.batch / 1000
    if args.decay_start_kimg is None:
        args.decay_start_kimg = args.kimg / 2
    if args.decay_halflife_kimg is None:
        args.decay_halflife_kimg = args.kimg / 8
    if args.decay_halflife_kimg <= 0:
        raise ValueError(f"--decay-halflife-kimg must be > 0, got {args.decay_halflife_kimg}")


def loss_function(stage: str) -> Callable:
    """The loss of a stage (aniso_fast.losses): `edm_loss`, `iso_loss` or `trajectory_loss`."""
    from . import losses

    return {"edm": losses.edm_loss, "iso": losses.iso_loss, "aniso": losses.trajectory_loss}[stage]


# ---------------------------------------------------------------------------------------- building


def _basis_from_args(args, data) -> SubspaceBasis:
    _, C, H, W = data.images.shape
    if args.basis == "iso":
        return IsotropicBasis((H, W))
    if args.basis == "dct":
        bands = args.dct_bands or [max(H, W) // 2]
        try:
            return DCTBasis(H, W, bands=bands)
        except ValueError as e:
            raise ValueError(f"--dct-bands {','.join(map(str, bands))} does not fit {H}x{W} images: {e}") from None
    ranks = args.pca_rank
    if args.pca_per != "global" and data.labels is None:
        raise ValueError(f"--pca-per {args.pca_per} needs class labels, and {args.data} has none")
    try:
        return PCABasis.fit(data.images, data.labels, rank=sum(ranks), per=args.pca_per,
                            num_clusters=args.pca_clusters, band_sizes=ranks,
                            max_per_group=args.pca_max_per_group, seed=args.seed)
    except ValueError as e:
        raise ValueError(f"--basis pca: {e}") from None


def _network_config(args, C: int, H: int, label_dim: int) -> dict:
    levels = len(args.channel_mult)
    lowest = H // 2 ** (levels - 1)
    if H % 2 ** (levels - 1):
        raise ValueError(f"--channel-mult has {levels} levels, which needs the image size to be divisible by "
                         f"{2 ** (levels - 1)}; the data is {H}x{H}")
    if args.attn_resolutions is None:
        attn = [lowest]
    elif args.attn_resolutions.strip().lower() == "none":
        attn = []
    else:
        attn = _int_list(args.attn_resolutions)
    return dict(img_resolution=H, in_channels=C, out_channels=C, label_dim=label_dim,
                model_channels=args.model_channels, channel_mult=list(args.channel_mult),
                num_blocks=args.num_blocks, attn_resolutions=attn, dropout=args.dropout)


def _load_init_source(source: str) -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) of an --init-from source: a training checkpoint, or a shipped model's name or file."""
    from . import models

    try:
        if models.is_shipped_file(source) or (not Path(source).exists() and source in models.shipped_models()):
            return models.read_shipped(source)
        return ckpt.load_checkpoint(source)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        raise ValueError(f"--init-from {source}: {e}") from None


def _copy_schedule(target: MatrixSchedule, source: MatrixSchedule) -> None:
    """psi of a previous stage into `target` (METHOD §2.2): one schedule -> every subspace, global -> every class."""
    for key in ("num_knots", "T", "g0"):
        if getattr(source, key) != getattr(target, key):
            raise ValueError(f"--init-from: the checkpoint's schedule has {key}={getattr(source, key)}, this run "
                             f"{getattr(target, key)}")
    (S0, P0, _), (S, P, _) = source.psi.shape, target.psi.shape
    if S0 not in (1, S):
        raise ValueError(f"--init-from: the checkpoint has {S0} class schedules, this run needs {S}"
                         + (" (a per-class schedule cannot become a global one)" if S == 1 else ""))
    if P0 not in (1, P):
        raise ValueError(f"--init-from: the checkpoint has {P0} subspace schedules, this run's basis has {P} "
                         f"subspaces (only a tied schedule can be copied to a different number of subspaces)")
    with torch.no_grad():
        target.psi.copy_(source.psi.detach().expand(S, P, -1))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": None, "python": None}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    py = random.getstate()
    state["python"] = [py[0], list(py[1]), py[2]]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, torch_state: Tensor | None, cuda_state: Tensor | None) -> None:
    if torch_state is not None:
        torch.set_rng_state(torch_state)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _versions() -> dict:
    from importlib import metadata

    def ver(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": ver("safetensors"), "aniso_fast": ver("aniso_fast")}


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Everything one training run holds; `fit()` runs it. Validation happens in the constructor, before any
    training step: data, labels, basis/image size, network/data, checkpoint configuration."""

    def __init__(self, args: argparse.Namespace, dist: distributed.Dist | None = None):
        self.args = args
        self.dist = dist if dist is not None else distributed.init(args.device)
        self.device = self.dist.device
        self.out = Path(args.out)
        self.resume_path: Path | None = None
        self.step = 0
        self.nimg = 0
        W = self.dist.world_size
        if args.batch % (args.grad_accum * W):
            raise ValueError(f"--batch {args.batch} must be divisible by --grad-accum x world size = "
                             f"{args.grad_accum} x {W}")

        resume = self._find_resume()
        self._load_data()
        tensors, meta = resume if resume else ({}, {})
        if resume:
            self._check_resume(meta)
        self._build_basis(meta, tensors)
        self._build_network(meta, tensors)
        self._build_schedule(meta, tensors)
        self._build_optim()
        if resume:
            self._load_state(tensors, meta)

    # ---- construction ----

    def _find_resume(self):
        args = self.args
        if args.resume is None:
            if ckpt.list_checkpoints(self.out):
                raise ValueError(f"--out {self.out} already holds checkpoints; pass --resume to continue that run "
                                 f"or choose another folder")
            return None
        path = ckpt.latest_checkpoint(self.out) if args.resume == "latest" else Path(args.resume)
        if path is None:
            raise ValueError(f"--resume: no checkpoint-*.safetensors in {self.out}")
        self.resume_path = path
        return ckpt.load_checkpoint(path)

    def _load_data(self) -> None:
        args = self.args
        try:
            data = load_dataset(args.data)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ValueError(f"--data {args.data}: {e}") from None
        if data.images.shape[0] < 1:
            raise ValueError(f"--data {args.data}: no images")
        _, C, H, W = data.images.shape
        if H != W:
            raise ValueError(f"--data {args.data}: images are {H}x{W}; the network needs square images")
        self.data = data
        self.num_classes = data.num_classes if data.labels is not None else 0
        if args.class_schedules and data.labels is None:
            raise ValueError(f"--class-schedules needs class labels, and {args.data} has none")
        if args.cond and data.labels is None:
            raise ValueError(f"--cond needs class labels, and {args.data} has none")
        self.dataset = ImageDataset(data.images, data.labels, xflip=args.xflip)
        self.sampler = InfiniteBatchSampler(len(self.dataset), args.batch, seed=args.seed)

    def _check_resume(self, meta: dict) -> None:
        mine = {k: v for k, v in vars(self.args).items() if k not in _RESUME_FREE}
        theirs = {k: v for k, v in meta["args"].items() if k not in _RESUME_FREE}
        ckpt.compare_configs("the command line", mine, theirs)
        shape = list(self.data.images.shape)
        if meta["data"]["shape"] != shape or meta["data"]["num_classes"] != self.num_classes:
            raise ckpt.CheckpointError(f"--data: the checkpoint was trained on {meta['data']}, this data is "
                                       f"{{'shape': {shape}, 'num_classes': {self.num_classes}}}")

    def _build_basis(self, meta: dict, tensors: dict) -> None:
        if meta:
            basis = basis_from_config(meta["basis_config"], ckpt.strip_prefix("basis", tensors))
        else:
            basis = _basis_from_args(self.args, self.data)
        H, W = self.data.images.shape[-2:]
        if basis.image_size is not None and tuple(basis.image_size) != (H, W):
            raise ValueError(f"the basis is for {basis.image_size[0]}x{basis.image_size[1]} images, the data is "
                             f"{H}x{W}")
        self.basis = basis.to(self.device)
        # PCA fits and GPU reductions may differ in the last bit between ranks: rank 0's basis is the basis
        self.dist.broadcast_(t for t in self.basis.state_dict().values() if t.numel())

    def _build_network(self, meta: dict, tensors: dict) -> None:
        args = self.args
        _, C, H, _ = self.data.images.shape
        torch.manual_seed(args.seed)
        ema_state = None
        if meta:
            net = SongUNet.from_config(meta["net_config"])
            net.load_state_dict(ckpt.strip_prefix("net", tensors))
            ema_state = ckpt.strip_prefix("ema", tensors)
        elif args.init_from:
            src_tensors, src_meta = _load_init_source(args.init_from)
            self._init_meta, self._init_tensors = src_meta, src_tensors
            net = SongUNet.from_config(src_meta["net_config"])
            if args.init_weights == "net" and not any(k.startswith("net.") for k in src_tensors):
                raise ValueError(f"--init-weights net: {args.init_from} is a shipped model, which holds only the "
                                 f"EMA network")
            # fine-tuning starts from the averaged weights: the raw network of a constant-lr run is far noisier
            net.load_state_dict(ckpt.strip_prefix(args.init_weights, src_tensors))
            ema_state = ckpt.strip_prefix("ema", src_tensors)
        elif args.edm_pickle:
            from .edm_pickle import load_edm_network

            try:
                net, _ = load_edm_network(args.edm_pickle)
            except (OSError, ValueError) as e:
                raise ValueError(f"--edm-pickle {args.edm_pickle}: {e}") from None
            net.train()  # official pickles hold only the EMA: the raw net starts as a copy (METHOD §2.2)
        else:
            cond = args.cond if args.cond is not None else self.data.labels is not None
            net = SongUNet(**_network_config(args, C, H, self.num_classes if cond else 0))
        cfg = net.config()
        if (cfg["img_resolution"], cfg["in_channels"]) != (H, C):
            raise ValueError(f"the network is for {cfg['in_channels']}x{cfg['img_resolution']}x"
                             f"{cfg['img_resolution']} images, the data is {C}x{H}x{H}")
        label_dim = cfg.get("label_dim", 0) or 0
        if label_dim and self.data.labels is None:
            raise ValueError(f"the network is class-conditional ({label_dim} classes) and {args.data} has no labels")
        if label_dim and label_dim != self.num_classes:
            raise ValueError(f"the network has label_dim={label_dim}, the data has {self.num_classes} classes")
        if args.cond is not None and bool(label_dim) != args.cond:
            raise ValueError(f"--{'' if args.cond else 'no-'}cond contradicts the loaded network "
                             f"(label_dim={label_dim})")
        if getattr(net, "map_augment", None) is not None:
            # no augmentation pipe passes augment labels: these weights get no gradient, and DDP must not wait for them
            net.map_augment.requires_grad_(False)
        self.net = net.to(self.device).train()
        self.loss_model = AnisoPrecond(self.net, self.basis)
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # the constructor broadcasts rank 0's weights; the net's buffers are constants: no per-forward sync
            import inspect

            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
            self.ddp = DDP(self.net, device_ids=[self.device] if self.device.type == "cuda" else None, **no_sync)
            # the loss calls precond.flow/denoise, which call .net: route that call through DDP's forward so that
            # network gradients are averaged over ranks (the reference skipped DDP's forward, METHOD §10.11)
            self.loss_model.net = self.ddp
        self.ema = EMA(self.net)
        if ema_state is not None:
            self.ema.module.load_state_dict(ema_state)

    def _build_schedule(self, meta: dict, tensors: dict) -> None:
        args = self.args
        if meta:
            sched = MatrixSchedule.from_config(meta["schedule_config"])
            sched.load_state_dict(ckpt.strip_prefix("schedule", tensors))
        else:
            S = self.num_classes if args.class_schedules else None
            sched = MatrixSchedule(num_subspaces=self.basis.num_subspaces, num_classes=S,
                                   tied=args.stage != "aniso", num_knots=args.num_knots)
            if args.init_from and args.stage != "edm":
                src = MatrixSchedule.from_config(self._init_meta["schedule_config"])
                src.load_state_dict(ckpt.strip_prefix("schedule", self._init_tensors))
                _copy_schedule(sched, src)
        if sched.num_subspaces != self.basis.num_subspaces:
            raise ValueError(f"the schedule has {sched.num_subspaces} subspaces, the basis "
                             f"{self.basis.num_subspaces}")
        self.schedule = sched.to(self.device)
        self.learn_schedule = args.stage != "edm"
        self.schedule.requires_grad_(self.learn_schedule)
        self.dist.broadcast_([self.schedule.psi.data])

    def _build_optim(self) -> None:
        self.opt_net = torch.optim.Adam(self.net.parameters(), lr=self.args.lr, betas=(0.9, 0.999), eps=1e-8)
        self.opt_sched = (ClassMaskedAdam([self.schedule.psi], lr=self.args.glr) if self.learn_schedule else None)

    # ---- checkpoint state ----

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, meta) of the whole run; collective under DDP (gathers every rank's RNG state)."""
        tensors = {}
        tensors.update(ckpt.prefixed("net", self.net.state_dict()))
        tensors.update(ckpt.prefixed("ema", self.ema.module.state_dict()))
        tensors.update(ckpt.prefixed("schedule", self.schedule.state_dict()))
        tensors.update(ckpt.prefixed("basis", self.basis.state_dict()))
        optim = {}
        for name, opt in (("net", self.opt_net), ("schedule", self.opt_sched)):
            if opt is not None:
                t, info = ckpt.flatten_optimizer_state(f"optim.{name}", opt.state_dict())
                tensors.update(t)
                optim[name] = info
        rngs = self.dist.gather_objects(_rng_state())
        for r, st in enumerate(rngs):
            tensors[f"rng.{r}.torch"] = st.pop("torch")
            if "cuda" in st:
                tensors[f"rng.{r}.cuda"] = st.pop("cuda")
        meta = {
            "stage": self.args.stage, "step": self.step, "nimg": self.nimg, "kimg": self.nimg / 1000,
            "args": vars(self.args), "net_config": self.net.config(), "basis_config": self.basis.config(),
            "schedule_config": self.schedule.config(), "optim": optim, "sampler": self.sampler.state_dict(),
            "rng": rngs, "world_size": self.dist.world_size, "versions": _versions(),
            "data": {"spec": self.args.data, "shape": list(self.data.images.shape), "num_classes": self.num_classes},
        }
        return tensors, meta

    def _load_state(self, tensors: dict, meta: dict) -> None:
        for name, opt in (("net", self.opt_net), ("schedule", self.opt_sched)):
            if opt is not None:
                if name not in meta["optim"]:
                    raise ckpt.CheckpointError(f"the checkpoint has no {name} optimizer state")
                opt.load_state_dict(ckpt.unflatten_optimizer_state(f"optim.{name}", tensors, meta["optim"][name]))
        self.sampler.load_state_dict(meta["sampler"])
        self.step, self.nimg = int(meta["step"]), int(meta["nimg"])
        r = self.dist.rank
        if len(meta["rng"]) == self.dist.world_size:
            _set_rng_state(meta["rng"][r], tensors.get(f"rng.{r}.torch"), tensors.get(f"rng.{r}.cuda"))

    def save_checkpoint(self) -> Path | None:
        tensors, meta = self.state()
        if not self.dist.is_main:
            return None
        path = ckpt.save_checkpoint(ckpt.checkpoint_path(self.out, self.step), tensors, meta)
        if self.args.keep:
            for old in ckpt.list_checkpoints(self.out)[:-self.args.keep]:
                old.unlink(missing_ok=True)
        return path

    # ---- one step ----

    def train_step(self, indices: Tensor | None = None) -> dict:
        """One optimiser step on the next global batch (or on dataset `indices` [batch]); returns the log record."""
        args, dist = self.args, self.dist
        t0 = time.perf_counter()
        idx = next(self.sampler) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        A, W, B = args.grad_accum, dist.world_size, idx.numel()
        chunks = idx.reshape(A, W, -1)
        loss_fn = loss_function(args.stage)
        kwargs = dict(reduction=args.reduction)
        if args.stage != "edm":
            kwargs["c"] = args.loss_c
        if args.stage == "aniso":
            kwargs["estimator"] = not args.no_estimator
        S = self.schedule.psi.shape[0]
        present = torch.zeros(S, dtype=torch.bool)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        stats_total: dict[str, Tensor] = {}
        for a in range(A):
            chunk = a * W + dist.rank
            x0, labels = self.dataset.get_batch(chunks[a, dist.rank])
            x0 = x0.to(self.device)
            if labels is not None:
                if self.schedule.num_classes is not None:
                    present |= torch.bincount(labels, minlength=S)[:S] > 0
                labels = labels.to(self.device)
            seed = _chunk_seed(args.seed, self.step, chunk)
            torch.manual_seed(seed ^ 0x5DEECE66D)  # the global stream (dropout)
            gen = torch.Generator(self.device).manual_seed(seed)
            sync = a == A - 1 or self.ddp is None
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss, stats = loss_fn(self.loss_model, self.schedule, x0, labels, generator=gen, **kwargs)
                (loss / A).backward()
            loss_total += loss.detach().double()
            for k, v in (stats or {}).items():  # per-subspace summaries; per-sample ones ("t") are skipped
                v = torch.as_tensor(v).detach()
                if k != "t" and v.dim() <= 1 and v.numel() <= 64:
                    stats_total[k] = stats_total.get(k, 0.0) + v.double().cpu() / A

        net_grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        sched_grads = []
        if self.learn_schedule:
            if self.schedule.psi.grad is None:
                self.schedule.psi.grad = torch.zeros_like(self.schedule.psi)
            sched_grads = [self.schedule.psi.grad]
            dist.all_reduce_mean_(sched_grads)  # network gradients were averaged by DDP in backward
        bad_net, bad_sched = _sanitize_(net_grads), _sanitize_(sched_grads)

        nimg = self.nimg + B
        f = lr_factor(nimg, args.rampup_kimg, args.decay_start_kimg, args.decay_halflife_kimg)
        for group in self.opt_net.param_groups:
            group["lr"] = args.lr * f
        self.opt_net.step()
        if self.opt_sched is not None:
            present = dist.any_over_ranks(present.to(self.device)) if S > 1 else torch.ones(1, dtype=torch.bool)
            for group in self.opt_sched.param_groups:
                group["lr"] = args.glr * f
            self.opt_sched.step(present)
        grad_norm_net, grad_norm_sched = _norm(net_grads), _norm(sched_grads)
        self.opt_net.zero_grad(set_to_none=True)
        if self.opt_sched is not None:
            self.opt_sched.zero_grad(set_to_none=True)
        self.ema.update(self.net, ema_beta(B, nimg, args.ema_halflife_kimg, args.ema_rampup_ratio))
        self.nimg = nimg
        self.step += 1

        loss_mean = (loss_total / A).reshape(1)
        dist.all_reduce_mean_([loss_mean])
        record = {"step": self.step, "kimg": self.nimg / 1000, "loss": float(loss_mean),
                  "lr": args.lr * f, "glr": args.glr * f if self.learn_schedule else 0.0,
                  "grad_norm_net": float(grad_norm_net), "grad_norm_schedule": float(grad_norm_sched),
                  "nonfinite_net": int(bad_net), "nonfinite_schedule": int(bad_sched)}
        if S > 1:
            record["classes_present"] = int(present.sum())
        record.update({k: v.tolist() for k, v in stats_total.items()})
        record["sec_per_step"] = time.perf_counter() - t0
        return record

    # ---- outputs ----

    def save_samples(self, path: Path) -> None:
        from PIL import Image

        from .solvers import sample

        args = self.args
        model = AnisoPrecond(self.ema.module, self.basis)
        labels = None
        cols = math.ceil(math.sqrt(args.sample_n))
        if model.num_classes:
            labels = torch.arange(args.sample_n, device=self.device) % model.num_classes
            cols = min(model.num_classes, args.sample_n)
        nfe = args.sample_nfe
        with torch.no_grad():
            x, _, _ = sample(model, self.schedule, nfe=nfe, solver="heun", grid="uniform_t",
                             seeds=range(args.sample_n), labels=labels, device=self.device)
        img = to_uint8(x).cpu()
        n, C, H, W = img.shape
        rows = math.ceil(n / cols)
        canvas = torch.zeros(C, rows * H, cols * W, dtype=torch.uint8)
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = img[i]
        arr = canvas.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if C == 1 else arr, "L" if C == 1 else "RGB").save(path)

    def plot_schedule(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sched = self.schedule
        t = torch.linspace(0, sched.T, 401, dtype=torch.float64, device=self.device)
        S = sched.num_classes or 1
        shown = list(range(min(S, 10)))
        names = self.data.class_names
        fig, axes = plt.subplots(2, len(shown), figsize=(3.2 * len(shown), 5.6), squeeze=False, sharex=True)
        with torch.no_grad():
            for col, s in enumerate(shown):
                labels = torch.full_like(t, s, dtype=torch.long) if sched.num_classes else None
                g = sched(t, labels)[0].cpu()
                tt = t.cpu()
                for k in range(g.shape[1]):
                    axes[0, col].semilogy(tt, g[:, k], label=f"g_{k}")
                    axes[1, col].semilogy(tt, g[:, k] / g[:, -1], label=f"g_{k}/g_{g.shape[1] - 1}")
                title = "global" if sched.num_classes is None else (names[s] if names else f"class {s}")
                axes[0, col].set_title(title, fontsize=9)
                axes[1, col].set_xlabel("t")
        axes[0, 0].set_ylabel("g_k(t)")
        axes[1, 0].set_ylabel("ratio to the last subspace (g/h)")
        axes[0, 0].legend(fontsize=7)
        axes[1, 0].legend(fontsize=7)
        fig.suptitle(f"{self.args.stage} schedule, step {self.step}, {self.nimg / 1000:.1f} kimg", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)

    def _truncate_log(self, log_path: Path) -> None:
        """On resume, drop log records after the checkpoint's step (they belong to the lost tail of the run)."""
        if not log_path.exists():
            return
        keep = []
        for line in log_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by the crash
                continue
        tmp = log_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, log_path)

    def fit(self) -> None:
        args, main = self.args, self.dist.is_main
        log_path = self.out / "log.jsonl"
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if args.resume:
                self._truncate_log(log_path)
                tqdm.write(f"resuming from {self.resume_path} at step {self.step} ({self.nimg / 1000:.4g} kimg)")
            else:
                (self.out / "args.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True))
        bar = tqdm(total=args.steps, initial=self.step, disable=not (main and args.progress), unit="step",
                   dynamic_ncols=True)
        log = open(log_path, "a") if main else None
        try:
            while self.step < args.steps:
                record = self.train_step()
                last = self.step == args.steps
                if main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", kimg=f"{record['kimg']:.4g}")
                    if (args.sample_every and self.step % args.sample_every == 0) or (args.sample_every and last):
                        self.save_samples(self.out / f"samples-{self.step:08d}.png")
                    if (args.plot_every and self.step % args.plot_every == 0) or (args.plot_every and last):
                        self.plot_schedule(self.out / f"schedule-{self.step:08d}.png")
                if (args.snapshot_every and self.step % args.snapshot_every == 0) or last:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> Trainer:
    """Set up (process group, validation) and train; returns the trainer (for tests and notebooks)."""
    dist = distributed.init(args.device)
    try:
        trainer = Trainer(args, dist)
        trainer.fit()
        return trainer
    finally:
        distributed.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
