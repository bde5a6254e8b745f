"""What the benchmarks can run, by name: plain data, importable without torch (the CLI's help lists it)."""

TRAIN_VARIANTS = ("ours", "mlp", "naive")
"""ours: crossvlm's design in the real loop; mlp: the loop with the MLP projector; naive: bench/naive.py."""

LEVERS = {
    "compile": "+ torch.compile of the decoder layers, the projector and the vision layers (run.compile)",
    "cudagraphs": "+ compiled with mode reduce-overhead: each compiled layer replayed as a CUDA graph",
    "batch2x": "+ twice the batch size per process",
    "bf16-allreduce": "+ under DDP, gradients all-reduced in bfloat16 (run.ddp_bf16_grads)",
    "chunked-ce": "+ LM head and cross-entropy in chunks of labelled rows, logits recomputed in backward",
    "eager-ce": "- under --compile, the LM head and cross-entropy left eager (float32 logits written out)",
    "no-bf16-frozen": "- frozen weights kept in float32 (autocast re-casts them every forward)",
    "full-logits": "- logits over every position and the whole vocabulary, then cross-entropy (HF-style)",
    "no-cudnn-attention": "+ scaled_dot_product_attention without its cuDNN backend (flash or memory-efficient instead)",
    "unfused-adamw": "- AdamW without fused=True (torch's default foreach implementation)",
}
"""Extra `ours` variants of `bench train`, one lever each: "+" adds, "-" takes away."""

DATA_VARIANTS = {
    "packed": ("auto", "auto"),
    "flex": (True, "flex_attention"),
    "varlen": (True, "varlen"),
    "sdpa": (True, "sdpa"),
    "padded": (False, "auto"),
    "fixed": None,
}
"""(data.packing, model.attention) of each `bench train --data` variant (crossvlm.bench.realdata);
`fixed` is the fixed-length reference."""

GENERATE_VARIANTS = {
    "dynamic": {},
    "static": {"cache_implementation": "static", "disable_compile": True},
    "static+compile": {"cache_implementation": "static"},
    "engine": {"engine": "crossvlm.engine"},
    "engine+compile": {"engine": "crossvlm.engine", "compile": True},
}
"""`generate()` options of each `bench generate` variant (transformers compiles a static cache on CUDA);
`engine` is crossvlm's generation engine, what `serve`, `chat`, `eval` and `crossvlm.load` run: slot KV
cache, continuous batching, decode steps replayed as CUDA graphs, sampling on the device; `engine+compile`
the same with its steps fused by torch.compile first (`crossvlm serve --compile`)."""

DEFAULT_GENERATE_VARIANTS = ("dynamic", "static", "static+compile", "engine")
"""What `bench generate` runs unless told."""
