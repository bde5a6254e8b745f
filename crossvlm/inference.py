"""Generation for people and programs: `crossvlm.load(DIR)` returns a `ChatModel`.

A `ChatModel` holds a CrossVLM and its processor on one device and answers conversations, one or
many at a time, through the generation engine (`crossvlm.engine`: continuous batching over a KV
cache allocated once, CUDA-graphed decode on a GPU). Messages are OpenAI-style `{role, content}`
dicts. A content is a string whose `<image>` marks take the `images` given separately, in order of
appearance, or a list of parts `{"type": "text", "text": ...}` / `{"type": "image", "image": ...}`
(a PIL image, a file path or encoded bytes).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from crossvlm.engine import Completion, Delta, Engine, EngineConfig, Request, SamplingParams
from crossvlm.engine.constraints import Grammars, Matcher, SchemaError
from crossvlm.engine.request import split_reasoning
from crossvlm.errors import CrossVLMError
from crossvlm.model.modeling import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor, to_rgb
from crossvlm.model.tokens import IMAGE_MARK, IMAGE_PAD, VISION_END, VISION_START

__all__ = ["ChatModel", "ChatStream", "Completion", "Delta", "InputError", "Prompt", "SamplingParams", "load",
           "split_reasoning"]

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
class Prompt:
    """A conversation ready for the model: token ids (image spans expanded), its RGB images and their
    pixel values (N, 3, H, W), made by the processor in the thread that prepared the prompt, so the
    engine's loop never waits for image preprocessing. A tiled model's prompt has each image's grid
    (`image_grids`, crossvlm.model.tiling) and every image's views in `pixel_values`."""

    input_ids: list[int]
    images: list[Image.Image]
    enable_thinking: bool = False
    pixel_values: torch.Tensor | None = None
    image_grids: list[tuple[int, int]] | None = None


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def open_image(source, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, param: str | None = None,
               draft_size: int | None = None) -> Image.Image:
    """An RGB image from a PIL image, a file path or encoded bytes; the pixel limit is read from the header.

    `draft_size` (a `ChatModel`'s `draft_size`) decodes a JPEG as the training loader does, at the
    smallest DCT scale that keeps both sides at least that large: the model then gets the pixels it was
    trained on, and a camera photo decodes several times faster. A PIL image is taken as it is."""
    from crossvlm.data.images import load_image
    from crossvlm.data.records import RecordError

    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, str):
        source = Path(source)
    try:
        return load_image(source, max_pixels, draft_size)
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


def collect_images(messages: list[dict], images: list | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   draft_size: int | None = None) -> tuple[list[dict], list[Image.Image]]:
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
                    ordered.append(open_image(pool.pop(0), max_pixels, where, draft_size))
                text += piece
            elif kind == "image":
                ordered.append(open_image(part.get("image"), max_pixels, where, draft_size))
                text += IMAGE_MARK
            else:
                raise InputError(f"{where}: unknown content part type {kind!r} (use text or image)",
                                 "invalid_content", where)
        flat_messages.append({**message, "content": text})
    if pool:
        raise InputError(f"{len(pool)} more images given than {IMAGE_MARK} marks", "image_count_mismatch", "images")
    return flat_messages, ordered


class ChatModel:
    """A CrossVLM ready to answer conversations; its engine starts on the first request."""

    def __init__(self, model: CrossVLM, processor: CrossVLMProcessor,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, engine: EngineConfig | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_image_pixels = max_image_pixels
        from crossvlm.data.images import target_side

        self.draft_size = target_side(processor.image_processor)
        """JPEGs given as bytes or paths decode at the scale the training loader uses (`open_image`)."""
        if processor.tiling is not None and self.draft_size:  # as the loader: the tiles' resolution kept
            self.draft_size = processor.tiling.side * processor.tiling.max_tiles
        self.engine_config = engine or EngineConfig()
        self.context_length = self.engine_config.max_len_for(model.config.text_config)
        eos = model.llm.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in [*eos, self.tokenizer.eos_token_id] if t is not None}
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self.grammars = Grammars(self.tokenizer, self.eos_ids, model.config.text_config.vocab_size)
        """Structured outputs: JSON schemas to matchers (`SamplingParams.json_schema`)."""
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = self.context_length * max(longest, 1)
        """No text longer than this fits the context: a token's string (bytes, in a byte-level vocabulary)
        is never shorter than the characters it decodes to, so more characters mean more tokens than the
        context holds. Checked before tokenizing, which for megabytes without a space takes the tokenizer
        seconds and gigabytes (or aborts the process)."""

    @classmethod
    def load(cls, model_dir: str | Path | None = None, *, llm: str | Path | None = None,
             vision: str | Path | None = None, device: str = "auto", dtype: torch.dtype | None = None,
             engine: EngineConfig | None = None, **projector_kwargs) -> "ChatModel":
        """A saved model directory, or a base LLM + vision tower with a fresh projector."""
        from crossvlm import sources

        if model_dir is not None:  # before anything loads: a wrong folder is named in a second
            sources.check(model_dir, "crossvlm")
        elif llm is not None and vision is not None:
            sources.check(llm, "llm")
            sources.check(vision, "vision")
        dev = pick_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if model_dir is not None:  # the processor first: its files are checked in a second, the weights take longer
            processor = CrossVLMProcessor.from_pretrained(model_dir)
            model = CrossVLM.from_pretrained(str(model_dir), dtype=dtype)
        elif llm is not None and vision is not None:
            model = CrossVLM.from_base_models(llm, vision, dtype=dtype, **projector_kwargs)
            from crossvlm.model.tiling import Tiling

            processor = CrossVLMProcessor.from_base_models(llm, vision, model.num_image_tokens,
                                                           Tiling.from_config(model.config))
        else:
            raise CrossVLMError("give a saved model directory, or both a base LLM and a vision tower")
        return cls(model.to(dev), processor, engine=engine)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def engine(self) -> Engine:
        """The generation engine (made on first use: it allocates the KV cache and records the CUDA graphs)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self.model, self.tokenizer, self.eos_ids, self.engine_config)
                # A script that never calls close() still stops the engine's thread before the
                # interpreter tears down: a thread left inside torch then aborts the process
                # ("terminate called without an active exception", exit 134).
                atexit.register(_close_at_exit, weakref.ref(self))
            return self._engine

    def close(self) -> None:
        """Stop the engine's worker thread (requests still running get an error)."""
        if self._engine is not None:
            self._engine.close()

    def __enter__(self) -> "ChatModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prompt(self, messages: list[dict], images: list | None = None, enable_thinking: bool = False) -> Prompt:
        """Check, render and tokenize one conversation; raises `InputError` for what cannot be answered."""
        if not messages:
            raise InputError("the conversation has no messages", "invalid_content", "messages")
        from crossvlm.data.render import TemplateMismatch, encode_prompt

        chars = sum(len(m.get("content")) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
        chars += sum(len(str(part.get("text", ""))) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                     for part in m["content"] if isinstance(part, dict))
        if chars > self.max_prompt_chars:
            raise InputError(f"the conversation's {chars} characters need more tokens than the context's "
                             f"{self.context_length}; shorten it", "context_length_exceeded", "messages")
        flat, imgs = collect_images(messages, images, self.max_image_pixels, self.draft_size)
        grids = self.processor.image_grids(imgs)  # tiled models: each image's grid (None: one view each)

        def render(grids):
            try:  # rendered exactly as training renders a conversation (docs/DATA.md)
                return encode_prompt(flat, self.tokenizer, self.processor.image_token_counts(grids),
                                     enable_thinking=enable_thinking)
            except TemplateMismatch as err:
                raise CrossVLMError(str(err)) from err
            except ValueError as err:
                raise InputError(f"cannot render the conversation: {err}", "invalid_content", "messages") from err

        ids = render(grids)
        if len(ids) >= self.context_length and grids and any(g != (1, 1) for g in grids):
            grids = [(1, 1)] * len(grids)  # the tiles do not fit the context: every image's thumbnail alone
            ids = render(grids)
        if len(ids) >= self.context_length:
            raise InputError(
                f"the prompt takes {len(ids)} tokens (images included) but the context is "
                f"{self.context_length} tokens; shorten the conversation or send fewer images",
                "context_length_exceeded", "messages",
            )
        return Prompt(ids, imgs, enable_thinking, self.processor.preprocess_images(imgs, grids) if imgs else None,
                      grids if imgs else None)

    def matcher(self, sampling: SamplingParams, thinking: bool = False) -> Matcher | None:
        """The grammar matcher of a structured-output request (None without `json_schema`); raises
        `InputError` for a schema that cannot be enforced. A schema of several kB compiles in ms:
        the server calls this in a worker thread."""
        if sampling.json_schema is None:
            return None
        if thinking:
            raise InputError("a JSON schema (response_format) cannot go with thinking: the answer would have to "
                             "start with the document; turn enable_thinking off", "invalid_request", "response_format")
        try:
            return self.grammars.matcher(sampling.json_schema)
        except SchemaError as err:
            raise InputError(str(err), "invalid_json_schema", "response_format") from None

    def submit(self, prompt: Prompt, sampling: SamplingParams | None, on_event: Callable, stream: bool = False,
               max_waiting: int | None = None, matcher: Matcher | None = None) -> Request:
        """Hand one prepared prompt to the engine; `on_event` gets its `Delta`s (with `stream`), then a
        `Completion` or an exception, from the engine's thread. Raises `QueueFull` if `max_waiting`
        requests already wait for a slot. A `json_schema` request's `matcher` is made here if not given."""
        sampling = sampling or SamplingParams()
        if matcher is None:
            matcher = self.matcher(sampling, prompt.enable_thinking)
        request = Request(prompt.input_ids, prompt.pixel_values, sampling, on_event, thinking=prompt.enable_thinking,
                          stream=stream, matcher=matcher, image_grids=prompt.image_grids)
        return self.engine.submit(request, max_waiting)

    def generate_prompts(self, prompts: list[Prompt], sampling: SamplingParams | list[SamplingParams] | None = None,
                         on_delta: Callable[[int, Delta], None] | None = None,
                         on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """Answer prepared prompts, all at once through the engine; each may have its own settings.

        `on_delta(i, delta)` gets text as it is generated, `on_done(i, completion)` each answer as
        soon as it ends. Raises the first request's error if any generation failed (after all end).
        """
        settings = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        results: list[Completion | BaseException | None] = [None] * len(prompts)
        finished = threading.Semaphore(0)

        def handler(i: int):
            def on_event(event):
                if isinstance(event, Delta):
                    if on_delta is not None:
                        on_delta(i, event)
                    return
                results[i] = event
                if isinstance(event, Completion) and on_done is not None:
                    on_done(i, event)
                finished.release()
            return on_event

        for i, (p, s) in enumerate(zip(prompts, settings)):
            self.submit(p, s, handler(i), stream=on_delta is not None)
        for _ in prompts:
            finished.acquire()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return results

    def generate(self, conversations: list[list[dict]], images: list[list] | None = None,
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 enable_thinking: bool = False) -> list[Completion]:
        """Answer many conversations at once; returns one `Completion` per conversation."""
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


def _close_at_exit(ref: "weakref.ref[ChatModel]") -> None:
    chat = ref()
    if chat is not None:
        chat.close()


class ChatStream:
    """Iterates over the deltas of one answer as the engine produces them; `cancel()` stops it."""

    def __init__(self, chat: ChatModel, prompt: Prompt, sampling: SamplingParams | None):
        self.completion: Completion | None = None
        self._events: queue.Queue = queue.Queue()
        self._engine = chat.engine
        self.request = chat.submit(prompt, sampling, self._events.put, stream=True)

    def cancel(self) -> None:
        """Stop generating (the request's slot is free at the engine's next step)."""
        self._engine.cancel(self.request)

    def __iter__(self) -> Iterator[Delta]:
        try:
            while self.completion is None:
                event = self._events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Completion):
                    self.completion = event
                else:
                    yield event
        finally:
            if self.completion is None:
                self.cancel()  # the reader stopped early


def load(model_dir: str | Path, device: str = "auto", dtype: torch.dtype | None = None,
         engine: EngineConfig | None = None) -> ChatModel:
    """Load a saved CrossVLM directory for chatting and batched generation."""
    return ChatModel.load(model_dir, device=device, dtype=dtype, engine=engine)
