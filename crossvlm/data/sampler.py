"""Which samples go in which batch: deterministic from (seed, epoch), sharded by rank, resumable.

The order of an epoch is a function of the seed and the epoch number only. It is cut into global
batches of `batch_size × world_size`; rank r takes slice r of each. So one process with batch 2B sees,
step by step, exactly the samples that two processes with batch B see together (rank 0's then
rank 1's), and resuming at step s just skips s global batches without reading any sample.
"""

from __future__ import annotations

import math

import numpy as np

from crossvlm.errors import DataError

# Length grouping sorts windows of this many global batches (as in HF's LengthGroupedSampler).
MEGABATCH = 50


def epoch_order(source_ranges: list[tuple[int, int, float]], *, seed: int, epoch: int, shuffle: bool = True,
                lengths: np.ndarray | None = None, global_batch: int = 1) -> np.ndarray:
    """Dataset indices of one epoch.

    `source_ranges` holds (first index, end index, weight) per source: an epoch takes every row of a
    source floor(weight) times plus a random round(frac(weight) × rows) of them. With `lengths`,
    windows of MEGABATCH global batches are sorted by length and their batches shuffled, so each batch
    holds samples of similar length.
    """
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for start, stop, weight in source_ranges:
        rows = np.arange(start, stop, dtype=np.int64)
        whole = int(math.floor(weight))
        parts += [rows] * whole
        extra = int(round((weight - whole) * len(rows)))
        if extra:
            parts.append(np.sort(rng.choice(rows, size=extra, replace=False)))
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if shuffle:
        order = rng.permutation(order)
    if lengths is not None and len(order):
        window = MEGABATCH * global_batch
        grouped = []
        for w in range(0, len(order), window):
            chunk = order[w : w + window]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            batches = [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
            # Keep a short last batch at the end; shuffle the full ones.
            full = [b for b in batches if len(b) == global_batch]
            tail = [b for b in batches if len(b) != global_batch]
            grouped += [full[i] for i in (rng.permutation(len(full)) if shuffle else range(len(full)))] + tail
        order = np.concatenate(grouped)
    return order


class ShardedBatchSampler:
    """Yields this rank's list of dataset indices for each step, from `start_step` on.

    Steps count global batches across epochs: step s is batch s % steps_per_epoch of epoch
    s // steps_per_epoch. `epochs=None` repeats forever.
    """

    def __init__(self, source_ranges, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, lengths: np.ndarray | None = None, epochs: int | None = None,
                 start_step: int = 0, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.source_ranges = list(source_ranges)
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size
        self.seed, self.rank, self.shuffle, self.lengths = seed, rank, shuffle, lengths
        self.epochs, self.start_step, self.drop_last = epochs, start_step, drop_last
        self.epoch_length = sum(
            math.floor(w) * (b - a) + int(round((w - math.floor(w)) * (b - a))) for a, b, w in self.source_ranges
        )
        per_epoch = self.epoch_length / self.global_batch
        self.steps_per_epoch = math.floor(per_epoch) if drop_last else math.ceil(per_epoch)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"an epoch holds {self.epoch_length} samples, fewer than one global batch of "
                f"{self.global_batch} (batch {batch_size} × {world_size} ranks)"
            )

    @property
    def total_steps(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.steps_per_epoch

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an endless sampler has no length")
        return max(self.total_steps - self.start_step, 0)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.source_ranges, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                           lengths=self.lengths, global_batch=self.global_batch)

    def __iter__(self):
        step, cached_epoch, order = self.start_step, None, None
        while self.total_steps is None or step < self.total_steps:
            epoch, b = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.order(epoch)
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            step += 1
