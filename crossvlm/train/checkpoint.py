"""Checkpoints that resume a run exactly, written atomically, checked before use, loaded without
arbitrary unpickling.

A checkpoint is a folder `out_dir/checkpoints/step-NNNNNNN/`:
  trainable.safetensors  the trained parameters (full tensors, gathered under FSDP)
  optimizer.pt           AdamW state, keyed by parameter name; a trained parameter that has had no
                         gradient yet is listed in the param groups and has no state
  scheduler.pt           learning-rate schedule state
  rng.pt                 every random generator's state
  meta.json              step, data position, bad-record counts, the resolved config, and the size
                         and sha256 of every other file; written last
The folder is written under a temporary name and renamed when complete, so a kill or a failed write
mid-way leaves the previous checkpoint intact and no partial folder that counts as a checkpoint.
Before resuming, the files are checked against meta.json's record: a truncated, missing or corrupt
file makes `--resume auto` fall back to the previous checkpoint. `.pt` files are read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from crossvlm.errors import CheckpointError
from crossvlm.train.runtime import Runtime, rng_state, set_rng_state

_STEP_DIR = re.compile(r"^step-(\d+)$")
_DATA_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
_FILES = (*_DATA_FILES, "meta.json")
_TMP = ".tmp-"  # prefix of a folder being written: never counted as a checkpoint


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Published checkpoint folders, oldest first (whether their files are intact: `checkpoint_problems`)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _digest(path: Path, fsync: bool = False) -> dict:
    """Size and sha256 of a file (and, with `fsync`, the file flushed to the disk)."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            sha.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with the checkpoint folder `path`, one entry per problem (empty: intact).

    Every file must have the size and sha256 that meta.json recorded when it was written: a file
    cut short by a full disk or a copy, missing, or corrupt shows here, before anything is loaded.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    try:
        files = json.loads((path / "meta.json").read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except FileNotFoundError:
        return ["meta.json is missing"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"meta.json is unreadable or has no file record ({type(err).__name__}: {err})"]
    problems = []
    for name in _DATA_FILES:
        want = files.get(name) or {}
        if not (path / name).is_file():
            problems.append(f"{name} is missing")
        elif (size := (path / name).stat().st_size) != want.get("bytes"):
            problems.append(f"{name} has {size} bytes, {want.get('bytes')} were written (truncated?)")
        elif _digest(path / name)["sha256"] != want.get("sha256"):
            problems.append(f"{name} does not match the sha256 recorded when it was written (corrupt)")
    return problems


def find_resume(out_dir: Path, resume: str | None, warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume from, its files checked (`checkpoint_problems`).

    `auto`: the newest intact checkpoint in out_dir, or None if out_dir has none at all. A damaged
    newer one is skipped after `warn` (default: `warnings.warn`) is called with what is wrong; if
    every one is damaged, that is an error. A run's out_dir (a folder holding `checkpoints/`) means its
    newest intact checkpoint. Otherwise `resume` is a checkpoint folder that must be intact.
    """
    if not resume:
        return None
    if resume != "auto" and not (Path(resume) / "meta.json").exists() and checkpoint_dir(resume).is_dir():
        # A run's folder, not one of its checkpoints: its newest intact checkpoint.
        found = find_resume(Path(resume), "auto", warn)
        if found is None:
            raise CheckpointError(f"cannot resume from {resume}: {checkpoint_dir(resume)} holds no checkpoint")
        return found
    if resume != "auto":
        if not Path(resume).is_dir():
            raise CheckpointError(f"cannot resume from {resume}: no such folder (give a checkpoint folder, "
                                  "a run's out_dir, or auto)")
        problems = checkpoint_problems(Path(resume))
        if problems == ["meta.json is missing"]:
            problems = ["it is neither a checkpoint (no meta.json) nor a run's out_dir (no checkpoints/)"]
        if problems:
            raise CheckpointError(f"cannot resume from {resume}: {'; '.join(problems)}")
        return Path(resume)
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    found = list_checkpoints(out_dir)
    for path in reversed(found):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        warn(f"skipping damaged checkpoint {path}: {'; '.join(problems)}")
    if found:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(out_dir)} (each of the {len(found)} is "
                              "damaged, see the warnings); remove the folder to start over")
    return None


def _plain(model):
    """The model under a DDP wrapper (FSDP2 shards in place: its module is the model)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _unique(state: dict, model) -> dict:
    """Drop the second names of shared parameters (Qwen3 ties lm_head to embed_tokens); loading the
    first re-ties them. Told by parameter identity: gathered FSDP2 tensors no longer share memory."""
    seen, second = set(), set()
    for name, p in _plain(model).named_parameters(remove_duplicate=False):
        if id(p) in seen:
            second.add(name)
        seen.add(id(p))
    return {name: tensor for name, tensor in state.items() if name not in second}


def _options(full: bool = True) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=True, ignore_frozen_params=True)


def _param_names(model) -> dict[torch.Tensor, str]:
    """Each parameter's name as torch's state-dict helpers give it (a DDP wrapper's `module.` dropped)."""
    return {p: name for name, p in _plain(model).named_parameters()}


def _optimizer_state(model, optimizer) -> dict:
    """The optimizer's full state, keyed by parameter name; a parameter with no state has none saved.

    torch's getter first gives an optimizer that has no state at all (every step so far skipped) a
    zero-gradient step, so every parameter gets AdamW state with step 1: that would shift the bias
    correction of the live run's later updates. That state is taken out again, from the live optimizer
    and from what is saved.
    """
    had_state = set(optimizer.state)
    state = get_optimizer_state_dict(model, optimizer, options=_options())
    for p, name in _param_names(model).items():
        if p in optimizer.state and p not in had_state:
            del optimizer.state[p]
            state.get("state", {}).pop(name, None)
    return state


def _restore_optimizer(model, optimizer, saved: dict, path: Path) -> None:
    """Load `saved` into `optimizer`: the same parameters in the same groups, or an error naming them."""
    names = _param_names(model)
    current = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
    stored = [list(group["params"]) for group in saved["param_groups"]]
    if stored != current:
        have, want = {n for g in stored for n in g}, {n for g in current for n in g}
        raise CheckpointError(
            f"{path / 'optimizer.pt'} does not match this run's optimizer (not in the checkpoint: "
            f"{sorted(want - have)[:10]}, not trained in this run: {sorted(have - want)[:10]}"
            f"{'' if have != want else ', or the parameter groups differ'}); was it made with another config?"
        )
    stateless = {n for group in stored for n in group} - set(saved["state"])
    # strict=False lets only the parameters without saved state through (the check above rules out any
    # other difference). torch gives them a zero-gradient step's state; removing it restores them as
    # they were saved: without state, so their first update is AdamW's first step, as in the run that
    # wrote the checkpoint.
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True, strict=False))
    for p, name in names.items():
        if name in stateless:
            optimizer.state.pop(p, None)


def _write_folder(final: Path, writers: dict[str, Callable[[Path], None]], meta: dict) -> None:
    """Write a checkpoint folder under a temporary name, record every file's size and sha256 in
    meta.json (written last), flush it all to the disk, then rename it to `final`.

    Any failure removes the temporary folder and re-raises; a folder left by a killed write is
    removed by the next one.
    """
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{_TMP}{final.name}"
    try:
        tmp.mkdir()
        files = {}
        for name, write in writers.items():
            write(tmp / name)
            files[name] = _digest(tmp / name, fsync=True)
        (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=2, default=str))
        _digest(tmp / "meta.json", fsync=True)
        if final.exists():  # the same step again, after resuming from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(rt: Runtime, out_dir: Path, step: int, model, optimizer, scheduler, *,
                    data_state: dict, config: dict, keep_last: int) -> Path:
    """Write step `step` atomically; returns its folder.

    Every rank takes part in gathering; rank 0 writes, then every rank learns whether the write
    worked. A failed write (a full disk, ...) raises CheckpointError on every rank and leaves the
    checkpoints already there as they were; only after a successful one are the oldest pruned.
    """
    weights = _unique(get_model_state_dict(model, options=_options()), model)
    optim_state = _optimizer_state(model, optimizer)
    final = checkpoint_dir(out_dir) / f"step-{step:07d}"
    error = None
    if rt.is_main:
        writers = {
            "trainable.safetensors": lambda f: save_file({k: v.contiguous() for k, v in weights.items()}, str(f)),
            "optimizer.pt": lambda f: torch.save(optim_state, f),
            "scheduler.pt": lambda f: torch.save(scheduler.state_dict(), f),
            "rng.pt": lambda f: torch.save(rng_state(), f),
        }
        meta = {"step": step, "data": data_state, "config": config, "world_size": rt.world_size}
        try:
            _write_folder(final, writers, meta)
        except OSError as err:
            error = err
    if rt.any(error is not None):
        if error is None:
            raise CheckpointError(f"rank 0 could not write the checkpoint {final} (its error says why)")
        kept = [p.name for p in list_checkpoints(out_dir)]
        raise CheckpointError(
            f"could not write the checkpoint {final}: {error}. The run stops; the checkpoints already in "
            f"{final.parent} are untouched ({', '.join(kept) or 'none yet'}). Fix the cause (free disk "
            "space?), then continue with --resume auto."
        ) from error
    if rt.is_main:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns meta.json's content."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        sched_state = torch.load(path / "scheduler.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    expected = set(_unique(get_model_state_dict(model, options=_options(full=False)), model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(
            f"checkpoint {path} does not match this run's trainable parameters "
            f"(missing: {missing[:10]}, unexpected: {extra[:10]}); was it made with another config?"
        )
    # strict=False because the file holds only the trained parameters; the key check above is exact.
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False,
                                                                  broadcast_from_rank0=False))
    _restore_optimizer(model, optimizer, optim_state, path)
    scheduler.load_state_dict(sched_state)
    set_rng_state(rng)
    return meta
