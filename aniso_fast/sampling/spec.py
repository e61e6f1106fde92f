"""The solver table: one `SolverSpec` per solver holds every fact about it, and everything else reads it.

A solver's name, label and short code, its orders, how many network calls it spends per step and so how many
steps an NFE buys (METHOD §10.6: no wasted call), whether it ends on an Euler step, the secondary points and grids
it takes, whether it is stochastic, and the function that runs it. `resolve_sampler` reconciles one (solver, grid,
secondary, NFE, order) choice into a `Sampler` plan; `choose_for_nfe` decides which recorded sampler may run at an
NFE the results table did not measure. A new solver is one module plus one line in `SOLVERS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping

from torch import Tensor

from . import multistep, ode
from .grids import GRIDS, SECONDARIES

__all__ = ["SolverSpec", "SOLVERS", "EM", "MAX_NFE", "NAMED_SAMPLERS", "FALLBACK_SAMPLERS", "Sampler", "resolve_sampler",
           "sampler_name", "sampler_code", "choose_for_nfe", "learned_key", "LEARNED_KEYS"]

EM = "em"  # Euler-Maruyama, the stochastic solver: the families' own SDE samplers dispatch on it
MAX_NFE = 10_000  # far beyond any useful sampler; keeps a typo from allocating a grid of 10^11 steps


@dataclass(frozen=True)
class SolverSpec:
    """Every fact about one solver. `run(model, x, grid, labels, *, progress, ...)` integrates from x on a grid."""
    name: str  # as options and files spell it
    label: str  # as the docs and tables name it
    code: str  # for compact tables
    run: Callable[..., Tensor]
    secondaries: tuple[str, ...] = ()  # Heun's secondary points: one more network call per step, at that point
    final_euler: bool = False  # ends on an Euler step, as measured (EDM's convention: no call at the end point)
    orders: tuple[int, ...] = ()  # a multistep solver's orders (none: it takes no order)
    default_order: int | None = None
    lower_order_final: bool = False  # lowers its order over the last steps as well as warming up
    order_in_name: bool = False  # its order is part of the sampler's name (its orders differ in kind)
    stochastic: bool = False  # integrates the reverse SDE: per-seed step noises
    grids: tuple[str, ...] = tuple(GRIDS)

    @property
    def calls_per_step(self) -> int:
        return 2 if self.secondaries else 1

    def check_order(self, order: int | None) -> int | None:
        """The order to run (the default when None; None for a solver without orders); ValueError naming `order`."""
        if not self.orders:
            return None
        order = self.default_order if order is None else order
        if isinstance(order, bool) or not isinstance(order, int) or order not in self.orders:
            raise ValueError(f"order: {self.name} takes order {' or '.join(map(str, self.orders))}, got {order!r}")
        return order

    def min_nfe(self, order: int | None = None, secondary: str = "end") -> int:
        """The fewest network calls it can spend exactly: a multistep solver takes at least one step of `order`
        (`order` steps to warm up, 2 order - 1 when it also lowers the order over the last steps); end-point Heun
        2N - 1 >= 3 calls, midpoint Heun 2; the others one step."""
        if self.orders:
            order = self.check_order(order)
            return 2 * order - 1 if self.lower_order_final else order
        if self.secondaries:
            return 3 if secondary == "end" else 2
        return 1

    def steps_for_nfe(self, nfe: int, secondary: str = "end") -> tuple[int, bool]:
        """(number of steps, final_euler) that spend exactly `nfe` network calls; ValueError naming `nfe`. The order
        of a multistep solver is checked by `resolve_sampler`."""
        if not isinstance(nfe, int) or isinstance(nfe, bool):
            raise ValueError(f"nfe: expected an int, got {nfe!r}")
        if not self.secondaries:
            if nfe < 1:
                raise ValueError(f"nfe: {self.label} needs at least 1 network call, got {nfe}")
            return nfe, False
        if secondary == "end":  # the end point is never evaluated, so the last step is always Euler
            if nfe < 3 or nfe % 2 == 0:
                raise ValueError(f"nfe: end-point Heun uses 2N-1 calls (N steps, the last one Euler): expected an "
                                 f"odd number >= 3, got {nfe}")
            return (nfe + 1) // 2, True
        if nfe < 2:
            raise ValueError(f"nfe: midpoint Heun needs at least 2 network calls, got {nfe}")
        return (nfe + 1) // 2, nfe % 2 == 1


SOLVERS: dict[str, SolverSpec] = {s.name: s for s in (
    SolverSpec("euler", "Euler", "E", ode.euler),
    SolverSpec("heun", "Heun", "H", ode.heun, secondaries=SECONDARIES, final_euler=True),
    SolverSpec(EM, "Euler-Maruyama", "EM", ode.em, stochastic=True),
    SolverSpec("dpmpp-2m", "DPM-Solver++(2M)", "2M", multistep.dpmpp_2m, orders=(2,), default_order=2,
               lower_order_final=True),
    SolverSpec("dpmpp-3m", "DPM-Solver++(3M)", "3M", multistep.dpmpp_3m, orders=(3,), default_order=3,
               lower_order_final=True),
    SolverSpec("unipc", "UniPC-bh2", "UniPC", multistep.unipc, orders=(2, 3), default_order=3,
               lower_order_final=True, order_in_name=True),
    SolverSpec("ipndm", "iPNDM", "iPNDM", multistep.ipndm, orders=(1, 2, 3, 4), default_order=4,
               order_in_name=True),
    SolverSpec("deis", "DEIS-tAB", "DEIS", multistep.deis, orders=(1, 2, 3, 4), default_order=3,
               order_in_name=True),
)}

def learned_key(solver: str, order: int | None = None, secondary: str | None = None) -> str:
    """The key a grid learned for a solver is stored under (`grids.FittedGrids.learned`, the manifest's
    grids.learned): the solver's name, with its order where the order is part of the sampler's name ('ipndm-4'),
    and '-mid' for midpoint Heun ('heun-mid'; end-point Heun is 'heun')."""
    spec = SOLVERS[solver]
    key = f"{solver}-{spec.check_order(order)}" if spec.order_in_name else solver
    return f"{key}-mid" if secondary == "mid" and "mid" in spec.secondaries else key


# every key a learned grid may be stored under: the deterministic solvers at each of their orders (and Heun at
# each secondary point)
LEARNED_KEYS = tuple(dict.fromkeys(learned_key(s.name, o, sec) for s in SOLVERS.values() if not s.stochastic
                                   for o in (s.orders or (None,)) for sec in (s.secondaries or (None,))))

# samplers with a name of their own (the paper's, EDM's): (solver, grid, secondary) -> (name, one-letter code)
NAMED_SAMPLERS = {("heun", "karras", "end"): ("Heun, Karras grid (EDM)", "K"),
                  ("heun", "uniform_t", "mid"): ("midpoint Heun, uniform t grid (paper)", "u"),
                  ("heun", "uniform_t", "end"): ("end-point Heun, uniform t grid", "ue"),
                  ("heun", "edm_sigma", "end"): ("end-point Heun, EDM sigma grid on the geometric mean", "e"),
                  ("euler", "uniform_t", "end"): ("Euler, uniform t grid", "E")}

# where a family's default sampler cannot run at an NFE as designed (midpoint Heun at an even NFE), the per-NFE
# fallback tries these on the default model: they spend every NFE from their minimum with nothing to move (the
# log-SNR DPM-Solver++(2M) is the table's second line on every learned row)
FALLBACK_SAMPLERS = ({"solver": "dpmpp-2m", "grid": "logsnr"},)


def sampler_name(solver: str, grid: str, secondary: str | None = None, order: int | None = None) -> str:
    """The name the docs and tables give a resolved sampler."""
    named = NAMED_SAMPLERS.get((solver, grid, secondary or "end"))
    if named is not None:
        return named[0]
    spec = SOLVERS[solver]
    shown = f" order {order}" if order is not None and spec.order_in_name else ""
    point = "midpoint " if secondary == "mid" and spec.secondaries else ""
    return f"{point}{spec.label}{shown}, {GRIDS[grid].label}"


def sampler_code(solver: str, grid: str, secondary: str | None = None, order: int | None = None) -> str:
    """A short code for compact tables: a named sampler's letter, else solver code, order and grid letter."""
    named = NAMED_SAMPLERS.get((solver, grid, secondary or "end"))
    if named is not None and order is None:
        return named[1]
    mid = "m" if secondary == "mid" and SOLVERS[solver].secondaries else ""
    return f"{SOLVERS[solver].code}{mid}{order or ''}-{GRIDS[grid].code}"


@dataclass(frozen=True)
class Sampler:
    """A fully resolved sampler: the one place where solver, grid, secondary point and NFE are reconciled."""
    solver: str
    grid: str
    secondary: str | None  # Heun's secondary point ('mid' or 'end'); None for the one-call-per-step solvers
    nfe: int  # network calls per sample, exactly
    steps: int
    final_euler: bool
    order: int | None = None  # multistep solvers only

    @property
    def spec(self) -> SolverSpec:
        return SOLVERS[self.solver]

    @property
    def key(self) -> tuple[str, str, str]:
        """(solver, grid, secondary) as the sampler-name tables key it (Euler: secondary 'end')."""
        return (self.solver, self.grid, self.secondary or "end")

    @property
    def name(self) -> str:
        return sampler_name(self.solver, self.grid, self.secondary, self.order)

    @property
    def code(self) -> str:
        return sampler_code(self.solver, self.grid, self.secondary, self.order)


def resolve_sampler(solver: str = "heun", grid: str = "uniform_t", secondary: str | None = None,
                    nfe: int = 9, order: int | None = None) -> Sampler:
    """Check a (solver, grid, secondary, nfe) choice and work out its steps; ValueError naming the argument.

    Defaults: Heun's secondary point is the grid's (the midpoint on the uniform t grid, the end point elsewhere; on
    the Karras grid, EDM's, Heun takes the end point only); a multistep solver's order is its default order. The
    other solvers spend one call per step, take no secondary point and run on every grid. Which samplers a process
    family accepts: `Family.check_sampler`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    spec = SOLVERS[solver]
    if grid not in spec.grids:
        raise ValueError(f"grid: expected one of {', '.join(spec.grids)}, got {grid!r}")
    if secondary is not None and secondary not in SECONDARIES:
        raise ValueError(f"secondary: expected 'end' or 'mid', got {secondary!r}")
    if order is not None and not spec.orders:
        multi = ", ".join(s.name for s in SOLVERS.values() if s.orders)
        raise ValueError(f"order: only the multistep solvers ({multi}) take an order")
    if not spec.secondaries:
        if secondary == "mid":
            raise ValueError(f"secondary: {solver} uses no secondary point")
        secondary = None
    elif secondary is None:
        secondary = GRIDS[grid].default_secondary
    if secondary is not None and secondary not in GRIDS[grid].secondaries:
        raise ValueError(f"secondary: the {GRIDS[grid].label} is defined for end-point Heun only")
    if not isinstance(nfe, int) or isinstance(nfe, bool):
        raise ValueError(f"nfe: expected an int, got {nfe!r}")
    if nfe > MAX_NFE:
        raise ValueError(f"nfe: expected at most {MAX_NFE} network calls, got {nfe}")
    steps, final_euler = spec.steps_for_nfe(nfe, secondary or "end")
    if spec.orders:
        order = spec.check_order(order)
        need = spec.min_nfe(order)
        if nfe < need:
            raise ValueError(f"nfe: {solver} of order {order} needs at least {need} network calls, got {nfe}")
    return Sampler(solver, grid, secondary, nfe, steps, final_euler, order)


def _plan(choice: Mapping, nfe: int) -> Sampler | None:
    """The choice's sampler at `nfe`, or None where it cannot spend `nfe` exactly (or is malformed)."""
    try:
        return resolve_sampler(choice["solver"], choice["grid"], choice.get("secondary"), nfe, choice.get("order"))
    except (KeyError, ValueError):
        return None


def choose_for_nfe(recorded: Mapping[int, Mapping], nfe: int, *,
                   fitted_steps: Callable[[str], Collection[int]] = lambda model: (),
                   fallbacks: Iterable[Mapping] = (),
                   admits: Callable[[Mapping, Sampler], bool] = lambda choice, plan: True) -> Mapping | None:
    """Which (model, solver, grid, secondary, order) choice samples at `nfe`: the one place that decides it.

    `recorded` maps each NFE the results table measured to its best choice (dicts with model, solver, grid and
    optionally secondary, order and `nfes`: the only NFEs its line ran at). At a recorded NFE, its choice. Else the
    choice of the nearest recorded NFE (the lower on a tie) that runs at `nfe` as it ran when measured: its sampler
    spends `nfe` exactly, ends on a final Euler step exactly where it did (midpoint Heun at an even NFE is not the
    sampler measured at an odd one), is not stochastic, and its line was not measured at its own NFEs only (a
    family's own sampler at its own step counts, e.g. VSDM's Euler-Maruyama at 200 steps or VSMD's Heun at 100:
    its FD there says nothing about another NFE). Else
    the first of `fallbacks` (the caller's default model with its family's default sampler, then
    `FALLBACK_SAMPLERS`) that runs at `nfe` as designed: spent exactly, ending on an Euler step where its solver
    does (`SolverSpec.final_euler`), not stochastic. Every candidate also needs a fitted grid for its step count on
    the 'optimized' grid (`fitted_steps(model)`: the step counts the model has grids for; on the 'learned' grid, its
    `.learned` grids for the solver, as `grids.FittedGrids` holds them) and the caller's
    `admits(choice, plan)` (a model that still exists, a sampler its family takes). None when nothing applies.
    """
    def usable(choice: Mapping, plan: Sampler | None) -> bool:
        if plan is None:
            return False
        if plan.grid == "learned":  # fitted_steps returns the model's grids.FittedGrids
            learned = getattr(fitted_steps(choice["model"]), "learned", {})
            if plan.steps not in learned.get(learned_key(plan.solver, plan.order, plan.secondary), ()):
                return False
        return (plan.grid != "optimized" or plan.steps in fitted_steps(choice["model"])) and admits(choice, plan)

    if nfe in recorded and usable(recorded[nfe], _plan(recorded[nfe], nfe)):
        return recorded[nfe]
    for measured in sorted((k for k in recorded if k != nfe), key=lambda k: (abs(k - nfe), k)):
        choice = recorded[measured]
        here, then = _plan(choice, nfe), _plan(choice, measured)
        if here is not None and then is not None and not here.spec.stochastic and not choice.get("nfes") \
                and here.final_euler == then.final_euler and usable(choice, here):
            return choice
    for choice in fallbacks:
        here = _plan(choice, nfe)
        if here is not None and not here.spec.stochastic and here.final_euler == here.spec.final_euler \
                and usable(choice, here):
            return choice
    return None
