"""The synthetic "shapes" data set: small images of one to three shapes, with captions and questions.

Per image: a caption (pretraining) and a conversation of short questions (SFT) about the colour of a
named shape, the shape of a named colour, the count, the position of a named shape, and a two-turn
exchange ("What colour is the circle?" … "And where is it?"). Within an image, shapes have distinct
kinds, colours and grid cells, so every question has exactly one answer. Language is templated and
answers are one or two words, so a tiny model can learn it on a CPU in minutes.

Files (MiniMind-V parquet: `conversations` JSON string, `image_bytes` JPEG):
- pretrain_train / pretrain_test: one caption conversation per image;
- sft_train: one conversation per training image, all question blocks in random order; or, with
  `one_question_per_row`, one row per (training image, question block; the two-turn exchange is
  one block): shorter sequences, so a step costs less and no earlier answer sits in the context;
- sft_test: one row per (test image, question type), with `question_type` and `answer` columns; the
  conversation ends with the expected answer, so the prompt is everything before the last turn.
Test images are fresh renderings from a separate random stream (and checked not to repeat a
training image byte for byte). Everything is deterministic from the seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from crossvlm.model.tokens import IMAGE_MARK

KINDS = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 35),
    "green": (30, 150, 50),
    "blue": (35, 70, 225),
    "yellow": (235, 205, 20),
    "purple": (135, 45, 175),
    "orange": (245, 125, 20),
}
# Half-extent of a shape as a fraction of its grid cell's side.
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.42}
# 3×3 grid, row by row; the canonical answers to "where is …?".
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")

QUESTION_TYPES = ("colour", "shape", "count", "position", "multi")
# Accuracy of guessing uniformly among the possible answers of each question type.
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(KINDS), "count": 1 / 3,
          "position": 1 / len(POSITIONS), "multi": 1 / len(POSITIONS)}

CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?")
QUESTIONS = {
    "colour": ("What colour is the {kind}?", "Which colour is the {kind}?"),
    "shape": ("What shape is {colour}?", "Which shape is {colour}?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "position": ("Where is the {kind}?", "Where is the {kind} in the image?"),
}
FOLLOW_UP = "And where is it?"
NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "zero": "0", "four": "4"}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: int  # 0..8, row by row

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


def sample_scene(rng: random.Random) -> list[Shape]:
    """One to three shapes with distinct kinds, colours and cells."""
    n = rng.randint(1, 3)
    kinds = rng.sample(KINDS, n)
    colours = rng.sample(sorted(COLOURS), n)
    cells = rng.sample(range(9), n)
    return [Shape(k, c, rng.choice(sorted(SIZES)), cell) for k, c, cell in zip(kinds, colours, cells)]


def render_scene(shapes: list[Shape], rng: random.Random, image_size: int = 64) -> bytes:
    """JPEG bytes of the scene: a pale two-tone gradient background and the shapes, drawn at 2× and
    downsampled for smooth edges."""
    from PIL import Image, ImageDraw

    scale = 2
    side = image_size * scale
    c1 = tuple(rng.randint(185, 250) for _ in range(3))
    c2 = tuple(min(255, max(170, v + rng.randint(-40, 40))) for v in c1)
    mask = Image.linear_gradient("L").resize((side, side)).rotate(90 * rng.randint(0, 3))
    img = Image.composite(Image.new("RGB", (side, side), c1), Image.new("RGB", (side, side), c2), mask)
    draw = ImageDraw.Draw(img)
    cell = side / 3
    for s in shapes:
        r = SIZES[s.size] * cell
        slack = cell / 2 - r - scale  # keep the shape inside its cell
        cx = (s.cell % 3 + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (s.cell // 3 + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, s.kind, cx, cy, r, COLOURS[s.colour])
    img = img.resize((image_size, image_size), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _draw_shape(draw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        q = r * 0.85  # same visual weight as the circle
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif kind == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def caption(shapes: list[Shape]) -> str:
    count = ("One shape", "Two shapes", "Three shapes")[len(shapes) - 1]
    parts = [f"a {s.size} {s.colour} {s.kind} at {s.position}" for s in shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{count}: {listed}."


_CAPTION_PART = re.compile(r"a (\w+) (\w+) (\w+) at ([a-z ]+?)(?=, | and |\.$)")


def parse_caption(text: str) -> list[Shape]:
    """The shapes a caption of `caption()` describes (its inverse)."""
    shapes = [Shape(kind, colour, size, POSITIONS.index(where)) for size, colour, kind, where
              in _CAPTION_PART.findall(text.split(": ", 1)[-1])]
    if not shapes:
        raise ValueError(f"not a shapes caption: {text!r}")
    return shapes


def question_blocks(shapes: list[Shape], rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """One block of (question, answer) turns per question type, about randomly chosen shapes."""
    def ask(qtype: str, **fields) -> str:
        return rng.choice(QUESTIONS[qtype]).format(**fields)

    target = rng.choice(shapes)
    by_colour = rng.choice(shapes)
    located = rng.choice(shapes)
    followed = rng.choice(shapes)
    return {
        "colour": [(ask("colour", kind=target.kind), target.colour)],
        "shape": [(ask("shape", colour=by_colour.colour), by_colour.kind)],
        "count": [(ask("count"), str(len(shapes)))],
        "position": [(ask("position", kind=located.kind), located.position)],
        "multi": [(ask("colour", kind=followed.kind), followed.colour), (FOLLOW_UP, followed.position)],
    }


def _conversation(turns: list[tuple[str, str]]) -> str:
    """MiniMind-V's `conversations` JSON, the image marked at the start of the first question."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": (f"{IMAGE_MARK}\n" if i == 0 else "") + question})
        messages.append({"role": "assistant", "content": answer})
    return json.dumps(messages, ensure_ascii=False)


def write_synthetic(out_dir: str | Path, seed: int = 0, n_train: int = 10_000, n_test: int = 500,
                    image_size: int = 64, one_question_per_row: bool = False) -> dict[str, Path]:
    """Write the shapes set under `out_dir`; returns {"pretrain_train": path, ...}.

    The images, captions and questions are the same whatever `one_question_per_row` says; only how
    sft_train groups the question blocks into rows changes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, dict[str, list]] = {
        name: {"conversations": [], "image_bytes": [], "image_id": []}
        for name in ("pretrain_train", "pretrain_test", "sft_train", "sft_test")
    }
    tables["sft_test"].update(question_type=[], answer=[])
    train_hashes = set()
    for split, n in (("train", n_train), ("test", n_test)):
        rng = random.Random(f"crossvlm-shapes/{seed}/{split}")
        made = 0
        while made < n:
            shapes = sample_scene(rng)
            image = render_scene(shapes, rng, image_size)
            digest = hashlib.sha1(image).digest()
            if split == "train":
                train_hashes.add(digest)
            elif digest in train_hashes:
                continue  # held-out images must not repeat a training image
            image_id = f"{split}-{made:06d}"
            _add(tables[f"pretrain_{split}"], _conversation([(rng.choice(CAPTION_PROMPTS), caption(shapes))]),
                 image, image_id)
            blocks = question_blocks(shapes, rng)
            if split == "train":
                order = list(QUESTION_TYPES)
                rng.shuffle(order)
                if one_question_per_row:
                    for qtype in order:
                        _add(tables["sft_train"], _conversation(blocks[qtype]), image, image_id)
                else:
                    _add(tables["sft_train"], _conversation([t for q in order for t in blocks[q]]), image, image_id)
            else:
                for qtype in QUESTION_TYPES:
                    _add(tables["sft_test"], _conversation(blocks[qtype]), image, image_id,
                         question_type=qtype, answer=blocks[qtype][-1][1])
            made += 1
    paths = {}
    for name, columns in tables.items():
        path = out / f"{name}.parquet"
        schema = {"conversations": pa.string(), "image_bytes": pa.binary(), "image_id": pa.string(),
                  "question_type": pa.string(), "answer": pa.string()}
        table = pa.table({k: pa.array(v, type=schema[k]) for k, v in columns.items()})
        pq.write_table(table, path, row_group_size=1024)
        paths[name] = path
    return paths


def _add(table: dict, conversations: str, image: bytes, image_id: str, **extra) -> None:
    table["conversations"].append(conversations)
    table["image_bytes"].append(image)
    table["image_id"].append(image_id)
    for key, value in extra.items():
        table[key].append(value)


_ALIASES = {"center": "centre", "middle": "centre", "gray": "grey", "colour": "", "color": "", "shape": ""}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, synonyms mapped: 'The Center.' → 'centre'."""
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    words = [NUMBER_WORDS.get(w, _ALIASES.get(w, w)) for w in words if w not in ("a", "an", "the", "it", "is")]
    words = [w for w in words if w]
    # "top centre" is "top", "centre left" is "left": the centre word only names the middle cell.
    if len(words) == 2 and "centre" in words:
        words = [w for w in words if w != "centre"]
    return " ".join(words)


def score_answer(pred: str, expected: str) -> bool:
    """Normalised exact match of a predicted answer against the expected short answer."""
    return normalize_answer(pred) == normalize_answer(expected)
