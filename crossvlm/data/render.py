"""Conversations to token ids and labels, with the LLM's own chat template.

How a conversation is rendered (docs/DATA.md says why):
- Each `<image>` mark becomes `<|vision_start|><|image_pad|>×M<|vision_end|>` before templating.
- The conversation is cut into segments, one per assistant turn: the turns since the previous answer
  (user, system) followed by the answer. Each segment is rendered by the chat template as if its answer
  were the last message, so the text before every answer ends with exactly what
  `apply_chat_template(history, add_generation_prompt=True, enable_thinking=...)` ends with: with thinking
  off, `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`. That prompt part is not labelled; the answer
  and the `<|im_end|>` closing it are. With thinking on, the prompt ends at `<|im_start|>assistant\\n` and
  the empty think block is labelled, since the model must then write it itself.
- Earlier answers therefore keep their (empty) think block in the history, where Qwen3's stock template
  drops it. `encode_prompt` renders a chat for generation the same way, so what a model sees when it
  answers turn k is what it was trained on.
Text pieces are tokenized separately; every boundary is at a special token or a newline, where joint
and separate tokenization agree (a test checks the required property on the real template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from crossvlm.model.tokens import VisionTokenIds, expand_image_marks

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"


class TemplateMismatch(ValueError):
    """The chat template renders an answer differently from its own generation prompt."""


@dataclass
class EncodedSample:
    """Token ids of one conversation and its labels (IGNORE_INDEX where nothing is trained)."""

    input_ids: list[int]
    labels: list[int]
    num_images: int


def prepare_messages(messages: list[dict], num_image_tokens: int | Sequence[int], system_prompt: str | None) -> list[dict]:
    """Expand image marks and put `system_prompt` first when the conversation has no system turn.

    `num_image_tokens`: the visual tokens of every image, or of each image in order of appearance
    (tiled images: `Tiling.tokens`)."""
    counts = num_image_tokens if isinstance(num_image_tokens, int) else iter(num_image_tokens)
    out = [{"role": m["role"], "content": expand_image_marks(m["content"], counts)} for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


class _Renderer:
    """Segment-wise rendering through `tokenizer.apply_chat_template`, returning token pieces."""

    def __init__(self, tokenizer, enable_thinking: bool):
        self.tok = tokenizer
        self.enable_thinking = enable_thinking

    def text(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, enable_thinking=self.enable_thinking
        )

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    @staticmethod
    def after(full: str, prefix: str, what: str) -> str:
        if not full.startswith(prefix):
            raise TemplateMismatch(
                f"the chat template's rendering of {what} does not extend its rendering of what precedes it; "
                "crossvlm needs a template where appending a message only appends text (Qwen3's does)"
            )
        return full[len(prefix):]

    def segments(self, messages: list[dict]) -> tuple[list[tuple[str, str, str]], tuple[list, str, list]]:
        """(context, answer, tail) texts per assistant turn, and what is left after the last answer.

        The first segment is rendered from the start of the conversation; later ones after an anchor
        (the conversation's first message) whose rendering is subtracted, because templates cannot
        render an empty list and may add a default system prompt to a list that starts elsewhere.
        The leftover is (anchor, its rendering, the turns after the last answer).
        """
        anchor: list[dict] = []
        base = ""
        start = 0
        pieces = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            turns = anchor + messages[start:k]
            prompt = self.text(turns, generation_prompt=True)
            full = self.text(turns + [m])
            context = self.after(prompt, base, "the generation prompt")
            answer = self.after(full, prompt, f"assistant turn {k}")
            end = answer.rfind(END_OF_TURN)
            if end < 0:
                raise TemplateMismatch(f"the chat template does not close assistant turn {k} with {END_OF_TURN}")
            end += len(END_OF_TURN)
            pieces.append((context, answer[:end], answer[end:]))
            if not anchor:
                anchor = messages[:1]
                base = self.text(anchor)
            start = k + 1
        return pieces, (anchor, base, messages[start:])


def encode_conversation(messages: list[dict], tokenizer, num_image_tokens: int | Sequence[int], *,
                        system_prompt: str | None = None, enable_thinking: bool = False) -> EncodedSample:
    """Token ids and labels for a conversation of `{role, content}` messages (roles system/user/assistant).

    Labels are the answer tokens of every assistant turn and the `<|im_end|>` closing it; everything
    else is IGNORE_INDEX. Turns after the last answer are not rendered (nothing there is trained).
    """
    msgs = prepare_messages(messages, num_image_tokens, system_prompt)
    renderer = _Renderer(tokenizer, enable_thinking)
    input_ids: list[int] = []
    labels: list[int] = []
    pieces, _ = renderer.segments(msgs)
    for context, answer, tail in pieces:
        for text, trained in ((context, False), (answer, True), (tail, False)):
            ids = renderer.ids(text)
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
    vision = VisionTokenIds.from_tokenizer(tokenizer)
    span_ids = {vision.start, vision.pad, vision.end}
    # Image spans are inputs, never targets, even where an answer holds an <image> mark.
    labels = [IGNORE_INDEX if t in span_ids else lab for t, lab in zip(input_ids, labels)]
    # Turns after the last answer are not rendered, so their images (the last ones) are not counted.
    return EncodedSample(input_ids, labels, input_ids.count(vision.start))


def encode_prompt(messages: list[dict], tokenizer, num_image_tokens: int | Sequence[int], *,
                  system_prompt: str | None = None, enable_thinking: bool = False) -> list[int]:
    """Token ids of a chat ready for generation, rendered exactly as training renders its history.

    `messages` ends with the user turn to answer; the ids end with the generation prompt.
    """
    msgs = prepare_messages(messages, num_image_tokens, system_prompt)
    renderer = _Renderer(tokenizer, enable_thinking)
    pieces, (anchor, base, rest) = renderer.segments(msgs)
    ids = [t for segment in pieces for text in segment for t in renderer.ids(text)]
    if not rest:
        raise ValueError("encode_prompt needs a conversation that ends with a user turn")
    ids += renderer.ids(renderer.after(renderer.text(anchor + rest, generation_prompt=True), base, "the prompt"))
    return ids


def truncate(sample: EncodedSample, max_length: int, vision: VisionTokenIds) -> tuple[EncodedSample, bool] | None:
    """Cut a sample to `max_length` tokens without cutting an image span.

    When the cut would fall inside an image span it moves back to just before that span, so the image
    and any later ones are dropped with the text. Returns (sample, was_cut), or None when no labelled
    token is left (the caller counts it as `too_long`).
    """
    ids = sample.input_ids
    if len(ids) <= max_length:
        return sample, False
    cut = max_length
    last_start = _rindex(ids, vision.start, cut)
    if last_start >= 0 and _rindex(ids, vision.end, cut) < last_start:
        cut = last_start  # the span opened before the cut is not closed before it
    labels = sample.labels[:cut]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None
    kept = ids[:cut]
    return EncodedSample(kept, labels, kept.count(vision.start)), True


def _rindex(ids: list[int], value: int, stop: int) -> int:
    for i in range(stop - 1, -1, -1):
        if ids[i] == value:
            return i
    return -1
