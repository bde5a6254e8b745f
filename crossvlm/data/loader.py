"""The data set and the loader the training loop uses.

`build_dataset` opens every source lazily; its `__getitem__` (run in DataLoader workers) reads one
record, checks it, renders it, and decodes its images, returning a `Sample` or, for any problem, a
`BadRecord` — never raising. `build_loader` wraps it in a DataLoader driven by the deterministic,
sharded, resumable `ShardedBatchSampler`, and counts bad records as batches arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from crossvlm.data.badrecords import BadRecordTracker
from crossvlm.data.collate import Collator, Sample
from crossvlm.data.config import DataConfig
from crossvlm.data.images import ImageTransform, load_image
from crossvlm.data.readers import TableReader
from crossvlm.data.sources import resolve_source
from crossvlm.data.records import BadRecord, RawRecord, RecordError, normalize
from crossvlm.data.render import TemplateMismatch, encode_conversation, truncate
from crossvlm.data.sampler import ShardedBatchSampler
from crossvlm.data.streaming import StreamingData, StreamLoader, StreamSource
from crossvlm.data.workers import counted, ignore_sigterm
from crossvlm.errors import DataError
from crossvlm.model.tokens import IMAGE_MARK, VisionTokenIds

# Characters per token assumed when estimating lengths for grouping (only the order matters).
CHARS_PER_TOKEN = 3.0


@dataclass
class SourceSpan:
    """The dataset indices [start, stop) of one configured source, and its mixture weight."""

    start: int
    stop: int
    weight: float


class SampleMaker:
    """A record -> a `Sample` (checked, rendered, truncated, images decoded) or, for any problem, a
    `BadRecord` — never an exception: it runs in DataLoader workers, for random access and streams."""

    def __init__(self, cfg: DataConfig, tokenizer, image_processor, num_image_tokens: int, tiling=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.transform = ImageTransform(image_processor) if image_processor is not None else None
        self.num_image_tokens = num_image_tokens
        self.tiling = tiling if tiling is not None and tiling.enabled else None
        """A tiled model's `Tiling` (crossvlm.model.tiling): each image's span and views follow its grid."""
        if self.tiling is not None and self.transform is not None:  # JPEG drafts keep the tiles' resolution
            self.transform.draft_size = self.tiling.side * self.tiling.max_tiles
        self.vision = VisionTokenIds.from_tokenizer(tokenizer)

    def __call__(self, record: RawRecord | BadRecord) -> Sample | BadRecord:
        if isinstance(record, BadRecord):
            return record
        return self.make(lambda: record, record.location)

    def make(self, read: Callable[[], RawRecord], location: str) -> Sample | BadRecord:
        try:
            return self.load(read())
        except RecordError as err:
            return BadRecord(err.kind, location, err.detail)
        except TemplateMismatch as err:
            return BadRecord("error", location, str(err))
        except Exception as err:  # noqa: BLE001 — a worker must report, not die; counted as "error"
            return BadRecord("error", location, f"{type(err).__name__}: {err}")

    def load(self, raw: RawRecord) -> Sample:
        import torch

        conv = normalize(raw)
        draft = self.transform and self.transform.draft_size
        counts, grids, images = self.num_image_tokens, None, None
        if self.tiling is not None:  # each image's span follows its grid: decoded before rendering
            images = [load_image(src, self.cfg.max_image_pixels, draft) for src in conv.images]
            grids = [self.tiling.grid(im) for im in images]
            counts = [self.tiling.tokens(g) for g in grids]
        encoded = encode_conversation(conv.messages, self.tokenizer, counts,
                                      system_prompt=self.cfg.system_prompt, enable_thinking=self.cfg.enable_thinking)
        result = truncate(encoded, self.cfg.max_length, self.vision)
        if result is None:
            raise RecordError("too_long", f"{len(encoded.input_ids)} tokens > max_length {self.cfg.max_length}")
        encoded, cut = result
        # Spans appear in mark order, so the kept images are the first ones.
        if images is None:
            images = [load_image(src, self.cfg.max_image_pixels, draft) for src in conv.images[: encoded.num_images]]
        images = images[: encoded.num_images]
        grids = grids and grids[: encoded.num_images]
        if grids:  # every image's views: its thumbnail, then its tiles
            images = [view for im, grid in zip(images, grids) for view in self.tiling.views(im, grid)]
        pixel_values = self.transform(images) if images and self.transform else None  # (n, 3, H, W)
        return Sample(
            input_ids=torch.tensor(encoded.input_ids, dtype=torch.long),
            labels=torch.tensor(encoded.labels, dtype=torch.long),
            pixel_values=pixel_values,
            location=conv.location,
            truncated=cut,
            image_grids=torch.tensor(grids, dtype=torch.long) if grids else None,
        )


class VLMDataset:
    """Map-style data set over all files of all sources; item i is a `Sample` or a `BadRecord`."""

    def __init__(self, readers: list, spans: list[SourceSpan], cfg: DataConfig, tokenizer, image_processor,
                 num_image_tokens: int, tiling=None):
        self.readers = readers
        self.spans = spans
        self.cfg = cfg
        self.maker = SampleMaker(cfg, tokenizer, image_processor, num_image_tokens, tiling)
        self.tiling = self.maker.tiling
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.file_starts = np.cumsum([0] + [len(r) for r in readers])  # (F+1,)

    @property
    def transform(self) -> ImageTransform | None:
        return self.maker.transform

    def __len__(self) -> int:
        return int(self.file_starts[-1])

    def locate(self, index: int) -> tuple[object, int]:
        f = int(np.searchsorted(self.file_starts, index, side="right") - 1)
        return self.readers[f], index - int(self.file_starts[f])

    @property
    def source_ranges(self) -> list[tuple[int, int, float]]:
        return [(s.start, s.stop, s.weight) for s in self.spans]

    def __getitem__(self, index: int) -> Sample | BadRecord:
        reader, row = self.locate(index)
        return self.maker.make(lambda: reader.read(row), reader.location(row))

    def length_estimates(self) -> np.ndarray:
        """Estimated token length of every item, from text sizes and image marks (no rendering)."""
        most = self.tiling.tokens((1, self.tiling.max_tiles)) if self.tiling else self.num_image_tokens
        per_image = most + 2 - len(IMAGE_MARK) / CHARS_PER_TOKEN  # tiled: as if every image took its most
        parts = []
        for reader in self.readers:
            chars, marks = reader.length_estimates()
            parts.append(chars / CHARS_PER_TOKEN + marks * per_image)
        return np.concatenate(parts) if parts else np.zeros(0)


def build_dataset(cfg: DataConfig, tokenizer, image_processor, num_image_tokens: int, split: str | None = None,
                  tiling=None) -> "VLMDataset | StreamingData":
    """Open the configured sources (lazily) as one data set: random access (`VLMDataset`) when every
    source allows it, else streamed (`StreamingData`); `data.streaming` forces either.

    `split` ("train", "test", ...) keeps, in every folder source, only files whose name contains it;
    file sources are used as given. `tiling`: a tiled model's `Tiling` (None: one view per image).
    """
    cfg.validate()
    resolved = []
    for i, src in enumerate(cfg.sources):
        source = resolve_source(src.path, fmt=src.format, image_root=src.image_root, split=src.split,
                                streaming=cfg.streaming is True, row_group_cache=cfg.row_group_cache)
        if split and source.readers is not None and Path(src.path).is_dir() and not isinstance(
                source.readers[0], TableReader):  # the files of a folder; a saved dataset has `split` of its own
            source.readers = [r for r in source.readers if split in Path(str(r.path)).stem]
            source.shards = [sh for sh in source.shards if sh.reader in source.readers]
            if not source.readers:
                raise DataError(f"{src.path}: no data file with {split!r} in its name")
        resolved.append(source)
    streamed = [r.name for r in resolved if r.readers is None]
    if cfg.streaming is False and streamed:
        raise DataError(f"data.streaming is false, but {streamed[0]} can only be streamed (tar shards or a URL)")
    maker = SampleMaker(cfg, tokenizer, image_processor, num_image_tokens, tiling)
    if cfg.streaming is True or streamed:
        sources = [StreamSource.of(r, src.weight, src.caption_prompt) for r, src in zip(resolved, cfg.sources)]
        return StreamingData(sources, cfg, maker)
    readers, spans = [], []
    for source, src in zip(resolved, cfg.sources):
        start = sum(len(r) for r in readers)
        readers += source.readers
        stop = sum(len(r) for r in readers)
        if stop == start:
            raise DataError(f"{src.path}: no records")
        spans.append(SourceSpan(start, stop, src.weight))
    return VLMDataset(readers, spans, cfg, tokenizer, image_processor, num_image_tokens, tiling)


class Loader:
    """Iterable of batches for one rank; resumes at `step` (global batches already consumed).

    Every batch is counted by `tracker`, which raises DataError when bad records pass
    `max_bad_fraction`. `state_dict()` / `load_state_dict()` carry the step and the counts.
    """

    def __init__(self, dataset: VLMDataset, cfg: DataConfig, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, epochs: int | None = None, drop_last: bool = True,
                 pin_memory: bool | None = None, prefetch_factor: int = 2):
        self.dataset, self.cfg, self.batch_size = dataset, cfg, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = start_step
        self.epochs, self.drop_last = epochs, drop_last
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.lengths = dataset.length_estimates() if cfg.group_by_length else None
        self.collator = Collator(dataset.tokenizer.pad_token_id, cfg.packing, cfg.max_length)
        sampler = self.sampler()
        self.steps_per_epoch = sampler.steps_per_epoch
        self.tracker = BadRecordTracker(cfg.max_bad_fraction, expected_total=sampler.epoch_length)

    def sampler(self) -> ShardedBatchSampler:
        return ShardedBatchSampler(
            self.dataset.source_ranges, self.batch_size, seed=self.seed, rank=self.rank,
            world_size=self.world_size, shuffle=self.cfg.shuffle, lengths=self.lengths, epochs=self.epochs,
            start_step=self.step, drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        return len(self.sampler())

    def __iter__(self):
        import torch
        from torch.utils.data import DataLoader

        workers = self.cfg.num_workers
        loader = DataLoader(
            self.dataset, batch_sampler=self.sampler(), collate_fn=self.collator, num_workers=workers,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None, persistent_workers=False,
            worker_init_fn=ignore_sigterm,
        )
        yield from counted(self, iter(loader))

    def state_dict(self) -> dict:
        """The data position as (epoch, samples of its order consumed): the same whatever the number of
        processes that shared them, so a run can resume on another one."""
        global_batch = self.batch_size * self.world_size
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        return {"epoch": epoch, "samples_in_epoch": batch * global_batch, "seed": self.seed,
                "global_batch": global_batch, "bad_records": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("streaming"):
            raise DataError("cannot resume the data position: the checkpoint streamed its data, this run reads "
                            "it by random access (set data.streaming: true as before)")
        global_batch = self.batch_size * self.world_size
        samples, problem = int(state["samples_in_epoch"]), None
        if state["seed"] != self.seed:
            problem = f"the checkpoint's data order comes from seed {state['seed']}, this run's from {self.seed}"
        elif samples % global_batch:
            problem = (f"the checkpoint stopped {samples} samples into epoch {state['epoch']}, not a whole number of "
                       f"this run's batches of {global_batch} (batch size × processes)")
        elif self.lengths is not None and state["global_batch"] != global_batch:
            problem = (f"with group_by_length the order depends on the batch of all processes: it was "
                       f"{state['global_batch']}, here it is {global_batch}")
        if problem:
            raise DataError(f"cannot resume the data position: {problem}")
        self.step = int(state["epoch"]) * self.steps_per_epoch + samples // global_batch
        self.tracker.load_state_dict(state["bad_records"])


def build_loader(dataset: "VLMDataset | StreamingData", cfg: DataConfig, batch_size: int, *, seed: int,
                 rank: int = 0, world_size: int = 1, start_step: int = 0, epochs: int | None = None,
                 drop_last: bool = True) -> "Loader | StreamLoader":
    """Batches of `batch_size` samples for `rank` of `world_size`, from global step `start_step` on.

    `epochs=None` repeats the data forever (the loop stops at its step budget); evaluation passes
    `epochs=1, drop_last=False` and `cfg.shuffle=False`.
    """
    if isinstance(dataset, StreamingData):
        if start_step:
            raise DataError("a streamed data set resumes from its saved state (load_state_dict), not a step")
        return StreamLoader(dataset, cfg, batch_size, seed=seed, rank=rank, world_size=world_size, epochs=epochs,
                            drop_last=drop_last)
    return Loader(dataset, cfg, batch_size, seed=seed, rank=rank, world_size=world_size,
                  start_step=start_step, epochs=epochs, drop_last=drop_last)
