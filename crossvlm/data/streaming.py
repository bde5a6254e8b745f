"""Streamed data: shards split over ranks and loader workers, a bounded shuffle buffer, mixing by
weight, and a position that resumes exactly.

The shards of every source are cut into units (a shard, or every k-th record of one when a source
has fewer shards than there are streams) and each epoch's units, shuffled from (seed, epoch, source),
are dealt to the `world_size × max(1, num_workers)` streams: stream j takes units j, j + N, j + 2N, …
so no record is read by two streams. A stream (one per loader worker) draws each sample's source
with probability ∝ weight × records (∝ weight where a source's size is unknown: remote tars), reads
that source's next record, and passes it through a shuffle buffer of `shuffle_buffer` raw records
(bytes, not decoded images). Every source repeats its epochs until the run's step budget ends.

A stream's position is small and exact: per source (epoch, unit, records read from it), the two
random generators' states, and where each buffered record came from. Each batch carries the state
its worker was in after making it; the main process keeps the state of the last batch it took from
each worker and which worker comes next (torch's DataLoader takes batches from its workers in turn).
Resuming reopens every source at its unit and record (records before it are passed over unread
where the format allows: parquet row groups, tar members' data), and reads the buffered records
back from their units. The batches that follow are those the uninterrupted run would have had.

The streams depend on `world_size × num_workers`: a run resumes exactly on the same number of
processes and workers, and refuses another (random-access sources have no such limit).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset

from crossvlm.data.badrecords import BadRecordTracker
from crossvlm.data.records import BadRecord
from crossvlm.data.sources import ResolvedSource, Shard
from crossvlm.data.workers import counted, ignore_sigterm
from crossvlm.errors import DataError


@dataclass
class StreamSource:
    """One configured source as a stream: its shards, mixture weight and caption prompt."""

    name: str
    shards: list[Shard]
    weight: float
    caption_prompt: str
    records: int | None  # None when counting would mean reading remote shards

    @classmethod
    def of(cls, resolved: ResolvedSource, weight: float, caption_prompt: str) -> "StreamSource":
        counts = [s.count() for s in resolved.shards]
        total = None if any(c is None for c in counts) else sum(counts)
        return cls(resolved.name, resolved.shards, weight, caption_prompt, total)


def units_for(num_shards: int, streams: int) -> list[tuple[int, int, int]]:
    """(shard, part, parts): every shard, cut into parts taking every `parts`-th record when there are
    fewer shards than streams, so that each stream gets at least one unit."""
    parts = max(1, math.ceil(streams / max(num_shards, 1)))
    return [(k, p, parts) for k in range(num_shards) for p in range(parts)]


class Cursor:
    """Where one stream is in one source: (epoch, unit, records read from that unit)."""

    def __init__(self, source: StreamSource, index: int, stream: int, streams: int, *, seed: int, shuffle: bool,
                 epochs: int | None):
        self.source, self.index, self.stream, self.streams = source, index, stream, streams
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.epoch = self.unit = self.offset = 0
        self.read_this_epoch = 0
        self._iter = None
        self._units_epoch, self._units = None, None

    def units(self, epoch: int) -> list[tuple[int, int, int]]:
        """This stream's units of `epoch`, in reading order."""
        if self._units_epoch != epoch:
            units = units_for(len(self.source.shards), self.streams)
            order = (np.random.default_rng([self.seed, epoch, self.index, 7]).permutation(len(units))
                     if self.shuffle else np.arange(len(units)))
            self._units_epoch, self._units = epoch, [units[u] for u in order[self.stream :: self.streams]]
        return self._units

    def open(self, epoch: int, unit: int, skip: int):
        shard, part, parts = self.units(epoch)[unit]
        return self.source.shards[shard].records(part, parts, skip, caption_prompt=self.source.caption_prompt)

    def next(self):
        """((source, epoch, unit, offset), record) or None when the source's epochs are done."""
        while self.epochs is None or self.epoch < self.epochs:
            if self.unit >= len(self.units(self.epoch)):
                if self.read_this_epoch == 0 and self.epochs is None:
                    raise DataError(f"{self.source.name}: an epoch of stream {self.stream} read no records")
                self.epoch, self.unit, self.offset, self.read_this_epoch = self.epoch + 1, 0, 0, 0
                continue
            if self._iter is None:
                self._iter = self.open(self.epoch, self.unit, self.offset)
            record = next(self._iter, None)
            if record is None:
                self.unit, self.offset, self._iter = self.unit + 1, 0, None
                continue
            position = (self.index, self.epoch, self.unit, self.offset)
            self.offset += 1
            self.read_this_epoch += 1
            return position, record
        return None

    def state(self) -> list[int]:
        return [self.epoch, self.unit, self.offset, self.read_this_epoch]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.unit, self.offset, self.read_this_epoch = (int(v) for v in state)
        self._iter = None


class Stream:
    """One stream's records: sources mixed by weight, through a bounded shuffle buffer."""

    def __init__(self, sources: list[StreamSource], stream: int, streams: int, *, seed: int, shuffle: bool,
                 buffer_size: int, epochs: int | None = None):
        self.cursors = [Cursor(s, i, stream, streams, seed=seed, shuffle=shuffle, epochs=epochs)
                        for i, s in enumerate(sources)]
        sizes = [s.records for s in sources]
        shares = [s.weight * (n if None not in sizes else 1) for s, n in zip(sources, sizes)]
        self.shares = [float(share) for share in shares]
        self.done = [False] * len(sources)
        self.mix = np.random.default_rng([seed, stream, 1])
        self.pick = np.random.default_rng([seed, stream, 2])
        self.buffer_size = buffer_size if shuffle else 0
        self.buffer: list[tuple[tuple, object]] = []

    def _next_read(self):
        while not all(self.done):
            if len(self.cursors) == 1:  # nothing to draw
                i = 0
            else:
                live = [0.0 if done else share for done, share in zip(self.done, self.shares)]
                edges = list(itertools.accumulate(share / sum(live) for share in live))
                i = min(bisect.bisect_right(edges, self.mix.random()), len(self.cursors) - 1)
            item = self.cursors[i].next()
            if item is not None:
                return item
            self.done[i] = True
        return None

    def __next__(self):
        """The next record (a RawRecord or a BadRecord); StopIteration once every source is done."""
        while True:
            item = self._next_read()
            if item is None:
                if not self.buffer:
                    raise StopIteration
                return self.buffer.pop(int(self.pick.integers(len(self.buffer))))[1]
            if self.buffer_size == 0:
                return item[1]
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(item)
                continue
            slot = int(self.pick.integers(self.buffer_size))
            out, self.buffer[slot] = self.buffer[slot], item
            return out[1]

    def __iter__(self):
        return self

    def close(self) -> None:
        """Close the shards being read (their files and connections) now, not at garbage collection."""
        for cursor in self.cursors:
            if cursor._iter is not None:
                cursor._iter.close()
                cursor._iter = None

    def state(self) -> dict:
        return {"cursors": [c.state() for c in self.cursors], "done": list(self.done),
                "mix": self.mix.bit_generator.state, "pick": self.pick.bit_generator.state,
                "buffer": [list(position) for position, _ in self.buffer]}

    def restore(self, state: dict) -> None:
        for cursor, s in zip(self.cursors, state["cursors"]):
            cursor.restore(s)
        self.done = [bool(d) for d in state["done"]]
        self.mix.bit_generator.state = state["mix"]
        self.pick.bit_generator.state = state["pick"]
        # Read the buffered records back from their units (each unit once, up to the last one wanted).
        wanted: dict[tuple, list[int]] = {}
        for source, epoch, unit, offset in state["buffer"]:
            wanted.setdefault((source, epoch, unit), []).append(offset)
        found = {}
        for (source, epoch, unit), offsets in wanted.items():
            keep, last = set(offsets), max(offsets)
            with contextlib.closing(self.cursors[source].open(epoch, unit, 0)) as records:
                for offset, record in enumerate(records):
                    if offset in keep:
                        found[(source, epoch, unit, offset)] = record
                    if offset >= last:
                        break
        self.buffer = []
        for position in state["buffer"]:
            position = tuple(position)
            record = found.get(position)
            if record is None:
                record = BadRecord("error", self.cursors[position[0]].source.name,
                                   f"record {position} of the saved shuffle buffer could not be read again")
            self.buffer.append((position, record))


class StreamingData:
    """The streamed data set: what `build_dataset` returns when a source must be (or is asked to be)
    streamed. `sample_maker` turns a record into a Sample or a BadRecord (crossvlm.data.loader)."""

    def __init__(self, sources: list[StreamSource], cfg, sample_maker):
        self.sources, self.cfg, self.maker = sources, cfg, sample_maker
        self.tokenizer = sample_maker.tokenizer

    @property
    def records(self) -> int | None:
        sizes = [s.records for s in self.sources]
        return None if None in sizes else int(sum(round(s.weight * s.records) for s in self.sources))


class _WorkerStreams(IterableDataset):
    """The torch IterableDataset: each worker runs its own stream and yields collated batches, each
    with the stream's state after it (`batch["stream_state"]`)."""

    def __init__(self, data: StreamingData, collator, batch_size: int, *, seed: int, rank: int, world_size: int,
                 workers: int, first_stream: int, states: dict, epochs: int | None, drop_last: bool):
        self.data, self.collator, self.batch_size = data, collator, batch_size
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, workers
        self.first_stream, self.states = first_stream, states
        self.epochs, self.drop_last = epochs, drop_last

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.first_stream) % self.workers  # the DataLoader starts with worker 0
        yield from self.batches(local)

    def batches(self, local: int):
        cfg = self.data.cfg
        stream = Stream(self.data.sources, self.rank * self.workers + local, self.world_size * self.workers,
                        seed=self.seed, shuffle=cfg.shuffle, buffer_size=cfg.shuffle_buffer, epochs=self.epochs)
        if self.states.get(local) is not None:
            stream.restore(self.states[local])
        with contextlib.closing(stream):
            while True:
                samples = []
                for record in stream:
                    samples.append(self.data.maker(record))
                    if len(samples) == self.batch_size:
                        break
                if not samples or (len(samples) < self.batch_size and self.drop_last):
                    return
                batch = self.collator(samples)
                batch["stream_state"] = (local, stream.state())
                yield batch


class StreamLoader:
    """The streamed counterpart of `Loader` (same interface): batches for one rank, the bad-record
    tracker, `steps_per_epoch` (None when a source's size is unknown), and an exact position."""

    def __init__(self, data: StreamingData, cfg, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 epochs: int | None = None, drop_last: bool = True, pin_memory: bool | None = None,
                 prefetch_factor: int = 2):
        from crossvlm.data.collate import Collator

        if cfg.group_by_length:
            raise DataError("data.group_by_length needs random access; streamed sources cannot be grouped")
        self.data, self.cfg, self.batch_size = data, cfg, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, cfg.num_workers)
        self.epochs, self.drop_last = epochs, drop_last
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.collator = Collator(data.tokenizer.pad_token_id, cfg.packing, cfg.max_length)
        self.step = 0
        self.states: dict[int, dict] = {}
        records = data.records
        global_batch = batch_size * world_size
        self.steps_per_epoch = None if records is None else max(1, records // global_batch)
        self.tracker = BadRecordTracker(cfg.max_bad_fraction, expected_total=records)

    def __iter__(self):
        import torch
        from torch.utils.data import DataLoader

        streams = _WorkerStreams(self.data, self.collator, self.batch_size, seed=self.seed, rank=self.rank,
                                 world_size=self.world_size, workers=self.workers,
                                 first_stream=self.step % self.workers, states=dict(self.states),
                                 epochs=self.epochs, drop_last=self.drop_last)
        if self.cfg.num_workers == 0:  # one stream, in this process
            batches = (b for local in [self.step % self.workers] for b in streams.batches(local))
        else:
            batches = iter(DataLoader(
                streams, batch_size=None, num_workers=self.cfg.num_workers,
                pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
                prefetch_factor=self.prefetch_factor, persistent_workers=False, worker_init_fn=ignore_sigterm))
        yield from counted(self, batches, self._take_state)

    def _take_state(self, batch: dict) -> None:
        local, state = batch.pop("stream_state")
        self.states[local] = state

    def state_dict(self) -> dict:
        """Every rank's stream states (gathered: every rank calls this when a checkpoint is written)."""
        mine = {str(k): v for k, v in self.states.items()}
        ranks = [mine]
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        return {"streaming": True, "seed": self.seed, "batches": self.step, "world_size": self.world_size,
                "workers": self.workers, "batch_size": self.batch_size, "streams": ranks,
                "bad_records": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        problem = None
        if not state.get("streaming"):
            problem = "the checkpoint read its data by random access, this run streams it"
        elif state["seed"] != self.seed:
            problem = f"the checkpoint's data order comes from seed {state['seed']}, this run's from {self.seed}"
        elif (state["world_size"], state["workers"]) != (self.world_size, self.workers):
            problem = (f"streamed shards are split over processes × loader workers: the checkpoint's "
                       f"{state['world_size']} × {state['workers']}, this run's {self.world_size} × {self.workers}; "
                       "resume with the same number of processes and data.num_workers")
        elif state["batch_size"] != self.batch_size:
            problem = f"the checkpoint's batches held {state['batch_size']} samples a rank, this run's {self.batch_size}"
        if problem:
            raise DataError(f"cannot resume the data position: {problem}")
        self.step = int(state["batches"])
        self.states = {int(k): v for k, v in state["streams"][self.rank].items()}
        self.tracker.load_state_dict(state["bad_records"])
