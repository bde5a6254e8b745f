"""Faults a long run meets: parameters without optimizer state, damaged checkpoints, a full disk, SIGTERM."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import _run_cli, debug_overrides, losses

from crossvlm.configs import config_path
from crossvlm.errors import CheckpointError
from crossvlm.train import checkpoint
from crossvlm.train.config import ModelSection, OptimSection, TrainableSection, load_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    from crossvlm.data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("shapes"), seed=0, n_train=48, n_test=4)


# -- optimizer state of parameters that had no gradient yet ------------------------------------------
def _model_and_optimizer(tiny_models: Path, llm: str = "full"):
    from crossvlm.train.optim import build_optimizer, build_scheduler
    from crossvlm.train.setup import apply_trainable, build_model

    torch.manual_seed(0)
    model, _ = build_model(ModelSection(llm=str(tiny_models / "llm"), vision=str(tiny_models / "vision"),
                                        num_queries=16, projector_heads=4))
    apply_trainable(model, TrainableSection(llm=llm))
    optimizer = build_optimizer(model, OptimSection(lr=1e-2), torch.device("cpu"))
    return model, optimizer, build_scheduler(optimizer, OptimSection(lr=1e-2), 10)


def _save(out: Path, step: int, model, optimizer, scheduler) -> Path:
    from crossvlm.train.runtime import Runtime

    return checkpoint.save_checkpoint(Runtime(torch.device("cpu")), out, step, model, optimizer, scheduler,
                                      data_state={}, config={}, keep_last=5)


def _step(model, optimizer, only: str | None = None, seed: int = 1) -> None:
    """One AdamW step with fixed random gradients, on every trained parameter or only those under `only`."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and (only is None or name.startswith(only)):
            p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_parameters_without_optimizer_state_are_saved_and_restored_without_it(tiny_models, tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(tiny_models)
    names = {p: n for n, p in model.named_parameters()}
    # Saving before any update (every step so far skipped) must not give the optimizer state.
    _save(tmp_path, 1, model, optimizer, scheduler)
    assert not optimizer.state
    fresh_model, fresh_opt, fresh_sched = _model_and_optimizer(tiny_models)
    checkpoint.load_checkpoint(tmp_path / "checkpoints" / "step-0000001", fresh_model, fresh_opt, fresh_sched)
    assert not fresh_opt.state

    _step(model, optimizer, only="projector.")  # the LLM got no gradient in this step
    with_state = {names[p] for p in optimizer.state}
    assert with_state and all(n.startswith("projector.") for n in with_state)
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    assert {names[p] for p in optimizer.state} == with_state  # saving changed nothing

    fresh_model, fresh_opt, fresh_sched = _model_and_optimizer(tiny_models)
    checkpoint.load_checkpoint(path, fresh_model, fresh_opt, fresh_sched)
    fresh_names = {p: n for n, p in fresh_model.named_parameters()}
    assert {fresh_names[p] for p in fresh_opt.state} == with_state
    # One more step with gradients everywhere: the LLM's first AdamW step in both, bit for bit.
    _step(model, optimizer, seed=2)
    _step(fresh_model, fresh_opt, seed=2)
    for (name, a), b in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(a, b), name
    for p, state in optimizer.state.items():
        other = fresh_opt.state[dict(fresh_model.named_parameters())[names[p]]]
        assert all(torch.equal(state[k], other[k]) for k in state), names[p]


def test_a_checkpoint_of_another_trainable_set_is_refused_naming_the_keys(tiny_models, tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(tiny_models)
    _step(model, optimizer)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    lora = _model_and_optimizer(tiny_models, llm="lora")
    with pytest.raises(CheckpointError, match=r"missing: \[.*lora_A.*unexpected: \[.*mlp.down_proj.weight"):
        checkpoint.load_checkpoint(path, *lora)
    # The weights match, but optimizer.pt lists a parameter group without one of them.
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    dropped = saved["param_groups"][0]["params"].pop()
    torch.save(saved, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match=rf"not in the checkpoint: \['{dropped}'\]"):
        checkpoint.load_checkpoint(path, *_model_and_optimizer(tiny_models))


# -- the data position, whatever the number of processes ------------------------------------------------
def test_data_position_carries_over_to_another_number_of_processes(tiny_models, shapes):
    from transformers import AutoImageProcessor, AutoTokenizer

    from crossvlm.data.config import DataConfig
    from crossvlm.data.loader import build_dataset, build_loader
    from crossvlm.errors import DataError

    cfg = DataConfig.from_dict({"sources": [str(shapes["sft_train"])]})
    ds = build_dataset(cfg, AutoTokenizer.from_pretrained(tiny_models / "llm"),
                       AutoImageProcessor.from_pretrained(tiny_models / "vision"), 16)

    def loaders(world: int, batch: int, **kw):
        return [build_loader(ds, cfg, batch, seed=3, rank=r, world_size=world, **kw) for r in range(world)]

    def next_samples(ranks, n: int) -> list[int]:
        """The next n samples all processes take together, step by step (rank 0's, then rank 1's...)."""
        steps = zip(*(iter(loader.sampler()) for loader in ranks))  # endless: take what is needed
        return list(itertools.islice((i for step in steps for batch in step for i in batch), n))

    two = loaders(2, 2, start_step=13)  # 48 samples an epoch, 4 a step: epoch 1, 4 samples into it
    state = two[0].state_dict()
    assert (state["epoch"], state["samples_in_epoch"]) == (1, 4)
    one = loaders(1, 1)
    one[0].load_state_dict(state)
    assert one[0].step == 48 + 4 and next_samples(one, 8) == next_samples(two, 8)
    back = loaders(2, 2)
    for loader in back:
        loader.load_state_dict(build_loader(ds, cfg, 1, seed=3, start_step=52).state_dict())
    assert next_samples(back, 8) == next_samples(two, 8)
    with pytest.raises(DataError, match="4 samples into epoch 1, not a whole number of this run's batches of 3"):
        loaders(1, 3)[0].load_state_dict(state)


# -- damaged checkpoints ---------------------------------------------------------------------------
def test_resume_auto_skips_damaged_checkpoints_and_names_what_is_wrong(tiny_models, tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(tiny_models)
    paths = []
    for step in (1, 2, 3, 4):
        _step(model, optimizer, seed=step)
        paths.append(_save(tmp_path, step, model, optimizer, scheduler))
    warned = []
    assert checkpoint.find_resume(tmp_path, "auto", warn=warned.append) == paths[3] and not warned

    with open(paths[3] / "optimizer.pt", "r+b") as fh:  # cut short, as by a full disk or a broken copy
        fh.truncate(100)
    (paths[2] / "rng.pt").unlink()
    data = bytearray((paths[1] / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    (paths[1] / "trainable.safetensors").write_bytes(bytes(data))
    assert checkpoint.find_resume(tmp_path, "auto", warn=warned.append) == paths[0]
    assert len(warned) == 3
    assert "step-0000004" in warned[0] and "optimizer.pt has 100 bytes" in warned[0]
    assert "step-0000003" in warned[1] and "rng.pt is missing" in warned[1]
    assert "step-0000002" in warned[2] and "trainable.safetensors does not match the sha256" in warned[2]

    (paths[0] / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpoint.find_resume(tmp_path, "auto", warn=warned.append)
    assert "meta.json is missing" in warned[-1]
    with pytest.raises(CheckpointError, match="rng.pt is missing"):  # an explicit path is checked too
        checkpoint.find_resume(tmp_path, str(paths[2]))


@pytest.mark.slow
def test_damaged_latest_checkpoint_and_full_disk_in_a_run(tiny_models, shapes, tmp_path, monkeypatch, capsys):
    """The loop: a truncated latest checkpoint makes `resume: auto` go back one and continue exactly; a
    write that fails for want of space stops the run with an error, the previous checkpoint intact."""
    from crossvlm.train.loop import train

    def run(out: Path, **extra):
        return train(load_config(config_path("debug.yaml"), debug_overrides(
            tiny_models, shapes["sft_train"], out, **{"run.max_steps": 4, "run.save_interval": 1,
                                                      "run.keep_last": 4, "run.batch_size": 2, **extra})))

    run(tmp_path / "whole")
    ref = losses(tmp_path / "whole")
    with open(tmp_path / "whole" / "checkpoints" / "step-0000004" / "trainable.safetensors", "r+b") as fh:
        fh.truncate(10)
    run(tmp_path / "whole", **{"run.resume": "auto"})
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "step-0000004" in err and "trainable.safetensors has 10" in err
    assert losses(tmp_path / "whole")[4] == ref[4]  # logged again, by the run resumed from step 3
    assert not checkpoint.checkpoint_problems(tmp_path / "whole" / "checkpoints" / "step-0000004")

    real_save = torch.save

    def disk_full_at_step_2(obj, path, *args, **kwargs):
        if "step-0000002" in str(path) and str(path).endswith("optimizer.pt"):
            with open(path, "wb") as fh:
                fh.write(b"\0" * 64)  # part of the file got out before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_step_2)
    with pytest.raises(CheckpointError) as err:
        run(tmp_path / "full")
    message = str(err.value)
    assert "No space left on device" in message and "(step-0000001)" in message and "--resume auto" in message
    root = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001"]  # no temporary folder left behind
    assert not checkpoint.checkpoint_problems(root / "step-0000001")
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    run(tmp_path / "full", **{"run.resume": "auto"})
    got = losses(tmp_path / "full")
    assert [got[s] for s in range(2, 5)] == [ref[s] for s in range(2, 5)]


# -- preemption --------------------------------------------------------------------------------------
def test_resume_command_is_the_starting_command_with_resume_auto():
    from crossvlm.train.loop import resume_command

    argv = ["/x/bin/crossvlm", "train", "my config.yaml", "--resume", "runs/a/checkpoints/step-1",
            "--run.max_steps", "9"]
    assert resume_command(argv, {}) == "crossvlm train 'my config.yaml' --run.max_steps 9 --resume auto"
    argv = ["/x/crossvlm/cli.py", "train", "c.yaml", "--run.resume=auto"]
    torchrun = {"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert resume_command(argv, torchrun) == (
        "torchrun --nnodes 2 --nproc_per_node 2 -m crossvlm.cli train c.yaml --resume auto "
        "(on every node, with the --rdzv-* options used before)")
    assert resume_command(argv, {}) == "python -m crossvlm.cli train c.yaml --resume auto"


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_exits_0_and_the_printed_command_resumes_exactly(tiny_models, shapes, tmp_path):
    """A real SIGTERM to the run's whole process group (as SLURM sends it: the loader's worker too).
    With a fused AdamW, as on GPUs: the host has launched the next step when it reads the stop, so
    the run stops after that one."""
    args = ["train", str(config_path("debug.yaml")), "--model.llm", str(tiny_models / "llm"),
            "--model.vision", str(tiny_models / "vision"), "--data.sources", f"[{shapes['sft_train']}]",
            "--run.max_steps", "8", "--run.batch_size", "2", "--data.num_workers", "1", "--optim.fused", "true"]
    whole = _run_cli(args + ["--run.out_dir", str(tmp_path / "whole")])
    victim = _run_cli(args + ["--run.out_dir", str(tmp_path / "stopped")], start_new_session=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and victim.poll() is None, victim.stdout.read()
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGTERM)
    out = victim.communicate(timeout=120)[0]
    assert victim.returncode == 0, out
    assert whole.wait(timeout=120) == 0, whole.stdout.read()
    stopped_at = max(losses(tmp_path / "stopped"))
    assert 2 <= stopped_at < 8 and f"stopped by SIGTERM after step {stopped_at} of 8" in out, out
    ckpt = tmp_path / "stopped" / "checkpoints" / f"step-{stopped_at:07d}"
    assert str(ckpt) in out and not checkpoint.checkpoint_problems(ckpt)
    assert not (tmp_path / "stopped" / "final").exists()
    command = out.split("resume with: ")[1].splitlines()[0]
    assert command.startswith("python -m crossvlm.cli train ") and command.endswith("--resume auto")
    resumed = _run_cli(shlex.split(command)[3:])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and f"resumed from {ckpt} at step {stopped_at}" in out, out
    ref, got = losses(tmp_path / "whole"), losses(tmp_path / "stopped")
    for step in range(stopped_at + 1, 9):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
