"""A training run's inputs checked before anything is built, and its folder kept safe.

`preflight` runs before the model loads (seconds, no weights read): the model sources
(`crossvlm.sources`), whether `run.out_dir` can be written, and whether it already holds a run.
Training into a folder that holds one (checkpoints, final/, metrics.jsonl) is refused unless the run
resumes (`--resume`) or starts over on purpose (`run.overwrite`, `crossvlm train --overwrite`): a
second run there would replace final/, cut metrics.jsonl and leave its checkpoints beside the old
ones, and a later `--resume auto` would pick up the wrong run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from crossvlm import sources
from crossvlm.errors import ConfigError, DataError

RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "curves.png", "tensorboard")
"""What a run writes in run.out_dir: what makes a folder hold a run, and what `run.overwrite` removes."""


def run_files(out_dir: Path) -> list[str]:
    """The names of RUN_FILES present in `out_dir`."""
    return [name for name in RUN_FILES if (Path(out_dir) / name).exists()]


def preflight(cfg) -> None:
    """Refuse, in one ConfigError / ModelLoadError naming the setting, what would fail (or lose a run)
    after minutes of loading."""
    model = cfg.model
    if model.init_from:
        sources.check(model.init_from, "crossvlm", "model.init_from")
    else:
        sources.check(model.llm, "llm", "model.llm")
        sources.check(model.vision, "vision", "model.vision")
    out = Path(cfg.run.out_dir)
    found = run_files(out)
    if found and not cfg.run.resume and not cfg.run.overwrite:
        raise ConfigError(
            f"run.out_dir {out} already holds a run ({', '.join(found)}); continue it with --resume auto, "
            "start it over with --overwrite (its checkpoints, final/ and metrics are removed), "
            "or pick another run.out_dir"
        )
    if cfg.run.resume and cfg.run.overwrite:
        raise ConfigError("--resume and --overwrite (run.overwrite) contradict each other: choose one")
    meta = resume_meta(cfg.run.resume, out)
    changed = overridden_changes(meta.get("config") or {}, cfg.to_dict()) if meta else []
    if changed:
        raise ConfigError(refused_changes(f"--resume {cfg.run.resume}: its checkpoint", changed))
    sources.check_writable(out, "run.out_dir")
    from crossvlm.data.sources import check_source  # (imports transformers: after the quick checks)

    for name, data in (("data", cfg.data), ("eval_data", cfg.eval_data)):
        for i, source in enumerate(data.sources if data is not None else ()):
            try:  # a missing file, a folder without data files, a file of no known format
                check_source(source.path, source.format)
            except DataError as err:
                raise DataError(f"{name}.sources[{i}]: {err}") from None


def refused_changes(checkpoint: str, changed: list[str]) -> str:
    return (f"{checkpoint} restores its optimizer, schedule and random state, which would override what this "
            f"run changes ({'; '.join(changed)}); resume with the checkpoint's settings, or start a new run "
            "(another run.out_dir, or --model.init_from its final/)")


def resume_meta(resume: str | None, out_dir: Path) -> dict | None:
    """The meta.json of the checkpoint `resume` names (its files are checked when it loads), for checks
    that need no weights; a `resume` that names nothing resumable is refused here."""
    if not resume:
        return None
    path = Path(out_dir if resume == "auto" else resume)
    if resume != "auto" and not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such folder (give a checkpoint folder, a run's out_dir, or auto)")
    steps = sorted((path / "checkpoints").glob("step-*"))
    if (path / "meta.json").is_file():
        meta = path / "meta.json"
    elif steps:
        meta = steps[-1] / "meta.json"
    elif resume == "auto":
        return None  # nothing to resume yet: the run starts
    else:
        raise ConfigError(f"--resume {resume}: it is neither a checkpoint (no meta.json) nor a run's out_dir "
                          "(no checkpoints/)")
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None  # a damaged checkpoint: loading it names what is wrong (or `auto` takes an older one)


def clear_run(out_dir: Path) -> list[str]:
    """Remove what an earlier run wrote in `out_dir` (`run.overwrite`); returns what was removed."""
    removed = run_files(out_dir)
    for name in removed:
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


OVERRIDDEN = ("optim.lr", "optim.projector_lr", "optim.weight_decay", "optim.betas", "optim.eps", "run.seed")
"""Settings a resumed checkpoint brings back (in the optimizer's parameter groups, the schedule's base
rates and the random generators' state), whatever this run's config says."""


def overridden_changes(saved: dict, current: dict) -> list[str]:
    """`key: checkpoint value -> this run's` for each OVERRIDDEN setting this run changes."""
    out = []
    for dotted in OVERRIDDEN:
        section, key = dotted.split(".")
        old, new = (saved.get(section) or {}).get(key), (current.get(section) or {}).get(key)
        if isinstance(old, list) or isinstance(new, (list, tuple)):
            old, new = list(old or []), list(new or [])
        if old != new:
            out.append(f"{dotted} {old} -> {new}")
    return out
