"""`crossvlm data convert`: any readable source to sharded MiniMind-V parquet or webdataset tars.

Records are read in order, checked (`normalize`), and written with their images' bytes as they are
(LLaVA's image files are read in; nothing is decoded or re-encoded). A record that cannot be used is
counted and located, not written. The shards go to a temporary folder beside `out` that becomes `out`
only when every shard is written, so a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from crossvlm.data.badrecords import BadRecordTracker
from crossvlm.data.config import DEFAULT_CAPTION_PROMPT
from crossvlm.data.records import BadRecord, RecordError, normalize
from crossvlm.data.sources import resolve_source
from crossvlm.errors import DataError

TARGETS = ("parquet", "webdataset")


@dataclass
class Conversion:
    """What `convert` wrote: the shard files and how many records, with the bad ones counted."""

    shards: list[Path] = field(default_factory=list)
    written: int = 0
    tracker: BadRecordTracker = field(default_factory=lambda: BadRecordTracker(1.0))


def convert(source: str, out: str | Path, to: str, *, fmt: str | None = None, image_root: str | None = None,
            split: str | None = None, records_per_shard: int = 1000,
            caption_prompt: str = DEFAULT_CAPTION_PROMPT, limit: int | None = None) -> Conversion:
    """Write every usable record of `source` (any path `resolve_source` opens) into `out` as shards
    `00000.parquet`, … (MiniMind-V columns, row groups of 1,024) or `00000.tar`, … (webdataset:
    `KEY.json` with the conversation, `KEY.0.jpg`, `KEY.1.png`, … its images)."""
    if to not in TARGETS:
        raise DataError(f"convert: --to must be one of {list(TARGETS)}, got {to!r}")
    if records_per_shard < 1:
        raise DataError(f"convert: --records-per-shard must be >= 1, got {records_per_shard}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; convert writes a new one")
    resolved = resolve_source(source, fmt=fmt, image_root=image_root, split=split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    result = Conversion()
    writer = _ParquetShards(tmp) if to == "parquet" else _TarShards(tmp)
    try:
        pending = []
        records = (r for shard in resolved.shards for r in shard.records(caption_prompt=caption_prompt))
        for record in records:
            if limit is not None and result.written + len(pending) >= limit:
                break
            try:
                if isinstance(record, BadRecord):
                    raise RecordError(record.kind, record.detail)
                conv = normalize(record)
                images = [_image_bytes(src) for src in conv.images]
            except RecordError as err:
                result.tracker.add(BadRecord(err.kind, record.location, err.detail))
                continue
            result.tracker.add_good()
            pending.append((conv.messages, images))
            if len(pending) == records_per_shard:
                writer.write(pending, result.written)
                result.written += len(pending)
                pending = []
        if pending:
            writer.write(pending, result.written)
            result.written += len(pending)
        if result.written == 0:
            raise DataError(f"{source}: no usable record to convert ({result.tracker.report(one_line=True)})")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.shards = [out / p.name for p in writer.paths]
    return result


def _image_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    try:
        return Path(src).read_bytes()
    except OSError as err:
        raise RecordError("missing_image", f"{src}: {err.strerror or err}") from None


class _ParquetShards:
    def __init__(self, folder: Path):
        self.folder, self.paths = folder, []

    def write(self, rows: list, first: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.folder / f"{len(self.paths):05d}.parquet"
        table = pa.table({
            "conversations": pa.array([json.dumps(m, ensure_ascii=False) for m, _ in rows], pa.string()),
            "image_bytes": pa.array([images for _, images in rows], pa.list_(pa.binary())),
        })
        pq.write_table(table, path, row_group_size=1024)
        self.paths.append(path)


class _TarShards:
    def __init__(self, folder: Path):
        self.folder, self.paths = folder, []

    def write(self, rows: list, first: int) -> None:
        path = self.folder / f"{len(self.paths):05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, (messages, images) in enumerate(rows):
                key = f"{first + i:09d}"
                files = [(f"{key}.json", json.dumps({"conversations": messages}, ensure_ascii=False).encode())]
                files += [(f"{key}.{n}.{_extension(data)}", data) for n, data in enumerate(images)]
                for name, data in files:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        self.paths.append(path)


def _extension(data: bytes) -> str:
    """The file extension of encoded image bytes, from their header (`jpg` for anything unknown:
    decoding reads the header, not the name)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"GIF":
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return "jpg"
