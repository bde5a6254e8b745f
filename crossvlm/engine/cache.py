"""The KV cache: one fixed slot of `max_len` positions per running request, allocated once.

Why slots and not pages: for Qwen3-0.6B a token's keys and values take 28 layers × 2 × 8 heads ×
128 × 2 bytes = 112 KiB, so 256 slots × 2,304 positions take 68 GB, half an H200: every running
request can have its whole context reserved up front. Then there is no block table, no paging
kernel and no preemption: attention reads a contiguous (slots, heads, length, dim) view that stock
`scaled_dot_product_attention` takes as it is. Pages pay off when contexts are long and vary
widely (a slot reserves memory a short request never uses); they need a paged attention kernel.

Slots are handed out lowest-numbered first, so the running requests sit in the first slots and a
decode step over "the first b slots" covers them all with few holes (a hole is a free slot whose
row is computed and thrown away). The stock `Qwen3ForCausalLM` runs unchanged: this object is
passed as its cache (`cache=` / `past_key_values=`), and each attention layer calls `update`, which
writes the new keys and values where the current `plan` says and returns the keys and values that
layer attends to. `slot_attention` is registered with transformers' `AttentionInterface` so a
one-token query reads the cache once per key/value head, not once per query head (see there).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION = "crossvlm_slots"


@dataclass
class Plan:
    """Where the forward about to run writes and what it reads.

    Decode (`slots` None): row i is slot i of the first `rows` slots, writing one token at
    `positions[i]` (rows,), attending to the first `kv_len` positions. Prefill: row i is slot
    `slots[i]` (n,), writing its tokens at `positions[i]` (n, T), attending to positions < `kv_len`.
    """

    positions: torch.Tensor
    kv_len: int
    rows: int = 0
    slots: torch.Tensor | None = None


class SlotCache:
    """Keys and values of every layer, (slots, kv_heads, max_len, head_dim) each, and the free slots."""

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 spare: bool = False):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots + spare, config.num_key_value_heads, max_len + spare, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_len = slots, max_len
        self.scratch = slots if spare else None
        """With `spare`, one slot and one position more than requests use: throw-away rows write in the
        slot (ModelRunner.prefill), and no read covers a whole dimension, which torch.compile would
        specialize (a compiled step for reads of every length up to `max_len`)."""
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self.plan: Plan | None = None

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def clear(self, slot: int) -> None:
        """Zero a slot's keys and values: after a failed request they may not be finite, and attention
        weighs a masked key by zero, which a NaN survives (0 · NaN = NaN)."""
        for k, v in zip(self.keys, self.values):
            k[slot].zero_()
            v[slot].zero_()

    # -- what the attention layers call ------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write a layer's new keys/values (rows, kv_heads, T, D) and return what it attends to."""
        k_all, v_all, plan = self.keys[layer_idx], self.values[layer_idx], self.plan
        if plan.slots is None:  # decode: row i is slot i; a view, nothing copied
            rows = torch.arange(plan.rows, device=key.device)
            k_all[rows, :, plan.positions] = key[:, :, 0]  # (rows, H, D)
            v_all[rows, :, plan.positions] = value[:, :, 0]
            return k_all[:plan.rows, :, :plan.kv_len], v_all[:plan.rows, :, :plan.kv_len]
        where = (plan.slots[:, None], slice(None), plan.positions)  # indexes (n, T, H, D)
        k_all[where] = key.transpose(1, 2)
        v_all[where] = value.transpose(1, 2)
        return k_all[plan.slots, :, :plan.kv_len], v_all[plan.slots, :, :plan.kv_len]  # (n, H, kv_len, D)


def slot_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention for grouped key/value heads; returns (B, T, Hq, D).

    query (B, Hq, T, D), key/value (B, Hkv, K, D), mask bool (B, 1, T, K) or None (causal). For one
    query token the Hq / Hkv query heads of a group become the query rows of their key/value head,
    so the cache is read as it is; repeating keys and values per query head (what transformers'
    SDPA path does when a mask is given) would copy the whole cache view in every layer and step.
    """
    b, hq, t, d = query.shape
    groups = hq // key.shape[1]
    if t == 1 and groups > 1:
        q = query.reshape(b, key.shape[1], groups, d)  # (B, Hkv, groups, D)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, 1, hq, d), None
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = attention_mask is None and t > 1
    if causal and key.shape[2] > t:
        key, value = key[:, :, :t], value[:, :, :t]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal,
                                         dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_slot_attention(llm) -> None:
    """Make `llm` (a stock Qwen3ForCausalLM) attend through `slot_attention`, via transformers' registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, slot_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks for callers that let transformers make them
    llm.set_attn_implementation(ATTENTION)
