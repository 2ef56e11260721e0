"""Batches of (images, labels) from the resized cache, seeded per epoch and per sample.

Every random choice is a function of (seed, epoch, sample row): shuffling and augmentation
are the same whether a run is uninterrupted or resumed, and with or without worker threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from steel_seg.data.cache import ResizedCache
from steel_seg.data.paddlex_layout import Sample


@dataclass
class Batch:
    images: np.ndarray  # (N, 3, H, W) float32, normalised
    labels: np.ndarray  # (N, H, W) int64, 255 = ignore
    rows: list[int]  # cache rows, to find the raw images again (overlays)

    def __len__(self) -> int:
        return len(self.rows)


class BatchLoader:
    """Iterate over `samples` in batches; `transform(image, label, rng)` prepares each pair.

    `num_workers` threads prepare samples in parallel (OpenCV releases the GIL); the output
    does not depend on it. With `shard=(rank, count)` (data-parallel training) every batch of
    the epoch's order is split over `count` processes and this one gets part `rank`: the shards
    are disjoint, and together they are exactly the single-process batch.
    """

    def __init__(
        self,
        cache: ResizedCache,
        samples: list[Sample],
        transform: Callable,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        max_batches: int | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        rows = [cache.index_of(s) for s in samples]
        missing = [s.image for s, r in zip(samples, rows) if r is None]
        if missing:
            raise ValueError(f"{len(missing)} sample(s) are not in the cache, e.g. {missing[0]}")
        if not rows:
            raise ValueError("no samples to load: the split is empty")
        self.cache, self.rows, self.transform = cache, rows, transform
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.num_workers, self.max_batches = seed, num_workers, max_batches
        self.rank, self.num_shards = shard
        if not 0 <= self.rank < self.num_shards:
            raise ValueError(f"shard {shard}: rank must be in 0..{self.num_shards - 1}")
        self.epoch = 0
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.rows) // self.batch_size if self.drop_last else -(-len(self.rows) // self.batch_size)
        n = max(n, 1)  # a split smaller than one batch still gives one (short) batch
        return min(n, self.max_batches) if self.max_batches else n

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(self.rows)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
        return [self.rows[i] for i in order]

    def _prepare(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.cache.pair(row)
        rng = np.random.default_rng([self.seed, self.epoch, row])
        image, label = self.transform(image, label, rng)
        return image, label

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        for b in range(len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.num_shards]
            if not rows:  # a short last batch with fewer images than processes
                continue
            pairs = list(self._pool.map(self._prepare, rows)) if self._pool else [self._prepare(r) for r in rows]
            images = np.stack([p[0] for p in pairs]).transpose(0, 3, 1, 2)
            labels = np.stack([p[1] for p in pairs]).astype(np.int64)
            yield Batch(np.ascontiguousarray(images, dtype=np.float32), labels, rows)
