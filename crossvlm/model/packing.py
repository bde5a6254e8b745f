"""Attention over packed rows: several samples share a row, each attends causally to itself only.

A packed batch carries `document_ids` (B, T): the index of the sample each token belongs to within
its row (the row's padding tail is one more "sample"). The LLM's modules are not touched; the
document mask reaches them through transformers' attention-implementation interface:

- `flex_attention` (transformers' own): the mask is a FlexAttention `BlockMask` built once per step
  from `document_ids` and passed as `attention_mask`; transformers hands a ready 4-D mask through to
  every layer. Blocks of 128 × 128 scores that lie wholly in another sample are skipped, so no dense
  [T, T] mask exists and the work follows Σ lengths², not rows × T².
- `varlen` (registered here through `AttentionInterface`): the rows are flattened and cut at the
  sample boundaries (`cu_seqlens`) for `torch.nn.attention.varlen.varlen_attn` (FlashAttention's
  variable-length kernel, CUDA only).
- `sdpa` / `eager`: no document mask is passed; transformers finds the boundaries from the restarting
  `position_ids` and builds a dense block-diagonal mask (correct, but [B, 1, T, T] and no skipping).
"""

from __future__ import annotations

import functools
import inspect

import torch

from crossvlm.errors import ConfigError

VARLEN = "varlen"
KERNELS = ("flex_attention", VARLEN, "sdpa")
"""The LLM attention implementations packed rows can use (`model.attention`, besides `auto`)."""


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An `AttentionInterface` function: causal attention within each span of `cu_seqlens`.

    query (B, H, T, D), key / value (B, Hkv, T, D); returns (B, T, H, D) as transformers expects.
    """
    from torch.nn.attention.varlen import varlen_attn

    b, h, t, d = query.shape
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    if torch.is_autocast_enabled(query.device.type):  # Qwen3's q/k norms return float32; the kernel takes bf16/fp16
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    q = query.transpose(1, 2).reshape(b * t, h, d)  # (B·T, H, D)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)  # (B·T, Hkv, D)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    extra = {}
    if k.shape[1] != h:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:  # torch >= 2.12
            extra["enable_gqa"] = True
        else:  # torch 2.10-2.11: every query head needs its own key/value head
            k, v = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k, v))
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), **extra)
    return out.view(b, t, h, d), None


def register_varlen() -> None:
    """Make `varlen` an attention implementation transformers models can be set to."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention)


def document_block_mask(document_ids: torch.Tensor):
    """A causal FlexAttention BlockMask that keeps every token to its own document: (B, 1, T, T) blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, kv):
        return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

    b, t = document_ids.shape
    # Compiled on a GPU: the mask is evaluated block by block there instead of as a dense (B, T, T) tensor.
    # Compiled once here, not through `_compile=True`, which wraps it anew (and warns) on every call:
    # 4-5 ms of host time a training step (docs/PERFORMANCE.md, run 6).
    build = _compiled_create_block_mask() if document_ids.device.type == "cuda" else create_block_mask
    return build(same_document_causal, b, None, t, t, device=document_ids.device)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def cu_seqlens(document_ids: torch.Tensor) -> torch.Tensor:
    """Start offsets of the documents in the flattened rows, and the total: (n_docs + 1,) int32."""
    b, t = document_ids.shape
    flat = (document_ids + torch.arange(b, device=document_ids.device)[:, None] * t).flatten()  # (B·T,) row-unique
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).flatten()  # first token of every document
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def packed_attention_kwargs(implementation: str, document_ids: torch.Tensor | None) -> dict:
    """What the LLM's forward needs, besides the restarting position ids, to keep documents apart."""
    if document_ids is None:
        return {}
    if implementation == "flex_attention":
        return {"attention_mask": document_block_mask(document_ids)}
    if implementation == VARLEN:
        cu, t = cu_seqlens(document_ids), document_ids.shape[1]
        # T bounds every document; a fixed bound keeps the compiled layers' arguments the same each step.
        return {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": t,
                "max_length_k": t}
    return {"attention_mask": None}  # transformers derives the block-diagonal mask from the position ids


def choose_kernel(requested: str, device: torch.device, llm) -> tuple[str | None, str]:
    """The attention implementation for packed rows, or None for padding, with the reason.

    `requested`: `auto` (FlexAttention on a GPU, else varlen; padding on a CPU, where FlexAttention
    has no backward and varlen does not exist), or one of KERNELS.
    """
    if requested not in ("auto", *KERNELS):
        raise ConfigError(f"model.attention {requested!r} is not one of auto, {', '.join(KERNELS)}")
    supports_flex = bool(getattr(llm, "_supports_flex_attn", False))
    if requested == "auto":
        if device.type != "cuda":
            return None, "auto: on a CPU FlexAttention has no backward and varlen does not exist, so batches are padded"
        if supports_flex:
            return "flex_attention", "auto: CUDA, and the LLM supports FlexAttention"
        if varlen_available() and getattr(llm, "_supports_attention_backend", False):
            return VARLEN, "auto: CUDA, the LLM takes registered attention functions"
        return None, (f"auto: {type(llm).__name__} supports neither FlexAttention nor registered attention, "
                      "so batches are padded")
    if requested == "flex_attention" and not supports_flex:
        raise ConfigError(f"model.attention flex_attention: {type(llm).__name__} does not support it")
    if requested == "flex_attention" and device.type != "cuda":
        raise ConfigError("model.attention flex_attention trains on a GPU only (torch has no FlexAttention backward "
                          "on a CPU); use sdpa, or data.packing false")
    if requested == VARLEN and not varlen_available():
        raise ConfigError("model.attention varlen needs torch.nn.attention.varlen (torch >= 2.10) and a CUDA GPU")
    return requested, f"{requested}, as configured"
