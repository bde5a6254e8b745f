"""`crossvlm bench all`: both training stages, the data loader and generation, one report folder.

Each part's JSON is written as soon as it finishes, and `summary.md` after each part, so a run cut
short still leaves what it measured. A part that fails is reported in the summary; the rest still runs.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

from crossvlm.bench.common import ensure_models, say, write_json
from crossvlm.bench.generate import GenerateBenchConfig, run_generate_bench
from crossvlm.bench.loader import run_data_bench
from crossvlm.bench.report import table
from crossvlm.bench.train import TrainBenchConfig, run_train_bench


def run_all(out: Path, train: TrainBenchConfig, generate: GenerateBenchConfig, data_workers: tuple[int, ...],
            data_seconds: float = 4.0) -> Path:
    """Run every benchmark with the given settings (`train.stage` is ignored: both run); returns summary.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    sections: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crossvlm-bench-") as tmp_name:
        models = train.models or Path(tmp_name) / "models"
        ensure_models(models, train.preset)
        parts = [
            ("train_pretrain", lambda: run_train_bench(replace(train, stage="pretrain", models=models))),
            ("train_sft", lambda: run_train_bench(replace(train, stage="sft", models=models))),
            ("data", lambda: run_data_bench(train.preset, models, data_workers, data_seconds,
                                            jpeg_size=train.jpeg_size)),
            ("generate", lambda: run_generate_bench(replace(generate, preset=train.preset, models=models))),
        ]
        for name, run in parts:
            part_start = time.perf_counter()
            try:
                report = run()
                write_json(out / f"{name}.json", report)
                sections.append(table(report))
            except Exception:  # noqa: BLE001 — one failing part must not lose the others
                error = traceback.format_exc(limit=8)
                say(f"[all] {name}: FAILED\n{error}")
                sections.append(f"{name}: FAILED\n\n```\n{error}```")
            say(f"[all] {name} took {time.perf_counter() - part_start:.0f} s "
                f"({time.perf_counter() - start:.0f} s so far)")
            summary.write_text("# crossvlm benchmarks\n\n" + "\n\n".join(sections) + "\n")
    return summary
