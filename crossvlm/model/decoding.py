"""Greedy decoding over a static KV cache, each decode step one CUDA-graph replay.

`CrossVLM.generate` hands the merged prompt to the stock `generate()`, which is general (sampling,
logits processors, streamers) and pays for it in host work on every token. `StaticDecoder` does one
thing: greedy decoding of a batch, with the KV cache allocated once (`transformers.StaticCache`) and
the one-token decode step compiled with `torch.compile(mode="reduce-overhead")` on CUDA, so a token
costs one graph replay. Positions, the attention mask and the cache's length advance on the device;
the host waits for the GPU only every `check_every` tokens, to see whether every row has stopped.
On a CPU the same loop runs eagerly (the tests compare it with `CrossVLM.generate`).
"""

from __future__ import annotations

import torch

from crossvlm.model.modeling import _CACHE_KWARG


class StaticDecoder:
    """Greedy generation for one CrossVLM, with a cache of `max_length` tokens per row."""

    def __init__(self, model, max_length: int, compile: bool | None = None):
        from transformers import StaticCache

        self.model, self.max_length = model, max_length
        self.cache = StaticCache(config=model.llm.config, max_cache_len=max_length)
        self.compiled = model.llm.device.type == "cuda" if compile is None else compile
        self._step = torch.compile(self._decode_step, mode="reduce-overhead") if self.compiled else self._decode_step

    def _forward(self, **inputs) -> torch.Tensor:
        out = self.model.llm(**inputs, use_cache=True, logits_to_keep=1, **{_CACHE_KWARG: self.cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)

    def _decode_step(self, token, position_ids, attention_mask) -> torch.Tensor:
        return self._forward(input_ids=token, position_ids=position_ids, attention_mask=attention_mask)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                 check_every: int = 16) -> torch.Tensor:
        """Prompt ids (left-padded, B × T) followed by up to `max_new_tokens` greedy tokens, like
        `CrossVLM.generate`; rows that stopped are filled with `pad_token_id`."""
        batch, prompt = input_ids.shape
        if prompt + max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds the decoder's "
                             f"max_length {self.max_length}")
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.zeros(batch, self.max_length, dtype=attention_mask.dtype, device=device)
        mask[:, :prompt] = attention_mask
        self.cache.reset()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: rows start at 0
        token = self._forward(inputs_embeds=self.model.embed(input_ids, pixel_values), position_ids=positions,
                              attention_mask=mask)
        eos = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=input_ids.dtype, device=device).flatten()
        out = torch.full((batch, max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
        done = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        written = torch.zeros(max_new_tokens, dtype=torch.bool, device=device)  # a row still running wrote here
        position = positions[:, -1:].clone()
        for i in range(max_new_tokens):
            out[:, i:i + 1] = token.masked_fill(done, pad_token_id)
            written[i] = ~done.all()
            done |= torch.isin(token, eos)
            if i == max_new_tokens - 1 or ((i + 1) % check_every == 0 and bool(done.all())):
                break
            position += 1
            mask[:, prompt + i] = 1
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            token = self._step(token, position, mask).clone()  # a copy: the graph's output is reused
        return torch.cat([input_ids, out[:, :int(written.nonzero().max()) + 1]], dim=1)
