"""The KV cache: one fixed slot of `max_len` positions per running request, allocated once.

Why slots and not pages: for Qwen3-0.6B a token's keys and values take 28 layers × 2 × 8 heads ×
128 × 2 bytes = 112 KiB, so 256 slots × 2,304 positions take 68 GB, half an H200: every running
request can have its whole context reserved up front. Then there is no block table, no paging
and no preemption: a slot's keys are one contiguous run of (length, heads, dim), which
FlashAttention's variable-length kernel reads in place, each request only as far as its own length
(`seqused_k`). Pages pay off when contexts are long and vary widely (a slot reserves memory a short
request never uses).

Slots are handed out lowest-numbered first, so the running requests sit in the first slots and a
decode step over "the first b slots" covers them all with few holes (a hole is a free slot whose
row is computed and thrown away). The stock `Qwen3ForCausalLM` runs unchanged: this object is
passed as its cache (`cache=` / `past_key_values=`), and each attention layer calls `update`, which
writes the new keys and values where the current `plan` says. `slot_attention`, registered with
transformers' `AttentionInterface`, then reads each sequence's part of the layer's cache:
`flash_varlen` on GPUs that run FlashAttention, else `reference_varlen` (SDPA, masked).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION = "crossvlm_slots"


@dataclass
class Plan:
    """What the forward about to run writes into the cache and what each of its sequences reads.

    Decode: row i is slot i (of the first `rows`), one token each; the tokens are (rows, 1).
    Prefill: the chunks are packed into one row without padding; the tokens are (1, S).
    Either way sequence b's queries are the forward's tokens `cu_q[b]` … `cu_q[b + 1] - 1`, and it
    attends to the first `used[b]` positions of its slot, causally with the queries at the end (its
    last query sees them all).
    """

    slots: torch.Tensor
    """(B,) the slot of each sequence."""
    positions: torch.Tensor
    """Where each token writes: (rows,) in decode, (S,) in prefill."""
    cu_q: torch.Tensor
    """(B + 1,) int32 offsets of the sequences' queries."""
    used: torch.Tensor
    """(B,) int32 positions each sequence reads."""
    max_q: int
    """The most queries of one sequence."""
    kv_len: int
    """Reads stop here: the slot length for FlashAttention, else a bound ≥ every `used` (the
    batched reference kernel reads that many positions of each slot, masked)."""
    token_slots: torch.Tensor | None = None
    """Prefill: (S,) the slot of each token."""
    token_seq: torch.Tensor | None = None
    """Prefill: (S,) the sequence of each token (the reference kernel unpacks by it)."""
    flash: bool = False
    """Attend with FlashAttention's variable-length kernel (else the reference: SDPA)."""

    @property
    def decoding(self) -> bool:
        return self.token_slots is None


class SlotCache:
    """Keys and values of every layer, (slots, length, kv_heads, head_dim) each, and the free slots.

    Positions are the second dimension, so a slot's keys are one contiguous run that FlashAttention's
    variable-length kernel reads in place (a sequence's keys start at `slot · length` in the flattened
    cache and it reads `used` of them)."""

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots + 1, max_len + 1, config.num_key_value_heads, head_dim)  # one spare of each: `scratch`
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_len = slots, max_len
        self.length = max_len + 1
        """Positions per slot as allocated."""
        self.scratch = slots
        """One slot and one position more than requests use: throw-away rows write in the slot (the
        padding of a prefill, `ModelRunner.prefill`), and no read covers a whole dimension, which
        torch.compile would specialize (a compiled step for reads of every length up to `max_len`)."""
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
        """Write a layer's new keys/values (B, kv_heads, T, D) where the plan says; return the layer's
        whole cache, which `slot_attention` reads as the plan says."""
        k_all, v_all, plan = self.keys[layer_idx], self.values[layer_idx], self.plan
        if plan.decoding:  # row i is slot i
            rows = torch.arange(key.shape[0], device=key.device)
            k_all[rows, plan.positions] = key[:, :, 0]  # (rows, H, D)
            v_all[rows, plan.positions] = value[:, :, 0]
        else:  # one packed row
            k_all[plan.token_slots, plan.positions] = key[0].transpose(0, 1)  # (S, H, D)
            v_all[plan.token_slots, plan.positions] = value[0].transpose(0, 1)
        return k_all, v_all


def flash_varlen(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan,
                 scale: float | None) -> torch.Tensor:
    """FlashAttention's variable-length forward (the build inside torch), reading the cache in place:
    sequence b's keys start at `slot · length` of the flattened cache and only `used[b]` are read
    (`seqused_k`); causal attention is aligned at the end, as a cache needs. Grouped key/value heads
    are the kernel's own. query (S, Hq, D) packed; returns (S, Hq, D)."""
    slots, length = keys.shape[:2]
    starts = (plan.slots * length).to(torch.int32)
    cu_k = torch.cat([starts, starts.new_full((1,), slots * length)])  # the last entry is not read
    return _flash_forward(query, keys.flatten(0, 1), values.flatten(0, 1), plan.cu_q, cu_k, plan.max_q, length,
                          0.0, True, False, scale=scale, seqused_k=plan.used)[0]


_flash_forward = torch.ops.aten._flash_attention_forward
"""The kernel (the op `varlen_attn` calls; its `seqused_k` and grouped heads reach back to torch 2.5,
where `varlen_attn` itself takes them only from 2.12)."""


def reference_varlen(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan,
                     scale: float | None) -> torch.Tensor:
    """What `flash_varlen` computes, with `scaled_dot_product_attention` on the first `kv_len`
    positions of each sequence's slot and a mask: for CPUs and for GPUs or dtypes FlashAttention
    does not take. query (S, Hq, D) packed; returns (S, Hq, D)."""
    hq, d = query.shape[1:]
    hkv = keys.shape[2]
    # Decode reads the first B slots (a view); a prefill's slots are gathered (a copy).
    pick = slice(0, len(plan.slots)) if plan.decoding else plan.slots
    k = keys[pick, :plan.kv_len].transpose(1, 2)  # (B, Hkv, K, D)
    v = values[pick, :plan.kv_len].transpose(1, 2)
    seen = torch.arange(plan.kv_len, device=query.device)
    if plan.decoding:
        # One query per sequence: the query heads of a group become the query rows of their key/value
        # head, so the keys are read as they are, not repeated per query head.
        b = query.shape[0]
        mask = (seen[None, :] < plan.used[:, None])[:, None, None]  # (B, 1, 1, K)
        out = F.scaled_dot_product_attention(query.reshape(b, hkv, hq // hkv, d), k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, hq, d)
    # Unpack into (B, max_q) query rows, right-padded; query t of sequence b sits at position
    # used[b] - n_b + t and sees the positions up to it.
    seq = plan.token_seq
    col = torch.arange(query.shape[0], device=query.device) - plan.cu_q[seq]
    q = query.new_zeros(len(plan.slots), plan.max_q, hq, d)
    q[seq, col] = query
    n = (plan.cu_q[1:] - plan.cu_q[:-1])[:, None, None]  # (B, 1, 1)
    at = plan.used[:, None, None] - n + torch.arange(plan.max_q, device=query.device)[None, :, None]  # (B, T, 1)
    mask = (seen[None, None, :] <= at)[:, None]  # (B, 1, T, K)
    if hkv != hq:
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale)  # (B, Hq, T, D)
    return out.transpose(1, 2)[seq, col]


def slot_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """The attention of an LLM run by the engine; returns (B, T, Hq, D).

    query (B, Hq, T, D). With the engine's `slot_plan` (passed down through the model's keyword
    arguments), key/value are a layer's whole cache and each sequence reads its own part
    (`flash_varlen`, or `reference_varlen`). Without one (the same model run by something else:
    `generate()`), this is plain attention: key/value (B, Hkv, K, D), mask bool (B, 1, T, K) or
    None (causal).
    """
    plan = kwargs.get("slot_plan")
    if plan is not None:
        b, hq, t, d = query.shape
        attend = flash_varlen if plan.flash else reference_varlen
        out = attend(query.transpose(1, 2).reshape(b * t, hq, d), key, value, plan, scaling)
        return out.view(b, t, hq, d), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = attention_mask is None and query.shape[2] > 1
    if causal and key.shape[2] > query.shape[2]:
        key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal,
                                         dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def flash_available(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `flash_varlen` runs here and agrees with `reference_varlen`, tried once on a small cache
    (the kernel takes CUDA GPUs of the Ampere generation or later, in bf16 or fp16)."""
    g = torch.Generator(device=device).manual_seed(0)
    keys, values = (torch.randn(3, 96, kv_heads, head_dim, generator=g, device=device, dtype=dtype) for _ in "kv")
    query = torch.randn(7, heads, head_dim, generator=g, device=device, dtype=dtype)
    plan = Plan(slots=torch.tensor([2, 0], device=device), positions=torch.zeros(7, device=device),
                cu_q=torch.tensor([0, 5, 7], device=device, dtype=torch.int32),
                used=torch.tensor([40, 90], device=device, dtype=torch.int32), max_q=5, kv_len=96,
                token_slots=torch.tensor([2] * 5 + [0] * 2, device=device),
                token_seq=torch.tensor([0] * 5 + [1] * 2, device=device))
    try:
        fast = flash_varlen(query, keys, values, plan, None)
    except RuntimeError:  # no kernel for this device or dtype (NotImplementedError is one too)
        return False
    return torch.allclose(fast.float(), reference_varlen(query, keys, values, plan, None).float(), atol=2e-2, rtol=2e-2)


def use_slot_attention(llm) -> None:
    """Make `llm` (a stock Qwen3ForCausalLM) attend through `slot_attention`, via transformers' registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, slot_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks for callers that let transformers make them
    llm.set_attn_implementation(ATTENTION)
