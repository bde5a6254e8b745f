"""What a configured source is, and how its records are read in order (streamed).

One place answers "what is this path?" for data:
- a `.parquet` / `.json` / `.jsonl` file, or a folder of them (MiniMind-V, The Cauldron / FineVision
  columns, LLaVA): random-access readers (crossvlm.data.readers);
- a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`): the `datasets`
  library memory-maps its Arrow files; random access;
- a hub id `owner/name[:config]` with `split` (`HuggingFaceM4/the_cauldron:vqav2`), or a local folder
  laid out like a hub dataset (`folder:config`): `datasets.load_dataset` (downloaded and
  memory-mapped), or with `data.streaming` its data files (parquet) read as shards over `hf://`;
- webdataset shards (img2dataset's layout: `KEY.jpg`, `KEY.txt`, `KEY.json` in one tar): a tar, a
  folder of tars, brace notation (`shards/{00000..00127}.tar`), or an `http(s)://`, `s3://`, `gs://`,
  `hf://` URL of any of these, opened with fsspec: streamed;
- parquet shards at a URL: streamed.

Tar shards are read with the standard library's `tarfile` in stream mode over an fsspec file: one
sequential pass, so a plain HTTP server (no range requests) or an object store's GET serves them,
and no index is built. The `webdataset` package would add its own shard splitting and shuffling,
which cannot resume at a record; fsspec's `TarFileSystem` indexes a whole tar before the first read.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from crossvlm.data.readers import (TABLE_SCHEMAS, TableReader, cauldron_turns, detect_format, detect_schema,
                                   find_files, open_reader, schema_columns, table_record)
from crossvlm.data.records import BadRecord, RawRecord, RecordError
from crossvlm.errors import DataError
from crossvlm.model.tokens import IMAGE_MARK

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_remote(path: str) -> bool:
    return bool(REMOTE.match(str(path)))


def expand_braces(pattern: str) -> list[str]:
    """`a/{00000..00003}.tar` -> four names (zero padding kept), `{a,b}` -> two; nested and repeated
    groups expand left to right (the notation of webdataset and bash)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + "{" + body + "}" + name for name in expand_braces(tail)]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


@dataclass(frozen=True)
class Shard:
    """One unit of streaming: a tar or parquet file (local path or URL), or an open random-access
    reader (`reader`) read in row order."""

    name: str
    kind: str  # "tar" | "parquet" | "reader"
    reader: object = None

    def records(self, part: int = 0, parts: int = 1, skip: int = 0, *, caption_prompt: str = ""
                ) -> Iterator[RawRecord | BadRecord]:
        """Records number part, part + parts, part + 2·parts, … of the shard, the first `skip` of them
        passed over without being decoded. A shard that cannot be read (a network error, a cut tar)
        yields one `BadRecord` naming it and ends."""
        try:
            if self.kind == "reader":
                for row in range(part, len(self.reader), parts)[skip:]:
                    try:
                        yield self.reader.read(row)
                    except RecordError as err:
                        yield BadRecord(err.kind, self.reader.location(row), err.detail)
            elif self.kind == "parquet":
                yield from _parquet_records(self.name, part, parts, skip)
            else:
                yield from _tar_records(self.name, part, parts, skip, caption_prompt)
        except (OSError, tarfile.TarError, ValueError, DataError) as err:
            yield BadRecord("error", self.name, f"shard cannot be read: {type(err).__name__}: {err}")

    def count(self) -> int | None:
        """Records in the shard when that is cheap to know (a reader, a local file), else None."""
        if self.kind == "reader":
            return len(self.reader)
        if is_remote(self.name):
            return None
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.name).metadata.num_rows
        with tarfile.open(self.name, "r:*") as tar:  # headers only: the data is seeked over
            return len({_split_name(m.name)[0] for m in tar if m.isfile() and _split_name(m.name)})


@dataclass
class ResolvedSource:
    """A configured source: random-access `readers` when its files allow it, else None; its streamed
    `shards` (the readers themselves when it has them)."""

    name: str
    readers: list | None
    shards: list[Shard]

    @property
    def kind(self) -> str:
        return "random access" if self.readers is not None else "streamed"


@dataclass
class _Target:
    """What a source's path names before anything is opened: a `save_to_disk` folder ("saved"), a hub
    id ("hub", `repo` and `config`), a URL ("remote"), or local files ("local", `names` its brace
    expansion and `local` their paths)."""

    kind: str
    names: list[str]
    local: list[Path]
    repo: str = ""
    config: str = ""


def _target(path: str) -> _Target:
    names = expand_braces(path)
    local = [Path(n).expanduser() for n in names]
    repo, _, config = path.rpartition(":") if _looks_like_config(path) else (path, "", "")
    if local[0].is_dir() and any((local[0] / m).exists() for m in HF_DISK_MARKERS):
        kind = "saved"
    elif is_remote(path):
        kind = "remote"
    elif not local[0].exists() and len(names) == 1 and (Path(repo).expanduser().is_dir() or looks_like_hub_id(repo)):
        kind = "hub"
    else:
        kind = "local"
    return _Target(kind, names, local, repo, config)


def _local_shards(path: str, target: _Target) -> list[str] | None:
    """The shards a local source names (brace notation, a tar, a folder holding tars), or None for data
    files read by random access; a missing file or shard is a DataError."""
    if len(target.names) > 1 or (target.local[0].is_file() and target.local[0].name.endswith(TAR_SUFFIXES)):
        missing = [str(p) for p in target.local if not p.is_file()]
        if missing:
            raise DataError(f"{path}: {len(missing)} of {len(target.local)} shards do not exist (first: {missing[0]})")
        return target.names
    if not target.local[0].exists():
        raise DataError(f"{path}: no such file or folder, and not a hub dataset id (owner/name[:config])")
    if target.local[0].is_dir():
        return sorted(str(p) for p in target.local[0].rglob("*") if p.is_file() and p.name.endswith(TAR_SUFFIXES)) or None
    return None


def resolve_source(path: str, *, fmt: str | None = None, image_root: str | None = None, split: str | None = None,
                   streaming: bool = False, row_group_cache: int = 2) -> ResolvedSource:
    """Open what `path` names (see the module docstring) without reading its records. `fmt` forces
    the columns or file format; `split` picks a hub dataset's or a saved DatasetDict's split."""
    path = str(path)
    table_fmt = fmt if fmt in TABLE_SCHEMAS else None  # forces minimind or cauldron columns
    file_fmt = fmt if fmt in (*TABLE_SCHEMAS, "llava") else None
    target = _target(path)
    if target.kind == "saved":
        folder = target.local[0]
        source = _readers(path, [TableReader(_load_from_disk(folder, split), _disk_name(folder, split), table_fmt)])
    elif target.kind == "hub":
        source = _hub(target.repo, target.config or None, split or "train", streaming, table_fmt)
    elif split:
        raise DataError(f"{path}: `split` ({split}) picks a split of a hub dataset or a saved DatasetDict; "
                        "this source has none")
    elif target.kind == "remote":
        source = _remote(path)
    else:
        shards = _local_shards(path, target)
        source = _shards(path, shards) if shards is not None else _readers(
            path, [open_reader(f, file_fmt, image_root, row_group_cache=row_group_cache) for f in find_files(target.local[0])])
    if fmt == "webdataset" and source.readers is not None:
        raise DataError(f"{path}: format webdataset, but it holds no tar shards")
    if file_fmt and source.readers is None and any(s.kind == "tar" for s in source.shards):
        raise DataError(f"{path}: format {fmt}, but it holds webdataset tar shards")
    return source


def check_source(path: str, fmt: str | None = None) -> None:
    """The quick part of `resolve_source`, for a run's checks before models load: local files and
    shards exist and have a known format. URLs, hub ids and saved datasets are not opened here (they
    are, and refused with the same kind of message, when training starts)."""
    path = str(path)
    target = _target(path)
    if target.kind == "local" and _local_shards(path, target) is None:
        for file in find_files(target.local[0]):  # (a folder without data files is refused here)
            if fmt is None:
                detect_format(file)


def looks_like_hub_id(name: str) -> bool:
    """`owner/name`, and not a local path gone missing: no data-file suffix, no existing first folder."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.lower().endswith((*TAR_SUFFIXES, ".parquet", ".json",
                                                                            ".jsonl", ".arrow")):
        return False
    return not Path(name.split("/")[0]).is_dir()


def _looks_like_config(path: str) -> bool:
    head, sep, tail = path.rpartition(":")
    return bool(sep and head and tail and "/" not in tail)


def _readers(name: str, readers: list) -> ResolvedSource:
    return ResolvedSource(name, readers, [Shard(str(r.path), "reader", r) for r in readers])


def _shards(name: str, files: list[str]) -> ResolvedSource:
    kinds = {_shard_kind(f) for f in files}
    if None in kinds:
        bad = next(f for f in files if _shard_kind(f) is None)
        raise DataError(f"{name}: {bad} is neither a tar shard ({', '.join(TAR_SUFFIXES)}) nor a .parquet shard")
    return ResolvedSource(name, None, [Shard(f, _shard_kind(f)) for f in files])


def _shard_kind(name: str) -> str | None:
    base = name.split("?")[0].lower()
    if base.endswith(TAR_SUFFIXES):
        return "tar"
    if base.endswith(".parquet"):
        return "parquet"
    return None


def _remote(path: str) -> ResolvedSource:
    """A URL: brace notation, one shard, or a folder listed by its filesystem (not HTTP: name the shards)."""
    names = expand_braces(path)
    if len(names) == 1 and _shard_kind(path) is None:
        fs, root = _filesystem(path)
        try:
            found = sorted(p for p in fs.find(root) if _shard_kind(p))
        except (OSError, NotImplementedError, ValueError) as err:
            raise DataError(f"{path}: cannot list the shards there ({err}); name them, e.g. "
                            f"{path.rstrip('/')}/{{00000..00009}}.tar") from None
        if not found:
            raise DataError(f"{path}: no .tar or .parquet shard there")
        names = [fs.unstrip_protocol(p) for p in found]
    return _shards(path, names)


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:  # s3:// needs s3fs, gs:// gcsfs
        raise DataError(f"{url}: {err}") from None


def open_url(name: str, *, sequential: bool = True):
    """A binary file object for a local path or a URL. `sequential` (tar shards): HTTP is read as one
    stream (no range requests, which a plain server may not offer); else (parquet, read from its
    footer) a seekable file that fetches byte ranges."""
    if not is_remote(name):
        return open(name, "rb")
    import fsspec

    options = {"block_size": 0} if sequential and name.lower().startswith(("http://", "https://")) else {}
    try:
        remote = fsspec.open(name, "rb", **options).open()
    except ImportError as err:
        raise DataError(f"{name}: {err}") from None
    if not sequential:
        return remote
    # Reads of 1 MiB whatever the reader asks for: each read of a remote file is a round trip to
    # fsspec's event loop thread (a tar of 64 photos over HTTP: 0.9-1.4 ms of CPU a record -> 0.2).
    return io.BufferedReader(remote, buffer_size=1 << 20)


def _load_from_disk(folder: Path, split: str | None):
    datasets = _datasets(f"{folder} (a save_to_disk folder)")
    loaded = datasets.load_from_disk(str(folder))
    if split and not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{folder}: `split` ({split}) given, but the folder holds one Dataset, not a DatasetDict")
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise DataError(f"{folder}: no split {split!r} (splits: {sorted(loaded)}); set the source's split")
        return loaded[split]
    return loaded


def _disk_name(folder: Path, split: str | None) -> str:
    return str(folder) + (f"[{split}]" if (folder / "dataset_dict.json").exists() else "")


def _hub(repo: str, config: str | None, split: str, streaming: bool, fmt: str | None) -> ResolvedSource:
    """A hub id (or a local folder in the hub's layout: the same code) through `datasets`."""
    datasets = _datasets(f"{repo} (a hub dataset id)")
    name = f"{repo}" + (f":{config}" if config else "") + f"[{split}]"
    if not Path(repo).expanduser().is_dir():
        _ask_the_hub(repo)
    try:
        if streaming:  # the split's data files, read as shards: nothing is downloaded first
            builder = datasets.load_dataset_builder(repo, config)
            files = (builder.config.data_files or {}).get(split)
            if not files:
                raise DataError(f"{name}: no data files for split {split!r}")
            return _shards(name, [str(f) for f in files])
        return _readers(name, [TableReader(datasets.load_dataset(repo, config, split=split), name, fmt)])
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 — datasets raises many types (hub, config, split); one line says which
        raise DataError(f"{name}: datasets could not load it: {type(err).__name__}: {err}") from None


def _ask_the_hub(repo: str) -> None:
    """One request to the Hub for a dataset id, before `datasets` (which retries for half a minute,
    printing each try, when the Hub cannot be reached): a missing or private dataset, or no network,
    is said at once. Offline (`HF_HUB_OFFLINE=1` or `HF_DATASETS_OFFLINE=1`) nothing is asked: `datasets`
    reads its cache."""
    import datasets.config
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    if datasets.config.HF_HUB_OFFLINE:  # (datasets folds both variables into it)
        return
    try:
        huggingface_hub.HfApi().dataset_info(repo, timeout=20)
    except RepositoryNotFoundError:
        raise DataError(f"{repo}: no such dataset on the Hub, or a private or gated one this machine is not "
                        "logged in for (hf auth login)") from None
    except Exception as err:  # noqa: BLE001 — the HTTP client's errors (httpx, requests) differ by version
        raise DataError(f"{repo}: the Hub cannot be reached ({type(err).__name__}: {err}); for a dataset "
                        "already in this machine's cache, set HF_HUB_OFFLINE=1") from None


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what}: reading it needs the `datasets` library: pip install 'crossvlm[hf]'") from None
    return datasets


# -- reading shards ------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's naming: the key is the path up to the first dot of the file name, the rest its
    extension (`dir/000123.jpg` -> (`dir/000123`, `jpg`)); hidden files are not samples."""
    folder, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    key, ext = base.split(".", 1)
    return posixpath.join(folder, key), ext.lower()


def _tar_groups(name: str, part: int, parts: int, skip: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of the samples of a tar, consecutive files with one key forming one
    sample. Samples not taken (other parts, skipped ones) are passed over unread."""
    with open_url(name) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        index, key, files, taken = -1, None, {}, 0
        wanted = False
        for member in tar:
            split = _split_name(member.name) if member.isfile() else None
            if split is None:
                continue
            if split[0] != key:
                if wanted:
                    yield key, files
                key, files, index = split[0], {}, index + 1
                mine = index % parts == part
                wanted = mine and taken >= skip
                taken += mine
            if wanted:
                files[split[1]] = tar.extractfile(member).read()
        if wanted:
            yield key, files


def _tar_records(name: str, part: int, parts: int, skip: int, caption_prompt: str) -> Iterator:
    for key, files in _tar_groups(name, part, parts, skip):
        location = f"{name} key {key}"
        try:
            yield webdataset_record(files, location, caption_prompt)
        except RecordError as err:
            yield BadRecord(err.kind, location, err.detail)


def webdataset_record(files: dict[str, bytes], location: str, caption_prompt: str) -> RawRecord:
    """One webdataset sample as a record: its images (in extension order: `jpg`, or `0.jpg`, `1.jpg`…)
    with a `.json` conversation (LLaVA's `conversations`, or Cauldron's `texts`) or, else, its `.txt`
    caption answering `caption_prompt` (img2dataset's `.json` holds only metadata)."""
    names = [ext for ext in files if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    images = [files[ext] for ext in sorted(names, key=_image_order)]
    meta = None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as err:
            raise RecordError("malformed", f".json is not valid JSON ({err})") from None
    if isinstance(meta, dict) and "conversations" in meta:
        turns = meta["conversations"]
        if isinstance(turns, list) and images and turns and isinstance(turns[0], dict):
            text = "".join(str(t.get("value", t.get("content", ""))) for t in turns)
            if IMAGE_MARK not in text:  # no marks: the images go before the first question
                first = dict(turns[0])
                field = "value" if "value" in first else "content"
                first[field] = IMAGE_MARK * len(images) + "\n" + str(first.get(field, ""))
                turns = [first, *turns[1:]]
        return RawRecord(turns, images, location)
    if isinstance(meta, dict) and "texts" in meta:
        return RawRecord(cauldron_turns(meta["texts"], len(images)), images, location)
    caption = files.get("txt", files.get("caption"))
    if caption is None:
        raise RecordError("malformed", "sample has neither a .json conversation nor a .txt caption "
                                       f"(files: {sorted(files)})")
    try:
        caption = caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RecordError("malformed", ".txt caption is not UTF-8") from None
    prompt = caption_prompt if IMAGE_MARK in caption_prompt else IMAGE_MARK * len(images) + caption_prompt
    return RawRecord([{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}],
                     images, location)


def _image_order(ext: str) -> tuple[int, str]:
    """`jpg` first, then `0.jpg`, `1.png`, …, `10.jpg` in number order."""
    head = ext.split(".")[0]
    return (int(head) if head.isdigit() else -1, ext)


def _parquet_records(name: str, part: int, parts: int, skip: int) -> Iterator[RawRecord | BadRecord]:
    """Rows part, part + parts, … of a parquet shard, read a row group at a time (only the columns
    used); row groups wholly before the `skip`-th wanted row are not read."""
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as files:
        try:
            pf = pq.ParquetFile(files.enter_context(open_url(name, sequential=False)))
        except ValueError as err:  # a server without range requests (fsspec says so): copy to a temporary file
            if "range" not in str(err).lower():
                raise
            copy = files.enter_context(tempfile.TemporaryFile())
            with open_url(name) as stream:
                shutil.copyfileobj(stream, copy, 1 << 20)
            copy.seek(0)
            pf = pq.ParquetFile(copy)
        schema = detect_schema(pf.schema_arrow.names, name)
        columns = schema_columns(schema, pf.schema_arrow.names)
        first = part + skip * parts  # the first row to yield
        start = 0
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if start + rows <= first:
                start += rows
                continue
            table = pf.read_row_group(g, columns=columns)
            for i in range(max(first - start, 0), rows):
                if (start + i) % parts != part:
                    continue
                location = f"{name} row {start + i}"
                try:
                    yield table_record(schema, {c: table.column(c)[i].as_py() for c in columns}, location)
                except RecordError as err:
                    yield BadRecord(err.kind, location, err.detail)
            start += rows
