"""What a process family is: the `Family` protocol the registry (`registry.py`) holds, and the `Option`s a family
declares for the training command line.

A family owns, in one module: its options (name, default, valid values, and which of its variants take each:
`option_defaults`), how to build its forward path and network from a config or a stored file and wrap the network
(`new_process`, `process_from_config`, `new_network`, `network_from_config`, `wrap`), what it stores besides them
(`precond_config`), its losses (`loss`), its forward update (the alternating rule's `backward_paths` and
`forward_loss`), and the samplers it takes, its default and how it runs them (`check_sampler`, `default_sampler`,
`resolve_sampler`, `run_sampler`). Training, the store and the CLIs ask the registry for a family and call these;
no code outside a family's module asks which family it holds.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor, nn

from .. import sampling
from ..sampling.spec import Sampler

__all__ = ["Option", "Family", "LossFunction", "ALTERNATING_OPTIONS"]

# (x0, labels, generator) -> (loss, stats): one chunk's network loss
LossFunction = Callable[[Tensor, "Tensor | None", Any], "tuple[Tensor, dict | None]"]


@dataclass(frozen=True)
class Option:
    """A family option of `python -m aniso_fast.train`: the config attribute `name` (flag --name-with-dashes), its
    argparse settings, and `example`, a valid value (the argv after the flag) for the registry's walk."""
    name: str
    help: str
    type: Callable | None = None
    choices: tuple | None = None
    switch: bool = False  # a flag without a value (True when given)
    example: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_to(self, group) -> None:
        """Add the flag; its default is None (or a switch's None), so that a value given is told from none."""
        if self.switch:
            group.add_argument(self.flag, action="store_true", default=None, help=self.help)
        else:
            group.add_argument(self.flag, type=self.type, choices=self.choices, default=None, help=self.help)


# the alternating rule's options (VSDM's rule, VSMD's), declared once
ALTERNATING_OPTIONS = (
    Option("forward_every", "alternating rule: network steps between forward updates of the process (default 50)",
           int, example=("5",)),
    Option("forward_paths", "alternating rule: backward paths simulated per forward update (default: --batch)",
           int, example=("2",)),
    Option("forward_path_steps", "alternating rule: Euler-Maruyama steps of each backward path (default 50)",
           int, example=("3",)),
    Option("forward_steps", "alternating rule: Adam steps on the process per forward update (default 10)",
           int, example=("2",)),
    Option("sb_zeta", "alternating rule: the weight of the divergence in the forward SB loss (VSDM's "
                      "interact_coef; default 0.75 for vsdm, 1 for vsmd, whose loss has no such weight)",
           float, example=("0.5",)),
)


class Family:
    """The protocol of a process family (see the module docstring); the base gives the engine's defaults: a
    C-channel SongUNet inside `AnisoPrecond`, no stored wrapper configuration, no forward update, and the forward
    path learned with the network's steps."""

    name: str = ""
    help: str = ""  # one line for --family's help
    # the forward path is a MatrixSchedule: another may replace it (`sample --schedule`), grids are fitted on it
    matrix_schedule = False
    network_starts_others = False  # its network (an EDM network) starts a run of another family (--init-from)
    variant: str | None = None  # the option that picks one of the family's variants (core: stage)
    options: tuple[Option, ...] = ()  # every option the family takes, its variant option first

    def variants(self) -> tuple[Any, ...]:
        """The values of the variant option (its choices), or (None,) for a family without variants."""
        if self.variant is None:
            return (None,)
        return next(o for o in self.options if o.name == self.variant).choices

    def resolve_variant(self, cfg: argparse.Namespace) -> None:
        """Fill the variant option's default, or raise ValueError when it is required and missing."""

    def option_defaults(self, cfg: argparse.Namespace) -> dict[str, Any]:
        """{option: default} of the options this config's variant takes (None: filled by `check_options`), and
        the defaults of the general options the family sets (the schedule learning rate `glr`, required; `basis`)."""
        return {}

    def check_options(self, cfg: argparse.Namespace) -> None:
        """Check the values of the options this config takes (ValueError naming the option) after the defaults
        are filled; fill defaults that depend on other options."""

    def describe(self, cfg: argparse.Namespace) -> str:
        """`--family NAME [--VARIANT VALUE]`: this config's family in the command line's words."""
        variant = f" --{self.variant.replace('_', '-')} {getattr(cfg, self.variant)}" if self.variant else ""
        return f"--family {self.name}{variant}"

    def preview_sampler(self, cfg: argparse.Namespace, nfe: int) -> Sampler:
        """The sampler of the trainer's sample grids at `nfe` (ValueError naming `nfe` when it cannot spend it)."""
        return self.resolve_sampler(*self.default_sampler(None, None), None, nfe)

    def upgrade_args(self, args: dict) -> dict:
        """The stored arguments of a checkpoint written before an option existed, with that option's old meaning."""
        return args

    def new_process(self, cfg: argparse.Namespace, num_subspaces: int, num_classes: int | None) -> nn.Module:
        raise NotImplementedError

    def process_from_config(self, config: Mapping[str, Any]) -> nn.Module:
        raise NotImplementedError

    def network_channels(self, cfg: argparse.Namespace, channels: int) -> int:
        """The input channels of the family's network for images of `channels` channels."""
        return channels

    def new_network(self, cfg: argparse.Namespace, net_config: dict) -> nn.Module:
        """A new network from `net_config` (SongUNet's arguments for C-channel images)."""
        from ..networks.unet import SongUNet

        return SongUNet(**net_config)

    def network_from_config(self, net_config: Mapping[str, Any]) -> nn.Module:
        from ..networks.unet import SongUNet

        return SongUNet.from_config(net_config)

    def from_core_network(self, cfg: argparse.Namespace, net: nn.Module) -> nn.Module:
        """The family's network starting from a core (EDM) network: --init-from a core model, --edm-pickle."""
        return net

    def start_process(self, cfg: argparse.Namespace, process: nn.Module, source: nn.Module) -> None:
        """--init-from a model of this family: its forward path starts from the source's."""
        process.load_state_dict(source.state_dict())

    def precond_config(self, cfg: argparse.Namespace) -> dict:
        """The wrapper's configuration a file stores (`precond_config`), read back by `wrap`."""
        return {}

    def wrap(self, net: nn.Module, basis, process: nn.Module, precond_config: Mapping[str, Any] | None = None):
        """The model the losses and samplers call."""
        from ..networks.precond import AnisoPrecond

        return AnisoPrecond(net, basis)

    def learns_process(self, cfg: argparse.Namespace) -> bool:
        return True

    def alternating(self, cfg: argparse.Namespace) -> bool:
        """The forward path is learned by `forward_loss` on `backward_paths`, apart from the network's steps."""
        return False

    def loss(self, cfg: argparse.Namespace, model, process) -> LossFunction:
        raise NotImplementedError

    def backward_paths(self, process, model, seeds: Sequence[int], steps: int, labels: Tensor | None):
        raise NotImplementedError(f"the {self.name} family has no forward update")

    def forward_loss(self, process, basis, paths, zeta: float) -> Tensor:
        raise NotImplementedError(f"the {self.name} family has no forward update")

    def plot_process(self, process, path, title: str, class_names=None) -> None:
        raise NotImplementedError

    def owns(self, process) -> bool:
        """Whether `process` is a forward path of this family."""
        raise NotImplementedError

    def check_sampler(self, plan: Sampler) -> None:
        """ValueError naming `solver`, `grid` or `secondary` when the family does not take the resolved sampler."""

    def check_grid(self, grid: str, process) -> None:
        """ValueError naming `grid` when the grid does not apply to this forward path (`check_sampler` holds the
        family's own grid rules)."""

    def default_sampler(self, solver: str | None = None, grid: str | None = None) -> tuple[str, str]:
        """(solver, grid) with the unset ones filled: Heun on the uniform t grid."""
        return solver or "heun", grid or "uniform_t"

    def resolve_sampler(self, solver: str = "heun", grid: str = "uniform_t", secondary: str | None = None,
                        nfe: int = 9, order: int | None = None) -> Sampler:
        """`sampling.resolve_sampler`, then `check_sampler`; ValueError naming the argument."""
        plan = sampling.resolve_sampler(solver, grid, secondary, nfe, order)
        self.check_sampler(plan)
        return plan

    def run_sampler(self, model, process, plan: Sampler, seeds: Sequence[int], labels: Tensor | None, *,
                    fitted: Mapping[int, Sequence[float]] | None, device, progress: bool
                    ) -> tuple[Tensor, Tensor | None, dict]:
        """One sample per seed (per-seed deterministic): (x, labels, info with the NFE spent)."""
        raise NotImplementedError
