"""The engine's decode step alone on a GPU: its time per step at a batch and a context length, and its
kernels (docs/PERFORMANCE.md, "Generation engine"). The step as the engine replays it (its CUDA
graph, FlashAttention's paged kernel where it runs), every row given blocks of its own up to the same
context, without
`--compile` (the matrix products and attention kernels are the same; compiling fuses the
elementwise ones). Usage: python3 bench/decode_step.py MODELS_DIR [ROWS,...] [CONTEXT,...]
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from crossvlm.engine import Engine, EngineConfig
from crossvlm.model.modeling import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor


def main() -> None:
    models = sys.argv[1]
    rows_list = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,64,256").split(",")]
    contexts = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1100").split(",")]
    cuda = torch.cuda.is_available()  # (a CPU runs it too, slowly: a check of the script)
    model = CrossVLM.from_base_models(f"{models}/llm", f"{models}/vision", dtype=torch.bfloat16 if cuda else None)
    model = model.to("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokenizer = CrossVLMProcessor.from_base_models(f"{models}/llm", f"{models}/vision", model.num_image_tokens).tokenizer
    engine = Engine(model, tokenizer, {tokenizer.eos_token_id}, EngineConfig(slots=max(rows_list), max_len=2304))
    runner = engine.runner
    print(f"attention: {'flash' if runner.flash else 'sdpa'}; slots {engine.slots}")
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
            runner.position[:rows] = context
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    runner.decode(rows, context + 6, **kinds)
                sync()
            print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                            row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
