"""The CPU demo: tiny random base models + the synthetic shapes set; the tiny tower taught the shapes,
then both stages, then held-out accuracy.

`run_demo` is what `crossvlm demo` runs. Everything is made on the spot (nothing is downloaded), so
it doubles as the end-to-end check of the whole tool on a fresh machine.
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from crossvlm.configs import config_path

DEMO_PRETRAIN = "demo_pretrain.yaml"
DEMO_SFT = "demo_sft.yaml"
VISION_STEPS = 2000


@dataclass
class ShapesScore:
    """Held-out accuracy per question type, with a few examples."""

    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[dict] = field(default_factory=list)

    @property
    def overall(self) -> float:
        return sum(self.correct.values()) / max(1, sum(self.total.values()))

    def accuracy(self, qtype: str) -> float:
        return self.correct[qtype] / max(1, self.total[qtype])

    def table(self) -> str:
        from crossvlm.data.synth import CHANCE, QUESTION_TYPES

        lines = [f"{'question type':<14}{'accuracy':>10}{'chance':>9}{'n':>6}"]
        for q in QUESTION_TYPES:
            if self.total[q]:
                lines.append(f"{q:<14}{self.accuracy(q):>10.1%}{CHANCE[q]:>9.1%}{self.total[q]:>6}")
        lines.append(f"{'overall':<14}{self.overall:>10.1%}{'':>9}{sum(self.total.values()):>6}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"overall": self.overall, "per_type": {q: self.accuracy(q) for q in self.total},
                "counts": dict(self.total)}


def score_shapes(chat, test_parquet: Path, batch_size: int = 64, limit: int | None = None,
                 keep_examples: int = 6) -> ShapesScore:
    """Greedy answers to every held-out question of the synthetic set, scored per type.

    Each row's conversation ends with the question to answer; earlier turns (the multi-turn type)
    are given as history with their reference answers.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    from crossvlm.data.synth import score_answer
    from crossvlm.inference import SamplingParams

    table = pq.read_table(test_parquet, columns=["conversations", "image_bytes", "question_type", "answer"])
    rows = table.to_pylist()[:limit]
    score = ShapesScore()
    sampling = SamplingParams(max_new_tokens=8, greedy=True)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        convs = [json.loads(r["conversations"])[:-1] for r in chunk]  # drop the reference answer
        images = [[Image.open(io.BytesIO(r["image_bytes"]))] for r in chunk]
        answers = [c.text for c in chat.generate(convs, images, sampling)]
        for row, conv, pred in zip(chunk, convs, answers):
            ok = score_answer(pred, row["answer"])
            score.total[row["question_type"]] += 1
            score.correct[row["question_type"]] += ok
            if len(score.examples) < keep_examples and row["question_type"] not in {
                e["type"] for e in score.examples
            }:
                score.examples.append({"type": row["question_type"], "question": conv[-1]["content"],
                                       "expected": row["answer"], "answer": pred, "correct": bool(ok)})
    return score


def query_attention_picture(model_dir: Path, test_parquet: Path, out: Path, n_images: int = 3) -> Path:
    """Where the trained projector's queries look, on a few held-out images."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from crossvlm.inference import ChatModel
    from crossvlm.train.plots import plot_query_attention

    chat = ChatModel.load(model_dir, device="cpu")
    rows = pq.read_table(test_parquet, columns=["image_id", "image_bytes"]).to_pylist()
    distinct = list({r["image_id"]: r for r in rows}.values())[:n_images]  # the test set asks several questions per image
    images = [Image.open(io.BytesIO(r["image_bytes"])).convert("RGB") for r in distinct]
    pixels = chat.processor.preprocess_images(images)
    with torch.no_grad():
        attention = chat.model.projector.query_attention(chat.model.vision_features(pixels))
    return plot_query_attention(images, attention, out)


def _shapes_images_and_cells(parquet: Path, image_processor) -> tuple:
    """Pixels of every image of a caption file, and per 3×3 cell the kind and colour there (0: empty)."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from crossvlm.data.synth import COLOURS, KINDS, parse_caption

    rows = pq.read_table(parquet, columns=["conversations", "image_bytes"]).to_pylist()
    images = [Image.open(io.BytesIO(r["image_bytes"])).convert("RGB") for r in rows]
    pixels = torch.cat([image_processor(images=images[i:i + 512], return_tensors="pt")["pixel_values"]
                        for i in range(0, len(images), 512)])
    kinds, colours = torch.zeros(len(rows), 9, dtype=torch.long), torch.zeros(len(rows), 9, dtype=torch.long)
    for i, r in enumerate(rows):
        for shape in parse_caption(json.loads(r["conversations"])[-1]["content"]):
            kinds[i, shape.cell] = 1 + KINDS.index(shape.kind)
            colours[i, shape.cell] = 1 + sorted(COLOURS).index(shape.colour)
    return pixels, kinds, colours


def pretrain_vision_tower(vision_dir: Path, train_parquet: Path, test_parquet: Path, *, steps: int = VISION_STEPS,
                          lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> float:
    """The demo's stand-in for CLIP's pretraining, which the real tower has and the tiny one lacks.

    The tiny tower learns to tell what lies in each cell of the images' 3×3 grid (kind and colour,
    read from the captions) through two linear heads on its last layer's patch features, pooled per
    cell; the tower is saved back in place and the heads thrown away. Returns the held-out accuracy
    of the kind of occupied cells. A randomly initialised tower trained only through the language
    model's loss never learns to tell the shapes apart (docs/TRAINING.md).
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoImageProcessor, CLIPVisionModel

    from crossvlm.data.synth import COLOURS, KINDS
    from crossvlm.train.runtime import seed_everything

    seed_everything(seed)
    tower = CLIPVisionModel.from_pretrained(str(vision_dir))
    processor = AutoImageProcessor.from_pretrained(str(vision_dir))
    x, kinds, colours = _shapes_images_and_cells(train_parquet, processor)
    cfg = tower.config
    grid = cfg.image_size // cfg.patch_size
    centre_cell = ((torch.arange(grid) + 0.5) * 3 / grid).long()  # the grid cell of each patch row/column
    cell_of_patch = (centre_cell[:, None] * 3 + centre_cell[None, :]).flatten()  # (P,)
    pool = F.one_hot(cell_of_patch, 9).float()
    pool = pool / pool.sum(0)  # (P, 9): mean over each cell's patches
    heads = torch.nn.ModuleList([torch.nn.Linear(cfg.hidden_size, 1 + len(KINDS)),
                                 torch.nn.Linear(cfg.hidden_size, 1 + len(COLOURS))])

    def cell_logits(pixels):
        patches = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]  # (B, P, D)
        cells = torch.einsum("bpd,pc->bcd", patches, pool)  # (B, 9, D)
        return heads[0](cells), heads[1](cells)

    params = [*tower.parameters(), *heads.parameters()]
    # Clipping and beta2 = 0.95 (the usual recipe for transformers trained from scratch): without them
    # some seeds stall on a plateau and the tower never learns the kinds.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        kind_logits, colour_logits = cell_logits(x[idx])
        loss = (F.cross_entropy(kind_logits.flatten(0, 1), kinds[idx].flatten())
                + F.cross_entropy(colour_logits.flatten(0, 1), colours[idx].flatten()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    tower.eval()
    x, kinds, _ = _shapes_images_and_cells(test_parquet, processor)
    with torch.no_grad():
        predicted = torch.cat([cell_logits(x[i:i + 256])[0].argmax(-1) for i in range(0, len(x), 256)])
    occupied = kinds > 0
    tower.save_pretrained(str(vision_dir))
    return (predicted == kinds)[occupied].float().mean().item()


def run_demo(out: Path, *, seed: int = 0, n_train: int = 6000, n_test: int = 300, vision_steps: int = VISION_STEPS,
             pretrain_steps: int | None = None, sft_steps: int | None = None, projector: str = "cross_attn",
             quiet: bool = False) -> dict:
    """Make models and data, pretrain, fine-tune, evaluate; returns the figures printed."""
    from crossvlm.data.synth import write_synthetic
    from crossvlm.engine.engine import EngineConfig
    from crossvlm.inference import ChatModel
    from crossvlm.make_model import write_random_models
    from crossvlm.train.config import load_config
    from crossvlm.train.loop import train

    out = Path(out)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    timings = {}
    llm, vision = write_random_models(out / "models", "demo", seed=seed)
    # One question per SFT row: a row has a quarter of a whole conversation's tokens, so a step costs
    # less and more steps fit the budget, and no earlier answer sits in the context (docs/TRAINING.md).
    data = write_synthetic(out / "data", seed=seed, n_train=n_train, n_test=n_test, one_question_per_row=True)
    timings["setup_s"] = time.perf_counter() - t0
    say(f"[demo] tiny models in {out / 'models'}, {n_train} training / {n_test} held-out images in {out / 'data'}")
    seen = None
    if vision_steps > 0:
        say(f"[demo] vision: {vision_steps} steps teaching the tiny tower to see the shapes (the real CLIP comes "
            "pretrained)")
        t = time.perf_counter()
        seen = pretrain_vision_tower(vision, data["pretrain_train"], data["pretrain_test"], steps=vision_steps,
                                     seed=seed)
        timings["vision_s"] = time.perf_counter() - t
        say(f"[demo] vision: the tower tells the kind of {seen:.1%} of the held-out shapes")
    else:
        say("[demo] vision: skipped (--vision-steps 0): the tower stays random")

    stages = {}
    for name, file, extra in (
        ("pretrain", DEMO_PRETRAIN, {"model.llm": str(llm), "model.vision": str(vision),
                                     "model.projector_type": projector,
                                     "data.sources": [str(data["pretrain_train"])],
                                     "eval_data.sources": [str(data["pretrain_test"])]}),
        # The captions go into the SFT mix too: they name every shape's kind, colour and place,
        # the densest signal a from-scratch tiny model gets about what a shape looks like.
        ("sft", DEMO_SFT, {"model.init_from": str(out / "pretrain" / "final"),
                           "data.sources": [{"path": str(data["sft_train"])},
                                            {"path": str(data["pretrain_train"]), "weight": 0.5}],
                           "eval_data.sources": [str(data["sft_test"])]}),
    ):
        steps = pretrain_steps if name == "pretrain" else sft_steps
        # The demo writes its own folders afresh each time (its data too): an earlier demo's run is redone.
        overrides = {"run.out_dir": str(out / name), "run.seed": seed, "run.progress": not quiet,
                     "run.overwrite": True, **extra}
        if steps is not None:
            overrides["run.max_steps"] = steps
        cfg = load_config(config_path(file), overrides)
        say(f"[demo] {name}: {cfg.run.max_steps} steps, trains "
            + ", ".join(k for k in ("projector", "vision") if getattr(cfg.trainable, k))
            + (f", llm ({cfg.trainable.llm})" if cfg.trainable.llm != "frozen" else ""))
        t = time.perf_counter()
        stages[name] = train(cfg)
        timings[f"{name}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    # As many engine slots as score_shapes sends questions at once (the CPU default is 8).
    chat = ChatModel.load(stages["sft"], device="cpu", engine=EngineConfig(slots=64))
    score = score_shapes(chat, data["sft_test"])
    timings["eval_s"] = time.perf_counter() - t
    pictures = {"pretrain_curves": out / "pretrain" / "curves.png", "sft_curves": out / "sft" / "curves.png"}
    if projector == "cross_attn":
        pictures["query_attention"] = query_attention_picture(stages["sft"], data["sft_test"],
                                                              out / "query_attention.png")
    timings["total_s"] = time.perf_counter() - t0

    say("\n[demo] held-out accuracy (greedy answers, exact match after normalising):")
    say(score.table())
    say("\n[demo] a few held-out questions:")
    for e in score.examples:
        say(f"  [{e['type']}] Q: {e['question']!r}  expected: {e['expected']!r}  model: {e['answer']!r}"
            f"  {'ok' if e['correct'] else 'WRONG'}")
    say(f"\n[demo] pictures: " + ", ".join(str(p) for p in pictures.values()))
    say(f"[demo] model: {stages['sft']}  (try: crossvlm chat --model {stages['sft']} --image IMG --prompt ...)")
    say("[demo] time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items()))
    result = {"accuracy": score.to_dict(), "vision_kind_accuracy": seen, "timings": timings,
              "model": str(stages["sft"]), "visual_tokens": chat.model.num_image_tokens, "examples": score.examples}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result


def compare_projectors(out: Path, **demo_kwargs) -> dict:
    """The demo twice with the same budget, once per projector; held-out accuracy side by side."""
    from crossvlm.data.synth import CHANCE, QUESTION_TYPES

    results = {name: run_demo(Path(out) / name, projector=name, **demo_kwargs) for name in ("cross_attn", "mlp")}
    head = f"{'question type':<14}{'chance':>8}" + "".join(f"{name:>12}" for name in results)
    lines = [head]
    for q in QUESTION_TYPES:
        lines.append(f"{q:<14}{CHANCE[q]:>8.1%}" + "".join(f"{r['accuracy']['per_type'].get(q, 0):>12.1%}"
                                                           for r in results.values()))
    lines.append(f"{'overall':<14}{'':>8}" + "".join(f"{r['accuracy']['overall']:>12.1%}" for r in results.values()))
    lines.append(f"{'visual tokens':<14}{'':>8}" + "".join(f"{r['visual_tokens']:>12}" for r in results.values()))
    lines.append(f"{'train time':<14}{'':>8}" + "".join(f"{r['timings']['pretrain_s'] + r['timings']['sft_s']:>11.0f}s"
                                                        for r in results.values()))
    table = "\n".join(lines)
    print("\n[compare] same data, same steps, same seed:\n" + table, flush=True)
    summary = {"table": table, "results": results}
    (Path(out) / "comparison.json").write_text(json.dumps(summary, indent=2))
    return summary
