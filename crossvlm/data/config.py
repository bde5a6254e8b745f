"""Typed configuration of the data pipeline: where samples come from and how they become batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crossvlm.errors import ConfigError

FORMATS = ("minimind", "cauldron", "llava", "webdataset")
DEFAULT_CAPTION_PROMPT = "<image>\nDescribe the image."


@dataclass
class SourceConfig:
    """One data source: a file or a folder of files of one format."""

    path: str
    """A parquet / JSON / JSONL file or a folder of them (read in sorted order); a `save_to_disk` folder;
    webdataset tar shards (a tar, a folder of tars, brace notation `shards/{00000..00127}.tar`); an
    `http(s)://`, `s3://`, `gs://` or `hf://` URL of shards; or a hub dataset id `owner/name[:config]`."""
    format: str | None = None
    """`minimind` (parquet with `conversations`, `image_bytes`), `cauldron` (The Cauldron / FineVision:
    `texts`, `images`), `llava` (JSON/JSONL with image paths) or `webdataset`; None detects it."""
    split: str | None = None
    """The split of a hub dataset or of a saved DatasetDict (default `train`)."""
    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    """The user turn a webdataset `.txt` caption answers (LLaVA's pretraining prompt); `<image>` marks
    where the image goes (put first when absent)."""
    image_root: str | None = None
    """Folder that LLaVA `image` paths are relative to; None means the folder of each JSON file."""
    weight: float = 1.0
    """Share of the source in one epoch: an epoch holds round(weight × rows) of its samples
    (2.0 repeats every row twice, 0.5 takes a fresh random half each epoch)."""


@dataclass
class DataConfig:
    """Everything the loader needs besides the tokenizer, the image processor and the batch size."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The sources mixed into one data set (see `SourceConfig.weight`)."""
    max_length: int = 2048
    """Longest token sequence of a sample; longer ones are truncated (never inside an image span)."""
    system_prompt: str | None = None
    """System message put first in conversations that carry none of their own."""
    enable_thinking: bool = False
    """False: every assistant turn follows an empty `<think>` block that is part of the prompt (not
    trained), exactly as the generation prompt renders it. True: the empty block is trained."""
    packing: bool | str = False
    """Pack the samples of a batch into as few rows of `max_length` tokens as fit, attention kept per
    sample without a dense mask (crossvlm.model.packing). `auto`: pack on a GPU whose LLM attention can
    keep samples apart, pad otherwise (the run's first lines say which)."""
    group_by_length: bool = False
    """Put samples of similar estimated length in the same batch (less padding)."""
    max_bad_fraction: float = 0.01
    """Largest share of bad records (and samples dropped for length) tolerated before the run stops."""
    max_image_pixels: int = 64_000_000
    """Images with more pixels than this are bad records (guards against decompression bombs)."""
    num_workers: int = 4
    """DataLoader worker processes that read, render and decode (0 works in the main process)."""
    shuffle: bool = True
    """Shuffle the order of samples each epoch (deterministically from the seed and the epoch)."""
    row_group_cache: int = 2
    """Parquet row groups each worker keeps decoded (random access reads a whole row group)."""
    streaming: bool | str = "auto"
    """Read the sources as streams of shards split over processes and workers (crossvlm.data.streaming)
    instead of by random access. `auto`: streamed when a source can only be (tar shards, URLs)."""
    shuffle_buffer: int = 1000
    """Records each streaming worker holds to shuffle (raw bytes; 0 keeps the shards' order)."""

    @classmethod
    def from_dict(cls, raw: dict) -> "DataConfig":
        """Build from a plain mapping (a YAML section); unknown keys are reported by `ConfigError`."""
        raw = dict(raw)
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ConfigError(f"data: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        sources = []
        given = raw.pop("sources", []) or []
        if isinstance(given, (str, Path, dict)):  # one source, e.g. `--data.sources file.parquet`
            given = [given]
        for i, src in enumerate(given):
            if isinstance(src, (str, Path)):
                src = {"path": str(src)}
            if not isinstance(src, dict):
                raise ConfigError(f"data.sources[{i}]: expected a path or a mapping, got {src!r}")
            bad = sorted(set(src) - set(SourceConfig.__dataclass_fields__))
            if bad:
                raise ConfigError(f"data.sources[{i}]: unknown keys {bad}")
            sources.append(SourceConfig(**src))
        cfg = cls(sources=sources, **raw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field; raise one ConfigError listing all problems."""
        problems = []
        if not self.sources:
            problems.append("data.sources is empty: give at least one file or folder")
        for i, src in enumerate(self.sources):
            where = f"data.sources[{i}]"
            if not src.path:
                problems.append(f"{where}.path is empty")
            elif not _may_exist(src.path):
                problems.append(f"{where}.path {src.path} does not exist (nor is it a URL or owner/name[:config])")
            if src.format is not None and src.format not in FORMATS:
                problems.append(f"{where}.format {src.format!r} is not one of {list(FORMATS)}")
            if src.image_root is not None and not Path(src.image_root).expanduser().is_dir():
                problems.append(f"{where}.image_root {src.image_root} is not a folder")
            if not (src.weight > 0):
                problems.append(f"{where}.weight must be > 0, got {src.weight}")
        if self.packing not in (True, False, "auto"):
            problems.append(f"data.packing must be true, false or auto, got {self.packing!r}")
        if self.max_length < 8:
            problems.append(f"data.max_length must be at least 8, got {self.max_length}")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            problems.append(f"data.max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")
        if self.max_image_pixels < 1:
            problems.append(f"data.max_image_pixels must be positive, got {self.max_image_pixels}")
        if self.num_workers < 0:
            problems.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.streaming not in (True, False, "auto"):
            problems.append(f"data.streaming must be true, false or auto, got {self.streaming!r}")
        if self.shuffle_buffer < 0:
            problems.append(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.row_group_cache < 1:
            problems.append(f"data.row_group_cache must be >= 1, got {self.row_group_cache}")
        if problems:
            raise ConfigError("invalid data config: " + "; ".join(problems))


def _may_exist(path: str) -> bool:
    """A local path, a URL, brace notation or a hub id: what `crossvlm.data.sources` can open (checked
    fully there; here only a plain local path that is missing is refused)."""
    path = str(path)
    if "://" in path or "{" in path or Path(path).expanduser().exists():
        return True
    from crossvlm.data.sources import looks_like_hub_id

    repo = path.rpartition(":")[0] if ":" in path else path
    return Path(repo).expanduser().is_dir() or looks_like_hub_id(repo)
