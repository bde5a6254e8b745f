"""The engine's decode step alone on a GPU: its time per step at a batch and a context length, and its
kernels (docs/PERFORMANCE.md, "Generation engine"). The step as the engine replays it (its CUDA
graph, FlashAttention's paged kernel where it runs), every row given blocks of its own up to the same
context, without
`--compile` (the matrix products and attention kernels are the same; compiling fuses the
elementwise ones). Then one layer's attention alone, the same kernel on the same blocks: its effective read bandwidth.
Usage: python3 bench/decode_step.py MODELS_DIR [ROWS,...] [CONTEXT,...] [ATTENTION]
(ATTENTION: the engine's, auto by default; flash, triton or sdpa to compare them on one machine.)
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from crossvlm.engine import Engine, EngineConfig
from crossvlm.engine.cache import Plan, flash_paged, reference_paged
from crossvlm.engine.paged_decode import paged_decode
from crossvlm.model.modeling import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor


def main() -> None:
    models = sys.argv[1]
    rows_list = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,64,256").split(",")]
    contexts = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1100").split(",")]
    attention = sys.argv[4] if len(sys.argv) > 4 else "auto"
    cuda = torch.cuda.is_available()  # (a CPU runs it too, slowly: a check of the script)
    model = CrossVLM.from_base_models(f"{models}/llm", f"{models}/vision", dtype=torch.bfloat16 if cuda else None)
    model = model.to("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokenizer = CrossVLMProcessor.from_base_models(f"{models}/llm", f"{models}/vision", model.num_image_tokens).tokenizer
    engine = Engine(model, tokenizer, {tokenizer.eos_token_id}, EngineConfig(slots=max(rows_list), max_len=2304,
                                                                              attention=attention))
    runner = engine.runner
    print(f"attention: {engine.attention}; slots {engine.slots}")
    kinds = dict(greedy=True, penalty=False, min_tokens=False)
    per_row = engine.blocks.needed(max(contexts) + 60)
    table = torch.arange(1, 1 + max(rows_list) * per_row, dtype=torch.int32).view(-1, per_row)  # distinct blocks
    runner.block_table[:, :per_row] = table.to(runner.block_table.device)
    runner.live[:] = True
    for rows in rows_list:
        for context in contexts:
            runner.position[:rows] = context
            runner.decode(rows, context + 1, **kinds)  # records the graph of this rung
            steps = 50
            runner.position[:rows] = context
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                runner.decode(rows, context + steps + 1, **kinds)
            sync()
            ms = (time.perf_counter() - start) * 1000 / steps
            kv_gb = rows * (context + steps / 2) * engine.cache.bytes_per_token(model.config.text_config, model.llm.dtype) / 1e9
            print(f"rows {rows}, context {context}: {ms:.3f} ms a step ({rows / ms * 1000:.0f} tok/s), "
                  f"KV read {kv_gb:.2f} GB a step = {kv_gb / ms:.2f} TB/s")
            attention_alone(engine, rows, context, sync)
            runner.position[:rows] = context
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    runner.decode(rows, context + 6, **kinds)
                sync()
            print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                            row_limit=14, max_name_column_width=70))


def attention_alone(engine, rows: int, context: int, sync) -> None:
    """One layer's decode attention alone, as the step runs it (the same kernel, plan and blocks), timed
    over 100 calls: its effective read bandwidth is the keys and values the rows hold over its time."""
    runner, cache = engine.runner, engine.cache
    keys, values = cache.keys[0], cache.values[0]
    text = engine.model.config.text_config
    i32 = dict(device=keys.device, dtype=torch.int32)
    plan = Plan(runner.block_table[:rows], torch.zeros(rows, device=keys.device, dtype=torch.long),
                torch.arange(rows + 1, **i32), torch.full((rows,), context + 1, **i32), max_q=1,
                kv_len=runner.bucket(rows, context + 1)[1], flash=runner.flash)
    query = torch.randn(rows, text.num_attention_heads, keys.shape[-1], device=keys.device, dtype=keys.dtype)
    attend = flash_paged if runner.flash else reference_paged
    if runner.triton_decode:
        def attend(q, k, v, plan, scale):
            return paged_decode(q, k, v, plan.block_table, plan.used, plan.kv_len, scale)
    attend(query, keys, values, plan, None)
    sync()
    start = time.perf_counter()
    for _ in range(100):
        attend(query, keys, values, plan, None)
    sync()
    us = (time.perf_counter() - start) * 1e6 / 100
    gb = rows * (context + 1) * 2 * keys.shape[2] * keys.shape[3] * keys.element_size() / 1e9
    print(f"  attention alone, one layer: {us:.1f} us for {gb * 1000:.1f} MB of keys and values = {gb / us * 1e3:.2f} TB/s")


if __name__ == "__main__":
    main()
