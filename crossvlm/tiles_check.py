"""The tiles' learning check: a question only a high-resolution view can answer, on the CPU.

Each image is a grey canvas of `TILE_GRID` x `TILE_GRID` tower-sized tiles with one small mark at a
random place: a one-pixel checkerboard of a colour and its complement (red and cyan, green and
magenta, blue and yellow). Every such pair averages to the background's grey, so when the canvas is
shrunk to one tower-sized view the mark vanishes (what is left differs between the colours by at
most 5 grey levels, at the mark's corners); cut into tiles at the canvas's own resolution it is
plain to see. The question "What colour is the mark?" is answered by one word of three (chance: 1/3);
the second question, "Is the mark on the left or the right?" (chance: 1/2), is answered by where the
tile that shows it lies: the tiles' place codes or their tokens' order must tell the LLM.

`run_check` trains a tiny VLM (random tiny base models, as the tests use; the vision tower frozen,
the projector and LLM trained) on freshly drawn images for a fixed number of steps and returns the
held-out accuracy; `compare` runs it once per `max_tiles` on the same budget and seed. The model,
processor, rendering, collation and forward are the product's own. `python -m crossvlm.tiles_check`
runs the documented comparison (docs/TRAINING.md, "Tiles"); tests/test_tiles.py a shorter one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
QUESTIONS = {"colour": "<image>What colour is the mark?", "side": "<image>Is the mark on the left or the right?"}
TILE_GRID = 2
"""The canvas is this many tower-sized tiles a side (2: a 128-pixel canvas for the tiny 64-pixel tower)."""
MARK = 16
"""The mark's side in canvas pixels (4 x 4 patches of a tile at full resolution; 2 x 2 uniform grey ones in one view)."""
BACKGROUND = 128
PROJECTOR = dict(projector_init="pool", projector_locality="cell", projector_position="keys", projector_kv_norm=False,
                 projector_output_scale=14.0)
"""The CPU demo's projector (crossvlm/configs/demo_pretrain.yaml): what a tiny LLM trained from random
weights binds to quickly (docs/TRAINING.md, "The demo")."""


def draw_marks(n: int, side: int, rng: np.random.Generator, question: str = "colour") -> tuple[list, list[str]]:
    """`n` canvases (PIL images of `TILE_GRID`·`side` pixels a side) and each one's answer: its mark's
    colour, or (question "side") the half of the canvas it lies in, wholly."""
    from PIL import Image

    size = TILE_GRID * side
    names = list(COLOURS)
    yy, xx = np.mgrid[0:MARK, 0:MARK]
    board = ((yy + xx) % 2 == 0)[..., None]  # (MARK, MARK, 1)
    images, answers = [], []
    for _ in range(n):
        colour = names[int(rng.integers(len(names)))]
        c = np.array(COLOURS[colour], dtype=np.uint8)
        x, y = (2 * int(v) for v in rng.integers(0, (size - MARK) // 2 + 1, size=2))  # even: pairs stay whole
        half = None
        if question == "side":
            half = ("left", "right")[int(rng.integers(2))]
            x = 2 * int(rng.integers(0, (size // 2 - MARK) // 2 + 1)) + (size // 2 if half == "right" else 0)
        canvas = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
        canvas[y:y + MARK, x:x + MARK] = np.where(board, c, 255 - c)
        images.append(Image.fromarray(canvas))
        answers.append(half or colour)
    return images, answers


def _samples(processor, images, answers, question: str = "colour"):
    """Rendered samples (the trainer's `Sample`s) of one question per image."""
    import torch

    from crossvlm.data.collate import Sample
    from crossvlm.data.render import encode_conversation

    grids = processor.image_grids(images)
    out = []
    for k, (image, answer) in enumerate(zip(images, answers)):
        grid = None if grids is None else [grids[k]]
        messages = [{"role": "user", "content": QUESTIONS[question]}, {"role": "assistant", "content": answer}]
        enc = encode_conversation(messages, processor.tokenizer, processor.image_token_counts(grid))
        out.append(Sample(torch.tensor(enc.input_ids), torch.tensor(enc.labels),
                          processor.preprocess_images([image], grid),
                          image_grids=None if grid is None else torch.tensor(grid)))
    return out


def _model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "labels", "pixel_values")
    inputs = {k: batch[k] for k in keys if batch.get(k) is not None}
    if batch.get("image_grids") is not None:
        inputs["image_grids"] = batch["image_grids"]
    return inputs


def accuracy(model, processor, images, answers, question: str = "colour", batch_size: int = 64) -> float:
    """Share of images whose answer's first token is the model's likeliest next token after the prompt."""
    import torch

    from crossvlm.data.collate import Collator

    collate = Collator(processor.tokenizer.pad_token_id)
    right = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = collate(_samples(processor, images[start:start + batch_size], answers[start:start + batch_size],
                                     question))
            labels = batch["labels"]
            first = (labels != -100).int().argmax(1)  # (B,) each row's first labelled position
            inputs = _model_inputs(batch)
            inputs.pop("labels")
            logits = model(**inputs).logits  # (B, T, V)
            rows = torch.arange(len(first))
            right += int((logits[rows, first - 1].argmax(-1) == labels[rows, first]).sum())
    return right / len(images)


def run_check(models: Path, max_tiles: int, *, steps: int = 150, batch_size: int = 16, lr: float = 3e-3,
              seed: int = 0, n_test: int = 240, num_queries: int = 16, tile_queries: int | None = None,
              question: str = "colour", place_codes: bool = True, **projector) -> dict:
    """Train a tiny VLM with `max_tiles` on the marks for `steps` steps; its held-out accuracy and cost.

    `models` holds the tiny base models (`write_random_models(models, "tiny")`). `place_codes=False`
    holds the tiles' place codes at zero (the ablation: tiles told apart by their tokens' order alone).
    """
    import torch

    from crossvlm.data.collate import Collator
    from crossvlm.errors import ConfigError
    from crossvlm.model import CrossVLM
    from crossvlm.model.processor import CrossVLMProcessor
    from crossvlm.model.tiling import Tiling
    from crossvlm.train.runtime import seed_everything

    problems = [f"question {question!r} is not one of {sorted(QUESTIONS)}"] if question not in QUESTIONS else []
    problems += [f"{name} must be at least 1, not {value}" for name, value in
                 (("steps", steps), ("batch size", batch_size), ("test images", n_test)) if value < 1]
    if problems:
        raise ConfigError("tiles check: " + "; ".join(problems))
    seed_everything(seed)
    model = CrossVLM.from_base_models(models / "llm", models / "vision", num_queries=num_queries, projector_heads=4,
                                      max_tiles=max_tiles, tile_queries=tile_queries, **{**PROJECTOR, **projector})
    processor = CrossVLMProcessor.from_base_models(models / "llm", models / "vision", model.num_image_tokens,
                                                   Tiling.from_config(model.config))
    model.llm.requires_grad_(True)
    model.projector.requires_grad_(True)
    if not place_codes and model.projector.place_rows is not None:
        for code in (model.projector.place_rows, model.projector.place_cols):
            code.data.zero_()
            code.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    side = model.config.vision_config.image_size
    train_rng, test_rng = np.random.default_rng(seed), np.random.default_rng(seed + 10_000)
    collate = Collator(processor.tokenizer.pad_token_id)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        model.train()
        batch = collate(_samples(processor, *draw_marks(batch_size, side, train_rng, question), question))
        loss = model(**_model_inputs(batch)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    images, answers = draw_marks(n_test, side, test_rng, question)
    grid = processor.image_grids(images[:1])
    return {"max_tiles": max_tiles, "question": question, "place_codes": place_codes,
            "accuracy": accuracy(model, processor, images, answers, question),
            "chance": 1 / len(COLOURS) if question == "colour" else 1 / 2,
            "tokens_per_image": processor.image_token_counts(grid)[0] if grid else model.num_image_tokens,
            "grid": list(grid[0]) if grid else [1, 1], "steps": steps, "batch_size": batch_size,
            "train_s": round(train_s, 1), "final_loss": float(np.mean(losses[-10:]))}


def compare(models: Path, tiles: tuple[int, ...] = (1, 4), **kwargs) -> list[dict]:
    """`run_check` once per `max_tiles` value, same steps, data and seed.

    On one thread: the tiny model's operations are too small to split, and on a busy machine two
    threads waiting for each other made a step ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [run_check(models, n, **kwargs) for n in tiles]
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m crossvlm.tiles_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tiles_check"), help="where the tiny base models go")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tile-queries", type=int, default=None)
    parser.add_argument("--question", choices=sorted(QUESTIONS), default="colour")
    parser.add_argument("--no-place-codes", action="store_true", help="hold the tiles' place codes at zero")
    args = parser.parse_args(argv)
    from crossvlm.errors import CrossVLMError
    from crossvlm.make_model import write_random_models

    try:
        if not (args.out / "llm").is_dir():
            write_random_models(args.out, "tiny", seed=args.seed)
        results = compare(args.out, tuple(args.tiles), steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                          tile_queries=args.tile_queries, question=args.question, place_codes=not args.no_place_codes)
    except CrossVLMError as err:  # a bad setting: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for r in results:
        print(f"{r['question']}, max_tiles {r['max_tiles']}{'' if r['place_codes'] else ' (no place codes)'}: grid {r['grid']}, {r['tokens_per_image']} visual tokens per image, "
              f"held-out accuracy {r['accuracy']:.1%} (chance {r['chance']:.1%}), {r['steps']} steps in {r['train_s']} s")
    (args.out / "result.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
