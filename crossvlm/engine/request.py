"""What a request asks for (`SamplingParams`) and its host-side state while it runs (`Request`).

A `Request` follows its answer token by token on the host: the tokens the sampler returned, the
text so far (detokenized incrementally, only when someone reads it as it grows: a stream or stop
strings), stop strings, the token budget, and Qwen3's `<think>…</think>` reasoning split from the
answer. Its events (`Delta`, then `Completion`, or an exception) go to the callback given at
submission; the engine calls it from its own thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from tokenizers.decoders import DecodeStream

from crossvlm.errors import CrossVLMError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_LOGIT_BIAS = 300
"""Most tokens one request may bias (OpenAI's limit)."""


@dataclass
class SamplingParams:
    """How to pick tokens. `greedy=True` (or `temperature=0`) ignores the sampling knobs."""

    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    """0 turns top-k filtering off."""
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    """Strings that end the answer; the answer is cut before the first one found."""
    seed: int | None = None
    """Seeds this request's sampler: the same seed gives the same answer, whatever else runs beside it."""
    min_tokens: int = 0
    """End-of-turn tokens are not sampled (and stop strings not looked for) before this many tokens (vLLM's field)."""
    ignore_eos: bool = False
    """Go on past end-of-turn tokens until the token budget is spent (vLLM's field, for benchmarks)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was generated already (-2 to 2)."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit if it was generated already (-2 to 2)."""
    logit_bias: dict[int, float] | None = None
    """OpenAI's: token id -> a bias (-100 to 100) added to its logit before sampling (at most 300 tokens)."""
    json_schema: dict | None = None
    """Structured output: the answer is a JSON document this schema accepts (`{"type": "object"}`: any
    object), enforced token by token (`crossvlm.engine.constraints`). The answer ends when the document
    does; a budget spent first leaves it unfinished (finish reason "length")."""

    def __post_init__(self):
        self.stop = tuple(s for s in self.stop if s)
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            problems.append(f"min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                problems.append(f"logit_bias may bias at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
            if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
                problems.append("logit_bias values must be in [-100, 100]")
            if any(k < 0 for k in self.logit_bias):
                problems.append("logit_bias keys must be token ids >= 0")
        if self.json_schema is not None and (self.min_tokens or self.ignore_eos):
            problems.append("json_schema ends the answer with the document: it cannot go with min_tokens or ignore_eos")
        if problems:
            raise CrossVLMError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def check_vocab(self, vocab: int) -> None:
        """Raise if `logit_bias` names a token the model does not have."""
        outside = [k for k in self.logit_bias or {} if k >= vocab]
        if outside:
            raise CrossVLMError(f"logit_bias names token ids {outside[:5]} outside the vocabulary (0 to {vocab - 1})")


@dataclass
class Delta:
    """Newly generated text of one answer: reasoning (inside `<think>`) or answer text."""

    reasoning: str = ""
    text: str = ""


@dataclass
class Completion:
    """One answer. `reasoning` is the `<think>` content when thinking was on, else None."""

    text: str
    reasoning: str | None
    finish_reason: str
    """"stop" (end of turn or a stop string), "length" (token budget spent) or "cancelled"."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose keys and values were found in the prefix cache (OpenAI's
    `usage.prompt_tokens_details.cached_tokens`)."""

    def __str__(self) -> str:
        return self.text


def split_reasoning(raw: str, thinking: bool, final: bool = True) -> tuple[str | None, str]:
    """(reasoning, answer) of generated text; both stripped of surrounding whitespace.

    With thinking on, text that starts with `<think>` is reasoning up to `</think>` and answer
    after it (a budget spent inside the block leaves the answer empty); other text is all answer.
    `final=False` (text still growing) withholds what might still change: trailing whitespace and a
    start that could yet become `<think>`.
    """
    if not thinking:
        return None, raw.strip()
    body = raw.lstrip()
    if not final and THINK_OPEN.startswith(body):
        return "", ""  # too early to tell reasoning from answer
    if not body.startswith(THINK_OPEN):
        return "", raw.strip()
    reasoning, closed, answer = body[len(THINK_OPEN):].partition(THINK_CLOSE)
    return reasoning.strip(), answer.strip() if closed else ""


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


Event = Delta | Completion | BaseException


@dataclass(eq=False)
class Request:
    """One prompt on its way through the engine.

    `input_ids` are the rendered prompt (image spans expanded), `pixel_values` its images (N, 3, H, W)
    as the processor makes them, in order (None: no image);
    `on_event` receives `Delta`s (only when `stream` is set; the first, empty, when the first token is
    out), then one `Completion` or an exception.
    """

    input_ids: list[int]
    pixel_values: object
    sampling: SamplingParams
    on_event: Callable[[Event], None]
    thinking: bool = False
    stream: bool = False
    image_grids: object = None
    """A tiled model's images' (rows, columns) of tiles, a list (crossvlm.model.tiling); `pixel_values`
    then holds every image's views. None: one view per image."""
    # -- engine state ----------------------------------------------------------------------------
    max_new_tokens: int = 0
    """The budget after the engine clipped it to its context limit."""
    slot: int | None = None
    """The row of the decode batch (and of the sampler's settings) the request holds while it runs."""
    blocks: list[int] = field(default_factory=list)
    """The KV-cache blocks it holds, in order (its block table)."""
    context: list[int] | None = None
    """The ids being prefilled: the prompt, and after a preemption the tokens generated before it too."""
    hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache hashes of the context's full blocks (`blocks.block_hashes`)."""
    images: list[bytes] | None = None
    """A digest of each image (`blocks.image_digest`)."""
    embeds: object = None
    """Embeddings (T, D) of `context[embed_from:]`, images merged, from admission until its prefill is done."""
    embed_from: int = 0
    prefilled: int = 0
    """Context tokens already in the KV cache."""
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at admission."""
    preemptions: int = 0
    """Times the request gave its blocks back to others and was recomputed."""
    tokens: list[int] = field(default_factory=list)
    """Generated tokens, end-of-turn token excluded."""
    generated: int = 0
    """Tokens the model produced and the host has read, end-of-turn token included."""
    launched: int = 0
    """Tokens asked of the device so far (one step ahead of `generated` while a step runs)."""
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = 0.0
    """`time.perf_counter()` when the engine took the request (its timers count from here)."""
    admitted: float = 0.0
    """`time.perf_counter()` when it took a slot (0: not yet)."""
    token_times: list[float] = field(default_factory=list)
    """`time.perf_counter()` when each token reached the host (the server's latency metrics)."""
    matcher: object = None
    """Structured output: the `constraints.Matcher` that follows the answer (None: unconstrained)."""
    # -- text ------------------------------------------------------------------------------------
    raw: str = ""
    _stream: object = None  # a fast tokenizer's incremental decoder (False: windows below instead)
    _held: int = 0  # tokens since the incremental decoder last gave text
    _prefix: int = 0  # incremental detokenization in windows: tokens[_prefix:_read] were decoded last time
    _read: int = 0
    _sent: Delta = field(default_factory=Delta)  # reasoning and text already handed out

    def image_views(self) -> list:
        """Each image's pixel values (V, 3, H, W): its one view, or a tiled image's thumbnail and tiles."""
        if self.pixel_values is None:
            return []
        if self.image_grids is None:
            return [self.pixel_values[i:i + 1] for i in range(len(self.pixel_values))]
        from crossvlm.model.tiling import tile_count

        out, at = [], 0
        for grid in self.image_grids:
            count = 1 + tile_count(grid)  # the thumbnail, then the tiles
            out.append(self.pixel_values[at:at + count])
            at += count
        return out

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def follows_text(self) -> bool:
        """Whether the text must be followed token by token (streamed, or stop strings to find)."""
        return self.stream or bool(self.sampling.stop)

    def add_token(self, token: int, tokenizer, eos_ids: set[int]) -> None:
        """Take one sampled token: stream its text, or finish the request."""
        if self.stream and not self.generated:
            self.on_event(Delta())  # the first token is out (its text may come later): a stream starts here
        self.token_times.append(time.perf_counter())
        self.generated += 1
        early = self.generated <= self.sampling.min_tokens
        if token in eos_ids and not self.sampling.ignore_eos and not early:
            return self.finish("stop", tokenizer)
        if self.matcher is not None:
            self.matcher.accept(token)  # (a token the mask did not allow puts it in error: the engine fails the request)
        self.tokens.append(token)
        if self.follows_text:
            self._detokenize(tokenizer)
            if self.sampling.stop and not early:
                cut = min((j for j in (self.raw.find(s) for s in self.sampling.stop) if j >= 0), default=-1)
                if cut >= 0:
                    self.raw = self.raw[:cut]
                    return self.finish("stop", tokenizer, decoded=True)
        if self.generated >= self.max_new_tokens:
            return self.finish("length", tokenizer)
        if self.stream:
            self._send(final=False)

    def _detokenize(self, tokenizer) -> None:
        """Append the text of the newest token (a token may end inside a UTF-8 character: then nothing
        is added until the character is whole). A fast tokenizer does it in its own incremental decoder
        (`tokenizers`' `DecodeStream`, in Rust: a few µs a token); others decode a window of a few tokens,
        not the whole answer. The window moves on after a token that adds no text too (a skipped special
        token, say): it would otherwise grow with every such token, each decoding it whole again."""
        if self._stream is None:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            plain = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
            self._stream = DecodeStream(skip_special_tokens=True) if plain else False
        if self._stream is not False:
            try:
                piece = self._stream.step(tokenizer.backend_tokenizer, self.tokens[-1])
                self._held = 0 if piece is not None else self._held + 1
            except Exception:  # noqa: BLE001 — a decoder that rewrites earlier text: windows from here on
                piece, self._held = None, 9
            if self._held <= 8:
                self.raw += piece or ""
                return
            # Bytes that 8 more tokens did not make a character never will, but the incremental decoder
            # would hold them (and decode a growing tail) for ever: windows from here on.
            self._stream = False
            self.raw = tokenizer.decode(self.tokens, skip_special_tokens=True)
            self._prefix = self._read = len(self.tokens)
            return
        before = tokenizer.decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        now = tokenizer.decode(self.tokens[self._prefix:], skip_special_tokens=True)
        stuck = len(self.tokens) - self._read > 8  # bytes that 8 more tokens did not make a character never will
        if len(now) >= len(before) and (stuck or not now.endswith("\ufffd")):
            self.raw += now[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)

    def finish(self, reason: str, tokenizer=None, decoded: bool = False) -> None:
        """End the request and hand out its completion (a cancelled one gets no more text)."""
        if self.done:
            return
        self.finish_reason = reason
        self.embeds = None
        if reason == "cancelled":
            reasoning, text = split_reasoning(self.raw, self.thinking)
        else:
            if not decoded:  # the whole answer decoded once: exact, whatever the windows gave
                self.raw = tokenizer.decode(self.tokens, skip_special_tokens=True)
            reasoning, text = self._send(final=True)
        self.on_event(Completion(text, reasoning, reason, self.prompt_tokens, self.generated, self.cached_tokens))

    def fail(self, error: BaseException) -> None:
        """End the request with an error (its generation failed; others go on)."""
        if not self.done:
            self.finish_reason = "error"
            self.embeds = None
            self.on_event(error)

    def _send(self, final: bool) -> tuple[str | None, str]:
        raw = self.raw
        if not final:
            held = _partial_suffix(raw, self.sampling.stop + ((THINK_CLOSE,) if self.thinking else ()))
            raw = raw[: len(raw) - held].removesuffix("\ufffd")  # an unfinished UTF-8 character
        reasoning, text = split_reasoning(raw, self.thinking, final)
        if not self.stream:
            return reasoning, text
        sent = self._sent
        # Decoding more tokens only appends to the text, so what was sent is a prefix of what is new.
        delta = Delta(
            (reasoning or "")[len(sent.reasoning):] if (reasoning or "").startswith(sent.reasoning) else "",
            text[len(sent.text):] if text.startswith(sent.text) else "",
        )
        if delta.reasoning or delta.text:
            self._sent = Delta(sent.reasoning + delta.reasoning, sent.text + delta.text)
            self.on_event(delta)
        return reasoning, text
