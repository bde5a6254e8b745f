"""`crossvlm data inspect`: what a data path holds and whether crossvlm can train on it."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from crossvlm.data.badrecords import BadRecordTracker
from crossvlm.data.images import load_image
from crossvlm.data.config import DEFAULT_CAPTION_PROMPT
from crossvlm.data.readers import ParquetReader
from crossvlm.data.records import BadRecord, RecordError, normalize
from crossvlm.data.render import IGNORE_INDEX, EncodedSample, TemplateMismatch, encode_conversation, truncate
from crossvlm.data.sources import resolve_source
from crossvlm.model.tokens import VisionTokenIds

# Row groups larger than this make random access slow (a read decodes the whole group).
LARGE_ROW_GROUP = 50_000


@dataclass
class Inspection:
    """What `inspect_data` found; `usable` is False when training on it would fail."""

    files: list[tuple[Path | str, str, int | None]] = field(default_factory=list)
    checked: int = 0
    images: int = 0
    lengths: list[int] = field(default_factory=list)
    tracker: BadRecordTracker = field(default_factory=BadRecordTracker)
    example: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int | None:
        """Rows in all files; None when a remote shard's count is unknown."""
        counts = [n for _, _, n in self.files]
        return None if None in counts else sum(counts)

    @property
    def usable(self) -> bool:
        return self.checked > self.tracker.bad and not self.tracker.too_many()


def inspect_data(path: str | Path, *, fmt: str | None = None, image_root: str | Path | None = None,
                 tokenizer=None, num_image_tokens: int = 64, limit: int = 1000, max_length: int | None = None,
                 max_image_pixels: int = 64_000_000, max_bad_fraction: float = 0.01,
                 system_prompt: str | None = None, enable_thinking: bool = False, split: str | None = None,
                 caption_prompt: str = DEFAULT_CAPTION_PROMPT) -> Inspection:
    """Open every file under `path` (any source `crossvlm.data.sources` opens), check up to `limit`
    rows — spread evenly over random-access files (all rows when fewer), the first ones of streamed
    shards — decode their images, and with a tokenizer render them and measure token lengths."""
    result = Inspection()
    source = resolve_source(str(path), fmt=fmt, image_root=image_root, split=split)
    if source.readers is not None:
        records = _spread(source.readers, limit, result)
    else:
        for shard in source.shards:
            result.files.append((shard.name, "webdataset" if shard.kind == "tar" else "parquet shard", shard.count()))
        records = _located(islice((r for shard in source.shards for r in shard.records(caption_prompt=caption_prompt)),
                                  limit))
        result.notes.append(f"streamed shards: the first {limit} records were checked")
    result.tracker = BadRecordTracker(max_bad_fraction, expected_total=min(limit, result.rows or limit))
    vision = VisionTokenIds.from_tokenizer(tokenizer) if tokenizer is not None else None
    for location, read in records:
        try:
            record = read()
            if isinstance(record, BadRecord):
                raise RecordError(record.kind, record.detail)
            conv = normalize(record)
            images = conv.images
            if tokenizer is not None:
                encoded = encode_conversation(conv.messages, tokenizer, num_image_tokens,
                                              system_prompt=system_prompt, enable_thinking=enable_thinking)
                result.lengths.append(len(encoded.input_ids))
                if max_length:
                    cut = truncate(encoded, max_length, vision)
                    if cut is None:
                        raise RecordError("too_long", f"{len(encoded.input_ids)} tokens > max_length {max_length}")
                    encoded = cut[0]
                    images = images[: encoded.num_images]
                if result.example is None:
                    result.example = f"{conv.location}:\n" + show_labels(encoded, tokenizer, vision)
            for src in images:
                load_image(src, max_image_pixels)
        except RecordError as err:
            result.tracker.add(BadRecord(err.kind, location, err.detail))
        except TemplateMismatch as err:
            result.tracker.add(BadRecord("error", location, str(err)))
        else:
            result.tracker.add_good()
            result.images += len(images)
        result.checked += 1
    return result


def _spread(readers: list, limit: int, result: Inspection) -> list:
    """(location, read) of up to `limit` rows spread evenly over random-access readers."""
    for r in readers:
        result.files.append((r.path, r.format, len(r)))
        if isinstance(r, ParquetReader) and r.max_group_rows > LARGE_ROW_GROUP:
            result.notes.append(f"{r.path}: row groups of up to {r.max_group_rows} rows; random access decodes a "
                                "whole group, so rewrite it with smaller groups (e.g. row_group_size=1024)")
    total = result.rows
    picks = np.unique(np.linspace(0, total - 1, min(limit, total)).astype(np.int64)) if total else []
    starts = np.cumsum([0] + [len(r) for r in readers])
    found = []
    for index in picks:
        f = int(np.searchsorted(starts, index, side="right") - 1)
        reader, row = readers[f], int(index - starts[f])
        found.append((reader.location(row), functools.partial(reader.read, row)))
    return found


def _located(records):
    for record in records:
        yield record.location, lambda record=record: record


def show_labels(sample: EncodedSample, tokenizer, vision: VisionTokenIds) -> str:
    """The decoded sample with trained tokens in [[…]] and each image span shortened."""
    out, run, run_trained = [], [], False

    def flush():
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"[[{text}]]" if run_trained else text)

    i, ids = 0, sample.input_ids
    while i < len(ids):
        if ids[i] == vision.start:
            flush()
            run = []
            j = i
            while j < len(ids) and ids[j] != vision.end:
                j += 1
            out.append(f"<|vision_start|><|image_pad|>×{j - i - 1}<|vision_end|>")
            i = j + 1
            continue
        trained = sample.labels[i] != IGNORE_INDEX
        if run and trained != run_trained:
            flush()
            run = []
        run_trained = trained
        run.append(ids[i])
        i += 1
    flush()
    return "".join(out)


def histogram(lengths: list[int], bins: int = 10, width: int = 40) -> str:
    """Text histogram of token lengths."""
    if not lengths:
        return "  (no rendered samples)"
    counts, edges = np.histogram(lengths, bins=min(bins, max(lengths) - min(lengths) + 1))
    top = max(counts.max(), 1)
    lines = [f"  {int(lo):>6}-{int(hi):<6} {n:>7} {'#' * int(round(width * n / top))}"
             for n, lo, hi in zip(counts, edges[:-1], edges[1:])]
    q = np.percentile(lengths, [50, 90, 99])
    lines.append(f"  min {min(lengths)}, median {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, max {max(lengths)}")
    return "\n".join(lines)


def format_inspection(result: Inspection, tokenized: bool) -> str:
    lines = ["files:"]
    lines += [f"  {path}  format={fmt}  rows={'?' if n is None else n}" for path, fmt, n in result.files]
    rows = "? (remote shards are not counted)" if result.rows is None else result.rows
    lines.append(f"rows: {rows}  checked: {result.checked}  images in good checked rows: {result.images}")
    lines.append("token lengths:" if tokenized else "token lengths: (give --llm DIR to render and count tokens)")
    if tokenized:
        lines.append(histogram(result.lengths))
    lines.append("bad records:")
    lines += ["  " + line for line in result.tracker.report().splitlines()]
    lines += [f"note: {n}" for n in result.notes]
    if result.example:
        lines += ["rendered sample (trained tokens in [[...]]):", result.example]
    lines.append("usable: yes" if result.usable else "usable: NO")
    return "\n".join(lines)
