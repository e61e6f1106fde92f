"""What a training run starts from: the basis, the forward path and the network of a new run (from the options,
--init-from or --edm-pickle), or those of a resumed one (from its checkpoint), each built by the run's family
(`processes.registry`), and the checks of the network against the data."""
from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from ..geometry.bases import DCTBasis, IsotropicBasis, PCABasis, SubspaceBasis
from ..networks.unet import SongUNet
from ..processes import registry
from ..store import checkpoint as ckpt
from ..store import StoredModel, build_model
from ..utils.data import LoadedDataset
from .config import attn_resolutions

__all__ = ["basis_from_args", "network_config", "load_init_source", "new_run", "resumed_run", "check_network"]


def basis_from_args(args: argparse.Namespace, data: LoadedDataset) -> SubspaceBasis:
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


def network_config(args: argparse.Namespace, C: int, H: int, label_dim: int) -> dict:
    """SongUNet's arguments for C-channel H x H images from the network options."""
    levels = len(args.channel_mult)
    lowest = H // 2 ** (levels - 1)
    if H % 2 ** (levels - 1):
        raise ValueError(f"--channel-mult has {levels} levels, which needs the image size to be divisible by "
                         f"{2 ** (levels - 1)}; the data is {H}x{H}")
    attn = attn_resolutions(args.attn_resolutions)
    return dict(img_resolution=H, in_channels=C, out_channels=C, label_dim=label_dim,
                model_channels=args.model_channels, channel_mult=list(args.channel_mult),
                num_blocks=args.num_blocks, attn_resolutions=[lowest] if attn is None else attn,
                dropout=args.dropout)


def load_init_source(source: str) -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) of an --init-from source: a training checkpoint, or a shipped model's name or file."""
    try:
        return StoredModel.open(source).state()
    except (OSError, ValueError) as e:  # StoredFileError is a ValueError
        raise ValueError(f"--init-from {source}: {e}") from None


def resumed_run(tensors: dict, meta: dict):
    """(network, basis, forward path, EMA state) of a resumed run: the raw network trains on, the EMA continues."""
    model, process = build_model(tensors, meta, weights="net")
    return model.net, model.basis, process, ckpt.strip_prefix("ema", tensors)


def _core_twin(family, args, net: nn.Module, net_config: dict, ema_state: dict | None):
    """The family's start from a core network and, when given, from its EMA weights (`Family.from_core_network`)."""
    if ema_state is not None:
        ema = SongUNet.from_config(net_config)
        ema.load_state_dict(ema_state)
        ema_state = family.from_core_network(args, ema).state_dict()
    return family.from_core_network(args, net), ema_state


def new_run(args: argparse.Namespace, data: LoadedDataset, num_classes: int):
    """(network, basis, forward path, EMA state or None) of a new run: the basis from the options; the forward
    path new (the family's, per class with --class-schedules), or from --init-from's when the family is the same
    (core: its schedule, METHOD §2.2); the network new, from --init-from or from --edm-pickle. A core network
    starting another family becomes the family's (`Family.from_core_network`), and so does its EMA."""
    family = registry.get(args.family)
    _, C, H, _ = data.images.shape
    basis = basis_from_args(args, data)
    process = family.new_process(args, basis.num_subspaces, num_classes if args.class_schedules else None)
    torch.manual_seed(args.seed)
    ema_state = None
    if args.init_from:
        tensors, meta = load_init_source(args.init_from)
        if args.init_weights == "net" and not any(k.startswith("net.") for k in tensors):
            raise ValueError(f"--init-weights net: {args.init_from} is a shipped model, which holds only the "
                             f"EMA network")
        source = registry.family_of(meta)
        if source is not family and (not source.network_starts_others or family.network_starts_others):
            raise ValueError(f"--init-from {args.init_from}: a {source.name} model cannot start a "
                             f"--family {family.name} run (only a core network can start another family)")
        # fine-tuning starts from the averaged weights: the raw network of a constant-lr run is far noisier
        model, source_process = build_model(tensors, meta, weights=args.init_weights)
        net, ema_state = model.net, ckpt.strip_prefix("ema", tensors)
        if source is not family:
            net, ema_state = _core_twin(family, args, net, meta["net_config"], ema_state)
        else:
            family.start_process(args, process, source_process)
    elif args.edm_pickle:
        from ..networks.edm_pickle import load_edm_network

        try:
            net, _ = load_edm_network(args.edm_pickle)
        except (OSError, ValueError) as e:
            raise ValueError(f"--edm-pickle {args.edm_pickle}: {e}") from None
        net.train()  # official pickles hold only the EMA: the raw net starts as a copy (METHOD §2.2)
        net = family.from_core_network(args, net)
    else:
        cond = args.cond if args.cond is not None else data.labels is not None
        net = family.new_network(args, network_config(args, C, H, num_classes if cond else 0))
    return net, basis, process, ema_state


def check_network(args: argparse.Namespace, net: nn.Module, data: LoadedDataset, num_classes: int) -> None:
    """The network fits the data: image size and channels (the family's input channels), classes, --cond."""
    _, C, H, _ = data.images.shape
    cfg = net.config()
    if (cfg["img_resolution"], cfg["out_channels"]) != (H, C):
        raise ValueError(f"the network is for {cfg['out_channels']}x{cfg['img_resolution']}x"
                         f"{cfg['img_resolution']} images, the data is {C}x{H}x{H}")
    channels = registry.get(args.family).network_channels(args, C)
    if cfg["in_channels"] != channels:
        raise ValueError(f"the network reads {cfg['in_channels']} channels, --family {args.family} feeds it "
                         f"{channels}")
    label_dim = cfg.get("label_dim", 0) or 0
    if label_dim and data.labels is None:
        raise ValueError(f"the network is class-conditional ({label_dim} classes) and {args.data} has no labels")
    if label_dim and label_dim != num_classes:
        raise ValueError(f"the network has label_dim={label_dim}, the data has {num_classes} classes")
    if args.cond is not None and bool(label_dim) != args.cond:
        raise ValueError(f"--{'' if args.cond else 'no-'}cond contradicts the loaded network "
                         f"(label_dim={label_dim})")
