"""Generation for people and programs: `crossvlm.load(DIR)` returns a `ChatModel`.

A `ChatModel` holds a CrossVLM and its processor on one device and answers conversations, one or
many at a time (left padding, KV cache). Messages are OpenAI-style `{role, content}` dicts. A
content is a string whose `<image>` marks take the `images` given separately, in order of
appearance, or a list of parts `{"type": "text", "text": ...}` / `{"type": "image", "image": ...}`
(a PIL image, a file path or encoded bytes).

Every prompt of a batch is followed token by token (`_RowTracker`, a transformers
`StoppingCriteria`): that gives each prompt its own token budget and stop strings, streams its
text as it grows, and splits Qwen3's `<think>…</think>` reasoning from the answer.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from crossvlm.errors import CrossVLMError
from crossvlm.model.modeling import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor, to_rgb
from crossvlm.model.tokens import IMAGE_MARK, IMAGE_PAD, VISION_END, VISION_START

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class InputError(CrossVLMError, ValueError):
    """A conversation or image that cannot be answered as given.

    `code` names the problem for programs (the server returns it in its error body): invalid_image,
    image_not_found, image_too_large, image_count_mismatch, invalid_content, context_length_exceeded.
    """

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


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
    """Seeds the sampler, so a sampled answer can be reproduced (a seeded prompt runs in a batch alone)."""

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
        if problems:
            raise CrossVLMError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def batch_key(self) -> tuple:
        """Prompts whose keys are equal can share one `generate` call (budgets and stops may differ)."""
        if self.is_greedy:
            return ("greedy", self.repetition_penalty)
        if self.seed is not None:
            return ("seeded", id(self))  # the sampler's draws depend on the batch: run alone
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty)

    def generate_kwargs(self) -> dict:
        if self.is_greedy:
            return dict(do_sample=False, repetition_penalty=self.repetition_penalty,
                        temperature=None, top_p=None, top_k=None)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k or None, repetition_penalty=self.repetition_penalty)


@dataclass
class Prompt:
    """A conversation ready for the model: token ids (image spans expanded) and its RGB images."""

    input_ids: list[int]
    images: list[Image.Image]
    enable_thinking: bool = False


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


@dataclass
class _Row:
    """Generation state of one prompt of a batch."""

    prompt_tokens: int
    max_new_tokens: int
    stop: tuple[str, ...]
    thinking: bool
    tokens: list[int] = field(default_factory=list)  # generated, end-of-turn token excluded
    generated: int = 0  # tokens the model produced, end-of-turn token included
    raw: str = ""
    finish_reason: str | None = None
    sent: Delta = field(default_factory=Delta)  # reasoning and text already handed out


class _RowTracker(StoppingCriteria):
    """Follows every prompt of a batch token by token, hands out text deltas and stops each row.

    transformers calls a stopping criterion once per new token with the sequences so far; the last
    column is the new token of every row. A row stops at an end-of-turn token, at one of its stop
    strings or at its own token budget; finished rows get padding from `generate` and are ignored.
    """

    def __init__(self, tokenizer, rows: list[_Row], eos_ids: set[int],
                 on_delta: Callable[[int, Delta], None] | None = None,
                 on_done: Callable[[int, Completion], None] | None = None):
        self.tokenizer, self.rows, self.eos_ids = tokenizer, rows, eos_ids
        self.on_delta, self.on_done = on_delta, on_done
        self.completions: list[Completion | None] = [None] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        for i, token in enumerate(input_ids[:, -1].tolist()):  # (B,)
            row = self.rows[i]
            if row.finish_reason is not None:
                continue
            row.generated += 1
            if token in self.eos_ids:
                self._finish(i, "stop")
                continue
            row.tokens.append(token)
            row.raw = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = min((j for j in (row.raw.find(s) for s in row.stop) if j >= 0), default=-1)
            if cut >= 0:
                row.raw = row.raw[:cut]
                self._finish(i, "stop")
            elif row.generated >= row.max_new_tokens:
                self._finish(i, "length")
            else:
                self._send(i, final=False)
        return torch.tensor([r.finish_reason is not None for r in self.rows], device=input_ids.device)

    def cancel(self, i: int) -> None:
        """Stop row i without handing out more of it (its client has gone)."""
        if self.rows[i].finish_reason is None:
            self.rows[i].finish_reason = "cancelled"

    def finish_all(self) -> list[Completion]:
        """After `generate` returns: rows still open ran out of the batch's budget."""
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                self._finish(i, "length")
        return self.completions

    def _send(self, i: int, final: bool) -> tuple[str | None, str]:
        row = self.rows[i]
        raw = row.raw
        if not final:
            held = _partial_suffix(raw, row.stop + ((THINK_CLOSE,) if row.thinking else ()))
            raw = raw[: len(raw) - held].removesuffix("\ufffd")  # an unfinished UTF-8 character
        reasoning, text = split_reasoning(raw, row.thinking, final)
        # Decoding more tokens only appends to the text, so what was sent is a prefix of what is new.
        delta = Delta(
            (reasoning or "")[len(row.sent.reasoning):] if (reasoning or "").startswith(row.sent.reasoning) else "",
            text[len(row.sent.text):] if text.startswith(row.sent.text) else "",
        )
        if delta.reasoning or delta.text:
            row.sent = Delta(row.sent.reasoning + delta.reasoning, row.sent.text + delta.text)
            if self.on_delta is not None:
                self.on_delta(i, delta)
        return reasoning, text

    def _finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        row.finish_reason = reason
        reasoning, text = self._send(i, final=True)
        done = Completion(text, reasoning, reason, row.prompt_tokens, row.generated)
        self.completions[i] = done
        if self.on_done is not None:
            self.on_done(i, done)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def open_image(source, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, param: str | None = None) -> Image.Image:
    """An RGB image from a PIL image, a file path or encoded bytes; the pixel limit is read from the header."""
    from crossvlm.data.images import load_image
    from crossvlm.data.records import RecordError

    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, str):
        source = Path(source)
    try:
        return load_image(source, max_pixels)
    except RecordError as err:
        if err.kind == "image_too_large":
            raise InputError(f"image has too many pixels: {err.detail}", "image_too_large", param) from None
        if err.kind == "missing_image":
            raise InputError(f"image file not found: {err.detail}", "image_not_found", param) from None
        # The detail names the decoder's exception first ("UnidentifiedImageError: ..."); the rest
        # may quote an in-memory file object, which means nothing to a user.
        kind = err.detail.split(":")[0] or err.kind
        raise InputError(f"cannot decode the image ({kind}): send PNG, JPEG, WebP, GIF or BMP",
                         "invalid_image", param) from None


def collect_images(messages: list[dict], images: list | None = None,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[dict], list[Image.Image]]:
    """Messages with string contents (`<image>` marking each image) and their images in order.

    String `<image>` marks take from `images` in turn; image parts carry their own image. Vision
    special tokens typed into text are refused: they would be read as image slots.
    """
    pool = list(images or [])
    flat_messages, ordered = [], []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InputError(f"message {m} is not a {{role, content}} mapping", "invalid_content", f"messages[{m}]")
        content = message.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = ""
        for p, part in enumerate(parts):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                piece = str(part.get("text", ""))
                for token in (VISION_START, VISION_END, IMAGE_PAD):
                    if token in piece:
                        raise InputError(f"{where}: text must not contain the special token {token}",
                                         "invalid_content", where)
                for _ in range(piece.count(IMAGE_MARK)):
                    if not pool:
                        raise InputError(f"{where}: more {IMAGE_MARK} marks than images given",
                                         "image_count_mismatch", where)
                    ordered.append(open_image(pool.pop(0), max_pixels, where))
                text += piece
            elif kind == "image":
                ordered.append(open_image(part.get("image"), max_pixels, where))
                text += IMAGE_MARK
            else:
                raise InputError(f"{where}: unknown content part type {kind!r} (use text or image)",
                                 "invalid_content", where)
        flat_messages.append({**message, "content": text})
    if pool:
        raise InputError(f"{len(pool)} more images given than {IMAGE_MARK} marks", "image_count_mismatch", "images")
    return flat_messages, ordered


class ChatModel:
    """A CrossVLM ready to answer conversations."""

    def __init__(self, model: CrossVLM, processor: CrossVLMProcessor,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_image_pixels = max_image_pixels
        self.context_length = model.config.text_config.max_position_embeddings
        eos = model.llm.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in [*eos, self.tokenizer.eos_token_id] if t is not None}

    @classmethod
    def load(cls, model_dir: str | Path | None = None, *, llm: str | Path | None = None,
             vision: str | Path | None = None, device: str = "auto", dtype: torch.dtype | None = None,
             **projector_kwargs) -> "ChatModel":
        """Load a saved VLM directory, or build one from base models (projector untrained)."""
        dev = pick_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if model_dir is not None:
            model = CrossVLM.from_pretrained(str(model_dir), dtype=dtype)
            processor = CrossVLMProcessor.from_pretrained(model_dir)
        elif llm is not None and vision is not None:
            model = CrossVLM.from_base_models(llm, vision, dtype=dtype, **projector_kwargs)
            processor = CrossVLMProcessor.from_base_models(llm, vision, model.num_image_tokens)
        else:
            raise CrossVLMError("give a saved model directory, or both a base LLM and a vision tower")
        return cls(model.to(dev), processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, messages: list[dict], images: list | None = None, enable_thinking: bool = False) -> Prompt:
        """Check, render and tokenize one conversation; raises `InputError` for what cannot be answered."""
        if not messages:
            raise InputError("the conversation has no messages", "invalid_content", "messages")
        from crossvlm.data.render import TemplateMismatch, encode_prompt

        flat, imgs = collect_images(messages, images, self.max_image_pixels)
        try:  # rendered exactly as training renders a conversation (docs/DATA.md)
            ids = encode_prompt(flat, self.tokenizer, self.processor.num_image_tokens, enable_thinking=enable_thinking)
        except TemplateMismatch as err:
            raise CrossVLMError(str(err)) from err
        except ValueError as err:
            raise InputError(f"cannot render the conversation: {err}", "invalid_content", "messages") from err
        if len(ids) >= self.context_length:
            raise InputError(
                f"the prompt takes {len(ids)} tokens (images included) but the model's context is "
                f"{self.context_length}; shorten the conversation or send fewer images",
                "context_length_exceeded", "messages",
            )
        return Prompt(ids, imgs, enable_thinking)

    @torch.inference_mode()
    def generate_prompts(self, prompts: list[Prompt], sampling: SamplingParams | list[SamplingParams] | None = None,
                         on_delta: Callable[[int, Delta], None] | None = None,
                         on_done: Callable[[int, Completion], None] | None = None,
                         tracker_ready: Callable[[_RowTracker], None] | None = None) -> list[Completion]:
        """Answer prepared prompts in one left-padded batch.

        `sampling` is one setting for all, or one per prompt; per-prompt settings may differ only in
        `max_new_tokens` and `stop` (see `SamplingParams.batch_key`). `on_delta(i, delta)` gets text
        as it is generated, `on_done(i, completion)` each answer as soon as it ends;
        `tracker_ready` receives the row tracker before generation starts (to cancel rows).
        """
        if not prompts:
            return []
        settings = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len({s.batch_key() for s in settings}) > 1:
            raise CrossVLMError("prompts of one batch must share their sampling settings "
                                "(only max_new_tokens and stop may differ)")
        rows = [_Row(len(p.input_ids), max(1, min(s.max_new_tokens, self.context_length - len(p.input_ids))),
                     s.stop, p.enable_thinking) for p, s in zip(prompts, settings)]
        tracker = _RowTracker(self.tokenizer, rows, self.eos_ids, on_delta, on_done)
        if tracker_ready is not None:
            tracker_ready(tracker)

        longest = max(len(p.input_ids) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[i, longest - len(p.input_ids):] = 1
        images = [im for p in prompts for im in p.images]
        self.model.check_image_tokens(ids, len(images))  # on the host copy: no GPU sync
        pixels = self.processor.preprocess_images(images).to(self.device) if images else None  # (N, 3, H, W)
        if settings[0].seed is not None and not settings[0].is_greedy:
            torch.manual_seed(settings[0].seed)
        self.model.generate(
            ids.to(self.device), pixels, attention_mask=mask.to(self.device), pad_token_id=pad,
            eos_token_id=sorted(self.eos_ids), max_new_tokens=max(r.max_new_tokens for r in rows),
            stopping_criteria=StoppingCriteriaList([tracker]), **settings[0].generate_kwargs(),
        )
        return tracker.finish_all()

    def generate(self, conversations: list[list[dict]], images: list[list] | None = None,
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 enable_thinking: bool = False) -> list[Completion]:
        """Answer many conversations in one batch; returns one `Completion` per conversation."""
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise InputError(f"{len(conversations)} conversations but {len(images)} image lists",
                             "image_count_mismatch", "images")
        prompts = [self.prompt(c, imgs, enable_thinking) for c, imgs in zip(conversations, images)]
        return self.generate_prompts(prompts, sampling)

    def chat(self, messages: list[dict], images: list | None = None, sampling: SamplingParams | None = None,
             enable_thinking: bool = False) -> Completion:
        """Answer one conversation (`str(completion)` is the answer text)."""
        return self.generate([messages], [images or []], sampling, enable_thinking)[0]

    def stream(self, messages: list[dict], images: list | None = None, sampling: SamplingParams | None = None,
               enable_thinking: bool = False) -> "ChatStream":
        """Answer one conversation as it is generated: iterate for `Delta`s, then read `.completion`."""
        return ChatStream(self, self.prompt(messages, images, enable_thinking), sampling)


class ChatStream:
    """Iterates over the deltas of one answer while `generate` runs in a background thread."""

    def __init__(self, chat: ChatModel, prompt: Prompt, sampling: SamplingParams | None):
        self.completion: Completion | None = None
        self._events: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(chat, prompt, sampling), daemon=True)
        self._thread.start()

    def _run(self, chat: ChatModel, prompt: Prompt, sampling: SamplingParams | None) -> None:
        try:
            chat.generate_prompts([prompt], sampling, on_delta=lambda _, d: self._events.put(d),
                                  on_done=lambda _, c: self._events.put(c))
        except BaseException as err:  # handed to the reading thread, which raises it
            self._events.put(err)

    def __iter__(self) -> Iterator[Delta]:
        while self.completion is None:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Completion):
                self.completion = event
            else:
                yield event
        self._thread.join()


def load(model_dir: str | Path, device: str = "auto", dtype: torch.dtype | None = None) -> ChatModel:
    """Load a saved CrossVLM directory for chatting and batched generation."""
    return ChatModel.load(model_dir, device=device, dtype=dtype)
