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

from ..store import checkpoint as ckpt
from . import distributed
from ..utils import figures
from . import optim
from .. import sampling
from ..utils.atomic import atomic_write_text, check_writable_folder
from ..geometry.bases import DCTBasis, IsotropicBasis, PCABasis, SubspaceBasis
from ..utils.cli import Parser
from ..utils.data import ImageDataset, InfiniteBatchSampler, load_dataset, to_uint8
from .ema import EMA, ema_beta
from ..processes.families import FAMILIES, VSDM_RULES, VSMD_HEADS, is_alternating, wrap_network
from ..networks.unet import SongUNet
from ..geometry.schedules import MatrixSchedule

__all__ = ["STAGES", "build_parser", "config_from_argv", "parse_args", "loss_function", "Trainer", "run", "main"]

STAGES = ("edm", "iso", "aniso")
_STAGE_DEFAULTS = {  # (loss c, loss reduction, schedule lr): METHOD §9 table; the families' own below
    "edm": (1.0, "mean", 0.0),
    "iso": (1.0, "mean", 1e-2),
    "aniso": (0.5, "sum", 1e-4),
    ("vsdm", "trajectory"): (0.5, "sum", 3e-3),  # the aniso stage's loss; the fine-tuning recipes' schedule lr
    ("vsdm", "alternate"): (1.0, "mean", 1e-3),  # the forward update's lr (VSDM's toy config)
    ("vsmd", None): (1.0, "mean", 1e-3),
}
_FAMILY_OPTIONS = {  # option -> (families it applies to, default)
    "beta_max": {"vsdm": 20.0, "vsmd": 10.0},
    "zeta": {"vsmd": 1.0},
    "sigma_data": {"vsmd-velocity": 0.5},  # EDM's sigma_data: images in [-1, 1]
    "forward_every": {"vsdm-alternate": 50, "vsmd": 50},
    "forward_path_steps": {"vsdm-alternate": 50, "vsmd": 50},
    "forward_steps": {"vsdm-alternate": 10, "vsmd": 10},
    "sb_zeta": {"vsdm-alternate": 0.75, "vsmd": 1.0},  # VSDM's interact_coef; VSMD's loss has no such weight
    "forward_paths": {"vsdm-alternate": None, "vsmd": None},
}
_FORWARD_CHUNK = 2 ** 31  # the chunk index of the forward update's path seeds (the data chunks count from 0)
# options that may change between a run and its --resume (everything else must match the checkpoint)
_RESUME_FREE = {"out", "resume", "kimg", "steps", "snapshot_every", "keep", "sample_every", "sample_n",
                "sample_nfe", "plot_every", "progress", "device"}


def _chunk_seed(seed: int, step: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, np.uint64)[0] >> np.uint64(1))


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
    p = Parser(
        prog="python -m aniso_fast.train",
        description="Train an EDM network with a learned isotropic or anisotropic (matrix) noise schedule. "
                    "Typical chain: --stage edm -> --stage iso --init-from ... -> --stage aniso --init-from ... "
                    "Outputs in --out: log.jsonl, checkpoint-*.safetensors, samples-*.png, schedule-*.png.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--family", default="core", choices=FAMILIES,
                   help="the process family: core (the engine's matrix schedule, trained in --stage), vsdm (VSDM's "
                        "multivariate OU process, rates learned by --vsdm-rule) or vsmd (VSMD's phase-space process "
                        "with a velocity-score network; c learned by the alternating rule)")
    g.add_argument("--stage", default=None, choices=STAGES,
                   help="family core only, required there. edm: network only, with EDM's loss (log-normal sigma; the schedule stays the frozen Karras "
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
                        "options must match the checkpoint, except output cadence, --device and --kimg/--steps "
                        "(learning-rate decay defaults derived from the run length follow it)")
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
    g.add_argument("--dropout", type=float, default=0.1, help="dropout probability, in [0, 1)")

    g = p.add_argument_group("basis (subspaces of the matrix schedule)")
    g.add_argument("--basis", choices=("iso", "dct", "pca", "pixel"), default=None,
                   help="iso: one subspace; dct: DCT frequency bands (METHOD 7.1); pca: principal subspaces "
                        "(METHOD 7.2-7.3); pixel: every pixel and channel its own subspace (VSDM's image code). "
                        "Default: iso for the edm/iso stages, dct for aniso and the process families")
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
    g.add_argument("--num-knots", type=int, default=32, help="knots of each schedule, >= 2 (METHOD 2.1)")
    g.add_argument("--loss-c", type=float, default=None,
                   help="constant c of the loss weight gdot^2/(g(g+c)) (default: 1 for edm/iso, 0.5 for aniso; "
                        "METHOD 10.2)")
    g.add_argument("--reduction", choices=("mean", "sum"), default=None,
                   help="loss reduction over a chunk (default: mean for edm/iso, sum for aniso; METHOD 4.4)")
    g.add_argument("--no-estimator", action="store_true",
                   help="aniso: backpropagate through the network's conditioning instead of the schedule-gradient "
                        "estimator of METHOD 5")

    g = p.add_argument_group("process families (--family vsdm / vsmd)")
    g.add_argument("--vsdm-rule", default=None, choices=VSDM_RULES,
                   help="how VSDM learns its rates: alternate (VSDM's rule: network steps by denoising score "
                        "matching with the rates frozen, and every --forward-every steps a forward SB update of the "
                        "rates on backward Euler-Maruyama paths) or trajectory (the trajectory loss with the "
                        "schedule-gradient estimator on the VE view, network and rates together). Default: alternate")
    g.add_argument("--beta-max", type=float, default=None,
                   help="vsdm: beta_max of VSDM's power schedule (default 20); vsmd: VSMD's constant beta "
                        "(default 10)")
    g.add_argument("--zeta", type=float, default=None,
                   help="vsmd: the damping ratio, in (0, 1] (1: critically damped, VSMD's default; below: "
                        "under-damped)")
    g.add_argument("--vsmd-head", default=None, choices=VSMD_HEADS,
                   help="vsmd: denoiser (default: a C-channel EDM network inside AnisoPrecond gives the velocity "
                        "score exactly through the phase_space denoiser view; an EDM network starts it unchanged) "
                        "or velocity (VSMD's own: a 2C-channel network regresses the velocity noise)")
    g.add_argument("--sigma-data", type=float, default=None,
                   help="vsmd --vsmd-head velocity: the data std of the velocity score's Gaussian skip (CLD's mixed "
                        "score; the net learns the departure from Gaussian data), 0 for VSMD's own form (default 0.5)")
    g.add_argument("--forward-every", type=int, default=None,
                   help="alternating rule: network steps between forward updates of the process (default 50)")
    g.add_argument("--forward-paths", type=int, default=None,
                   help="alternating rule: backward paths simulated per forward update (default: --batch)")
    g.add_argument("--forward-path-steps", type=int, default=None,
                   help="alternating rule: Euler-Maruyama steps of each backward path (default 50)")
    g.add_argument("--forward-steps", type=int, default=None,
                   help="alternating rule: Adam steps on the process per forward update (default 10)")
    g.add_argument("--sb-zeta", type=float, default=None,
                   help="alternating rule: the weight of the divergence in the forward SB loss (VSDM's "
                        "interact_coef; default 0.75 for vsdm, 1 for vsmd, whose loss has no such weight)")

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
                   help="learning-rate decay starts here (default: half the run, also after a --resume that "
                        "changes its length; 'inf': never)")
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


def config_from_argv(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and resolve every option (stage defaults, run length) and check all that need no data; bad input
    raises ValueError naming the option. No data or checkpoint is read, nothing is written."""
    return _resolve_args(build_parser().parse_args(argv))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`config_from_argv` for the command line: bad input prints `error: ...` and exits with status 2."""
    try:
        return config_from_argv(argv)
    except ValueError as e:
        build_parser().exit(2, f"error: {e}\n")


def _expect(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"--{name.replace('_', '-')}: expected {expected}, got {got}")


def _finite(v: float | None, low: float, strict: bool = False) -> bool:
    return v is None or (math.isfinite(v) and (v > low if strict else v >= low))


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill stage-dependent defaults and the run length, and check every option that needs no data."""
    for name in ("batch", "grad_accum", "sample_n", "sample_nfe", "model_channels", "num_blocks", "steps",
                 "pca_clusters", "pca_max_per_group"):
        v = getattr(args, name)
        _expect(v is None or v >= 1, name, "an integer >= 1", v)
    for name in ("snapshot_every", "sample_every", "keep", "plot_every"):
        v = getattr(args, name)
        _expect(v is None or v >= 0, name, "an integer >= 0", v)
    for name in ("channel_mult", "dct_bands", "pca_rank"):
        v = getattr(args, name)
        _expect(v is None or min(v) >= 1, name, "integers >= 1", ",".join(map(str, v or [])))
    _expect(args.num_knots >= 2, "num_knots", "an integer >= 2", args.num_knots)
    try:
        sampling.resolve_sampler("heun", "uniform_t", None, args.sample_nfe)  # the trainer's sample grids
    except ValueError as e:
        raise ValueError(f"--sample-nfe: {str(e).removeprefix('nfe: ')}") from None
    _expect(0 <= args.seed < 2 ** 63, "seed", "an integer in [0, 2^63)", args.seed)
    _attn_resolutions(args.attn_resolutions)
    # non-finite values are refused everywhere; only the decay start may be 'inf' (no decay)
    for name in ("kimg", "decay_halflife_kimg", "ema_halflife_kimg", "ema_rampup_ratio", "loss_c"):
        _expect(_finite(getattr(args, name), 0, strict=True), name, "a finite number > 0", getattr(args, name))
    for name in ("lr", "glr", "rampup_kimg"):
        _expect(_finite(getattr(args, name), 0), name, "a finite number >= 0", getattr(args, name))
    start = args.decay_start_kimg
    _expect(start is None or start >= 0, "decay_start_kimg", "a number >= 0 or 'inf'", start)
    _expect(0 <= args.dropout < 1, "dropout", "a probability in [0, 1)", args.dropout)
    if args.stage == "edm" and args.class_schedules:
        raise ValueError("--class-schedules: the edm stage has no learned schedule")
    if args.init_from and args.edm_pickle:
        raise ValueError("--init-from and --edm-pickle are exclusive: pick where the network comes from")
    c, reduction, glr = _STAGE_DEFAULTS[_resolve_family(args)]
    args.loss_c = c if args.loss_c is None else args.loss_c
    args.reduction = reduction if args.reduction is None else args.reduction
    args.glr = glr if args.glr is None else args.glr
    args.basis = args.basis or ("iso" if args.stage in ("edm", "iso") else "dct")
    if args.basis == "pca" and args.pca_rank is None:
        raise ValueError("--basis pca needs --pca-rank")
    if args.basis == "pca" and args.pca_per == "cluster" and args.pca_clusters is None:
        raise ValueError("--pca-per cluster needs --pca-clusters")
    args.plot_every = args.sample_every if args.plot_every is None else args.plot_every
    # the run length is resolved here (a resume compares the actual values); the decay defaults derived from it
    # stay None, so that a resume may change the length (optim.lr_decay resolves them)
    args.steps, args.kimg = optim.train_length(args.kimg, args.steps, args.batch)
    distributed.resolve_device(args.device, name="--device")
    _check_out(args.out)
    return args


def _resolve_family(args: argparse.Namespace):
    """Check --family, --stage, --vsdm-rule and the families' options (each only where it applies) and fill their
    defaults; returns the key of the loss defaults in `_STAGE_DEFAULTS`."""
    if args.family == "core":
        if args.stage is None:
            raise ValueError("--stage: required with --family core (edm, iso or aniso)")
    elif args.stage is not None:
        raise ValueError(f"--stage: only with --family core; --family {args.family} trains its own process")
    if args.vsdm_rule is not None and args.family != "vsdm":
        raise ValueError(f"--vsdm-rule: only with --family vsdm, got --family {args.family}")
    if args.family == "vsdm":
        args.vsdm_rule = args.vsdm_rule or "alternate"
    if args.vsmd_head is not None and args.family != "vsmd":
        raise ValueError(f"--vsmd-head: only with --family vsmd, got --family {args.family}")
    if args.family == "vsmd":
        args.vsmd_head = args.vsmd_head or "denoiser"
    variants = {args.family, f"{args.family}-{args.vsdm_rule}", f"{args.family}-{args.vsmd_head}"}
    for name, defaults in _FAMILY_OPTIONS.items():
        applies = sorted(variants & defaults.keys())
        value = getattr(args, name)
        if not applies:
            _expect(value is None, name, f"no value here: it applies to {' / '.join(sorted(defaults))} only",
                    f"{value} with --family {args.family}")
        elif value is None:
            setattr(args, name, defaults[applies[0]])
    if args.forward_paths is None and args.forward_every is not None:
        args.forward_paths = args.batch
    for name in ("forward_every", "forward_paths", "forward_path_steps", "forward_steps"):
        v = getattr(args, name)
        _expect(v is None or 1 <= v <= sampling.MAX_NFE, name, f"an integer in [1, {sampling.MAX_NFE}]", v)
    _expect(_finite(args.beta_max, 0, strict=True), "beta_max", "a finite number > 0", args.beta_max)
    _expect(args.zeta is None or (math.isfinite(args.zeta) and 0 < args.zeta <= 1), "zeta",
            "a damping ratio in (0, 1] (1: critically damped)", args.zeta)
    _expect(_finite(args.sb_zeta, 0), "sb_zeta", "a finite number >= 0", args.sb_zeta)
    _expect(_finite(args.sigma_data, 0), "sigma_data", "a finite number >= 0 (0: VSMD's own form)", args.sigma_data)
    return args.stage if args.family == "core" else (args.family, args.vsdm_rule)


def _attn_resolutions(text: str | None) -> list[int] | None:
    """--attn-resolutions: None (the default: the lowest resolution), [] for 'none', else the listed ones."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        return _int_list(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"--attn-resolutions: expected comma-separated integers or 'none', got {text!r}") from None


def _check_out(out: str) -> None:
    """--out must be a folder, or creatable as one, that this process can write."""
    try:
        check_writable_folder(out)
    except ValueError as e:
        raise ValueError(f"--out: expected a writable folder: {e}") from None


def loss_function(stage: str) -> Callable:
    """The loss of a stage (aniso_fast.losses): `edm_loss`, `iso_loss` or `trajectory_loss`."""
    from ..processes import losses

    return {"edm": losses.edm_loss, "iso": losses.iso_loss, "aniso": losses.trajectory_loss}[stage]


def _basis_from_args(args, data) -> SubspaceBasis:
    _, C, H, W = data.images.shape
    if args.basis == "iso":
        return IsotropicBasis((H, W))
    if args.basis == "pixel":
        return PCABasis.pixels((C, H, W))
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
    attn = _attn_resolutions(args.attn_resolutions)
    return dict(img_resolution=H, in_channels=C, out_channels=C, label_dim=label_dim,
                model_channels=args.model_channels, channel_mult=list(args.channel_mult),
                num_blocks=args.num_blocks, attn_resolutions=[lowest] if attn is None else attn,
                dropout=args.dropout)


def _load_init_source(source: str) -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) of an --init-from source: a training checkpoint, or a shipped model's name or file."""
    from ..store import StoredModel

    try:
        return StoredModel.open(source).state()
    except (OSError, ValueError) as e:  # StoredFileError is a ValueError
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


class Trainer:
    """Everything one training run holds; `fit()` runs it. Validation happens in the constructor, before any
    training step and any file written: data, labels, basis/image size, network/data, checkpoint configuration."""

    def __init__(self, args: argparse.Namespace, dist: distributed.Dist | None = None):
        self.args = args
        self.dist = dist if dist is not None else distributed.init(args.device)
        self.device = self.dist.device
        self.out = Path(args.out)
        self.resume_path: Path | None = None
        self.step = 0
        self.nimg = 0
        self.decay = optim.lr_decay(args.kimg, args.decay_start_kimg, args.decay_halflife_kimg)
        W = self.dist.world_size
        if args.batch % (args.grad_accum * W):
            raise ValueError(f"--batch {args.batch} must be divisible by --grad-accum x world size = "
                             f"{args.grad_accum} x {W}")

        resume = self._find_resume()
        self._load_data()
        if resume:
            tensors, meta = resume
            self._check_resume(meta)
            net, basis, schedule, ema_state = self._from_checkpoint(tensors, meta)
        else:
            net, basis, schedule, ema_state = self._from_args()
        self._set_basis(basis)
        self._set_schedule(schedule)
        self._set_network(net, ema_state)
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
        try:
            return ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--resume: {e}") from None

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
        derived = optim.lr_decay(meta["args"]["kimg"], None, None)
        for key, value in zip(("decay_start_kimg", "decay_halflife_kimg"), derived):
            if mine[key] is None and theirs.get(key) == value:  # older checkpoints stored the derived value
                theirs[key] = None
        if theirs.get("family") == "vsmd" and "vsmd_head" not in theirs:  # from before --vsmd-head: VSMD's head
            theirs["vsmd_head"] = "velocity"
        ckpt.compare_configs("the command line", mine, theirs)
        shape = list(self.data.images.shape)
        if meta["data"]["shape"] != shape or meta["data"]["num_classes"] != self.num_classes:
            raise ckpt.CheckpointError(f"--data: the checkpoint was trained on {meta['data']}, this data is "
                                       f"{{'shape': {shape}, 'num_classes': {self.num_classes}}}")

    def _from_checkpoint(self, tensors: dict, meta: dict):
        """(network, basis, schedule, EMA state) of a resumed run: the raw network trains on, the EMA continues."""
        from ..store import build_model

        model, schedule = build_model(tensors, meta, weights="net")
        return model.net, model.basis, schedule, ckpt.strip_prefix("ema", tensors)

    def _new_process(self, basis: SubspaceBasis):
        """The forward path of a new run: a MatrixSchedule (core; tied except in the aniso stage), or the family's
        process with VSDM's rates / VSMD's c at 0 (VP / the stationary N(0, I) law), per class with
        --class-schedules."""
        args = self.args
        classes = self.num_classes if args.class_schedules else None
        if args.family == "vsdm":
            from ..processes.vsdm import VSDMProcess

            return VSDMProcess(basis.num_subspaces, classes, beta_max=args.beta_max)
        if args.family == "vsmd":
            from ..processes.vsmd import VSMDProcess

            return VSMDProcess(basis.num_subspaces, classes, zeta=args.zeta, beta=args.beta_max)
        return MatrixSchedule(num_subspaces=basis.num_subspaces, num_classes=classes, tied=args.stage != "aniso",
                              num_knots=args.num_knots)

    def _from_args(self):
        """(network, basis, schedule, EMA state or None) of a new run: the basis from the options; the network new,
        from --init-from (with its schedule, METHOD §2.2, or its process when the family is the same) or from
        --edm-pickle. A VSMD run starting from an EDM network gets its phase-space twin (`from_edm`: the velocity
        inputs start at zero), and so does the EMA."""
        from ..store import build_model

        args = self.args
        _, C, H, _ = self.data.images.shape
        basis = _basis_from_args(args, self.data)
        schedule = self._new_process(basis)
        torch.manual_seed(args.seed)
        ema_state = None
        if args.init_from:
            tensors, meta = _load_init_source(args.init_from)
            if args.init_weights == "net" and not any(k.startswith("net.") for k in tensors):
                raise ValueError(f"--init-weights net: {args.init_from} is a shipped model, which holds only the "
                                 f"EMA network")
            source_family = meta.get("family") or "core"
            if source_family != args.family and (source_family != "core" or args.family == "core"):
                raise ValueError(f"--init-from {args.init_from}: a {source_family} model cannot start a "
                                 f"--family {args.family} run (only a core network can start another family)")
            # fine-tuning starts from the averaged weights: the raw network of a constant-lr run is far noisier
            model, source_schedule = build_model(tensors, meta, weights=args.init_weights)
            net, ema_state = model.net, ckpt.strip_prefix("ema", tensors)
            if source_family != args.family:
                if args.family == "vsmd" and args.vsmd_head == "velocity":
                    net, ema_state = self._phase_space_twin(net, meta["net_config"], ema_state)
            elif args.family != "core":
                schedule.load_state_dict(source_schedule.state_dict())
            elif args.stage != "edm":
                _copy_schedule(schedule, source_schedule)
        elif args.edm_pickle:
            from ..networks.edm_pickle import load_edm_network

            try:
                net, _ = load_edm_network(args.edm_pickle)
            except (OSError, ValueError) as e:
                raise ValueError(f"--edm-pickle {args.edm_pickle}: {e}") from None
            net.train()  # official pickles hold only the EMA: the raw net starts as a copy (METHOD §2.2)
        else:
            cond = args.cond if args.cond is not None else self.data.labels is not None
            cfg = _network_config(args, C, H, self.num_classes if cond else 0)
            if args.vsmd_head == "velocity":  # the phase space z = (x, v) in, the velocity score out
                from ..processes.vsmd import VelocityScoreNet

                net = VelocityScoreNet(SongUNet(**dict(cfg, in_channels=2 * C)))
            else:
                net = SongUNet(**cfg)
        if args.edm_pickle and args.vsmd_head == "velocity":
            net = self._phase_space_twin(net)[0]
        return net, basis, schedule, ema_state

    @staticmethod
    def _phase_space_twin(net: SongUNet, net_config: dict | None = None, ema_state: dict | None = None):
        """VSMD's start from a core network (VSDM takes one as it is: it denoises the VE view like the core
        family): the phase-space twin of the network and, when given, of its EMA weights."""
        from ..processes.vsmd import VelocityScoreNet

        if ema_state is not None:
            ema = SongUNet.from_config(net_config)
            ema.load_state_dict(ema_state)
            ema_state = VelocityScoreNet.from_edm(ema).state_dict()
        return VelocityScoreNet.from_edm(net), ema_state

    def _set_basis(self, basis: SubspaceBasis) -> None:
        H, W = self.data.images.shape[-2:]
        if basis.image_size is not None and tuple(basis.image_size) != (H, W):
            raise ValueError(f"the basis is for {basis.image_size[0]}x{basis.image_size[1]} images, the data is "
                             f"{H}x{W}")
        self.basis = basis.to(self.device)
        # PCA fits and GPU reductions may differ in the last bit between ranks: rank 0's basis is the basis
        self.dist.broadcast_(t for t in self.basis.state_dict().values() if t.numel())

    def _set_network(self, net: SongUNet, ema_state: dict | None) -> None:
        args = self.args
        _, C, H, _ = self.data.images.shape
        cfg = net.config()
        if (cfg["img_resolution"], cfg["out_channels"]) != (H, C):
            raise ValueError(f"the network is for {cfg['out_channels']}x{cfg['img_resolution']}x"
                             f"{cfg['img_resolution']} images, the data is {C}x{H}x{H}")
        phase = 2 * C if args.vsmd_head == "velocity" else C  # VSMD's own network reads z = (x, v)
        if cfg["in_channels"] != phase:
            raise ValueError(f"the network reads {cfg['in_channels']} channels, --family {args.family} feeds it "
                             f"{phase}")
        label_dim = cfg.get("label_dim", 0) or 0
        if label_dim and self.data.labels is None:
            raise ValueError(f"the network is class-conditional ({label_dim} classes) and {args.data} has no labels")
        if label_dim and label_dim != self.num_classes:
            raise ValueError(f"the network has label_dim={label_dim}, the data has {self.num_classes} classes")
        if args.cond is not None and bool(label_dim) != args.cond:
            raise ValueError(f"--{'' if args.cond else 'no-'}cond contradicts the loaded network "
                             f"(label_dim={label_dim})")
        inner = getattr(net, "net", net)  # VSMD's VelocityScoreNet wraps a SongUNet
        if getattr(inner, "map_augment", None) is not None:
            # no augmentation pipe passes augment labels: these weights get no gradient, and DDP must not wait for them
            inner.map_augment.requires_grad_(False)
        self.net = net.to(self.device).train()
        # VSMD's head (and the velocity head's Gaussian skip, 0: VSMD's own form); the other families' wrappers
        # take no configuration
        self.precond_config = ({} if args.family != "vsmd" else {"head": "denoiser"} if args.vsmd_head == "denoiser"
                               else {"sigma_data": args.sigma_data or None})
        self.loss_model = wrap_network(args.family, self.net, self.basis, self.schedule, self.precond_config)
        self.ddp = None
        if self.dist.enabled:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # the constructor broadcasts rank 0's weights; the net's buffers are constants: no per-forward sync
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
            self.ddp = DDP(self.net, device_ids=[self.device] if self.device.type == "cuda" else None, **no_sync)
            # the loss calls precond.flow/denoise, which call .net: route that call through DDP's forward so that
            # network gradients are averaged over ranks (the reference skipped DDP's forward, METHOD §10.11)
            self.loss_model.set_network(self.ddp)
        self.ema = EMA(self.net)
        if ema_state is not None:
            self.ema.module.load_state_dict(ema_state)

    def _set_schedule(self, schedule) -> None:
        """The forward path (MatrixSchedule, or the family's process): one parameter [S, K...], class rows first."""
        if schedule.num_subspaces != self.basis.num_subspaces:
            raise ValueError(f"the schedule has {schedule.num_subspaces} subspaces, the basis "
                             f"{self.basis.num_subspaces}")
        self.schedule = schedule.to(self.device)
        self.schedule_param, = self.schedule.parameters()
        self.learn_schedule = self.args.stage != "edm"
        # the alternating rules move the process only in their forward updates, apart from the network's steps
        self.alternating = is_alternating(self.args.family, self.args.vsdm_rule)
        self.schedule.requires_grad_(self.learn_schedule)
        self.dist.broadcast_([self.schedule_param.data])

    def _build_optim(self) -> None:
        self.opt_net = torch.optim.Adam(self.net.parameters(), lr=self.args.lr, betas=(0.9, 0.999), eps=1e-8)
        self.opt_sched = (optim.ClassMaskedAdam([self.schedule_param], lr=self.args.glr) if self.learn_schedule
                          else None)

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
            "family": self.args.family, "precond_config": self.precond_config, "stage": self.args.stage,
            "step": self.step, "nimg": self.nimg, "kimg": self.nimg / 1000,
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
        loss_fn = self._loss_function()
        step_schedule = self.learn_schedule and not self.alternating
        S = self.schedule_param.shape[0]
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
                loss, stats = loss_fn(x0, labels, gen)
                (loss / A).backward()
            loss_total += loss.detach().double()
            for k, v in (stats or {}).items():  # per-subspace summaries; per-sample ones ("t") are skipped
                v = torch.as_tensor(v).detach()
                if k != "t" and v.dim() <= 1 and v.numel() <= 64:
                    stats_total[k] = stats_total.get(k, 0.0) + v.double().cpu() / A

        net_grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        sched_grads = []
        if step_schedule:
            if self.schedule_param.grad is None:
                self.schedule_param.grad = torch.zeros_like(self.schedule_param)
            sched_grads = [self.schedule_param.grad]
            dist.all_reduce_mean_(sched_grads)  # network gradients were averaged by DDP in backward
        bad_net, bad_sched = optim.sanitize_grads_(net_grads), optim.sanitize_grads_(sched_grads)

        nimg = self.nimg + B
        f = optim.lr_factor(nimg, args.rampup_kimg, *self.decay)
        for group in self.opt_net.param_groups:
            group["lr"] = args.lr * f
        self.opt_net.step()
        if step_schedule:
            present = dist.any_over_ranks(present.to(self.device)) if S > 1 else torch.ones(1, dtype=torch.bool)
            for group in self.opt_sched.param_groups:
                group["lr"] = args.glr * f
            self.opt_sched.step(present)
        grad_norm_net, grad_norm_sched = optim.grad_norm(net_grads), optim.grad_norm(sched_grads)
        self.opt_net.zero_grad(set_to_none=True)
        if self.opt_sched is not None:
            self.opt_sched.zero_grad(set_to_none=True)
        self.ema.update(self.net, ema_beta(B, nimg, args.ema_halflife_kimg, args.ema_rampup_ratio))
        self.nimg = nimg
        self.step += 1

        loss_mean = (loss_total / A).reshape(1)
        dist.all_reduce_mean_([loss_mean])
        record = {"step": self.step, "kimg": self.nimg / 1000, "loss": float(loss_mean),
                  "lr": args.lr * f, "glr": args.glr * f if step_schedule else 0.0,
                  "grad_norm_net": float(grad_norm_net), "grad_norm_schedule": float(grad_norm_sched),
                  "nonfinite_net": int(bad_net), "nonfinite_schedule": int(bad_sched)}
        if S > 1:
            record["classes_present"] = int(present.sum())
        record.update({k: v.tolist() for k, v in stats_total.items()})
        if self.alternating and self.step % args.forward_every == 0:
            record.update(self.forward_update(f))
        record["sec_per_step"] = time.perf_counter() - t0
        return record

    def _loss_function(self) -> Callable:
        """(x0, labels, generator) -> (loss, stats) of this run's network step: the core stage's loss, VSDM's
        DSM (alternate) or trajectory loss on the VE view (trajectory), VSMD's velocity DSM."""
        from ..processes import losses

        args, model, process = self.args, self.loss_model, self.schedule
        if args.family == "core":
            fn, kwargs = loss_function(args.stage), dict(reduction=args.reduction)
            if args.stage != "edm":
                kwargs["c"] = args.loss_c
            if args.stage == "aniso":
                kwargs["estimator"] = not args.no_estimator
            return lambda x0, labels, gen: fn(model, process, x0, labels, generator=gen, **kwargs)
        if args.family == "vsdm" and args.vsdm_rule == "trajectory":
            return lambda x0, labels, gen: losses.trajectory_loss(
                model, process.ve_schedule(), x0, labels, generator=gen, c=args.loss_c, reduction=args.reduction,
                estimator=not args.no_estimator)
        family = self._family_module()
        return lambda x0, labels, gen: (family.dsm_loss(process, model, x0, labels, gen), {})

    def _family_module(self):
        from ..processes import vsdm
        from ..processes import vsmd

        return {"vsdm": vsdm, "vsmd": vsmd}[self.args.family]

    def forward_update(self, lr_factor: float) -> dict:
        """The alternating rule's process update (VSDM, VSMD): --forward-paths backward Euler-Maruyama paths of the
        EMA network, seeded from (seed, step) so that a resume repeats them, each rank simulating its share; then
        --forward-steps Adam steps on the forward SB loss over them (gradients averaged over ranks)."""
        args, dist, process = self.args, self.dist, self.schedule
        t0 = time.perf_counter()
        family = self._family_module()
        model = wrap_network(args.family, self.ema.module, self.basis, process, self.precond_config)
        base = _chunk_seed(args.seed, self.step, _FORWARD_CHUNK)
        seeds = [(base + i) % 2 ** 32 for i in range(dist.rank, args.forward_paths, dist.world_size)]
        classes = process.num_classes or getattr(model, "num_classes", None)
        labels = sampling.seeded_labels(seeds, classes, self.device) if classes else None
        paths = family.simulate_backward(process, model, seeds, args.forward_path_steps, labels)
        S = self.schedule_param.shape[0]
        present = torch.ones(S, dtype=torch.bool, device=self.device)
        if S > 1:
            present = dist.any_over_ranks(torch.bincount(labels, minlength=S)[:S] > 0)
        for group in self.opt_sched.param_groups:
            group["lr"] = args.glr * lr_factor
        total = 0.0
        for _ in range(args.forward_steps):
            loss = family.forward_sb_loss(process, self.basis, paths, args.sb_zeta)
            loss.backward()
            grads = [self.schedule_param.grad]
            dist.all_reduce_mean_(grads)
            optim.sanitize_grads_(grads)
            self.opt_sched.step(present)
            self.opt_sched.zero_grad(set_to_none=True)
            total += float(loss.detach())
        loss_mean = torch.tensor([total / args.forward_steps], dtype=torch.float64, device=self.device)
        dist.all_reduce_mean_([loss_mean])
        return {"forward_loss": float(loss_mean), "forward_sec": time.perf_counter() - t0}

    # ---- outputs ----

    def save_samples(self, path: Path) -> None:
        """A grid of the EMA network's samples (uniform-t midpoint Heun; VSMD's Heun with a last Euler step, or
        the phase-space DPM-Solver++(2M) on the logsnr grid for its denoiser head),
        one class per column when conditional."""
        args = self.args
        model = wrap_network(args.family, self.ema.module, self.basis, self.schedule, self.precond_config)
        labels, cols = None, None
        if model.num_classes:
            labels = torch.arange(args.sample_n, device=self.device) % model.num_classes
            cols = min(model.num_classes, args.sample_n)
        seeds = range(args.sample_n)
        with torch.no_grad():
            if args.family == "core":
                x = sampling.sample(model, self.schedule, nfe=args.sample_nfe, solver="heun", grid="uniform_t",
                                   seeds=seeds, labels=labels, device=self.device)[0]
            else:
                phase_space = {"solver": "dpmpp-2m", "grid": "logsnr"} if args.vsmd_head == "denoiser" else {}
                x = self._family_module().sample_ode(self.schedule, model, seeds, args.sample_nfe, labels=labels,
                                                     device=self.device, **phase_space)[0]
        figures.save_image_grid(to_uint8(x), path, cols=cols)

    def plot_schedule(self, path: Path) -> None:
        """The learned forward path: g_k(t) (core), VSDM's rates lambda_k, VSMD's c_k per subspace."""
        args = self.args
        title = f"{args.stage or args.family} schedule, step {self.step}, {self.nimg / 1000:.1f} kimg"
        if args.family == "core":
            figures.plot_schedule(self.schedule, path, title, class_names=self.data.class_names)
        else:
            values, name = ((self.schedule.rates, "lambda_k (VSDM rate)") if args.family == "vsdm"
                            else (self.schedule.c, "c_k (VSMD damping value)"))
            figures.plot_subspace_values(values.detach(), path, title, name, class_names=self.data.class_names)

    def _truncate_log(self, log_path: Path) -> None:
        """Drop log records after the current step: a resumed run's lost tail, or a dead run that never reached
        a checkpoint (a new run starts at step 0)."""
        if not log_path.exists():
            return
        keep = []
        for line in log_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by the crash
                continue
        atomic_write_text(log_path, "".join(line + "\n" for line in keep))

    def fit(self) -> None:
        args, main = self.args, self.dist.is_main
        log_path = self.out / "log.jsonl"
        t0 = time.perf_counter()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._truncate_log(log_path)
            if args.resume:
                tqdm.write(f"resuming from {self.resume_path} at step {self.step} ({self.nimg / 1000:.4g} kimg)")
            else:
                atomic_write_text(self.out / "args.json", json.dumps(vars(args), indent=2, sort_keys=True))
        bar = tqdm(total=args.steps, initial=self.step, disable=not (main and args.progress), unit="step",
                   dynamic_ncols=True)
        log = open(log_path, "a") if main else None
        loss = None
        try:
            while self.step < args.steps:
                record = self.train_step()
                loss = record["loss"]
                last = self.step == args.steps
                if main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", kimg=f"{record['kimg']:.4g}")
                    if args.sample_every and (self.step % args.sample_every == 0 or last):
                        self.save_samples(self.out / f"samples-{self.step:08d}.png")
                    if args.plot_every and (self.step % args.plot_every == 0 or last):
                        self.plot_schedule(self.out / f"schedule-{self.step:08d}.png")
                if (args.snapshot_every and self.step % args.snapshot_every == 0) or last:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()
        if main:
            final = "n/a (no step to run)" if loss is None else f"{loss:.4g}"
            print(f"done: step {self.step} of {args.steps}, {self.nimg / 1000:.4g} kimg, final loss {final}, "
                  f"{time.perf_counter() - t0:.1f} s, last checkpoint {ckpt.latest_checkpoint(self.out)}")


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
