"""Packed rows (crossvlm.model.packing, data.collate): fixed row length, document masks that keep every
sample to itself, the run's speed report (crossvlm.train.throughput) and `bench train --data`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossvlm.data.collate import Collator, Sample
from crossvlm.errors import ConfigError
from crossvlm.model.packing import choose_kernel, cu_seqlens, packed_attention_kwargs

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "document_ids", "pixel_values")


@pytest.fixture(scope="module")
def vlm(tiny_models):
    from crossvlm.model import CrossVLM

    torch.manual_seed(0)
    return CrossVLM.from_base_models(tiny_models / "llm", tiny_models / "vision", num_queries=16,
                                     projector_heads=4).eval()


def make_sample(model, length: int, image: bool, seed: int) -> Sample:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.randint(10, 200, (length,), generator=g)
    pixels = None
    if image:
        span = [cfg.vision_start_token_id] + [cfg.image_token_id] * model.num_image_tokens + [cfg.vision_end_token_id]
        ids = torch.cat([torch.tensor(span), ids])
        size = cfg.vision_config.image_size
        pixels = torch.randn(1, 3, size, size, generator=g)
    labels = ids.clone()
    labels[: len(ids) // 2] = -100
    return Sample(ids, labels, pixels)


def logits_of(model, batch: dict, attention: str) -> torch.Tensor:
    model.llm.set_attn_implementation(attention)
    with torch.no_grad():
        return model(**{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}, use_cache=False).logits


def test_rows_are_max_length_wide_with_documents_and_positions():
    samples = [Sample(torch.full((n,), n), torch.full((n,), n), None) for n in (3, 5, 2, 4)]
    batch = Collator(pad_token_id=0, packing=True, max_length=8)(samples)
    # first-fit decreasing: 5 then 4 open rows, 3 joins the 5, 2 joins the 4
    assert batch["input_ids"].tolist() == [[5, 5, 5, 5, 5, 3, 3, 3], [4, 4, 4, 4, 2, 2, 0, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    assert batch["lengths"] == [3, 5, 2, 4] and batch["attention_mask"] is None
    # a batch of short samples still makes rows of max_length: one compiled row length
    short = Collator(pad_token_id=0, packing=True, max_length=8)(samples[:1])
    assert short["input_ids"].shape == (1, 8) and short["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert cu_seqlens(batch["document_ids"]).tolist() == [0, 5, 8, 12, 14, 16]


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["flex_attention", "sdpa"])
def test_no_token_attends_across_documents(vlm, attention):
    """Changing one sample of a packed row (its text and its image) leaves every other sample's logits as
    they were; the same row with one document id for all does not, so the check would catch a leak."""
    lengths, images = (30, 12, 45, 9), (True, False, True, False)
    samples = [make_sample(vlm, n, i, seed) for seed, (n, i) in enumerate(zip(lengths, images))]
    collate = Collator(pad_token_id=0, packing=True, max_length=128)
    batch = collate(samples)
    changed = list(samples)
    a = samples[2]  # the longest: first in its row, with an image
    ids = a.input_ids.clone()
    ids[-20:] = torch.randint(10, 200, (20,), generator=torch.Generator().manual_seed(99))
    changed[2] = Sample(ids, a.labels, a.pixel_values + 1.0)
    perturbed = collate(changed)
    row, col = (batch["input_ids"] != perturbed["input_ids"]).nonzero()[0].tolist()
    is_a = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    is_a[row] = batch["document_ids"][row] == batch["document_ids"][row, col]
    same_row_other = torch.zeros_like(is_a)
    same_row_other[row] = ~is_a[row]  # the other samples (and the padding) of A's row
    assert same_row_other.any() and batch["input_ids"].shape[0] == 2
    before, after = logits_of(vlm, batch, attention), logits_of(vlm, perturbed, attention)
    torch.testing.assert_close(after[~is_a], before[~is_a], rtol=0, atol=1e-5)
    assert (after[is_a] - before[is_a]).abs().max() > 1e-2  # A itself did change
    if attention == "flex_attention":  # the control: one document per row lets B see A
        leak, leak_after = dict(batch), dict(perturbed)
        for b in (leak, leak_after):
            b["document_ids"] = torch.zeros_like(b["document_ids"])
        leaked = logits_of(vlm, leak_after, attention)[same_row_other] - logits_of(vlm, leak, attention)[same_row_other]
        assert leaked.abs().max() > 1e-3


@pytest.mark.slow
def test_packed_flex_loss_equals_unpacked_loss(vlm):
    samples = [make_sample(vlm, n, i, seed) for seed, (n, i) in enumerate(zip((25, 60, 8), (True, True, False)))]

    def loss(batch, attention):
        vlm.llm.set_attn_implementation(attention)
        with torch.no_grad():
            return vlm(**{k: batch[k] for k in (*MODEL_INPUTS, "labels") if batch.get(k) is not None},
                       use_cache=False, num_items_in_batch=1).loss

    unpacked = sum(loss(Collator(0)([s]), "sdpa") for s in samples)
    packed = Collator(0, packing=True, max_length=160)(samples)
    assert packed["input_ids"].shape == (1, 160)  # all three and a padding tail in one row
    torch.testing.assert_close(loss(packed, "flex_attention"), unpacked, rtol=1e-5, atol=1e-4)


def test_attention_inputs_per_kernel():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    assert packed_attention_kwargs("sdpa", docs) == {"attention_mask": None}
    assert packed_attention_kwargs("flex_attention", None) == {}
    varlen = packed_attention_kwargs("varlen", docs)
    assert varlen["cu_seq_lens_q"].tolist() == [0, 2, 5, 6] and varlen["max_length_q"] == 6
    mask = packed_attention_kwargs("flex_attention", docs)["attention_mask"]
    assert mask.shape == (1, 1, 6, 6)
    q, kv = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    allowed = mask.mask_mod(torch.tensor(0), torch.tensor(0), q, kv).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]


def test_kernel_choice(tiny_models):
    from transformers import Qwen3ForCausalLM

    llm = Qwen3ForCausalLM.from_pretrained(tiny_models / "llm")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_kernel("auto", cpu, llm)[0] is None  # padded on a CPU
    assert choose_kernel("auto", gpu, llm)[0] == "flex_attention"
    assert choose_kernel("sdpa", cpu, llm) == ("sdpa", "sdpa, as configured")
    with pytest.raises(ConfigError, match="GPU only"):
        choose_kernel("flex_attention", cpu, llm)


def test_batch_flops_of_equal_lengths_is_the_benchmark_step(vlm):
    from crossvlm.model.flops import LLMShape, VisionShape, Workload, batch_flops, projector_forward_flops, step_flops

    cfg = vlm.config
    got = batch_flops(cfg, [100] * 4, 4 * 30, 4, "trained")
    want = step_flops(LLMShape.from_config(cfg.text_config), VisionShape.from_config(cfg.vision_config),
                      projector_forward_flops(cfg), Workload(100, 30, vision_layers=cfg.vision_config.num_hidden_layers
                                                             + 1 + cfg.vision_feature_layer), "trained", 4)
    assert got == pytest.approx(want)
    # packed samples attend within themselves: two halves cost half the attention of one whole
    whole, halves = batch_flops(cfg, [200], 50, 0, "through"), batch_flops(cfg, [100, 100], 50, 0, "through")
    assert halves["llm_attention"] == pytest.approx(whole["llm_attention"] / 2)
    assert halves["llm_linear"] == whole["llm_linear"]


def test_step_counts_and_rates(vlm, monkeypatch):
    from crossvlm.model.flops import batch_flops
    from crossvlm.train import throughput

    samples = [make_sample(vlm, n, i, s) for s, (n, i) in enumerate(zip((20, 50, 10), (True, False, True)))]
    batch = Collator(0, packing=True, max_length=128)(samples)
    counts = dict(zip(throughput.COUNTS, throughput.step_counts([batch], vlm.config, "trained")))
    real = sum(len(s) for s in samples)
    assert counts["tokens"] == real and counts["samples"] == 3 and counts["slots"] == 128
    assert counts["flops"] == batch_flops(vlm.config, [len(s) for s in samples], batch["num_tokens"], 2,
                                          "trained")["total"]
    clock = iter([0.0, 0.5, 1.0, 2.0])  # reset, the data wait's start and end, rates
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    window = throughput.SpeedWindow(torch.device("cpu"))
    assert window.peak is None and "not known" in window.note
    window.next_batches(iter([batch]), 1)
    window.add(counts)
    rates = window.rates()
    assert rates["samples_per_s"] == 1.5 and rates["tokens_per_s"] == real / 2
    assert rates["padding_share"] == pytest.approx(1 - real / 128) and rates["mfu"] is None
    assert rates["data_wait_share"] == 0.25
    assert throughput.peak_flops("NVIDIA H200") == 989e12 and throughput.peak_flops("Tesla T4") is None


def test_packed_cpu_run_reports_speed(tiny_models, tmp_path, capsys):
    """`crossvlm train` with packing on a CPU: the first lines say how batches are made, and every
    metrics line carries samples/s, real tokens/s, padding share and data wait (MFU left out on a CPU)."""
    from crossvlm.configs import config_path
    from crossvlm.data.synth import write_synthetic
    from crossvlm.train.config import load_config
    from crossvlm.train.loggers import read_metrics
    from crossvlm.train.loop import train

    data = write_synthetic(tmp_path / "shapes", seed=0, n_train=16, n_test=4)["sft_train"]
    cfg = load_config(config_path("debug.yaml"), {
        "model.llm": str(tiny_models / "llm"), "model.vision": str(tiny_models / "vision"),
        "data.sources": [str(data)], "run.out_dir": str(tmp_path / "run"), "run.max_steps": 2,
        "data.packing": True, "data.max_length": 512})
    train(cfg)
    printed = capsys.readouterr().out
    assert "samples packed into rows of 512 tokens" in printed and "by sdpa" in printed
    assert "MFU not reported" in printed
    lines = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["samples_per_s"] > 0 and m["tokens_per_s"] > 0 and 0 < m["padding_share"] < 1
        assert 0 <= m["data_wait_share"] < 1 and m["mfu"] is None


@pytest.mark.slow
def test_bench_train_on_a_data_file(tiny_models, tmp_path, capsys):
    from crossvlm.bench.realdata import write_variable_length_set
    from crossvlm.cli import main

    data = write_variable_length_set(tmp_path / "captions.parquet", "pretrain", rows=64, size=(160, 120))
    out = tmp_path / "real.json"
    assert main(["bench", "train", "--preset", "tiny", "--models", str(tiny_models), "--stage", "pretrain",
                 "--data", str(data), "--max-length", "512", "--variants", "sdpa,padded,fixed", "--steps", "2",
                 "--warmup", "1", "--batch-size", "4", "--workers", "0", "--jpeg-size", "160x120",
                 "--profile", str(tmp_path / "prof"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    records = {r["variant"]: r for r in report["variants"]}
    assert report["data"]["path"] == str(data) and not report["data"]["generated"]
    sdpa, padded, fixed = records["sdpa"], records["padded"], records["fixed"]
    assert sdpa["packing"] and sdpa["attention"] == "sdpa" and not padded["packing"]
    assert sdpa["steps_measured"] == 2 and sdpa["tokens_per_s"] > 0 and 0 <= sdpa["padding_share"] < 1
    # the fixed-length reference takes the packed run's rows: max_length tokens, one sample each
    assert fixed["batch_size"] == round(sdpa["rows_per_step"]) and fixed["text_tokens"] == 512 - 64
    assert sdpa["tokens_vs_fixed"] == pytest.approx(sdpa["tokens_per_s"] / fixed["tokens_per_s"])
    for r in (sdpa, fixed):  # kernel tables of both, to compare a packed row with a fixed one
        assert "Self CPU" in (tmp_path / "prof" / Path(r["kernels"]).name).read_text()
    # the data variant's profile covers whole iterations of Trainer.run's loop, after the measured steps
    from crossvlm.bench.idle import read_trace

    labels = {e["name"] for e in read_trace(Path(sdpa["trace"])) if e.get("cat") == "user_annotation"}
    assert {"train.next_batch", "train.forward", "train.backward", "train.optimizer", "train.report"} <= labels
    assert "| sdpa | sdpa |" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["flex_attention", "varlen"])
def test_packed_kernels_on_cuda_match_unpacked_logits(vlm, attention):
    """On a GPU, under bf16 autocast as in training: each packed kernel gives every sample the logits it
    gets alone."""
    from crossvlm.model.packing import register_varlen

    register_varlen()
    model = vlm.cuda()
    samples = [make_sample(model, n, i, seed) for seed, (n, i) in enumerate(zip((40, 90, 17), (True, False, True)))]
    packed = {k: (v.cuda() if torch.is_tensor(v) else v)
              for k, v in Collator(0, packing=True, max_length=256)(samples).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = logits_of(model, packed, attention).float()
        for d, s in enumerate(samples):  # all in row 0, in first-fit-decreasing order
            alone = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in Collator(0)([s]).items()}
            want = logits_of(model, alone, "sdpa").float()[0]
            doc = (packed["document_ids"][0] == sorted(range(3), key=lambda i: -len(samples[i])).index(d))
            torch.testing.assert_close(got[0][doc], want, rtol=0.05, atol=0.05)
    model.cpu()
