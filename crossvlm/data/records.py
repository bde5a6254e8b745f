"""One record as read from a file, its normalised conversation, and the kinds of bad record.

Readers return a `RawRecord` (the file's own representation); `normalize` turns it into a
`Conversation` with `{role, content}` messages or raises `RecordError` naming the kind of problem.
Nothing here knows about tokens or tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossvlm.model.tokens import IMAGE_MARK

# Every kind of bad record, with the line the report prints for it.
BAD_KINDS = {
    "malformed": "record is not valid JSON, or its conversation is not a list of turns",
    "empty_conversation": "conversation has no turns, or only empty ones",
    "no_assistant_turn": "conversation has no assistant turn to learn from",
    "turn_order": "an assistant turn comes first or follows another assistant turn",
    "unknown_role": "a turn has a role other than system/user/assistant (human/gpt), or none",
    "non_text_content": "a turn's content is not a string",
    "image_count_mismatch": "the number of <image> marks differs from the number of images",
    "missing_image": "an image file does not exist",
    "bad_image": "image bytes cannot be decoded",
    "image_too_large": "an image has more pixels than max_image_pixels",
    "too_long": "nothing trainable is left after truncation to max_length",
    "error": "unexpected error while reading the record",
}

ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class RecordError(Exception):
    """A record cannot be used; `kind` is one of BAD_KINDS."""

    def __init__(self, kind: str, detail: str = ""):
        assert kind in BAD_KINDS, kind
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class BadRecord:
    """A skipped record: what was wrong and where (file and 0-based row)."""

    kind: str
    location: str
    detail: str = ""


@dataclass
class RawRecord:
    """A record as stored: `conversations` is a JSON string or a list; `images` are bytes or paths."""

    conversations: Any
    images: list[bytes | Path]
    location: str


@dataclass
class Conversation:
    """A checked record: messages with canonical roles and string contents, images in mark order."""

    messages: list[dict[str, str]]
    images: list[bytes | Path] = field(default_factory=list)
    location: str = ""


def normalize(raw: RawRecord) -> Conversation:
    """Check a raw record and bring its turns to `{role, content}` with roles system/user/assistant."""
    turns = raw.conversations
    if isinstance(turns, (str, bytes)):
        try:
            turns = json.loads(turns)
        except ValueError as err:
            raise RecordError("malformed", f"conversations is not valid JSON ({err})") from None
    if isinstance(turns, dict) and "conversations" in turns:
        turns = turns["conversations"]
    if turns is None:
        turns = []
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise RecordError("malformed", f"conversations must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise RecordError("empty_conversation")

    # A missing key and a null (as parquet stores a struct field some turns lack) both mean "no role".
    has_role = [t.get("role", t.get("from")) is not None for t in turns]
    if any(has_role) and not all(has_role):
        raise RecordError("unknown_role", f"turn {has_role.index(False)} has no role while others do")
    messages = []
    for i, turn in enumerate(turns):
        if all(has_role):
            given = turn.get("role", turn.get("from"))
            role = ROLE_ALIASES.get(given.lower()) if isinstance(given, str) else None
            if role is None:
                raise RecordError("unknown_role", f"turn {i} has role {given!r}")
        else:  # older MiniMind-V files: no roles, turns alternate user/assistant, user first
            role = "user" if i % 2 == 0 else "assistant"
        content = turn.get("content", turn.get("value"))
        if not isinstance(content, str):
            raise RecordError("non_text_content", f"turn {i} content is {type(content).__name__}")
        messages.append({"role": role, "content": content})

    if not any(m["content"].strip() for m in messages):
        raise RecordError("empty_conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant_turn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and (i == 0 or messages[i - 1]["role"] == "assistant"):
            raise RecordError("turn_order", f"assistant turn {i} does not follow a user turn")

    marks = sum(m["content"].count(IMAGE_MARK) for m in messages)
    if marks != len(raw.images):
        raise RecordError("image_count_mismatch", f"{marks} <image> marks, {len(raw.images)} images")
    return Conversation(messages=messages, images=list(raw.images), location=raw.location)
