"""Checkpoints that resume a run exactly, written atomically, loaded without arbitrary unpickling.

A checkpoint is a folder `out_dir/checkpoints/step-NNNNNNN/`:
  trainable.safetensors  the trained parameters (full tensors, gathered under FSDP)
  optimizer.pt           AdamW state, keyed by parameter name
  scheduler.pt           learning-rate schedule state
  rng.pt                 every random generator's state
  meta.json              step, data position, bad-record counts, the resolved config
The folder is written under a temporary name and renamed when complete, so a kill mid-write
leaves the previous checkpoint intact. `.pt` files are read with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "meta.json")


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_resume(out_dir: Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint in out_dir (None if there is none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    missing = [f for f in _FILES if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    return path


def _unique(state: dict) -> dict:
    """Drop second names of shared tensors (Qwen3 ties lm_head to embed_tokens); loading re-ties them."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape) if tensor.device.type != "meta" else (name,)
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def _options(full: bool = True) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=True, ignore_frozen_params=True)


def save_checkpoint(rt: Runtime, out_dir: Path, step: int, model, optimizer, scheduler, *,
                    data_state: dict, config: dict, keep_last: int) -> Path | None:
    """Write step `step` atomically (rank 0 writes; every rank takes part in gathering)."""
    weights = _unique(get_model_state_dict(model, options=_options()))
    optim_state = get_optimizer_state_dict(model, optimizer, options=_options())
    if not rt.is_main:
        rt.barrier()
        return None
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    meta = {"step": step, "data": data_state, "config": config, "world_size": rt.world_size}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    for f in tmp.iterdir():  # make the files durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
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
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    expected = set(_unique(get_model_state_dict(model, options=_options(full=False))))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(
            f"checkpoint {path} does not match this run's trainable parameters "
            f"(missing: {missing[:10]}, unexpected: {extra[:10]}); was it made with another config?"
        )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False,
                                                                  broadcast_from_rank0=False))
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(sched_state)
    set_rng_state(rng)
    return meta
