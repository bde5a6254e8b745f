"""A decode-attention kernel in Triton that reads the paged KV cache in place (issue 31, item 4).

A decode step has one query per sequence, so the work per key/value head is tiny: the kernel gives
each (sequence, key/value head) one program whose query rows are the query heads of that group
(Qwen3-0.6B: 2 of 16), padded to the 16 rows a tensor-core product takes, and walks the sequence's
blocks through its block table, tile by tile, with an online softmax. Nothing is gathered: the keys
and values are read once, where they lie. Where the batch is small (fewer programs than twice the
GPU's multiprocessors) the positions are split among several programs per head (split-KV, "flash
decoding") and their partial results are merged by their log-sum-exp.

It stands in for FlashAttention's paged kernel where torch's build lacks the block table (torch
2.11), and it is what `EngineConfig.attention = "triton"` selects. Prefill stays with the other
kernels (it is compute-bound; gathering its blocks costs little beside it). Triton comes with torch's
CUDA builds; on a machine without it, or without a GPU, the engine uses another kernel.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton
    triton = None

GROUP_ROWS = 16
"""Query rows of a program: a group's query heads, padded (tensor-core products take ≥ 16 rows)."""


def tile_for(block_size: int) -> int | None:
    """Positions per tile: the largest of 64, 32, 16 that divides the block size (a tile never crosses
    a block); None where none does."""
    return next((n for n in (64, 32, 16) if block_size % n == 0), None)


def splits_for(programs: int, kv_len: int, tile: int, device: torch.device) -> int:
    """How many programs share a head's positions: enough to give the GPU twice as many programs as it
    has multiprocessors, each still a few tiles long."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(-(-2 * sms // programs), kv_len // (4 * tile)))


if triton is not None:
    @triton.jit
    def _decode_kernel(Q, K, V, Table, Used, Out, Lse, scale, split_len,
                       stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb,
                       stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                       GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                       TILE: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        used = tl.load(Used + b)
        start = s * split_len
        end = tl.minimum(start + split_len, used)
        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, TILE)
        heads = h * GROUP + rows
        live = rows < GROUP
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=live[:, None], other=0.0)
        top = tl.full([ROWS], -1.0e30, tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        for pos in range(start, end, TILE):
            block = tl.load(Table + b * stride_tb + pos // BLOCK).to(tl.int64)
            inside = pos + cols < end
            at = block * stride_kb + (pos % BLOCK + cols)[:, None] * stride_kp + h * stride_kh + dims[None, :]
            k = tl.load(K + at, mask=inside[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (ROWS, TILE)
            scores = tl.where(inside[None, :], scores, -1.0e30)
            new_top = tl.maximum(top, tl.max(scores, 1))
            p = tl.exp(scores - new_top[:, None])
            keep = tl.exp(top - new_top)
            total = total * keep + tl.sum(p, 1)
            v = tl.load(V + at, mask=inside[:, None], other=0.0)
            acc = acc * keep[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            top = new_top
        total = tl.maximum(total, 1.0e-30)  # an empty split: weight exp(-1e30) in the merge, output 0
        out = acc / total[:, None]
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + dims[None, :], out,
                 mask=live[:, None])
        tl.store(Lse + b * stride_lb + heads * stride_lh + s, top + tl.log(total), mask=live)


def supports(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
             block_size: int) -> bool:
    """Whether the kernel takes this case: Triton, a CUDA GPU, bf16/fp16, a head size of a power of two
    ≥ 16, at most 16 query heads per key/value head, blocks that whole tiles fit (whether it also
    builds and agrees with the reference here: `cache.triton_decode_available`)."""
    return (triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0
            and heads // kv_heads <= GROUP_ROWS and tile_for(block_size) is not None)


def paged_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_table: torch.Tensor,
                 used: torch.Tensor, kv_len: int, scale: float | None, splits: int | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its first `used[b]` positions, read through its
    `block_table` row. query (B, Hq, D); keys/values (blocks, block_size, Hkv, D), a layer's cache;
    `kv_len` bounds every `used` (it sets the split-KV partition, fixed for a CUDA graph); `splits`
    overrides the partition's count (`splits_for`). Returns (B, Hq, D)."""
    b, hq, d = query.shape
    block_size, hkv = keys.shape[1], keys.shape[2]
    tile = tile_for(block_size)
    assert keys.stride() == values.stride(), "keys and values share one layout"
    splits = splits or splits_for(b * hkv, kv_len, tile, query.device)
    split_len = -(-kv_len // (splits * tile)) * tile  # whole tiles: a tile starts a block or within it
    splits = -(-kv_len // split_len)
    query = query.contiguous()
    out = torch.empty(b, hq, splits, d, device=query.device, dtype=torch.float32)
    lse = torch.empty(b, hq, splits, device=query.device, dtype=torch.float32)
    _decode_kernel[(b, hkv, splits)](
        query, keys, values, block_table, used, out, lse,
        scale if scale is not None else 1.0 / math.sqrt(d), split_len,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        GROUP=hq // hkv, ROWS=GROUP_ROWS, HEAD_DIM=d, BLOCK=block_size, TILE=tile,
    )
    if splits == 1:
        return out[:, :, 0].to(query.dtype)
    weights = torch.softmax(lse, dim=-1)  # (B, Hq, S): each split's share of the softmax's mass
    return (out * weights[..., None]).sum(2).to(query.dtype)
