"""Token choice on the device, each row with its own settings, no host sync.

Every slot's settings (temperature, top-p, top-k, repetition, frequency and presence penalties,
logit bias, min_tokens, seed) live in device tensors written once when a request is admitted, so a
step needs nothing from the host but which kind of batch it is (all greedy or not, any penalty, any
min_tokens) and, for structured outputs, each constrained row's mask of allowed tokens
(`constraints`), which the engine writes into `allowed` before the step. Sampled rows draw by
the Gumbel-max trick with noise hashed from (seed, token count, rank) on the device: a seeded
request gets the same tokens whatever runs beside it and whatever the batch size, and unseeded
requests get a random seed at admission.
"""

from __future__ import annotations

import random

import torch

from crossvlm.engine.constraints import unpack, words
from crossvlm.engine.request import MAX_LOGIT_BIAS, SamplingParams

_M32 = 0xFFFFFFFF


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list or tensor on the device without a sync: a copy from pageable memory would wait
    for every step already queued on the GPU, so the host could no longer run ahead of it."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (in int64, so products never overflow)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, width: int) -> torch.Tensor:
    """(n, width) floats in (0, 1), a pure function of each row's (seed, step)."""
    row = _mix((seed & _M32) ^ _mix(step & _M32))  # (n,)
    col = torch.arange(width, device=seed.device, dtype=torch.int64)
    bits = _mix(row[:, None] ^ _mix(col + 0x3243F6A8)[None, :])  # (n, width)
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


class Sampler:
    """Per-slot sampling state and the sampling step."""

    def __init__(self, slots: int, vocab: int, eos_ids: list[int], device: torch.device):
        z = lambda dtype: torch.zeros(slots, dtype=dtype, device=device)  # noqa: E731
        self.temperature, self.top_p = z(torch.float32), z(torch.float32)
        self.penalty = z(torch.float32)
        self.top_k, self.seed, self.min_tokens = z(torch.int64), z(torch.int64), z(torch.int64)
        self.generated = z(torch.int64)  # tokens sampled so far, per slot: the noise's step
        self.last_token = z(torch.int64)  # the input of the next decode step
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)  # for repetition penalty
        self.is_eos = torch.zeros(vocab, dtype=torch.bool, device=device)  # (V,)
        self.is_eos[sorted(eos_ids)] = True
        self.device, self.vocab = device, vocab
        # OpenAI's frequency and presence penalties count each slot's generated tokens: (slots, V) int32,
        # allocated for the first request that asks for one.
        self.frequency, self.presence = z(torch.float32), z(torch.float32)
        self.counts: torch.Tensor | None = None
        self.bias_ids = torch.zeros(slots, MAX_LOGIT_BIAS, dtype=torch.int64, device=device)  # (slots, K); unused: id 0 + 0.0
        self.bias_values = torch.zeros(slots, MAX_LOGIT_BIAS, dtype=torch.float32, device=device)
        self.allowed = torch.full((slots, words(vocab)), -1, dtype=torch.int32, device=device)  # bitmask; -1: all
        # Slots whose request uses each (on the host: a batch with none skips the work). A freed slot
        # stays in until another request takes it: its hole row then costs a little work, nothing more.
        self.penalized: set[int] = set()
        self.biased: set[int] = set()
        self.masked: set[int] = set()

    def admit(self, slots: list[int], params: list[SamplingParams]) -> None:
        """Write the settings of newly admitted requests into their slots (one copy per kind)."""
        idx = to_device(slots, self.device)
        self._admit_extras(slots, idx, params)
        floats = to_device([[0.0 if p.is_greedy else p.temperature, p.top_p, p.repetition_penalty]
                            for p in params], self.device, torch.float32)
        ints = to_device([[p.top_k, random.getrandbits(31) if p.seed is None else p.seed, p.min_tokens]
                          for p in params], self.device, torch.int64)
        for target, column in ((self.temperature, floats[:, 0]), (self.top_p, floats[:, 1]),
                               (self.penalty, floats[:, 2]), (self.top_k, ints[:, 0]), (self.seed, ints[:, 1]),
                               (self.min_tokens, ints[:, 2])):
            target.index_copy_(0, idx, column)

    def _admit_extras(self, slots: list[int], idx: torch.Tensor, params: list[SamplingParams]) -> None:
        """Frequency and presence penalties, logit bias and structured outputs of newly admitted requests."""
        # Rows to write: of requests that use one, and of slots whose last request did (stale values there
        # would be applied to this one whenever another row of the batch uses it).
        rewrite = [k for k, (slot, p) in enumerate(zip(slots, params))
                   if slot in self.penalized or slot in self.biased or p.frequency_penalty or p.presence_penalty
                   or p.logit_bias]
        for slot, p in zip(slots, params):
            for used, members in ((p.frequency_penalty or p.presence_penalty, self.penalized),
                                  (p.logit_bias, self.biased), (p.json_schema is not None, self.masked)):
                (members.add if used else members.discard)(slot)
        self.allowed.index_fill_(0, idx, -1)  # unconstrained rows allow everything; the engine fills the others
        if not rewrite:
            return
        if self.penalized and self.counts is None:
            self.counts = torch.zeros(self.allowed.shape[0], self.vocab, dtype=torch.int32, device=self.device)
        rows = to_device([slots[k] for k in rewrite], self.device)
        chosen = [params[k] for k in rewrite]
        pen = to_device([[p.frequency_penalty, p.presence_penalty] for p in chosen], self.device, torch.float32)
        self.frequency.index_copy_(0, rows, pen[:, 0])
        self.presence.index_copy_(0, rows, pen[:, 1])
        ids = torch.zeros(len(chosen), MAX_LOGIT_BIAS, dtype=torch.int64)  # unused entries: token 0 + 0.0
        values = torch.zeros(len(chosen), MAX_LOGIT_BIAS, dtype=torch.float32)
        for i, p in enumerate(chosen):
            for j, (token, bias) in enumerate((p.logit_bias or {}).items()):
                ids[i, j], values[i, j] = token, bias
        self.bias_ids.index_copy_(0, rows, to_device(ids, self.device))
        self.bias_values.index_copy_(0, rows, to_device(values, self.device))

    def begin(self, slots: list[int], prompts: list[list[int]], penalty: bool) -> None:
        """Zero the token counts (and, for a repetition penalty, mark the prompt's tokens seen) of requests
        whose first token is about to be sampled. Not at admission: until then a slot is a hole row of
        the decode steps, which count and mark for it."""
        idx = to_device(slots, self.device)
        self.generated[idx] = 0
        if self.counts is not None:
            self.counts[idx] = 0
        if penalty:
            self.seen[idx] = False
            for slot, ids in zip(slots, prompts):
                self.seen[slot, to_device(ids, self.device)] = True

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, *, greedy: bool, penalty: bool,
               min_tokens: bool, candidates: int | None = None) -> torch.Tensor:
        """Tokens (n,) for logits (n, V) of the given slots; -1 where a row's logits are not finite.
        `candidates`: how many of a row's likeliest tokens a sampled row may draw from, at most (its
        top-k, the largest of the batch's; None: the whole vocabulary, sorted; 0: no row truncates
        by top-k or top-p, so none is sorted).

        Also records the tokens as the slots' next decode input and counts them.
        """
        logits = logits.float()
        bad = ~torch.isfinite(logits).all(-1)  # (n,)
        if penalty:  # transformers' rule: a seen token's logit is divided (or, if negative, multiplied)
            pen = self.penalty[slots, None]
            hit = self.seen[slots]  # (n, V)
            logits = torch.where(hit, torch.where(logits < 0, logits * pen, logits / pen), logits)
        if self.penalized:  # OpenAI's rule, over the tokens generated so far: minus f * count, minus p if any
            counts = self.counts[slots].float()  # (n, V)
            logits = logits - self.frequency[slots, None] * counts - self.presence[slots, None] * (counts > 0)
        if self.biased:  # (n, K) ids and values; unused entries add 0.0 to token 0
            logits = logits.scatter_add(1, self.bias_ids[slots], self.bias_values[slots])
        if self.masked:  # structured outputs: tokens outside the grammar's mask cannot be drawn
            logits = logits.masked_fill(~unpack(self.allowed[slots], self.vocab), float("-inf"))
        if min_tokens:
            early = (self.generated[slots] < self.min_tokens[slots])[:, None]  # (n, 1)
            logits = logits.masked_fill(early & self.is_eos, float("-inf"))
        tokens = logits.argmax(-1)  # (n,)
        if not greedy:
            tokens = torch.where(self.temperature[slots] > 0, self._draw(logits, slots, candidates), tokens)
        tokens = tokens.masked_fill(bad, -1)
        self.last_token[slots] = tokens.clamp(min=0)
        self.generated[slots] += 1
        if penalty:
            self.seen[slots, tokens.clamp(min=0)] = True
        if self.penalized:
            self.counts[slots, tokens.clamp(min=0)] += 1
        return tokens

    def _draw(self, logits: torch.Tensor, slots: torch.Tensor, candidates: int | None) -> torch.Tensor:
        """Temperature, then top-k, then top-p (transformers' order), then one Gumbel-max draw. The
        noise belongs to the token ids, so a row draws the same token however many candidates the rows
        beside it need (sorting the whole vocabulary is ~10 M elements a step at 64 rows of Qwen3's)."""
        temperature = self.temperature[slots].clamp(min=1e-5)[:, None]
        gumbel = -torch.log(-torch.log(uniform_noise(self.seed[slots], self.generated[slots], self.vocab)))  # (n, V)
        scaled = logits / temperature
        if candidates == 0:
            return (scaled + gumbel).argmax(-1)
        if candidates is not None and candidates < self.vocab:
            scaled, order = scaled.topk(candidates, dim=-1)  # (n, C), descending
        else:
            scaled, order = scaled.sort(dim=-1, descending=True, stable=True)  # (n, V)
        rank = torch.arange(scaled.shape[-1], device=logits.device)
        k = self.top_k[slots]
        drop = rank[None, :] >= torch.where(k > 0, k, self.vocab)[:, None]
        scaled = scaled.masked_fill(drop, float("-inf"))
        probs = scaled.softmax(-1)
        drop |= (probs.cumsum(-1) - probs) > self.top_p[slots, None]  # the first token always stays
        scaled = scaled.masked_fill(drop, float("-inf"))
        pick = (scaled + gumbel.gather(-1, order)).argmax(-1, keepdim=True)  # (n, 1), a rank
        return order.gather(-1, pick)[:, 0]
