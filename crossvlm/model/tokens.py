"""The text side of images: the `<image>` mark users write and the token span it becomes.

Every `<image>` in a conversation becomes `<|vision_start|><|image_pad|>×M<|vision_end|>`, where M is
the projector's number of visual tokens. Ids are always read from the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

IMAGE_MARK = "<image>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def image_placeholder(num_image_tokens: int) -> str:
    """The text one image occupies: start token, M pad tokens, end token."""
    return VISION_START + IMAGE_PAD * num_image_tokens + VISION_END


def expand_image_marks(text: str, num_image_tokens: int | Iterator[int]) -> str:
    """Replace each `<image>` mark in `text` with the image's token span.

    `num_image_tokens`: the tokens of every image, or an iterator giving each mark's in turn (tiled
    images differ: crossvlm.model.tiling); it must not run out before the marks do.
    """
    if isinstance(num_image_tokens, int):
        return text.replace(IMAGE_MARK, image_placeholder(num_image_tokens))
    pieces = text.split(IMAGE_MARK)
    out = [pieces[0]]
    for piece in pieces[1:]:
        count = next(num_image_tokens, None)
        if count is None:
            raise ValueError(f"more {IMAGE_MARK} marks than image token counts given")
        out += [image_placeholder(count), piece]
    return "".join(out)


@dataclass(frozen=True)
class VisionTokenIds:
    """Ids of the vision special tokens, looked up in a tokenizer."""

    start: int
    end: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "VisionTokenIds":
        ids = {}
        for name, token in (("start", VISION_START), ("end", VISION_END), ("pad", IMAGE_PAD)):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
                raise ValueError(
                    f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no {token} token; "
                    "crossvlm needs Qwen3's vision special tokens"
                )
            ids[name] = tid
        return cls(**ids)
