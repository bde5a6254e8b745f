"""Lazy, random-access readers for MiniMind-V parquet and LLaVA JSON / JSONL files.

Opening a reader keeps only a small index (numpy arrays), never the records as Python objects:
- parquet: row counts per row group; a row is read by decoding its row group (only the two columns
  used), with a small LRU cache of decoded groups per process;
- JSONL: the byte offset of every line; JSON (an array): the byte span of every element, found by one
  streaming pass at open. A record is read by seeking to its span and parsing just that.
Readers are opened in the main process and used in DataLoader workers: file handles are opened lazily
per process, so a forked worker never shares one with its parent.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from crossvlm.data.records import RawRecord, RecordError
from crossvlm.errors import DataError
from crossvlm.model.tokens import IMAGE_MARK

SUFFIXES = {".parquet": "minimind", ".json": "llava", ".jsonl": "llava"}


def find_files(path: str | Path) -> list[Path]:
    """The data files of a source: the file itself, or the data files in a folder (sorted, recursive)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no .parquet, .json, .jsonl or .tar file, nor a save_to_disk dataset")
        return files
    raise DataError(f"{path}: no such file or folder")


def detect_format(path: Path) -> str:
    """`minimind` or `llava`, from the suffix, checked against the file's contents."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        "use .parquet, .json or .jsonl, or force one with --format")
    return kind


def open_reader(path: Path, fmt: str | None = None, image_root: str | Path | None = None, *,
                row_group_cache: int = 2) -> "ParquetReader | JsonReader":
    """Open one file for random access; `fmt` forces the format instead of detecting it."""
    kind = fmt or detect_format(path)
    if kind in TABLE_SCHEMAS:  # which of the two, the columns say unless `fmt` forces it
        return ParquetReader(path, row_group_cache=row_group_cache, schema=fmt)
    if kind == "llava":
        return JsonReader(path, image_root=image_root)
    raise DataError(f"{path}: unknown format {kind!r}; choose minimind, cauldron or llava")


# Column tables: MiniMind-V's (`conversations` JSON or turns, `image_bytes`) and The Cauldron's /
# FineVision's (`texts`: a list of {user, assistant} turns, `images`: a list of HF Image structs).
TABLE_SCHEMAS = {"minimind": ("conversations", "image_bytes"), "cauldron": ("texts", "images")}


def detect_schema(names, where: str, forced: str | None = None) -> str:
    """`minimind` or `cauldron` from a table's column names (`forced` is checked against them)."""
    names = set(names)
    for schema in ([forced] if forced else TABLE_SCHEMAS):
        text, images = TABLE_SCHEMAS[schema]
        if text in names and (schema == "minimind" or images in names):
            return schema
    raise DataError(f"{where}: neither MiniMind-V columns (`conversations`, `image_bytes`) nor The Cauldron's / "
                    f"FineVision's (`texts`, `images`) (columns: {sorted(names)[:12]})")


def schema_columns(schema: str, names) -> list[str]:
    text, images = TABLE_SCHEMAS[schema]
    return [text] + ([images] if images in set(names) else [])


def image_value(value) -> bytes | Path:
    """An encoded image as a table stores it: bytes, or an HF `Image` struct {bytes, path}."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"])
        raise RecordError("bad_image", "an image struct holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise RecordError("bad_image", f"an image is a {type(value).__name__}, not bytes")


def cauldron_turns(texts, num_images: int):
    """The Cauldron's / FineVision's `texts` ({user, assistant} per turn) as {role, content} messages.

    Their texts carry no `<image>` mark: the images go first, before the first question (as nanoVLM
    and SmolVLM train on them). Anything but a list of turns is returned as is for `normalize` to judge.
    """
    if not isinstance(texts, list) or not all(isinstance(t, dict) for t in texts):
        return texts
    messages = []
    for turn in texts:
        messages += [{"role": "user", "content": turn.get("user")},
                     {"role": "assistant", "content": turn.get("assistant")}]
    marks = sum(m["content"].count(IMAGE_MARK) for m in messages if isinstance(m["content"], str))
    if messages and marks == 0 and num_images and isinstance(messages[0]["content"], str):
        messages[0]["content"] = IMAGE_MARK * num_images + "\n" + messages[0]["content"]
    return messages


def table_record(schema: str, row: dict, location: str) -> RawRecord:
    """One table row (column name -> Python value) as a RawRecord."""
    text, images_column = TABLE_SCHEMAS[schema]
    images = row.get(images_column)
    if images is None:
        images = []
    elif not isinstance(images, list):
        images = [images]
    images = [image_value(v) for v in images]
    conversations = row.get(text)
    if schema == "cauldron":
        conversations = cauldron_turns(conversations, len(images))
    return RawRecord(conversations, images, location)


def text_estimates(column) -> tuple[np.ndarray, np.ndarray]:
    """(text characters, <image> marks) per row of a text column: strings, lists of strings or lists
    of structs (every string field of a turn counted)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(column)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        flat = pc.list_flatten(column)
        parents = pc.list_parent_indices(column).to_numpy()
        fields = [flat]
        if pa.types.is_struct(flat.type):  # the turns' text: {role, content} or Cauldron's {user, assistant}
            names = [f.name for f in flat.type if pa.types.is_string(f.type)]
            names = [n for n in ("content", "value") if n in names][:1] or [n for n in ("user", "assistant") if n in names]
            fields = [pc.struct_field(flat, n) for n in names]
        chars, marks = np.zeros(n), np.zeros(n)
        for content in fields:
            chars += np.bincount(parents, pc.utf8_length(content).fill_null(0).to_numpy(), n)
            marks += np.bincount(parents, pc.count_substring(content, IMAGE_MARK).fill_null(0).to_numpy(), n)
        return chars, marks
    return (pc.utf8_length(column).fill_null(0).to_numpy().astype(np.float64),
            pc.count_substring(column, IMAGE_MARK).fill_null(0).to_numpy().astype(np.float64))


def image_counts(column) -> np.ndarray:
    """Images per row of an images column (a list per row, or one image)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return pc.list_value_length(column).fill_null(0).to_numpy().astype(np.float64)
    return pc.is_valid(column).to_numpy(zero_copy_only=False).astype(np.float64)


class ParquetReader:
    """A parquet file of MiniMind-V rows (`conversations` JSON string or list of turns, optional
    `image_bytes`) or of The Cauldron's / FineVision's (`texts`, `images`), told apart by its columns."""

    def __init__(self, path: Path, row_group_cache: int = 2, schema: str | None = None):
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as err:  # pyarrow raises several types for unreadable files
            raise DataError(f"{self.path}: not a readable parquet file ({err})") from None
        meta = pf.metadata
        names = pf.schema_arrow.names
        self.format = detect_schema(names, str(self.path), schema)
        self.columns = schema_columns(self.format, names)
        rows = np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)
        self.group_starts = np.concatenate([[0], np.cumsum(rows)])  # (G+1,)
        self.max_group_rows = int(rows.max()) if len(rows) else 0
        self.cache_size = row_group_cache
        self._file = None
        self._pid = None
        self._cache: OrderedDict[int, dict] = OrderedDict()

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None, _cache=OrderedDict())
        return state

    def _group(self, g: int) -> dict:
        if self._pid != os.getpid():
            import pyarrow.parquet as pq

            self._file, self._pid, self._cache = pq.ParquetFile(self.path, memory_map=True), os.getpid(), OrderedDict()
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        table = self._file.read_row_group(g, columns=self.columns)
        # Keep arrow arrays (not Python lists) so a cached group costs its binary size only.
        group = {name: table.column(name).combine_chunks() for name in self.columns}
        self._cache[g] = group
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return group

    def read(self, row: int) -> RawRecord:
        g = int(np.searchsorted(self.group_starts, row, side="right") - 1)
        group = self._group(g)
        i = row - int(self.group_starts[g])
        return table_record(self.format, {name: column[i].as_py() for name, column in group.items()},
                            self.location(row))

    def location(self, row: int) -> str:
        return f"{self.path} row {row}"

    def length_estimates(self) -> tuple[np.ndarray, np.ndarray]:
        """(text characters, <image> marks) per row, from the text column (and Cauldron's image lists)."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        parts = [table_estimates(self.format, pf.read_row_group(g, columns=self.columns))
                 for g in range(pf.num_row_groups)]
        if not parts:
            return np.zeros(0), np.zeros(0)
        return np.concatenate([c for c, _ in parts]), np.concatenate([m for _, m in parts])


def table_estimates(schema: str, table) -> tuple[np.ndarray, np.ndarray]:
    """(text characters, images) per row of a table in `schema`, from its columns alone."""
    text, images = TABLE_SCHEMAS[schema]
    chars, marks = text_estimates(table.column(text).combine_chunks())
    if schema == "cauldron" and images in table.column_names:  # Cauldron's texts carry no marks
        marks = image_counts(table.column(images).combine_chunks())
    return chars, marks


class TableReader:
    """A Hugging Face `datasets.Dataset` (a `save_to_disk` folder, or a hub id's download): its Arrow
    table is memory-mapped by `datasets`, and a row is sliced from it without decoding its images."""

    def __init__(self, dataset, name: str, schema: str | None = None):
        self.dataset = dataset.with_format("arrow")
        self.path = name
        self.format = detect_schema(dataset.column_names, name, schema)
        self.columns = schema_columns(self.format, dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, row: int) -> RawRecord:
        table = self.dataset[int(row)].select(self.columns)  # one row as a pyarrow Table
        return table_record(self.format, table.to_pylist()[0], self.location(row))

    def location(self, row: int) -> str:
        return f"{self.path} row {row}"

    def length_estimates(self) -> tuple[np.ndarray, np.ndarray]:
        chars, marks = [], []
        for start in range(0, len(self.dataset), 10_000):
            part = self.dataset[start : start + 10_000].select(self.columns)
            c, m = table_estimates(self.format, part)
            chars.append(c)
            marks.append(m)
        return (np.concatenate(chars), np.concatenate(marks)) if chars else (np.zeros(0), np.zeros(0))


class JsonReader:
    """LLaVA JSON (one array of records) or JSONL (one record a line): `image` paths + `conversations`."""

    format = "llava"

    def __init__(self, path: Path, image_root: str | Path | None = None):
        self.path = Path(path)
        self.image_root = Path(image_root).expanduser() if image_root else self.path.parent
        with open(self.path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 BOM (Windows editors) is no content
        if not head:
            raise DataError(f"{self.path}: file is empty")
        if head[:1] == b"[":
            self.starts, self.ends, self.chars, self.marks = _scan_json_array(self.path)
        elif head[:1] == b"{" and _first_line_is_object(self.path):
            self.starts, self.ends, self.chars, self.marks = _scan_jsonl(self.path)
        else:
            raise DataError(f"{self.path}: neither a JSON array of records nor JSON lines "
                            f"(starts with {head[:20]!r})")
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None)
        return state

    def record(self, row: int) -> dict:
        """The record as its JSON object (every field, e.g. an evaluation set's `answers`)."""
        if self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.starts[row]))
        raw = self._file.read(int(self.ends[row] - self.starts[row]))
        try:
            record = json.loads(raw)
        except ValueError as err:
            raise RecordError("malformed", f"not valid JSON ({err})") from None
        if not isinstance(record, dict) or "conversations" not in record:
            raise RecordError("malformed", "record has no `conversations`")
        return record

    def read(self, row: int) -> RawRecord:
        record, location = self.record(row), self.location(row)
        image = record.get("image", record.get("images"))
        if image is None:
            paths = []
        elif isinstance(image, str):
            paths = [image]
        elif isinstance(image, list) and all(isinstance(p, str) for p in image):
            paths = image
        else:
            raise RecordError("malformed", f"`image` must be a path or a list of paths, got {image!r:.60}")
        return RawRecord(record["conversations"], [self.image_root / p for p in paths], location)

    def location(self, row: int) -> str:
        return f"{self.path} record {row}"

    def length_estimates(self) -> tuple[np.ndarray, np.ndarray]:
        return self.chars, self.marks


def _first_line_is_object(path: Path) -> bool:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except ValueError:
                    return False
    return False


def _scan_jsonl(path: Path):
    """Byte spans of the non-blank lines, with each line's length and <image> count."""
    starts, ends, chars, marks = [], [], [], []
    mark = IMAGE_MARK.encode()
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                starts.append(pos)
                ends.append(pos + len(line))
                chars.append(len(line))
                marks.append(line.count(mark))
            pos += len(line)
    return (np.array(starts, np.int64), np.array(ends, np.int64),
            np.array(chars, np.float64), np.array(marks, np.float64))


def _scan_json_array(path: Path):
    """Byte spans of the elements of a top-level JSON array, found by one decoding pass.

    Each element is decoded once to find where it ends and then dropped, so the pass holds the file's
    text but never all records as objects.
    """
    text = path.read_text(encoding="utf-8")
    ascii_only = text.isascii()
    decoder = json.JSONDecoder()
    starts, ends, chars, marks = [], [], [], []
    pos = text.index("[") + 1
    byte_pos, char_pos = len(text[:pos].encode()), pos  # byte offset of char_pos

    def to_bytes(p: int) -> int:
        nonlocal byte_pos, char_pos
        byte_pos += (p - char_pos) if ascii_only else len(text[char_pos:p].encode())
        char_pos = p
        return byte_pos

    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}: JSON array is not closed")
        if text[pos] == "]":
            break
        try:
            _, end = decoder.raw_decode(text, pos)
        except ValueError as err:
            raise DataError(f"{path}: invalid JSON after record {len(starts)} ({err})") from None
        starts.append(to_bytes(pos))
        ends.append(to_bytes(end))
        chars.append(end - pos)
        marks.append(text.count(IMAGE_MARK, pos, end))
        pos = end
    return (np.array(starts, np.int64), np.array(ends, np.int64),
            np.array(chars, np.float64), np.array(marks, np.float64))
