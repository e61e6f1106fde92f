"""The training configuration: `python -m aniso_fast.train`'s options parsed into one namespace, every default
resolved and every check that needs no data or checkpoint done, so that bad input is a one-line error naming the
option before anything is read or written.

The general options live here; a family's options come from the registry (`processes.registry`): each family
declares them, fills their defaults for its variant (core: --stage; vsdm: --vsdm-rule; vsmd: --vsmd-head) and checks
their values, and an option given to a family (or variant) that does not take it is refused.
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

from ..networks import execution
from ..processes import registry
from ..utils.atomic import check_writable_folder
from ..utils.cli import Parser
from . import distributed, optim

__all__ = ["RESUME_FREE", "build_parser", "config_from_argv", "parse_args", "attn_resolutions", "int_list",
           "inapplicable_options"]

# options that may change between a run and its --resume (everything else must match the checkpoint)
RESUME_FREE = {"out", "resume", "kimg", "steps", "snapshot_every", "keep", "sample_every", "sample_n",
               "sample_nfe", "plot_every", "progress", "device", "precision"}


def int_list(text: str) -> list[int]:
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
    g.add_argument("--family", default="core", choices=tuple(registry.FAMILIES),
                   help="the process family: " + "; ".join(f"{f.name} ({f.help})"
                                                           for f in registry.FAMILIES.values()))
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
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda (under "
                                                    "torchrun each rank takes cuda:LOCAL_RANK)")
    # fp32 by default: no training-quality check of bf16 has been made (docs/RESULTS.md, "Precision")
    execution.add_options(g, precision="fp32", sampling=False)

    g = p.add_argument_group("network (when not loaded from --init-from / --edm-pickle)")
    g.add_argument("--cond", action=argparse.BooleanOptionalAction, default=None,
                   help="class-conditional network (default: when the data has labels)")
    g.add_argument("--model-channels", type=int, default=32, help="SongUNet base channels")
    g.add_argument("--channel-mult", type=int_list, default=[1, 2, 2], help="channel multiplier per level")
    g.add_argument("--num-blocks", type=int, default=1, help="residual blocks per level")
    g.add_argument("--attn-resolutions", type=str, default=None,
                   help="resolutions with self-attention, comma-separated, or 'none' (default: the lowest)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout probability, in [0, 1)")

    g = p.add_argument_group("basis (subspaces of the matrix schedule)")
    g.add_argument("--basis", choices=("iso", "dct", "pca", "pixel"), default=None,
                   help="iso: one subspace; dct: DCT frequency bands (METHOD 7.1); pca: principal subspaces "
                        "(METHOD 7.2-7.3); pixel: every pixel and channel its own subspace (VSDM's image code). "
                        "Default: iso for the edm/iso stages, dct for aniso and the process families")
    g.add_argument("--dct-bands", type=int_list, default=None,
                   help="band edges: '14' = frequencies max(u,v)<14 vs the rest (K=2); '7,14' gives K=3. "
                        "Default: half the image size")
    g.add_argument("--pca-rank", type=int_list, default=None,
                   help="PCA rank R (K=2: top-R directions vs the rest), or band sizes 'R1,R2' (K=3)")
    g.add_argument("--pca-per", choices=("global", "class", "cluster"), default="global",
                   help="one PCA basis, one per class, or one per cluster of classes")
    g.add_argument("--pca-clusters", type=int, default=None, help="number of clusters for --pca-per cluster")
    g.add_argument("--pca-max-per-group", type=int, default=None, help="images per PCA fit (default: all)")

    g = p.add_argument_group("schedule")
    g.add_argument("--class-schedules", action="store_true",
                   help="one schedule per class (METHOD 8); a class's schedule and its Adam state move only on "
                        "steps whose global batch contains the class")
    groups = {}
    for option, family in registry.options().values():  # each family's options, refused by the others
        if family.name not in groups:
            groups[family.name] = p.add_argument_group(f"--family {family.name}")
        option.add_to(groups[family.name])

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
    g.add_argument("--sample-nfe", type=int, default=9,
                   help="network calls per sample of the sample grids, with the family's sampler (midpoint Heun on "
                        "the uniform t grid; vsmd: its Heun, or the phase-space DPM-Solver++(2M) for the denoiser "
                        "head)")
    g.add_argument("--plot-every", type=int, default=None,
                   help="schedule plot every N steps and at the end (default: --sample-every; 0: never)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return p




def config_from_argv(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and resolve every option (family defaults, run length) and check all that need no data; bad input
    raises ValueError naming the option. No data or checkpoint is read, nothing is written."""
    return _resolve(build_parser().parse_args(argv))


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


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the family's defaults and the run length, and check every option that needs no data."""
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
    _expect(0 <= args.seed < 2 ** 63, "seed", "an integer in [0, 2^63)", args.seed)
    attn_resolutions(args.attn_resolutions)
    # non-finite values are refused everywhere; only the decay start may be 'inf' (no decay)
    for name in ("kimg", "decay_halflife_kimg", "ema_halflife_kimg", "ema_rampup_ratio"):
        _expect(_finite(getattr(args, name), 0, strict=True), name, "a finite number > 0", getattr(args, name))
    for name in ("lr", "glr", "rampup_kimg"):
        _expect(_finite(getattr(args, name), 0), name, "a finite number >= 0", getattr(args, name))
    start = args.decay_start_kimg
    _expect(start is None or start >= 0, "decay_start_kimg", "a number >= 0 or 'inf'", start)
    _expect(0 <= args.dropout < 1, "dropout", "a probability in [0, 1)", args.dropout)
    if args.init_from and args.edm_pickle:
        raise ValueError("--init-from and --edm-pickle are exclusive: pick where the network comes from")
    family = _resolve_family(args)
    try:  # the trainer's sample grids, with the family's sampler
        family.preview_sampler(args, args.sample_nfe)
    except ValueError as e:
        raise ValueError(f"--sample-nfe: {str(e).removeprefix('nfe: ')}") from None
    args.basis = args.basis or "dct"  # a family may set its own default (core: iso for the edm and iso stages)
    if args.basis == "pca" and args.pca_rank is None:
        raise ValueError("--basis pca needs --pca-rank")
    if args.basis == "pca" and args.pca_per == "cluster" and args.pca_clusters is None:
        raise ValueError("--pca-per cluster needs --pca-clusters")
    args.plot_every = args.sample_every if args.plot_every is None else args.plot_every
    # the run length is resolved here (a resume compares the actual values); the decay defaults derived from it
    # stay None, so that a resume may change the length (optim.lr_decay resolves them)
    args.steps, args.kimg = optim.train_length(args.kimg, args.steps, args.batch)
    device = distributed.resolve_device(args.device, name="--device")
    # recorded resolved (args.json, checkpoints): 'auto' becomes what it ran as
    args.precision = execution.resolve_precision(args.precision, device)
    _check_out(args.out)
    return args


def _variant_config(family, variant) -> argparse.Namespace:
    """The parser's defaults with --family and the family's variant option set (what the family's rules read)."""
    cfg = build_parser().parse_args(["--data", "-", "--out", "-"])
    cfg.family = family.name
    if family.variant is not None:
        setattr(cfg, family.variant, variant)
    return cfg


def inapplicable_options(args: argparse.Namespace) -> set[str]:
    """The family options this run's family and variant do not take."""
    family = registry.get(args.family)
    takes = set(family.option_defaults(args)) | {family.variant}
    return set(registry.options()) - takes


def _resolve_family(args: argparse.Namespace):
    """Refuse every family option the family (or its variant) does not take, then fill and check the others; the
    family's variant option is resolved first, since it decides which options apply."""
    family = registry.get(args.family)
    variants = {f.variant for f in registry.FAMILIES.values() if f.variant}
    given = [(o, getattr(args, o.name)) for o, _ in registry.options().values() if getattr(args, o.name) is not None]
    for option, value in sorted(given, key=lambda ov: ov[0].name not in variants):
        if option.name in variants and option.name != family.variant:
            _refuse(option, value, family, args)
    family.resolve_variant(args)
    defaults = family.option_defaults(args)
    for option, value in given:
        if option.name not in defaults and option.name != family.variant:
            _refuse(option, value, family, args)
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    family.check_options(args)
    return family


def _refuse(option, value, family, args) -> None:
    where = registry.where_option_applies(option.name, _variant_config)
    this = family.describe(args) if getattr(args, family.variant or "family", None) is not None else \
        f"--family {family.name}"
    shown = option.flag if option.switch else f"{option.flag} {value}"
    raise ValueError(f"{option.flag}: only with --family {' or --family '.join(where)}, got {shown} with {this}")


def attn_resolutions(text: str | None) -> list[int] | None:
    """--attn-resolutions: None (the default: the lowest resolution), [] for 'none', else the listed ones."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        return int_list(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"--attn-resolutions: expected comma-separated integers or 'none', got {text!r}") from None


def _check_out(out: str) -> None:
    """--out must be a folder, or creatable as one, that this process can write."""
    try:
        check_writable_folder(out)
    except ValueError as e:
        raise ValueError(f"--out: expected a writable folder: {e}") from None
