"""`crossvlm bench train --data [FILE]`: the real training loop on a real data file, with the
fixed-length figure of the same shapes beside it, in one process.

Each data variant is `crossvlm train` itself: the stage's shipped config with the data file as its
source, `Trainer.run()` (the real loader, collator, packing decision, train_step and metrics), with
only the writing of checkpoints and of the final model left out. Its speed is read back from the
run's own `metrics.jsonl` (one line per step), after `warmup` steps. Variants:

- `packed`: `data.packing: auto` and `model.attention: auto`, what a user gets by default;
- `flex`, `varlen`, `sdpa`: packed rows with that attention (crossvlm.model.packing);
- `padded`: `data.packing: false`, dynamic right padding;
- `fixed`: the fixed-length benchmark (`bench train` without `--data`) with rows of the same shape
  as the packed run's: as many rows of `max_length` tokens per step, one image and one sample per
  row, the same share of labelled tokens; the reference the real-data figures are divided by.

Without a FILE a variable-length set is generated: answers of log-normal length (mean about 250
words, 16-900, in SFT; captions of mean about 40 words, 5-150, in pretraining) after one
camera-sized JPEG each.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

from crossvlm.bench.catalog import DATA_VARIANTS
from crossvlm.bench.common import compiled_graphs, free_memory, peak_memory_gib, say

# Rows per parquet row group of the generated set: the loader reads samples in random order and
# decodes a whole group per miss (data.row_group_cache), so groups are kept small (~1 MB of JPEGs).
ROW_GROUP = 16

# Answer / caption lengths in words: (median, log-normal sigma, shortest, longest).
LENGTHS = {"sft": (200, 0.65, 16, 900), "pretrain": (35, 0.55, 5, 150)}
_WORDS = ("the a of and to in is it that with for on as was this at by from they we an be are or have not "
          "but one all there their which when what can more about up out so time people them some would "
          "into only other then over also new could after first two way these through because any most "
          "picture colour light left right small large near behind front window table street tree sky water "
          "person people building shows looks appears along under above around shadow bright dark red blue "
          "green white black yellow wooden metal glass open closed").split()


def write_variable_length_set(path: Path, stage: str, rows: int = 2048, size: tuple[int, int] = (640, 480),
                              seed: int = 0) -> Path:
    """A MiniMind-V parquet: one JPEG and one question per row, answers of log-normal word counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossvlm.data.bench import photo_jpegs

    median, sigma, shortest, longest = LENGTHS[stage]
    rng = random.Random(seed)
    jpegs = photo_jpegs(64, size, seed)
    prompt = "Describe the image in detail." if stage == "sft" else "Describe the image."
    conversations, images = [], []
    for _ in range(rows):
        words = min(longest, max(shortest, round(median * math.exp(rng.gauss(0.0, sigma)))))
        answer = " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."
        conversations.append(json.dumps([{"role": "user", "content": f"<image>\n{prompt}"},
                                         {"role": "assistant", "content": answer}]))
        images.append(rng.choice(jpegs))
    path = Path(path)
    pq.write_table(pa.table({"conversations": pa.array(conversations, pa.string()),
                             "image_bytes": pa.array(images, pa.binary())}), path, row_group_size=ROW_GROUP)
    return path


def _measured_trainer_class():
    from crossvlm.bench.common import profiler, synchronize, write_profile
    from crossvlm.train.loop import Trainer

    class MeasuredTrainer(Trainer):
        """`Trainer.run()` as `crossvlm train` runs it, minus writing checkpoints and the final model.

        With `profile` set to (first step, steps, stem, title), the loop's iterations from that step on
        run under torch.profiler, from one step's launch to the launch of the one after the last: everything the
        loop does between steps (the loader's hand-over, the report) is in the profile."""

        profile: tuple[int, int, Path, str] | None = None
        profile_record: dict | None = None

        def launch_step(self, batches: list[dict]):
            if self.profile is not None and self.rt.is_main:
                first, count, stem, title = self.profile
                if self.launched == first:
                    self._prof = profiler(self.rt.device)
                    self._prof.start()
                elif self.launched == first + count:
                    synchronize(self.rt.device)
                    self._prof.stop()
                    self.profile_record = write_profile(self._prof, self.rt.device, stem, title)
            return super().launch_step(batches)

        def save_checkpoint(self) -> None:
            pass

        def save_final(self) -> Path:
            return self.out_dir

    return MeasuredTrainer


def _summarise(lines: list[dict], warmup: int, measured: int, max_length: int, peak: float | None) -> dict:
    """The measured steps' rates from the run's metrics lines (one per step): steps warmup + 1 …
    warmup + measured (any later ones were profiled)."""
    steps = [m for m in lines if warmup < m.get("step", 0) <= warmup + measured and "window_s" in m]
    if not steps:
        raise RuntimeError(f"no step after the {warmup} warm-up steps was logged")
    wall = sum(m["window_s"] for m in steps)
    tokens = sum(m["tokens_per_s"] * m["window_s"] for m in steps)
    slots = sum(m["tokens_per_s"] * m["window_s"] / max(1e-9, 1 - m["padding_share"]) for m in steps)
    mfu = None if steps[0].get("mfu") is None else sum(m["mfu"] * m["window_s"] for m in steps) / wall
    return {
        "steps_measured": len(steps),
        "step_s_median": statistics.median(m["window_s"] for m in steps),
        "samples_per_s": sum(m["samples_per_s"] * m["window_s"] for m in steps) / wall,
        "tokens_per_s": tokens / wall,
        "padding_share": 1 - tokens / slots,
        "labelled_share": sum(m["labelled_share"] * m["tokens_per_s"] * m["window_s"] for m in steps) / tokens,
        "data_wait_share": sum(m.get("data_wait_share", 0.0) * m["window_s"] for m in steps) / wall,
        "step_s_mean": wall / len(steps),
        "rows_per_step": slots / len(steps) / max_length,
        "mfu": mfu,
        "peak_memory_gib": peak,
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
    }


def _run_real(ctx, name: str, data_path: Path, max_length: int, stage_overrides: Callable[[str], dict]) -> dict:
    from crossvlm.configs import config_path
    from crossvlm.train.config import load_config
    from crossvlm.train.loggers import read_metrics

    cfg, rt = ctx.cfg, ctx.rt
    packing, attention = DATA_VARIANTS[name]
    overrides = stage_overrides(name)
    overrides.update({
        "data.sources": [str(data_path)], "data.packing": packing, "model.attention": attention,
        "data.max_length": max_length, "data.num_workers": ctx.workers,
        # Profiled, the run goes on for profile_steps more loop iterations and one to end the last.
        "run.max_steps": cfg.warmup + cfg.steps + (cfg.profile_steps + 1 if cfg.profile else 0),
        "run.log_interval": 1, "run.eval_interval": 0,
    })
    trainer = _measured_trainer_class()(load_config(config_path(f"{cfg.stage}.yaml"), overrides), rt)
    if cfg.profile:
        trainer.profile = (cfg.warmup + cfg.steps, cfg.profile_steps, Path(cfg.profile) / f"train_{cfg.stage}_data_{name}",
                           f"{name} on real data, stage {cfg.stage}, {cfg.profile_steps} iterations of Trainer.run's loop")
    kernel = trainer.model.llm.config._attn_implementation if trainer.cfg.data.packing else None
    start = time.perf_counter()
    trainer.run()
    record = {"packing": trainer.cfg.data.packing, "attention": kernel, "run_s": time.perf_counter() - start,
              "compiled_graphs": compiled_graphs() if cfg.compile else None}
    record.update(_summarise(read_metrics(Path(overrides["run.out_dir"]) / "metrics.jsonl"), cfg.warmup, cfg.steps,
                             max_length, peak_memory_gib(rt.device)))
    record.update(trainer.profile_record or {})
    return record


def run_data_variants(ctx, data_path: Path | None, max_length: int | None, names: tuple[str, ...],
                      stage_overrides: Callable[[str], dict],
                      run_fixed: Callable[[int, int, float], dict]) -> tuple[list, dict]:
    """Every real-data variant, then `fixed` with the first packed variant's row shape (or the first
    variant's, when none packs); returns (records, data info). `names` are checked by TrainBenchConfig.

    The caller (crossvlm.bench.train) says how a variant's stage is set up (`stage_overrides(name)`:
    the config overrides of `ours` under that name) and runs the fixed-length reference
    (`run_fixed(rows, max_length, labelled_share)`: its record)."""
    import torch

    from crossvlm.configs import config_path
    from crossvlm.train.config import load_config

    cfg, rt = ctx.cfg, ctx.rt
    if max_length is None:
        stage = load_config(config_path(f"{cfg.stage}.yaml"), {"model.init_from": None, "data.sources": [str(ctx.photos)]})
        max_length = stage.data.max_length
    if data_path is None:
        data_path = write_variable_length_set(ctx.tmp / f"variable_{cfg.stage}.parquet", cfg.stage,
                                              size=cfg.jpeg_size, seed=cfg.seed)
        say(f"generated {data_path.name}: {LENGTHS[cfg.stage]} (median words, sigma, shortest, longest)")
    records, reference = [], None
    for name in [n for n in names if n != "fixed"] + [n for n in names if n == "fixed"]:
        record = {"variant": name, "compile": cfg.compile, "batch_size": cfg.batch_size, "max_length": max_length}
        rt.print(f"[{cfg.stage}] {name}: building ...")
        free_memory(rt.device)
        try:
            if name == "fixed":
                if reference is None:
                    raise RuntimeError("the fixed-length reference takes its shapes from a real-data variant; none ran")
                rows = max(1, round(reference["rows_per_step"]))
                share = reference["labelled_share"]
                record.update(run_fixed(rows, max_length, share), batch_size=rows)
            else:
                record.update(_run_real(ctx, name, Path(data_path), max_length, stage_overrides))
                if reference is None or (record["packing"] and not reference["packing"]):
                    reference = record  # the first packed variant sets the fixed rows' shape
            rt.print(f"[{cfg.stage}] {name}: {_line(record)}")
        except Exception:  # noqa: BLE001 — one failing variant (OOM, compile error) must not lose the others
            if rt.distributed:
                raise
            record["error"] = traceback.format_exc(limit=8)
            say(f"[{cfg.stage}] {name}: FAILED\n{record['error']}")
        finally:
            if cfg.compile:
                torch._dynamo.reset()
            free_memory(rt.device)
        records.append(record)
    fixed = next((r for r in records if r["variant"] == "fixed" and "error" not in r), None)
    for r in records:
        if fixed is not None and "error" not in r and r is not fixed:
            r["tokens_vs_fixed"] = r["tokens_per_s"] / fixed["tokens_per_s"]
    return records, {"path": str(data_path), "generated": data_path == ctx.tmp / f"variable_{cfg.stage}.parquet",
                     "max_length": max_length}


def _line(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    pad = f", padding {100 * r['padding_share']:.0f}%" if "padding_share" in r else ""
    pad += f", data wait {100 * r['data_wait_share']:.0f}%" if "data_wait_share" in r else ""
    return (f"{r['steps_measured']} steps, {1000 * r['step_s_median']:.0f} ms/step, {r['samples_per_s']:.1f} "
            f"samples/s, {r['tokens_per_s']:.0f} tokens/s{pad}{mfu}, {r.get('rows_per_step', 0):.1f} rows/step")
