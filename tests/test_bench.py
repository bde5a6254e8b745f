"""Benchmarks: the FLOP rules by hand and against torch's counter, the naive baseline's faithfulness,
the loss levers, and every `crossvlm bench` command on the tiny preset (CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from crossvlm.bench.train import TrainBenchConfig, load_naive, plan, run_train_bench
from crossvlm.errors import ConfigError
from crossvlm.model import flops
from crossvlm.model.flops import (LLMShape, VisionShape, Workload, attention_flops, cross_attn_projector_flops,
                                  linear_flops, step_flops)



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread avoids OpenMP oversubscription (100× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- FLOP rules, by hand -------------------------------------------------------------------------------
SMALL_LLM = LLMShape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10)
SMALL_VISION = VisionShape(hidden=4, intermediate=8, layers=1, patch=2, image_size=4, channels=3)


def test_linear_and_attention_rules():
    assert linear_flops(10, 3, "frozen") == 60  # 2·p·t forward only
    assert linear_flops(10, 3, "through") == 120  # + input gradients
    assert linear_flops(10, 3, "trained") == 180  # + input and weight gradients
    assert attention_flops(2, 3, 4, "frozen") == 96  # QKᵀ 2·2·3·4 + AV 2·2·3·4
    assert attention_flops(4, 4, 8, "through", causal=True) == 768  # half of 512 forward, ×3 with backward
    assert attention_flops(4, 4, 8, "trained", causal=True) == 768  # no weights: same as "through"


def test_shapes_count_weight_entries():
    # q and o: 4×(2·2) each; k and v: 4×(1·2) each; gate, up, down: 4×8 each
    assert SMALL_LLM.layer_params == 16 + 16 + 8 + 8 + 96
    assert SMALL_LLM.head_params == 40
    # patch embedding 3·2·2·4 = 48 weights on 4 patches; one layer of 4·4² + 2·4·8 = 128 weights on 5
    # tokens (CLS included); attention 4·5·5·4 = 400
    assert SMALL_VISION.forward_flops() == 2 * 48 * 4 + 2 * 128 * 5 + 400 == 2064
    assert SMALL_VISION.forward_flops(layers=0) == 384


def test_step_flops_by_hand():
    work = Workload(seq_len=3, logits=2)
    pretrain = step_flops(SMALL_LLM, SMALL_VISION, 100, work, "through", batch=1)
    # vision forward only; projector ×3; decoder linear 2·144·3 = 864 ×2; causal attention
    # 4·3·3·4 / 2 = 72 ×3; LM head at the 2 labelled positions 2·40·2 = 160 ×2
    assert pretrain == {"vision": 2064, "projector": 300, "llm_linear": 1728, "llm_attention": 216,
                        "lm_head": 320, "total": 4628}
    sft = step_flops(SMALL_LLM, SMALL_VISION, 100, work, "trained", batch=2)
    assert sft["llm_linear"] == 2 * 2592 and sft["lm_head"] == 2 * 480
    assert sft["total"] == 2 * (2064 + 300 + 2592 + 216 + 480)


def test_cross_attention_projector_by_hand():
    # kv_in 2×4 and kv_proj 4×8 on 4 patches; q, o (4×4 each), MLP (4×8, 8×4) and out 4×3 on 1 query;
    # scores 4·1·4·4
    expected = 2 * (8 + 32) * 4 + 2 * (32 + 64 + 12) * 1 + 64
    assert cross_attn_projector_flops(2, 4, 3, queries=1, patches=4, layers=1, mlp_ratio=2) == expected == 600


def test_mfu_and_feature_layers(tiny_models):
    assert flops.mfu(989e12, 1.0) == 1.0 and flops.mfu(494.5e12, 2.0) == 0.25
    cfg = _tiny_vlm(tiny_models).config
    assert flops.vision_layers_needed(cfg) == cfg.vision_config.num_hidden_layers - 1  # feature layer -2
    cfg.vision_feature_layer = 1
    assert flops.vision_layers_needed(cfg) == 1


# -- FLOP rules against torch's counter -----------------------------------------------------------------
def _tiny_vlm(tiny_models, projector_type="cross_attn"):
    from crossvlm.model import CrossVLM

    torch.manual_seed(0)
    return CrossVLM.from_base_models(tiny_models / "llm", tiny_models / "vision", num_queries=16,
                                     projector_heads=4, projector_type=projector_type)


def _counted(fn, ops=None) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if ops is None or str(k) in ops)


def test_flop_formulas_match_torch_flop_counter(tiny_models):
    """Forward and backward matmul FLOPs as torch counts them. On a CPU, attention without a mask runs
    the flash kernel, which the counter skips, so LLM and vision attention are compared apart."""
    model = _tiny_vlm(tiny_models)
    cfg = model.config
    llm, vision = LLMShape.from_config(cfg.text_config), VisionShape.from_config(cfg.vision_config)
    n, t = 2, 30
    features = torch.randn(n, cfg.num_patches, cfg.vision_config.hidden_size)
    assert _counted(lambda: model.projector(features)) == n * flops.projector_forward_flops(cfg)
    tokens = vision.patches + 1
    kept = flops.vision_layers_needed(cfg)  # the tower is cut at the feature layer: only these run
    vision_linear = vision.forward_flops(kept) - kept * attention_flops(tokens, tokens, vision.hidden, "frozen")
    pixels = torch.randn(n, 3, vision.image_size, vision.image_size)
    assert _counted(lambda: model.vision(pixel_values=pixels)) == n * vision_linear

    mm = {"aten.mm", "aten.addmm"}
    model.llm.requires_grad_(False)  # pretraining: gradients only pass through
    embeds = torch.randn(n, t, llm.hidden, requires_grad=True)
    through = _counted(lambda: model.llm.model(inputs_embeds=embeds).last_hidden_state.sum().backward(), mm)
    assert through == n * llm.layers * linear_flops(llm.layer_params, t, "through")
    model.llm.requires_grad_(True)
    trained = _counted(lambda: model.llm.model(inputs_embeds=embeds).last_hidden_state.sum().backward(), mm)
    assert trained == n * llm.layers * linear_flops(llm.layer_params, t, "trained")


# -- the naive baseline and the loss levers ---------------------------------------------------------------
def _batch(model, n=2, text=12, labelled=6, seed=0):
    """ids with one image span per sample, labels on the last `labelled` tokens, pixels."""
    from crossvlm.model.tokens import VisionTokenIds

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id)
    m = model.num_image_tokens
    rows = [torch.cat([torch.tensor([ids.start]), torch.full((m,), ids.pad), torch.tensor([ids.end]),
                       torch.randint(0, 500, (text,), generator=g)]) for _ in range(n)]
    input_ids = torch.stack(rows)
    labels = torch.full_like(input_ids, -100)
    labels[:, -labelled:] = input_ids[:, -labelled:]
    size = cfg.vision_config.image_size
    return input_ids, labels, torch.randn(n, 3, size, size, generator=g)


def test_naive_loss_is_the_hf_loss_and_equals_ours_on_the_same_embeddings(tiny_models):
    """The baseline's full-logits loss (HF `labels=`), our labelled-only loss and a hand-written
    cross-entropy agree on identical weights and embeddings (fp32)."""
    naive = load_naive()
    model = _tiny_vlm(tiny_models, "mlp")  # one token per patch, like the naive design
    vlm = naive.NaiveVLM(model.llm, model.vision, model.config.image_token_id, num_heads=4)
    input_ids, labels, pixels = _batch(model)
    embeds = vlm.merge(input_ids, pixels)
    mask = torch.ones_like(input_ids)
    naive_loss = vlm(input_ids, pixels, attention_mask=mask, labels=labels).loss
    hf_loss = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    ours = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    for value in (hf_loss, ours, by_hand):
        torch.testing.assert_close(naive_loss, value, rtol=1e-5, atol=1e-5)


def test_naive_projector_splices_each_sample_and_keeps_the_rest(tiny_models):
    naive = load_naive()
    model = _tiny_vlm(tiny_models, "mlp")
    vlm = naive.NaiveVLM(model.llm, model.vision, model.config.image_token_id, num_heads=4).eval()
    input_ids, _, pixels = _batch(model, n=3)
    merged = vlm.merge(input_ids, pixels)
    embeds = model.llm.get_input_embeddings()(input_ids)
    is_pad = input_ids == model.config.image_token_id
    torch.testing.assert_close(merged[~is_pad], embeds[~is_pad])
    features = model.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    kv = vlm.projector.vision_proj(features)
    batched, _ = vlm.projector.attn(embeds[is_pad].view(3, -1, embeds.shape[-1]), kv, kv)
    torch.testing.assert_close(merged[is_pad].view_as(batched), batched)
    # The tutorial's flaw, kept on purpose: identical placeholder queries give identical visual tokens.
    torch.testing.assert_close(batched[:, :1].expand_as(batched), batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lever", ["full-logits", "chunked-ce", "compiled"])
def test_loss_levers_give_the_stock_loss_and_gradients(tiny_models, lever, monkeypatch):
    """The bench's loss levers, and the loss `run.compile` compiles (`compile_loss`), change speed
    and memory only."""
    from crossvlm.bench import levers

    monkeypatch.setattr(levers, "CE_CHUNK_ROWS", 5)  # several chunks, the last one short
    model = _tiny_vlm(tiny_models)
    input_ids, labels, pixels = _batch(model, n=2, labelled=7)
    results = []
    for apply in (False, True):
        model.zero_grad()
        if apply and lever == "compiled":
            model.compile_loss()
        elif apply:
            levers.apply_model_levers(model, (lever,))
        loss = model(input_ids=input_ids, pixel_values=pixels, labels=labels, num_items_in_batch=9).loss
        loss.backward()
        results.append((loss.detach(), model.llm.lm_head.weight.grad.clone(), model.projector.out.weight.grad.clone()))
    for stock, changed in zip(*results):
        torch.testing.assert_close(stock, changed, rtol=1e-5, atol=1e-6)


# -- the commands on the tiny preset (CPU) --------------------------------------------------------------
def test_plan_names_one_variant_per_lever():
    cfg = TrainBenchConfig(levers=("compile", "batch2x", "full-logits"), batch_size=4)
    assert [v.name for v in plan(cfg)] == ["ours", "mlp", "naive", "ours+compile", "ours+batch2x", "ours+full-logits"]
    assert plan(cfg)[4].batch_size == 8 and plan(cfg)[3].compile
    with pytest.raises(ConfigError, match="unknown levers"):
        TrainBenchConfig(levers=("warp-drive",)).validate()


def test_models_of_another_preset_are_refused(tiny_models):
    from crossvlm.bench.common import ensure_models

    with pytest.raises(ConfigError, match="another preset"):
        ensure_models(tiny_models, "full")


def test_train_bench_tiny_pretrain(tiny_models):
    report = run_train_bench(TrainBenchConfig(preset="tiny", stage="pretrain", models=tiny_models, batch_size=2,
                                              steps=2, warmup=1, workers=0, levers=("full-logits", "batch2x"),
                                              jpeg_size=(160, 120)))
    records = {r["variant"]: r for r in report["variants"]}
    assert list(records) == ["ours", "mlp", "naive", "ours+full-logits", "ours+batch2x"]
    for name, r in records.items():
        assert "error" not in r, r.get("error")
        assert r["steps_measured"] == 2 and r["samples_per_s"] > 0 and r["step_s_median"] > 0
        assert 0 <= r["data_wait_share"] < 1
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # CPU: no MFU against a GPU peak
        assert 3 < r["loss_first"] < 12 and math.isfinite(r["loss_last"])  # ~ln(vocab) for random weights
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * r["seq_len"])
    ours, naive, mlp = records["ours"], records["naive"], records["mlp"]
    assert naive["vs_naive"] == 1.0 and ours["vs_naive"] > 0
    # the same useful work for the same samples; the naive design executes more of it
    assert ours["flops_required_per_step"] == naive["flops_required_per_step"] == mlp["flops_required_per_step"]
    assert naive["flops_executed_per_step"] > ours["flops_executed_per_step"]
    assert records["ours+batch2x"]["flops_required_per_step"] == 2 * ours["flops_required_per_step"]
    head = {name: r["flops_executed_breakdown"]["lm_head"] for name, r in records.items()}
    assert head["ours+full-logits"] > head["ours"]
    # the loss lever computes the same loss on the same first batch
    assert records["ours+full-logits"]["loss_first"] == pytest.approx(ours["loss_first"], rel=1e-5)
    assert report["sample"] == {"text_tokens": 128, "labelled": 96, "images": 1, "jpeg_size": [160, 120],
                                "loader_workers": 0}
    assert ours["seq_len"] == 64 + 128


def test_bench_train_command_sft_writes_json_and_profile(tiny_models, tmp_path, capsys):
    from crossvlm.cli import main

    out, prof = tmp_path / "train.json", tmp_path / "prof"
    code = main(["bench", "train", "--preset", "tiny", "--models", str(tiny_models), "--stage", "sft", "--steps",
                 "2", "--warmup", "0", "--batch-size", "2", "--workers", "1", "--variants", "ours",
                 "--jpeg-size", "160x120", "--profile", str(prof), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    (ours,) = report["variants"]
    assert report["stage"] == "sft" and report["sample"]["text_tokens"] == 384
    # workers × 2 extra warmup steps fill the loader's queue before measuring
    assert ours["steps_measured"] == 2 and ours["flops_executed_breakdown"]["llm_linear"] > 0
    assert Path(ours["trace"]).is_file() and "Self CPU" in Path(ours["kernels"]).read_text()
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("MFU: not applicable")
    assert "| ours |" in printed


def test_bench_train_runs_levers_alone_and_batches_larger_than_the_photo_pool(tiny_models, tmp_path):
    """`--variants none` runs only the lever variants; a batch above the 64 pooled photos still runs."""
    from crossvlm.cli import main

    out = tmp_path / "train.json"
    assert main(["bench", "train", "--preset", "tiny", "--models", str(tiny_models), "--stage", "pretrain",
                 "--steps", "1", "--warmup", "0", "--batch-size", "40", "--workers", "0", "--variants", "none",
                 "--levers", "batch2x", "--jpeg-size", "160x120", "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text())["variants"]
    assert record["variant"] == "ours+batch2x" and record["batch_size"] == 80 and record["steps_measured"] == 1


def test_bench_generate_and_data_commands(tiny_models, tmp_path, capsys):
    from crossvlm.cli import main

    out = tmp_path / "gen.json"
    assert main(["bench", "generate", "--preset", "tiny", "--models", str(tiny_models), "--new-tokens", "3",
                 "--batch-size", "2", "--out", str(out)]) == 0
    records = {r["variant"]: r for r in json.loads(out.read_text())["variants"]}
    assert set(records) == {"dynamic", "static", "static+compile", "engine"}
    assert records["static+compile"] == {"variant": "static+compile",
                                         "skipped": "transformers compiles generate on CUDA only"}
    assert main(["bench", "generate", "--preset", "tiny", "--models", str(tiny_models), "--new-tokens", "3",
                 "--batch-size", "2", "--variants", "engine", "--profile", str(tmp_path / "prof"),
                 "--out", str(out)]) == 0
    profiled = json.loads(out.read_text())["variants"][0]
    kernels = Path(profiled["kernels"])
    assert kernels == tmp_path / "prof" / "generate_engine.kernels.txt"
    assert "3 new tokens" in kernels.read_text() and "aten::" in kernels.read_text()
    assert Path(profiled["trace"]).stat().st_size > 0
    assert "kernels" not in records["engine"]  # profiled only when asked
    for name in ("dynamic", "static", "engine"):
        assert records[name]["ttft_ms"] > 0 and records[name]["aggregate_tokens_per_s"] > 0
    out = tmp_path / "data.json"
    assert main(["bench", "data", "--preset", "tiny", "--models", str(tiny_models), "--workers", "0",
                 "--seconds", "0.3", "--batch-size", "8", "--photos", "16", "--jpeg-size", "160x120",
                 "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["num_workers"] == 0 and result["images_per_s"] > 0
    assert "| workers | images/s |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_train_under_torchrun_reports_the_aggregate(tiny_models, tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "crossvlm.cli", "bench", "train", "--preset", "tiny", "--models", str(tiny_models),
                          "--stage", "pretrain", "--steps", "2", "--warmup", "0", "--batch-size", "2",
                          "--workers", "0", "--variants", "ours,naive", "--jpeg-size", "160x120", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["env"]["world_size"] == 2
    for r in report["variants"]:
        assert r["world_size"] == 2
        assert r["samples_per_s"] == pytest.approx(2 * 2 / r["step_s_median"])  # both processes' samples


@pytest.mark.gpu
def test_train_and_generate_bench_on_cuda(tiny_models):
    from crossvlm.bench.generate import GenerateBenchConfig, run_generate_bench

    report = run_train_bench(TrainBenchConfig(preset="tiny", stage="sft", models=tiny_models, batch_size=2,
                                              steps=3, warmup=1, workers=0, jpeg_size=(160, 120)))
    for r in report["variants"]:
        assert "error" not in r, r.get("error")
        assert 0 < r["mfu"] < 1 and r["peak_memory_gib"] > 0
    gen = run_generate_bench(GenerateBenchConfig(preset="tiny", models=tiny_models, new_tokens=4, batch_size=2,
                                                 ttft_repeats=2, decode_repeats=1, batch_repeats=1))
    for r in gen["variants"]:
        assert "error" not in r, r.get("error")
        assert r["ttft_ms"] > 0 and r["peak_memory_gib"] > 0


def test_gpu_idle_charges_each_gap_to_the_innermost_host_phase():
    """`crossvlm.bench.idle`: GPU gaps inside the labelled window, each moment charged to the innermost label."""
    from crossvlm.bench.idle import describe, gpu_idle

    def span(name, cat, start, end):
        return {"ph": "X", "name": name, "cat": cat, "ts": start, "dur": end - start}

    events = [span("train.step", "user_annotation", 0, 1000), span("train.forward", "user_annotation", 100, 400),
              span("train.report", "user_annotation", 800, 1000), span("other.label", "user_annotation", 0, 1000),
              span("k1", "kernel", 0, 100), span("k2", "kernel", 150, 300), span("copy", "gpu_memcpy", 290, 400),
              span("k3", "kernel", 500, 800), span("k4", "kernel", 805, 810)]  # k4 leaves gaps under 20 µs and above
    report = gpu_idle(events)
    assert report["window_ms"] == pytest.approx(1.0) and report["gpu_busy_ms"] == pytest.approx(0.655)
    assert report["gaps"] == 3 and report["longest_gap_ms"] == pytest.approx(0.19)
    # 100-150 lies in train.forward (inside train.step), 400-500 in train.step alone, 810-1000 in train.report
    assert report["idle_by_host_phase_ms"] == pytest.approx({"train.step": 0.1, "train.report": 0.19,
                                                             "train.forward": 0.05})
    assert "train.report" in describe(report) and "65.5%" in describe(report)
    assert gpu_idle([span("train.step", "user_annotation", 0, 10), span("aten::mm", "cpu_op", 1, 5)]) is None


def test_the_reference_config_is_the_one_crossvlm_train_builds(tiny_models):
    """The required FLOPs (and MFU) of `bench train` count the model the stage's model section builds,
    every projector setting included, without building it."""
    from crossvlm.bench.train import _reference_config
    from crossvlm.train.config import model_from_dict
    from crossvlm.train.setup import build_model

    section = model_from_dict({"llm": str(tiny_models / "llm"), "vision": str(tiny_models / "vision"),
                               "init_from": None, "num_queries": 16, "projector_heads": 2,
                               "projector_layers": 1, "vision_feature_layer": -1})
    built, _ = build_model(section)
    reference = _reference_config(tiny_models / "llm", tiny_models / "vision", section)
    assert reference.num_image_tokens == built.num_image_tokens == 16
    for grad in ("through", "trained"):
        assert (flops.required_step_flops(reference, 100, 40, grad, 2)
                == flops.required_step_flops(built.config, 100, 40, grad, 2))
