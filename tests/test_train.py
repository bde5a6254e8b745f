"""The training loop: configs, what trains, optimisation, checkpoints, exact resume, DDP, the guard."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossvlm.configs import config_path, shipped_configs
from crossvlm.errors import ConfigError, TrainingError
from crossvlm.train.config import load_config, parse_overrides
from crossvlm.train.loggers import read_metrics

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    from crossvlm.data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("shapes"), seed=0, n_train=96, n_test=8)


def debug_overrides(tiny_models: Path, data: Path, out: Path, **extra) -> dict:
    return {"model.llm": str(tiny_models / "llm"), "model.vision": str(tiny_models / "vision"),
            "data.sources": [str(data)], "run.out_dir": str(out), **extra}


def losses(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out_dir / "metrics.jsonl") if "loss" in m}


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "crossvlm.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


# -- configs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_parses(path, tmp_path):
    data = tmp_path / "d.parquet"
    data.write_bytes(b"")
    cfg = load_config(path, {"data.sources": [str(data)], "eval_data.sources": [str(data)]})
    assert cfg.run.batch_size >= 1 and cfg.data.sources[0].path == str(data)


def test_config_problems_are_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainable: {llm: sideways}\noptim: {lr: -1, accumulation_steps: 0}\nrun: {dtype: fp8, colour: red}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    for part in ("trainable.llm 'sideways'", "optim.lr", "accumulation_steps", "run.dtype 'fp8'",
                 "run.colour is not a known key", "no training data"):
        assert part in msg


def test_one_data_source_on_the_command_line(tmp_path):
    data = tmp_path / "x.parquet"
    data.write_bytes(b"")
    for flag in ("--data.sources", "--eval_data.sources"):
        cfg = load_config(config_path("sft.yaml"), parse_overrides(["--data.sources", str(data), flag, str(data)]))
        section = cfg.eval_data if flag.startswith("--eval") else cfg.data
        assert [src.path for src in section.sources] == [str(data)]  # one path, not one source per character
    from crossvlm.data.config import DataConfig

    for given in (data, [data], {"path": str(data)}):  # a Path, in a list or alone, or one mapping
        assert [src.path for src in DataConfig.from_dict({"sources": given}).sources] == [str(data)]


def test_cpu_training_leaves_the_loader_workers_their_cores(monkeypatch):
    from crossvlm.train.loop import _cpu_threads
    from crossvlm.train.runtime import Runtime

    from crossvlm.data.config import DataConfig
    from crossvlm.train.config import TrainConfig

    cfg = TrainConfig(data=DataConfig(num_workers=1))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    before = torch.get_num_threads()
    with _cpu_threads(cfg, Runtime(torch.device("cpu"))):
        assert torch.get_num_threads() == 5
    with _cpu_threads(cfg, Runtime(torch.device("cpu"), world_size=2)):  # two processes on one machine
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun: 3 of the processes on this machine
    with _cpu_threads(cfg, Runtime(torch.device("cpu"), world_size=6)):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's setting wins
    with _cpu_threads(cfg, Runtime(torch.device("cpu"))):
        assert torch.get_num_threads() == before


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match="--bogus"):
        parse_overrides(["--bogus", "1"])


# -- what trains, optimisation -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["frozen", "full", "last_n", "lora"])
def test_trainable_parts(tiny_models, mode):
    from crossvlm.train.config import ModelSection, OptimSection, TrainableSection
    from crossvlm.train.optim import build_optimizer
    from crossvlm.train.setup import apply_trainable, build_model, set_train_mode

    model, _ = build_model(ModelSection(llm=str(tiny_models / "llm"), vision=str(tiny_models / "vision"),
                                        num_queries=16, projector_heads=4))
    apply_trainable(model, TrainableSection(llm=mode, llm_last_n=1))
    set_train_mode(model)
    opt = build_optimizer(model, OptimSection(lr=1e-3, projector_lr=1e-2), torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained and {id(named[n]) for n in trained} == in_opt
    assert all(n.startswith(("projector.", "llm.")) for n in trained)
    assert not model.vision.training and not any(p.requires_grad for p in model.vision.parameters())
    llm_trained = {n for n in trained if n.startswith("llm.")}
    if mode == "frozen":
        assert not llm_trained and not model.llm.training
    elif mode == "full":
        assert len(llm_trained) == sum(1 for n in named if n.startswith("llm."))
    elif mode == "last_n":
        assert llm_trained and all(".layers.1." in n or ".norm." in n for n in llm_trained)
    else:
        assert llm_trained and all("lora_" in n for n in llm_trained)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["projector"] == 1e-2 and all(v == 1e-3 for k, v in lrs.items() if not k.startswith("projector"))


def test_no_weight_decay_on_norms_biases_embeddings(tiny_models):
    from crossvlm.train.config import ModelSection, OptimSection, TrainableSection
    from crossvlm.train.optim import param_groups
    from crossvlm.train.setup import apply_trainable, build_model

    model, _ = build_model(ModelSection(llm=str(tiny_models / "llm"), vision=str(tiny_models / "vision"),
                                        num_queries=16, projector_heads=4))
    apply_trainable(model, TrainableSection(llm="full"))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in param_groups(model, OptimSection(weight_decay=0.1)):
        for p in group["params"]:
            name = names[id(p)]
            exempt = p.ndim < 2 or "embed" in name or "norm" in name or "queries" in name
            assert (group["weight_decay"] == 0.0) == exempt, name


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from crossvlm.train.optim import lr_multiplier

    values = [lr_multiplier(s, 100, 10, 0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[100] == pytest.approx(0.1)


# -- runs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["host-waits", "outcome-read-a-step-late"])
def test_debug_run_matches_reference_losses(tiny_models, shapes, tmp_path, fused):
    """Regression guard: a change to the model, data path or loop that moves the loss fails here.
    With a fused AdamW (the GPU default) the host reads each step's outcome a step late and the
    learning-rate schedule must still meet every step at its own value.

    Regenerate (after checking the change is intended) with `python tests/assets/make_reference.py`.
    """
    from crossvlm.train.loop import train

    ref = json.loads((ASSETS / "debug_losses.json").read_text())
    cfg = load_config(config_path("debug.yaml"), debug_overrides(tiny_models, shapes["sft_train"], tmp_path,
                                                                 **{"optim.fused": fused}))
    train(cfg)
    got = losses(tmp_path)
    assert sorted(got) == sorted(int(k) for k in ref["losses"])
    for step, value in ref["losses"].items():
        assert got[int(step)] == pytest.approx(value, rel=2e-3, abs=2e-3), f"step {step}"
    assert got[12] < got[1] - 0.5  # and it does learn


def test_compiled_run_matches_eager_losses(tiny_models, shapes, tmp_path):
    """run.compile (decoder layers, projector, vision layers through torch.compile) changes speed only."""
    from crossvlm.train.loop import train

    ref = json.loads((ASSETS / "debug_losses.json").read_text())["losses"]
    overrides = debug_overrides(tiny_models, shapes["sft_train"], tmp_path, **{"run.max_steps": 3, "run.compile": True})
    train(load_config(config_path("debug.yaml"), overrides))
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3]  # losses 1-3 follow the two warm-up updates, as in the 12-step reference
    for step in got:
        assert got[step] == pytest.approx(ref[str(step)], rel=2e-3, abs=2e-3), f"step {step}"


def test_final_model_loads_for_chat_and_as_the_next_stage(tiny_models, shapes, tmp_path):
    from crossvlm.inference import ChatModel, SamplingParams
    from crossvlm.train.loop import train

    pre = train(load_config(config_path("debug.yaml"), debug_overrides(
        tiny_models, shapes["pretrain_train"], tmp_path / "pre", **{"trainable.llm": "frozen", "run.max_steps": 3})))
    assert (pre / "model.safetensors").exists() and (pre / "tokenizer.json").exists()
    sft = train(load_config(config_path("debug.yaml"), {
        "model.init_from": str(pre), "data.sources": [str(shapes["sft_train"])], "run.out_dir": str(tmp_path / "sft"),
        "run.max_steps": 3, "trainable.llm": "lora"}))
    chat = ChatModel.load(sft, device="cpu")
    assert isinstance(chat.chat([{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=4)).text, str)
    assert not any("lora" in k for k in chat.model.state_dict())  # adapters merged into the weights


@pytest.mark.parametrize("fused", [False, True], ids=["host-waits", "outcome-read-a-step-late"])
def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_models, shapes, tmp_path, monkeypatch, fused):
    from crossvlm.model.modeling import CrossVLM
    from crossvlm.train.loop import train

    real = CrossVLM.loss_from_hidden
    calls = {"n": 0}

    def sometimes_nan(self, *args):
        calls["n"] += 1
        loss = real(self, *args)
        return loss * float("nan") if calls["n"] in (2, 4, 5, 6) else loss

    monkeypatch.setattr(CrossVLM, "loss_from_hidden", sometimes_nan)
    cfg = load_config(config_path("debug.yaml"), debug_overrides(
        tiny_models, shapes["sft_train"], tmp_path, **{"run.max_nonfinite_in_row": 3, "optim.fused": fused}))
    with pytest.raises(TrainingError, match="3 steps in a row"):
        train(cfg)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics if m.get("skipped_nonfinite")] == [2, 4, 5, 6]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_a_nonfinite_step_read_a_step_late_leaves_weights_and_optimizer_untouched(tiny_models, shapes, tmp_path,
                                                                                  monkeypatch):
    """With a fused AdamW the skip is decided on the device (found_inf): nothing of the step lands."""
    from crossvlm.model.modeling import CrossVLM
    from crossvlm.train.loop import Trainer
    from crossvlm.train.runtime import init_runtime

    cfg = load_config(config_path("debug.yaml"), debug_overrides(tiny_models, shapes["sft_train"], tmp_path,
                                                                 **{"optim.fused": True}))
    trainer = Trainer(cfg, init_runtime("cpu"))
    assert trainer.defer
    batches = iter(trainer.loader)
    first = trainer.launch_step([next(batches)])
    assert first.deferred and not first.result()["skipped"]

    def snapshot():
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        state = {n: {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
                 for n, p in trainer.model.named_parameters() if p.requires_grad}
        return params, state

    before = snapshot()
    real = CrossVLM.loss_from_hidden
    monkeypatch.setattr(CrossVLM, "loss_from_hidden", lambda *a, **k: real(*a, **k) * float("inf"))
    result = trainer.train_step([next(batches)])
    assert result["skipped"] and result["why"] == "non-finite loss"
    after = snapshot()
    for name in before[0]:
        assert torch.equal(before[0][name], after[0][name]), name
        for key, value in before[1][name].items():  # exp_avg, exp_avg_sq and the step count
            assert torch.equal(value, after[1][name][key]), (name, key)
    monkeypatch.setattr(CrossVLM, "loss_from_hidden", real)
    assert not trainer.train_step([next(batches)])["skipped"]
    assert not torch.equal(after[0]["projector.queries"], trainer.model.projector.queries.detach())


def test_the_host_launches_a_step_before_reading_the_last_unless_it_must_see_the_model(tiny_models, shapes, tmp_path,
                                                                                      monkeypatch):
    """The loop's order with a fused AdamW: launch k+1, then read k, so the GPU never waits for the
    host's report; but a step that ends in an evaluation or a checkpoint, and the last, is read
    before the next one launches."""
    from crossvlm.train.loop import Trainer, train

    order = []
    launch, after = Trainer.launch_step, Trainer._after_step

    def launch_step(self, batches):
        order.append(f"L{self.launched + 1}")
        return launch(self, batches)

    def after_step(self, result, speed, bar):  # reads the step's outcome
        order.append(f"R{self.step + 1}")
        return after(self, result, speed, bar)

    monkeypatch.setattr(Trainer, "launch_step", launch_step)
    monkeypatch.setattr(Trainer, "_after_step", after_step)
    cfg = load_config(config_path("debug.yaml"), debug_overrides(tiny_models, shapes["sft_train"], tmp_path, **{
        "optim.fused": True, "run.max_steps": 7, "run.save_interval": 3}))
    train(cfg)
    assert order == ["L1", "L2", "R1", "L3", "R2", "R3", "L4", "L5", "R4", "L6", "R5", "R6", "L7", "R7"]


def test_checkpoint_write_is_atomic(tiny_models, shapes, tmp_path, monkeypatch):
    from crossvlm.train import checkpoint
    from crossvlm.train.loop import train

    cfg = load_config(config_path("debug.yaml"), debug_overrides(
        tiny_models, shapes["sft_train"], tmp_path, **{"run.max_steps": 4, "run.save_interval": 2}))
    real_save = torch.save

    def dies_at_step_4(obj, path, *a, **k):
        if "step-0000004" in str(path) and str(path).endswith("scheduler.pt"):
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    done = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in done] == ["step-0000002"]
    assert checkpoint.find_resume(tmp_path, "auto") == done[0]
    assert all((done[0] / f).exists() for f in checkpoint._FILES)


def test_killed_run_resumes_with_identical_losses(tiny_models, shapes, tmp_path):
    """A real SIGKILL mid-run, then `--resume auto`: every later loss equals the uninterrupted run's.
    With the vision tower trained too (every other mode: tests/test_distributed.py, in one process)."""
    args = ["train", str(config_path("debug.yaml")), "--trainable.vision", "true",
            "--model.llm", str(tiny_models / "llm"),
            "--model.vision", str(tiny_models / "vision"), "--data.sources", f"[{shapes['sft_train']}]",
            "--run.max_steps", "10", "--run.save_interval", "3", "--data.num_workers", "1"]
    whole = _run_cli(args + ["--run.out_dir", str(tmp_path / "whole")])
    victim = _run_cli(args + ["--run.out_dir", str(tmp_path / "killed")])
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step-0000003").exists():
        assert time.time() < deadline and victim.poll() is None, victim.stdout.read()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert whole.wait() == 0, whole.stdout.read()
    killed_at = max(losses(tmp_path / "killed"))
    resumed = _run_cli(args + ["--run.out_dir", str(tmp_path / "killed"), "--resume", "auto"])
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    ref, got = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert killed_at < 10 and sorted(ref) == list(range(1, 11))
    for step in range(killed_at + 1, 11):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"


def _mixed_llava(tmp_path: Path, shapes_parquet: Path, n: int = 8) -> Path:
    """LLaVA JSON alternating text-only and image samples: with batch 1 per rank, one rank's batch
    has no image while the other's has one."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(shapes_parquet).slice(0, n).to_pylist()
    records = []
    for i, row in enumerate(rows):
        conv = json.loads(row["conversations"])[:2]
        record = {"id": str(i), "conversations": [
            {"from": "human", "value": conv[0]["content"] if i % 2 else conv[0]["content"].replace("<image>", "")},
            {"from": "gpt", "value": conv[1]["content"]}]}
        if i % 2:
            name = f"img{i}.png"
            Image.open(io.BytesIO(row["image_bytes"])).save(tmp_path / name)
            record["image"] = name
        records.append(record)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("fused", ["false", "true"], ids=["host-waits", "outcome-read-a-step-late"])
def test_two_processes_give_the_same_losses_as_one(tiny_models, shapes, tmp_path, fused):
    """torchrun with 2 CPU processes (gloo), batch 1 each, equals one process with batch 2 — with
    one rank's batch holding no image at every step."""
    data = _mixed_llava(tmp_path, shapes["sft_train"])
    common = ["train", str(config_path("debug.yaml")), "--model.llm", str(tiny_models / "llm"),
              "--model.vision", str(tiny_models / "vision"), "--data.sources", f"[{data}]",
              "--data.shuffle", "false", "--run.max_steps", "4", "--run.save_interval", "2", "--optim.fused", fused]
    one = _run_cli(common + ["--run.batch_size", "2", "--run.out_dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29513", "-m", "crossvlm.cli", *common,
                          "--run.batch_size", "1", "--run.out_dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert one.wait(timeout=300) == 0, one.stdout.read()
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), f"step {step}"
    # Only rank 0 wrote: one metrics file, one set of checkpoints, one final model.
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-0000002", "step-0000004"]
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
