"""The KV cache: blocks of `block_size` positions, allocated once, handed to requests as they grow.

Memory goes by tokens in use, not by the longest possible request: for Qwen3-0.6B a token's keys
and values take 28 layers × 2 × 8 heads × 128 × 2 bytes = 112 KiB, and a request holds
⌈context / block_size⌉ blocks (`blocks.BlockManager` keeps the books). A sequence's keys are found
through its block table, a row of block ids: position p lives at offset p mod `block_size` of
block `table[p // block_size]`. FlashAttention's variable-length kernel takes the block table and
reads the blocks in place (`flash_paged`, blocks a multiple of 256 positions, the kernel's page
size, with a torch whose build takes a block table); a decode step can also read them in place with
the Triton kernel of `paged_decode`; elsewhere `reference_paged` gathers the blocks a step reads and
runs SDPA, masked.

The stock `Qwen3ForCausalLM` runs unchanged: this object is passed as its cache (`cache=` /
`past_key_values=`), and each attention layer calls `update`, which writes the new keys and values
where the current `plan` says (`Plan.write_at`); the attention function `paged_attention`, which
the engine registers for its model (`use_engine_attention`), then reads what the plan says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLASH_BLOCK = 256
"""FlashAttention's paged kernel takes blocks of a multiple of this many positions."""


@dataclass
class Plan:
    """What the forward about to run writes into the cache and what each of its sequences reads.

    Decode: one token per row, the tokens are (rows, 1). Prefill: the chunks are packed into one row
    without padding, the tokens are (1, S). Either way sequence b's queries are the forward's tokens
    `cu_q[b]` … `cu_q[b + 1] - 1`, and it attends to its first `used[b]` positions, causally with the
    queries at the end (its last query sees them all).
    """

    block_table: torch.Tensor
    """(B, W) int32: the blocks of each sequence in order (unused entries: the scratch block)."""
    write_at: torch.Tensor
    """(tokens,) int64: each token's place in the flattened cache (block · block_size + offset)."""
    cu_q: torch.Tensor
    """(B + 1,) int32 offsets of the sequences' queries."""
    used: torch.Tensor
    """(B,) int32 positions each sequence reads."""
    max_q: int
    """The most queries of one sequence."""
    kv_len: int
    """Reads stop here, a multiple of the block size: the table's whole width for FlashAttention,
    else a bound ≥ every `used` (the reference kernel gathers that many positions of each sequence)."""
    token_seq: torch.Tensor | None = None
    """Prefill: (S,) the sequence of each token (the reference kernel unpacks by it); None in decode."""
    flash: bool = False
    """Attend with FlashAttention's variable-length kernel (else the reference: SDPA)."""
    triton_decode: bool = False
    """Decode steps attend with the Triton kernel of `paged_decode` (prefills as `flash` says)."""

    @property
    def decoding(self) -> bool:
        return self.token_seq is None


def write_positions(block_table: torch.Tensor, seq: torch.Tensor | None, positions: torch.Tensor,
                    block_size: int) -> torch.Tensor:
    """(tokens,) places in the flattened cache of tokens at `positions` of sequences `seq` (None: token i
    is sequence i), on the device."""
    rows = torch.arange(len(positions), device=positions.device) if seq is None else seq
    return block_table[rows, positions // block_size].long() * block_size + positions % block_size


class PagedCache:
    """Keys and values of every layer, (blocks, block_size, kv_heads, head_dim) each."""

    def __init__(self, config, blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (blocks, block_size, config.num_key_value_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.blocks, self.block_size = blocks, block_size
        self.plan: Plan | None = None

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8

    def clear(self, blocks: list[int]) -> None:
        """Zero blocks' keys and values: after a failed request they may not be finite, and attention
        weighs a masked key by zero, which a NaN survives (0 · NaN = NaN)."""
        if not blocks:
            return
        index = torch.tensor(blocks, device=self.keys[0].device)
        for k, v in zip(self.keys, self.values):
            k.index_fill_(0, index, 0)
            v.index_fill_(0, index, 0)

    # -- what the attention layers call ------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write a layer's new keys/values (B, kv_heads, T, D) where the plan says; return the layer's
        whole cache, which `paged_attention` reads as the plan says."""
        k_all, v_all, plan = self.keys[layer_idx], self.values[layer_idx], self.plan
        new_k = key[:, :, 0] if plan.decoding else key[0].transpose(0, 1)  # (tokens, H, D)
        new_v = value[:, :, 0] if plan.decoding else value[0].transpose(0, 1)
        k_all.view(-1, *k_all.shape[2:])[plan.write_at] = new_k
        v_all.view(-1, *v_all.shape[2:])[plan.write_at] = new_v
        return k_all, v_all


def flash_paged(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan,
                scale: float | None) -> torch.Tensor:
    """FlashAttention's variable-length forward (the build inside torch) reading the blocks in place
    through the block table, each sequence only `used[b]` positions (`seqused_k`); causal attention is
    aligned at the end, as a cache needs. Grouped key/value heads are the kernel's own. query
    (S, Hq, D) packed; returns (S, Hq, D)."""
    cu_k = F.pad(plan.used.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,): the kernel wants it; seqused_k rules
    return _flash_forward(query, keys, values, plan.cu_q, cu_k, plan.max_q, plan.kv_len, 0.0, True, False,
                          scale=scale, seqused_k=plan.used, block_table=plan.block_table)[0]


_flash_forward = torch.ops.aten._flash_attention_forward
"""The kernel (the op `varlen_attn` calls), with `seqused_k`, grouped heads and a block table."""


def reference_paged(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan,
                    scale: float | None) -> torch.Tensor:
    """What `flash_paged` computes, with `scaled_dot_product_attention` on the first `kv_len` positions
    of each sequence (its blocks gathered) and a mask: for CPUs and for GPUs or dtypes FlashAttention
    does not take. query (S, Hq, D) packed; returns (S, Hq, D)."""
    hq, d = query.shape[1:]
    hkv = keys.shape[2]
    b = len(plan.used)
    seen = torch.arange(plan.kv_len, device=query.device)
    # Each sequence's first kv_len positions in the flattened cache: (B, K). (Indexing the blocks would make
    # a dimension of kv_len / block_size, often 1, which torch.compile specializes.)
    bs = keys.shape[1]
    flat = plan.block_table[:, seen // bs].long() * bs + seen % bs  # (B, K)
    k = keys.flatten(0, 1)[flat].transpose(1, 2)  # (B, Hkv, K, D)
    v = values.flatten(0, 1)[flat].transpose(1, 2)
    if plan.decoding:
        # One query per sequence: the query heads of a group become the query rows of their key/value
        # head, so the keys are read as they are, not repeated per query head.
        mask = (seen[None, :] < plan.used[:, None])[:, None, None]  # (B, 1, 1, K)
        out = F.scaled_dot_product_attention(query.reshape(b, hkv, hq // hkv, d), k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, hq, d)
    # Unpack into (B, max_q) query rows, right-padded; query t of sequence b sits at position
    # used[b] - n_b + t and sees the positions up to it.
    seq = plan.token_seq
    col = torch.arange(query.shape[0], device=query.device) - plan.cu_q[seq]
    q = query.new_zeros(b, plan.max_q, hq, d)
    q[seq, col] = query
    n = (plan.cu_q[1:] - plan.cu_q[:-1])[:, None, None]  # (B, 1, 1)
    at = plan.used[:, None, None] - n + torch.arange(plan.max_q, device=query.device)[None, :, None]  # (B, T, 1)
    mask = (seen[None, None, :] <= at)[:, None]  # (B, 1, T, K)
    if hkv != hq:
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale)  # (B, Hq, T, D)
    return out.transpose(1, 2)[seq, col]


def flash_available(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `flash_paged` runs here and agrees with `reference_paged`, tried once on a small cache
    (the kernel takes CUDA GPUs of the Ampere generation or later, in bf16 or fp16, and a torch whose op
    takes a block table)."""
    g = torch.Generator(device=device).manual_seed(0)
    keys, values = (torch.randn(4, FLASH_BLOCK, kv_heads, head_dim, generator=g, device=device, dtype=dtype) for _ in "kv")
    query = torch.randn(7, heads, head_dim, generator=g, device=device, dtype=dtype)
    i32 = dict(device=device, dtype=torch.int32)
    plan = Plan(block_table=torch.tensor([[3, 1], [2, 0]], **i32), write_at=torch.zeros(7, device=device),
                cu_q=torch.tensor([0, 5, 7], **i32), used=torch.tensor([300, 90], **i32), max_q=5,
                kv_len=2 * FLASH_BLOCK, token_seq=torch.tensor([0] * 5 + [1] * 2, device=device))
    try:
        fast = flash_paged(query, keys, values, plan, None)
    except (RuntimeError, TypeError):  # no kernel for this device or dtype, or an op without a block table
        return False
    return torch.allclose(fast.float(), reference_paged(query, keys, values, plan, None).float(), atol=2e-2, rtol=2e-2)


def triton_decode_available(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                            block_size: int, *, check_only: bool = False) -> bool:
    """Whether `paged_decode.paged_decode` takes this case (`paged_decode.supports`) and, tried once on
    a small cache of this shape (rows of several lengths, an idle one; one split and two), agrees with
    `reference_paged`: a Triton that cannot build the kernel here says no at start-up, not at the
    first request. `check_only` skips the first condition (Triton's interpreter on a CPU, in tests)."""
    from crossvlm.engine.paged_decode import paged_decode, supports

    if not check_only and not supports(device, dtype, heads, kv_heads, head_dim, block_size):
        return False
    g = torch.Generator(device=device).manual_seed(0)
    width = 2
    keys, values = (torch.randn(6, block_size, kv_heads, head_dim, generator=g, device=device, dtype=dtype)
                    for _ in "kv")
    query = torch.randn(3, heads, head_dim, generator=g, device=device, dtype=dtype)
    i32 = dict(device=device, dtype=torch.int32)
    table = torch.tensor([[0, 0], [5, 2], [3, 1]], **i32)
    used = torch.tensor([1, width * block_size, block_size + 3], **i32)
    plan = Plan(table, torch.zeros(3, device=device), torch.arange(4, **i32), used, max_q=1, kv_len=width * block_size)
    expected = reference_paged(query, keys, values, plan, None).float()
    try:
        return all(torch.allclose(paged_decode(query, keys, values, table, used, plan.kv_len, None, splits=n).float(),
                                  expected, atol=2e-2, rtol=2e-2) for n in (1, 2))
    except Exception:  # noqa: BLE001 — Triton's compile errors have many types
        return False


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention of an LLM step run by the engine (`engine_plan` passed down through the model's
    keyword arguments): key/value are a layer's whole cache, each sequence reads its blocks
    (`flash_paged`, or `reference_paged`). query (B, Hq, T, D); returns (B, T, Hq, D)."""
    plan = kwargs["engine_plan"]
    b, hq, t, d = query.shape
    packed = query.transpose(1, 2).reshape(b * t, hq, d)
    if plan.decoding and plan.triton_decode:
        from crossvlm.engine.paged_decode import paged_decode

        out = paged_decode(packed, key, value, plan.block_table, plan.used, plan.kv_len, scaling)
    else:
        out = (flash_paged if plan.flash else reference_paged)(packed, key, value, plan, scaling)
    return out.view(b, t, hq, d), None


def use_engine_attention(llm) -> None:
    """Route `llm`'s attention through `paged_attention` when the engine runs it (a call with an
    `engine_plan`) and through the implementation it had otherwise: other callers of the same model
    (`generate()`, training) keep their kernel and their masks. The name registered with transformers'
    registries is per implementation (`crossvlm_engine+sdpa`, say), not one switch for the process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = llm.config._attn_implementation or "eager"
    if current.startswith("crossvlm_engine+"):
        return  # an engine was built on this model before
    name = f"crossvlm_engine+{current}"
    if current == "eager":
        from transformers.models.qwen3.modeling_qwen3 import eager_attention_forward as other
    else:
        other = ALL_ATTENTION_FUNCTIONS[current]

    def attention(module, query, key, value, attention_mask, **kwargs):
        if kwargs.get("engine_plan") is not None:
            return paged_attention(module, query, key, value, attention_mask, **kwargs)
        return other(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    llm.set_attn_implementation(name)
