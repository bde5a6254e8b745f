"""Typed configuration of the data pipeline: where samples come from and how they become batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crossvlm.errors import ConfigError

FORMATS = ("minimind", "llava")


@dataclass
class SourceConfig:
    """One data source: a file or a folder of files of one format."""

    path: str
    """A parquet / JSON / JSONL file, or a folder holding such files (read in sorted order)."""
    format: str | None = None
    """`minimind` (parquet with `image_bytes`) or `llava` (JSON/JSONL with image paths); None detects it."""
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
            elif not Path(src.path).expanduser().exists():
                problems.append(f"{where}.path {src.path} does not exist")
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
        if self.row_group_cache < 1:
            problems.append(f"data.row_group_cache must be >= 1, got {self.row_group_cache}")
        if problems:
            raise ConfigError("invalid data config: " + "; ".join(problems))
