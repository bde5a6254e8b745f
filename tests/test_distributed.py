"""Every trainable mode resumes exactly and runs distributed (gloo, 2 CPU processes); FSDP2; resuming
on another number of processes; two "nodes" on one host; SIGTERM under torchrun.

One process with batch 2 is the reference. Resuming (in this process, from the reference's next-to-last
checkpoint in a fresh folder, as `--resume auto` after a SIGKILL finds it) must give its losses and
final state bit for bit. Two processes with batch 1 each run every mode in one torchrun launch
(tests/train_many.py) and must give its losses within float32 reduction-order noise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import _mixed_llava, losses

from crossvlm.configs import config_path
from crossvlm.errors import CheckpointError
from crossvlm.train.checkpoint import checkpoint_problems
from crossvlm.train.config import LLM_MODES, load_config

pytestmark = pytest.mark.slow

STEPS = 3
# (llm, vision, projector): every combination a config allows (something must train).
COMBOS = [(llm, vision, projector) for llm in LLM_MODES for vision in (False, True) for projector in (True, False)
          if projector or vision or llm != "frozen"]
FSDP_COMBOS = [("full", False, True), ("lora", True, True), ("last_n", True, False)]
TOLERANCE = 1e-4  # two processes sum gradients and losses in another order than one: float32 rounding only


def combo_id(combo) -> str:
    llm, vision, projector = combo
    return f"llm={llm}-vision={'on' if vision else 'off'}-projector={'on' if projector else 'off'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from crossvlm.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("distributed")
    shapes = write_synthetic(root / "shapes", seed=0, n_train=8, n_test=2)
    return {"models": tiny_models, "data": _mixed_llava(root, shapes["sft_train"]), "root": root}


def overrides(setup, combo, out: Path, batch_size: int, **extra) -> dict:
    """A tiny run of `combo`. No LoRA dropout: its masks for one batch of 2 and two batches of 1 differ."""
    llm, vision, projector = combo
    return {"model.llm": str(setup["models"] / "llm"), "model.vision": str(setup["models"] / "vision"),
            "data.sources": [str(setup["data"])], "data.shuffle": False, "run.out_dir": str(out),
            "run.max_steps": STEPS, "run.save_interval": 1, "run.keep_last": STEPS, "run.batch_size": batch_size,
            "trainable.llm": llm, "trainable.vision": vision, "trainable.projector": projector,
            "trainable.llm_last_n": 1, "trainable.lora_dropout": 0.0, **extra}


@pytest.fixture(scope="module")
def reference(setup):
    """One process, batch 2, STEPS steps, a checkpoint after each: run once per combination, on demand."""
    from crossvlm.train.loop import train

    done = {}

    def get(combo) -> Path:
        if combo not in done:
            out = setup["root"] / "one" / combo_id(combo)
            train(load_config(config_path("debug.yaml"), overrides(setup, combo, out, batch_size=2)))
            done[combo] = out
        return done[combo]

    return get


@pytest.fixture(scope="module")
def two_processes(setup):
    """Every combination under DDP, then FSDP2's, in one torchrun launch (started at once, waited for on use)."""
    root = setup["root"]
    runs = [{"name": f"{kind}/{combo_id(c)}", "overrides": overrides(
        setup, c, root / kind / combo_id(c), batch_size=1, **{"run.distributed": kind})}
        for kind, combos in (("ddp", COMBOS), ("fsdp", FSDP_COMBOS)) for c in combos]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"config": str(config_path("debug.yaml")), "runs": runs,
                                "results": str(root / "results.json")}))
    launch = torchrun("--master_port", str(free_port()), str(Path(__file__).parent / "train_many.py"), str(spec))
    result = {}

    def status(name: str) -> str:
        """"ok", or why the run `name` (its folder: setup["root"] / name) failed."""
        if not result:
            result["output"] = launch.communicate(timeout=900)[0]
            result["runs"] = json.loads((root / "results.json").read_text())
        return result["runs"].get(name, "not run (an earlier run failed)")

    yield status
    if launch.poll() is None:
        launch.kill()


def assert_close_losses(got: Path, ref: Path, steps) -> None:
    a, b = losses(got), losses(ref)
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=TOLERANCE), f"step {step}: {a[step]} vs {b[step]}"


def cli_args(overrides: dict) -> list[str]:
    """`crossvlm train` options for config overrides."""
    return [f"--{key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in overrides.items()]


def resume_copy(src: Path, step: int, out: Path) -> Path:
    """A fresh run folder holding only checkpoint `step` of `src`: what `--resume auto` finds after a
    SIGKILL that came after it."""
    name = f"step-{step:07d}"
    shutil.copytree(src / "checkpoints" / name, out / "checkpoints" / name)
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_resume_gives_the_uninterrupted_run(setup, reference, two_processes, combo):
    from crossvlm.train.loop import train

    ref = reference(combo)
    out = resume_copy(ref, STEPS - 1, setup["root"] / "resumed" / combo_id(combo))
    train(load_config(config_path("debug.yaml"), overrides(setup, combo, out, batch_size=2, **{"run.resume": "auto"})))
    assert losses(out) == {STEPS: losses(ref)[STEPS]}
    last = f"checkpoints/step-{STEPS:07d}"
    a, b = load_file(out / last / "trainable.safetensors"), load_file(ref / last / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = (torch.load(d / last / "optimizer.pt", weights_only=True) for d in (out, ref))
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for name, state in opt_a["state"].items():
        assert all(torch.equal(state[k], opt_b["state"][name][k]) for k in state), name


def skip_without_fsdp2(two_processes) -> None:
    """Skip when FSDP2 itself cannot train a toy model on CPU processes with gloo (measured in the launch)."""
    probe = two_processes("fsdp2 probe")
    if probe != "ok":
        pytest.skip(f"FSDP2 does not train on CPU processes with gloo in torch {torch.__version__}: "
                    f"{probe.splitlines()[0]}")


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_two_processes_give_one_process_losses(setup, reference, two_processes, combo):
    name = f"ddp/{combo_id(combo)}"
    assert two_processes(name) == "ok"
    assert_close_losses(setup["root"] / name, reference(combo), range(1, STEPS + 1))


@pytest.mark.parametrize("combo", FSDP_COMBOS, ids=combo_id)
def test_fsdp2_on_gloo_gives_one_process_losses(setup, reference, two_processes, combo):
    skip_without_fsdp2(two_processes)
    name = f"fsdp/{combo_id(combo)}"
    assert two_processes(name) == "ok"
    assert_close_losses(setup["root"] / name, reference(combo), range(1, STEPS + 1))


@pytest.mark.parametrize("kind, one_process", [("ddp", {"run.batch_size": 1, "optim.accumulation_steps": 2}),
                                               ("fsdp", {"run.batch_size": 2})], ids=["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_in_one(setup, reference, two_processes, kind, one_process):
    """World size 2 → 1 (with batch 1 and two micro-batches per step, or batch 2): the data position
    (samples seen) and the optimizer state carry over."""
    from crossvlm.train.loop import train

    combo = FSDP_COMBOS[0]
    if kind == "fsdp":
        skip_without_fsdp2(two_processes)
    written = setup["root"] / kind / combo_id(combo)
    assert two_processes(f"{kind}/{combo_id(combo)}") == "ok"
    meta = json.loads((written / "checkpoints" / "step-0000001" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["data"]["samples_in_epoch"] == 2
    out = resume_copy(written, 1, setup["root"] / f"{kind}-to-one")
    if kind == "ddp":  # 1 sample a step instead of 2: refused, with the setting that fits
        with pytest.raises(CheckpointError, match=r"2 samples per optimizer step .* 1 × 2 × 1.*--run.batch_size 2"):
            train(load_config(config_path("debug.yaml"), overrides(setup, combo, out, batch_size=1,
                                                                    **{"run.resume": "auto"})))
    resume = overrides(setup, combo, out, batch_size=2, **{"run.resume": "auto"})
    train(load_config(config_path("debug.yaml"), {**resume, **one_process}))
    assert_close_losses(out, reference(combo), range(2, STEPS + 1))
    state = torch.load(out / f"checkpoints/step-{STEPS:07d}/optimizer.pt", weights_only=True)["state"]
    ref_state = torch.load(reference(combo) / f"checkpoints/step-{STEPS:07d}/optimizer.pt", weights_only=True)["state"]
    assert state.keys() == ref_state.keys()
    for name in state:
        assert int(state[name]["step"]) == STEPS
        torch.testing.assert_close(state[name]["exp_avg"], ref_state[name]["exp_avg"], rtol=1e-3, atol=1e-6)


def test_two_nodes_resume_a_one_process_checkpoint_train_and_checkpoint(setup, reference):
    """Two launchers, one process each, meeting at a c10d rendezvous on this host (the multi-node
    command of the README): world size 1 → 2, then training and checkpointing as one run."""
    combo = ("full", True, True)
    out = resume_copy(reference(combo), 1, setup["root"] / "two-nodes")
    args = cli_args(overrides(setup, combo, out, batch_size=1, **{"run.resume": "auto"}))
    rendezvous = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                  "--rdzv-id", "faults"]
    nodes = [torchrun(*rendezvous, "-m", "crossvlm.cli", "train", str(config_path("debug.yaml")), *args, nproc=1)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert any("resumed from" in o and "on 2 process(es)" in o for o in outputs), "\n".join(outputs)
    assert_close_losses(out, reference(combo), range(2, STEPS + 1))
    for step in range(2, STEPS + 1):
        path = out / "checkpoints" / f"step-{step:07d}"
        assert not checkpoint_problems(path) and json.loads((path / "meta.json").read_text())["world_size"] == 2


def _worker_pid(launcher: subprocess.Popen, local_rank: int) -> int:
    """The pid of torchrun's worker process of `local_rank` (Linux: /proc)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"LOCAL_RANK={local_rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of local rank {local_rank} under torchrun")


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(setup, tmp_path):
    """With a fused AdamW, as on GPUs: each rank reads the stop a step late, all at the same step."""
    out = tmp_path / "run"
    args = cli_args(overrides(setup, ("full", False, True), out, batch_size=1,
                              **{"run.max_steps": 30, "run.save_interval": 0, "optim.fused": True}))
    launch = torchrun("--master_port", str(free_port()), "-m", "crossvlm.cli", "train", str(config_path("debug.yaml")),
                      *args)
    rank1 = _worker_pid(launch, 1)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and launch.poll() is None, launch.stdout.read()
        time.sleep(0.02)
    os.kill(rank1, signal.SIGTERM)  # rank 0 gets no signal: it must learn of it and stop with rank 1
    output = launch.communicate(timeout=300)[0]
    assert launch.returncode == 0, output
    stopped_at = max(losses(out))
    assert stopped_at < 30 and f"stopped by SIGTERM after step {stopped_at} of 30" in output, output
    assert "resume with: torchrun --nnodes 1 --nproc_per_node 2 -m crossvlm.cli train" in output
    assert not checkpoint_problems(out / "checkpoints" / f"step-{stopped_at:07d}")
    assert not (out / "final").exists()
