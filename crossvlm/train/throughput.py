"""What a run reports about its speed: samples/s, real tokens/s, padding share and MFU.

Counts come from the collator on the host (no GPU sync): `lengths` (every sample's tokens),
`input_ids` (the token slots the model runs, padding included), `num_tokens` (labelled tokens) and
the images. FLOPs follow the model's FLOP count (crossvlm.model.flops: matmuls only, padding no
work, attention within each sample); MFU divides them by the window's wall time and the GPU's bf16
peak, and is left out where that peak is unknown (CPUs, GPUs not in `GPU_PEAKS`).
"""

from __future__ import annotations

import time

import torch

from crossvlm.model.flops import batch_flops, peak_flops

# The per-step counts, in the order `step_counts` returns them (summed over micro-batches and ranks).
COUNTS = ("labelled", "tokens", "samples", "slots", "flops")


def llm_grad_of(trainable_llm: str) -> str:
    """How the FLOP model counts the LLM's backward: full training, or gradients passing through it.

    LoRA and last-n training count as "through" (the adapters' and last layers' weight gradients are
    left out, so MFU is slightly under-counted there).
    """
    return "trained" if trainable_llm == "full" else "through"


def step_counts(batches: list[dict], config, llm_grad: str) -> list[float]:
    """COUNTS of one step's micro-batches on this process."""
    labelled = tokens = samples = slots = flops = 0.0
    for b in batches:
        lengths = b.get("lengths") or []
        images = len(b["pixel_values"]) if b.get("pixel_values") is not None else 0
        labelled += int(b["num_tokens"])
        tokens += sum(lengths)
        samples += int(b.get("num_samples", len(lengths)))
        slots += b["input_ids"].numel()
        flops += batch_flops(config, lengths, int(b["num_tokens"]), images, llm_grad)["total"]
    return [labelled, tokens, samples, slots, flops]


class SpeedWindow:
    """Accumulates step counts between two log lines and turns them into rates."""

    def __init__(self, device: torch.device, world_size: int = 1):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "a CPU"
        peak = peak_flops(name) if device.type == "cuda" else None
        self.peak = None if peak is None else peak * world_size
        self.note = None if peak is not None else f"MFU not reported: the bf16 peak of {name} is not known"
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(COUNTS, 0.0)
        self.waited = 0.0
        self.start = time.perf_counter()

    def next_batches(self, batches, count: int) -> list[dict]:
        """The next `count` batches, the time spent waiting for them counted as data wait."""
        start = time.perf_counter()
        out = [next(batches) for _ in range(count)]
        self.waited += time.perf_counter() - start
        return out

    def add(self, counts: dict) -> None:
        for key in COUNTS:
            self.totals[key] += counts[key]

    def rates(self) -> dict:
        """samples_per_s, tokens_per_s (real tokens), padding_share, labelled_share (of the real tokens), mfu
        (None without a known peak), data_wait_share (of the window, waiting for the loader) and window_s."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        t = self.totals
        return {
            "samples_per_s": t["samples"] / elapsed,
            "tokens_per_s": t["tokens"] / elapsed,
            "padding_share": 1.0 - t["tokens"] / t["slots"] if t["slots"] else 0.0,
            "labelled_share": t["labelled"] / t["tokens"] if t["tokens"] else 0.0,
            "mfu": t["flops"] / (elapsed * self.peak) if self.peak else None,
            "data_wait_share": self.waited / elapsed,
            "window_s": elapsed,
        }
