"""`crossvlm bench generate`: time to first token, batch-1 decode speed and batch-64 throughput.

The model is a CrossVLM of the preset's random base models (bf16 on a GPU, float32 on a CPU); the
prompt is one user turn with one camera-sized JPEG, rendered by the processor as chat and serving do.
The `generate()` variants are `CrossVLM.generate` (merged embeddings as the prefill, then Qwen3's own
`generate`); greedy, `min_new_tokens` = `max_new_tokens` so random weights cannot stop early at an EOS.

Variants (transformers' own levers, then ours):
- `dynamic`: the stock path (DynamicCache);
- `static`: `cache_implementation="static"` with `disable_compile=True`;
- `static+compile`: `cache_implementation="static"`, which transformers compiles on CUDA for the
  decode steps (`torch.compile`, mode "reduce-overhead": CUDA graphs); the prefill stays eager;
- `engine`, `engine+compile`: `crossvlm.engine`, the generation engine behind serve, chat, eval and `crossvlm.load`
  (greedy with `ignore_eos`; the prompt prepared once by `ChatModel.prompt`, images preprocessed, as
  the `generate()` variants get theirs). Its attention is registered for its model's engine steps
  only (`crossvlm.engine.cache.use_engine_attention`): the `generate()` variants keep their kernel
  whichever runs first.

Timings are CUDA-synchronised wall times. TTFT = a `max_new_tokens=1` call (prefill + first token,
inputs already on the device; the image processor's CPU time is reported apart as `preprocess_ms`).
Decode tokens/s at batch 1 = (N - 1) / (time of an N-token call - TTFT). Aggregate tokens/s at batch B
= B · N / time of an N-token call over B prompts (prefill included).
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from crossvlm.bench.catalog import DEFAULT_GENERATE_VARIANTS, GENERATE_VARIANTS as VARIANTS
from crossvlm.bench.common import (ensure_models, env_info, free_memory, median, peak_memory_gib, profiled, say,
                                   timed)
from crossvlm.errors import ConfigError

PROMPT = "<image>\nDescribe this image in detail."


@dataclass
class GenerateBenchConfig:
    """One `crossvlm bench generate` run."""

    preset: str = "full"
    models: Path | None = None
    """Folder with (or to receive) the preset's random base models; None: a temporary folder."""
    variants: tuple[str, ...] = DEFAULT_GENERATE_VARIANTS
    new_tokens: int = 64
    """Tokens generated per decode call."""
    batch_size: int = 64
    """Prompts in the aggregate-throughput call."""
    ttft_repeats: int = 10
    decode_repeats: int = 3
    batch_repeats: int = 2
    jpeg_size: tuple[int, int] = (640, 480)
    seed: int = 0
    profile: Path | None = None
    """Also profile one batch-1 call of `new_tokens` tokens per variant into this folder."""

    def validate(self) -> None:
        from crossvlm.make_model import PRESETS

        p = []
        if self.preset not in PRESETS:
            p.append(f"preset {self.preset!r} is not one of {sorted(PRESETS)}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            p.append(f"unknown variants {bad}; choose from {list(VARIANTS)}")
        if self.new_tokens < 2:
            p.append("new tokens must be >= 2 (decode speed needs more than the first token)")
        if min(self.batch_size, self.ttft_repeats, self.decode_repeats, self.batch_repeats) < 1:
            p.append("batch size and repeats must be >= 1")
        if p:
            raise ConfigError("invalid bench generate arguments:\n  - " + "\n  - ".join(p))


def _inputs(processor, image, n: int, device: torch.device) -> dict:
    text = processor.render([{"role": "user", "content": PROMPT}])
    batch = processor([text] * n, images=[image] * n)
    return {k: v.to(device) for k, v in batch.items()}


def _generate(model, inputs: dict, new_tokens: int, options: dict):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)


def _generator(model, processor, image, name: str, cfg: GenerateBenchConfig, device: torch.device):
    """generate(batch, n) -> new tokens of the first row, for a variant: `CrossVLM.generate` with the
    variant's options on one prompt or `batch_size` of them, or the engine on the same prompts."""
    options = VARIANTS[name]
    if "engine" not in options:
        inputs = {1: _inputs(processor, image, 1, device), cfg.batch_size: _inputs(processor, image, cfg.batch_size, device)}

        def generate(batch: int, n: int) -> int:
            out = _generate(model, inputs[batch], n, options)
            return out.shape[1] - inputs[batch]["input_ids"].shape[1]

        return generate
    from crossvlm.engine import EngineConfig, SamplingParams
    from crossvlm.inference import ChatModel

    chat = ChatModel(model, processor)
    prompt = chat.prompt([{"role": "user", "content": PROMPT}], [image])
    kv = -(-(len(prompt.input_ids) + cfg.new_tokens) // 256) * 256
    chat.engine_config = EngineConfig(slots=cfg.batch_size, max_len=kv, compile=options.get("compile", False))

    def generate(batch: int, n: int) -> int:
        done = chat.generate_prompts([prompt] * batch, SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True))
        return done[0].completion_tokens

    return generate


def _run_variant(model, processor, image, name: str, cfg: GenerateBenchConfig, device: torch.device) -> dict:
    options = VARIANTS[name]
    n, b = cfg.new_tokens, cfg.batch_size
    free_memory(device)
    say(f"[generate] {name}: warming up (compiles or records CUDA graphs here if the variant does) ...")
    start = time.perf_counter()
    generate = _generator(model, processor, image, name, cfg, device)
    compiles = "disable_compile" not in options and "cache_implementation" in options
    for _ in range(2 if compiles else 1):  # the first call compiles, the next records the CUDA graphs
        generate(1, n)
        generate(b, n)
    warmup_s = time.perf_counter() - start
    generate(1, 1)
    ttft = [timed(lambda: generate(1, 1), device)[0] for _ in range(cfg.ttft_repeats)]
    full, new = [], None
    for _ in range(cfg.decode_repeats):
        seconds, new = timed(lambda: generate(1, n), device)
        full.append(seconds)
    if new != n:
        raise RuntimeError(f"asked for {n} new tokens, got {new}")
    batch_s = [timed(lambda: generate(b, n), device)[0] for _ in range(cfg.batch_repeats)]
    ttft_s, full_s = median(ttft), median(full)
    # On a busy CPU the two medians can cross for very short calls; no decode speed is better than a wrong one.
    decode_s = (full_s - ttft_s) / (n - 1) if full_s > ttft_s else None
    record = {
        "variant": name, "options": options, "warmup_s": warmup_s,
        "ttft_ms": 1000 * ttft_s, "ttft_ms_min": 1000 * min(ttft),
        "decode_ms_per_token_bs1": None if decode_s is None else 1000 * decode_s,
        "decode_tokens_per_s_bs1": None if decode_s is None else 1 / decode_s,
        "call_s_bs1": full_s,
        "aggregate_tokens_per_s": b * n / median(batch_s),
        "call_s_batch": median(batch_s),
        "batch_size": b,
        "peak_memory_gib": peak_memory_gib(device),
    }
    if cfg.profile:
        stem = Path(cfg.profile) / f"generate_{name.replace('+', '_')}"
        record.update(profiled(lambda: generate(1, n), device, stem,
                               f"{name}, one prompt, {n} new tokens (prefill + {n - 1} decode steps)"))
        # Where the first token's time goes on the host (the engine labels its phases `engine.*`).
        record["ttft_profile"] = profiled(lambda: generate(1, 1), device, Path(f"{stem}_ttft"),
                                          f"{name}, one prompt, first token only", sort="cpu_time_total")
    decode = "n/a" if decode_s is None else f"{1 / decode_s:.1f}"
    say(f"[generate] {name}: TTFT {record['ttft_ms']:.1f} ms, decode {decode} tok/s at batch 1, "
        f"{record['aggregate_tokens_per_s']:.0f} tok/s at batch {b} (warmup {warmup_s:.1f} s)")
    return record


def run_generate_bench(cfg: GenerateBenchConfig) -> dict:
    import io

    from PIL import Image

    from crossvlm.bench.batches import jpeg_pool
    from crossvlm.model.modeling import CrossVLM
    from crossvlm.model.processor import CrossVLMProcessor

    cfg.validate()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    with tempfile.TemporaryDirectory(prefix="crossvlm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        llm_dir, vision_dir = ensure_models(cfg.models or tmp / "models", cfg.preset)
        image = Image.open(io.BytesIO(jpeg_pool(tmp, cfg.jpeg_size, count=1, seed=cfg.seed)[0])).convert("RGB")
        torch.manual_seed(cfg.seed)
        model = CrossVLM.from_base_models(llm_dir, vision_dir, dtype=dtype).to(device).eval()
        processor = CrossVLMProcessor.from_base_models(llm_dir, vision_dir, model.num_image_tokens)
    preprocess = []
    for _ in range(5):
        start = time.perf_counter()
        processor([processor.render([{"role": "user", "content": PROMPT}])], images=[image])
        preprocess.append(time.perf_counter() - start)
    prompt_tokens = _inputs(processor, image, 1, device)["input_ids"].shape[1]
    say(f"bench generate: preset {cfg.preset}, {dtype} on {device}, prompt {prompt_tokens} tokens "
        f"({model.num_image_tokens} image tokens), {cfg.new_tokens} new tokens; variants: {', '.join(cfg.variants)}")
    for name in cfg.variants:
        if name == "static+compile" and device.type != "cuda":
            records.append({"variant": name, "skipped": "transformers compiles generate on CUDA only"})
            say(f"[generate] {name}: skipped (needs CUDA)")
            continue
        try:
            records.append(_run_variant(model, processor, image, name, cfg, device))
        except Exception:  # noqa: BLE001 — one failing variant must not lose the others
            records.append({"variant": name, "error": traceback.format_exc(limit=8)})
            say(f"[generate] {name}: FAILED\n{records[-1]['error']}")
        finally:
            model.llm.__dict__.pop("_cache", None)  # a static cache transformers may keep on the model
            torch._dynamo.reset()
    base = next((r for r in records if r["variant"] == "dynamic" and "ttft_ms" in r), None)
    for r in records:
        if base is not None and "ttft_ms" in r:
            if r["decode_tokens_per_s_bs1"] and base["decode_tokens_per_s_bs1"]:
                r["decode_vs_dynamic"] = r["decode_tokens_per_s_bs1"] / base["decode_tokens_per_s_bs1"]
            r["aggregate_vs_dynamic"] = r["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
    return {
        "benchmark": "generate",
        "preset": cfg.preset,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "prompt_tokens": prompt_tokens,
        "image_tokens": model.num_image_tokens,
        "dtype": str(dtype),
        "preprocess_ms": 1000 * median(preprocess),
        "env": env_info(device),
        "variants": records,
    }
