"""Greedy decoding over a static KV cache, the prefill and each decode step one CUDA-graph replay.

`CrossVLM.generate` hands the merged prompt to the stock `generate()`, which is general (sampling,
logits processors, streamers) and pays for it in host work on every token. `StaticDecoder` does one
thing: greedy decoding of a batch, with the KV cache allocated once (`transformers.StaticCache`).
On CUDA two functions are compiled with `torch.compile(mode="reduce-overhead")`: the prefill (vision
tower, projector, merge and the LLM over the prompt) and the one-token decode step, so the first
token costs one graph replay and every later token one more. Prompts are left-padded to a multiple
of `prompt_multiple` tokens, so the prefill compiles once per length bucket (and batch size), not
once per prompt. Positions, the attention mask and the cache's length advance on the device; the
host waits for the GPU only every `check_every` tokens, to see whether every row has stopped. On a
CPU the same loop runs eagerly unless asked to compile (the tests compare both with
`CrossVLM.generate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crossvlm.model.modeling import _CACHE_KWARG


class StaticDecoder:
    """Greedy generation for one CrossVLM, with a cache of `max_length` tokens per row."""

    def __init__(self, model, max_length: int, compile: bool | None = None, prompt_multiple: int = 64,
                 mode: str = "reduce-overhead", decode_mode: str | None = None):
        """`mode` compiles the prefill, `decode_mode` (default: `mode`) the decode step: the step has one
        shape per batch size, so tuning it (`max-autotune`) costs far less than tuning the prefill."""
        from transformers import StaticCache

        self.model, self.max_length, self.prompt_multiple = model, max_length, prompt_multiple
        self._new_cache = lambda: StaticCache(config=model.llm.config, max_cache_len=max_length)
        self.cache = self._new_cache()
        self.compiled = model.llm.device.type == "cuda" if compile is None else compile
        if self.compiled:
            self._warm_image_path()
            self._prefill = torch.compile(self._prefill_step, mode=mode)
            self._step = torch.compile(self._decode_step, mode=decode_mode or mode)
        else:
            self._prefill, self._step = self._prefill_step, self._decode_step

    @torch.no_grad()
    def _warm_image_path(self) -> None:
        """One eager pass of the image path (tower and projector) on a blank image, so what it makes on
        its first call is made outside any CUDA graph: transformers installs its hidden-state hooks on
        a model's first call, under a lock torch.compile cannot trace (met inside the compiled prefill,
        it split the prefill into several graphs), and the projector caches its fixed position codes
        per device (made inside a graph, they were its outputs, overwritten by the next replay)."""
        size = self.model.config.vision_config.image_size
        vision = self.model.vision
        self.model.encode_images(torch.zeros(1, 3, size, size, dtype=vision.dtype, device=vision.device))

    def _cache_for(self, batch: int, device: torch.device) -> None:
        """An empty cache of `batch` rows, its tensors allocated here, outside any compiled function: made
        inside a CUDA graph they would belong to the graph's memory pool and be overwritten."""
        if self.cache.layers[0].is_initialized and self.cache.layers[0].keys.shape[0] != batch:
            self.cache = self._new_cache()
        if not self.cache.layers[0].is_initialized:
            cfg = self.model.llm.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            self.cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, self.model.llm.dtype, device)
        self.cache.reset()

    def _forward(self, **inputs) -> torch.Tensor:
        out = self.model.llm(**inputs, use_cache=True, logits_to_keep=1, **{_CACHE_KWARG: self.cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)

    def _prefill_step(self, input_ids, pixel_values, position_ids, attention_mask) -> torch.Tensor:
        return self._forward(inputs_embeds=self.model.embed(input_ids, pixel_values), position_ids=position_ids,
                             attention_mask=attention_mask)

    def _run(self, fn, *args) -> torch.Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*args).clone()  # a copy: a graph's output is overwritten by its next replay

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
        # Left-pad the prompt to its length bucket (masked out, so the answer is unchanged).
        padded = min(-(-prompt // self.prompt_multiple) * self.prompt_multiple, self.max_length - max_new_tokens)
        ids = F.pad(input_ids, (padded - prompt, 0), value=pad_token_id)
        mask = torch.zeros(batch, self.max_length, dtype=attention_mask.dtype, device=device)
        mask[:, padded - prompt:padded] = attention_mask
        self._cache_for(batch, device)
        positions = (mask[:, :padded].long().cumsum(-1) - 1).clamp(min=0)  # left padding: rows start at 0
        token = self._run(self._prefill, ids, pixel_values, positions, mask)
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
            mask[:, padded + i] = 1
            token = self._run(self._step, token, position, mask)
        return torch.cat([input_ids, out[:, :int(written.nonzero().max()) + 1]], dim=1)
