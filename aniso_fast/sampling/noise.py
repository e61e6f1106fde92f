"""Per-seed randomness, written once: the same seed gives the same sample whatever else is in the batch.

Each seed owns one torch generator (`SeedStreams`): its first draw is the start noise of every sampler
(`seeded_noise`), later draws are a stochastic sampler's step noises. Class labels come from a separate numpy
stream per seed (`seeded_labels`); `check_labels` is the one check of labels given per seed.
"""
from __future__ import annotations

import operator
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["MAX_SEED", "check_seeds", "SeedStreams", "seeded_noise", "seeded_labels", "check_labels"]

MAX_SEED = 2 ** 32 - 1  # torch's CPU generator keeps only a seed's low 32 bits: 2**32 would repeat seed 0


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as a list of ints in [0, MAX_SEED], at least one; ValueError naming `seeds` otherwise."""
    try:
        out = [operator.index(s) for s in seeds]
    except TypeError:
        raise ValueError(f"seeds: expected integers, got {seeds!r}") from None
    if not out:
        raise ValueError("seeds: expected at least one seed")
    bad = [s for s in out if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seeds: expected integers in [0, {MAX_SEED}] (32-bit generator seeds), got {bad[0]}")
    return out


class SeedStreams:
    """One standard normal stream per seed (a CPU torch generator each): `draw` gives the next image of every
    seed's stream, drawn in float64 on the CPU, so any device and dtype sees the same numbers."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = check_seeds(seeds)
        self._generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def draw(self, shape: Sequence[int], dtype=torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """[len(seeds), *shape]: the next draw of each seed's stream."""
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64)
                            for g in self._generators]).to(device=device, dtype=dtype)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], *, dtype=torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
    """The first draw of each seed's stream: the start noise of every sampler."""
    return SeedStreams(seeds).draw(shape, dtype, device)


def seeded_labels(seeds: Sequence[int], num_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """A class per seed from numpy's generator on (seed, 1): a stream apart from the seed's torch noise stream
    (an offset seed on torch's generator is not: it keeps only the low 32 bits)."""
    out = [int(np.random.default_rng([s, 1]).integers(num_classes)) for s in check_seeds(seeds)]
    return torch.tensor(out, dtype=torch.long, device=device)


def check_labels(labels, seeds: Sequence[int], num_classes: int | None,
                 device: torch.device | str = "cpu") -> Tensor | None:
    """One class label per seed (drawn by `seeded_labels` when None) for a model with `num_classes`, else None;
    ValueError naming `labels` otherwise."""
    if not num_classes:
        if labels is not None:
            raise ValueError("labels: this model is unconditional")
        return None
    if labels is None:
        return seeded_labels(seeds, num_classes, device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.shape != (len(seeds),):
        raise ValueError(f"labels: expected one label per seed ({len(seeds)}), got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels: expected classes in [0, {num_classes}), got {labels.tolist()}")
    return labels
