"""Seeded train/val/test split, stratified by the set of defect classes in each image."""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence, TypeVar

import numpy as np

Item = TypeVar("Item", bound=Hashable)
SPLITS = ("train", "val", "test")


def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Share `n` items by `ratios` with largest remainders, so counts add up to `n` exactly."""
    raw = np.asarray(ratios, dtype=float) * n / float(sum(ratios))
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def stratified_split(
    strata: dict[Item, frozenset[int]],
    ratios: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
) -> dict[str, list[Item]]:
    """Split items so each set of defect classes (e.g. {3}, {1, 3}) keeps the ratios.

    Items are shuffled within their stratum by a generator seeded from `seed`, so the result
    depends only on the items, their strata and the seed (not on dict order). Each split comes
    back sorted, which keeps the list files stable and easy to diff.
    """
    groups: dict[tuple[int, ...], list[Item]] = defaultdict(list)
    for item in sorted(strata):
        groups[tuple(sorted(strata[item]))].append(item)

    rng = np.random.default_rng(seed)
    out: dict[str, list[Item]] = {name: [] for name in SPLITS}
    # Rare strata get rounded shares; give the remainder to train first so tiny strata
    # (1-2 images) still appear in training.
    for key in sorted(groups):
        members = groups[key]
        order = rng.permutation(len(members))
        counts = split_counts(len(members), ratios)
        start = 0
        for name, count in zip(SPLITS, counts):
            out[name].extend(members[i] for i in order[start : start + count])
            start += count
    return {name: sorted(items) for name, items in out.items()}
