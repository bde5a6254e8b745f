"""Loader throughput: samples/s and images/s (decoded and processed) for several worker counts."""

from __future__ import annotations

import contextlib
import io
import random
import time
from pathlib import Path


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_loader(data_path: str | Path, vision_dir: str | Path, llm_dir: str | Path, num_workers=(0, 2, 4), *,
                 batch_size: int = 32, seconds: float = 10.0, num_image_tokens: int = 64, max_length: int = 2048,
                 fmt: str | None = None, image_root: str | None = None, packing: bool = False) -> list[dict]:
    """Iterate the real loader over `data_path` for about `seconds` per worker count.

    The first batch (worker start-up, first row-group reads) is timed apart as `first_batch_s`; the
    rates count the batches after it. `samples_per_cpu_s` divides every sample by the CPU time of this
    process and its workers (start-up and read-ahead included): what one busy core delivers, which
    other jobs on the machine disturb much less than the wall-clock rate.
    """
    from transformers import AutoTokenizer

    from crossvlm.data.config import DataConfig, SourceConfig
    from crossvlm.data.loader import build_dataset, build_loader
    from crossvlm.model.processor import load_image_processor

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    processor = load_image_processor(vision_dir)
    results = []
    for workers in num_workers:
        cfg = DataConfig(sources=[SourceConfig(str(data_path), fmt, image_root)], max_length=max_length,
                         num_workers=workers, packing=packing, max_bad_fraction=0.5)
        dataset = build_dataset(cfg, tokenizer, processor, num_image_tokens)
        loader = build_loader(dataset, cfg, batch_size, seed=0)
        samples = images = batches = first_samples = 0
        cpu = cpu_seconds()
        start = time.perf_counter()
        first = None
        with contextlib.closing(iter(loader)) as batches_in:  # the workers stop (and are counted) at the end
            for batch in batches_in:
                now = time.perf_counter()
                if first is None:
                    first, start, first_samples = now - start, now, batch["num_samples"]
                    continue
                batches += 1
                samples += batch["num_samples"]
                images += len(batch["pixel_values"]) if "pixel_values" in batch else 0
                if now - start >= seconds:
                    break
        elapsed = max(time.perf_counter() - start, 1e-9)
        cpu = max(cpu_seconds() - cpu, 1e-9)
        results.append({
            "num_workers": workers, "batch_size": batch_size, "batches": batches, "seconds": round(elapsed, 2),
            "samples_per_s": round(samples / elapsed, 1), "images_per_s": round(images / elapsed, 1),
            "first_batch_s": round(first or 0.0, 2), "bad_records": loader.tracker.bad,
            "samples_per_cpu_s": round((samples + first_samples) / cpu, 1),
        })
    return results


def write_photo_parquet(path: str | Path, rows: int = 512, size: tuple[int, int] = (640, 480), seed: int = 0) -> Path:
    """A MiniMind-V parquet of camera-sized JPEGs (smooth colour fields with noise, ~60 KB each), for
    benchmarking decode cost like real photos rather than the 64-px shapes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = photo_jpegs(min(rows, 64), size, seed)  # a pool of distinct images, reused to keep writing fast
    pick = random.Random(seed)
    conversations = ['[{"role": "user", "content": "<image>\\nDescribe the image."}, '
                     '{"role": "assistant", "content": "A picture with soft colours and some noise."}]'] * rows
    table = pa.table({"conversations": pa.array(conversations, pa.string()),
                      "image_bytes": pa.array([pick.choice(images) for _ in range(rows)], pa.binary())})
    path = Path(path)
    pq.write_table(table, path, row_group_size=256)
    return path


def photo_jpegs(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[bytes]:
    """`count` encoded camera-like JPEGs: smooth colour fields with noise, ~60 KB at 640×480."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    images = []
    for _ in range(count):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return images


def format_results(results: list[dict]) -> str:
    header = f"{'workers':>7} {'samples/s':>10} {'images/s':>9} {'batches':>8} {'first batch s':>14}"
    rows = [f"{r['num_workers']:>7} {r['samples_per_s']:>10} {r['images_per_s']:>9} {r['batches']:>8} "
            f"{r['first_batch_s']:>14}" for r in results]
    return "\n".join([header] + rows)


def bench_shards(folder: str | Path, vision_dir: str | Path, llm_dir: str | Path, num_workers=(0, 2, 4), *,
                 photos: int = 512, shards: int = 16, batch_size: int = 32, seconds: float = 10.0,
                 num_image_tokens: int = 64, jpeg_size: tuple[int, int] = (640, 480)) -> dict[str, list[dict]]:
    """The same generated JPEGs read three ways, with the real loader: MiniMind-V parquet (random
    access), webdataset tar shards on disk (streamed), and those shards from an HTTP server on
    127.0.0.1 (`python -m http.server` in its own process, streamed through fsspec)."""
    from crossvlm.data.convert import convert

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parquet = write_photo_parquet(folder / "photos.parquet", photos, size=tuple(jpeg_size))
    convert(str(parquet), folder / "shards", "webdataset", records_per_shard=max(1, -(-photos // shards)))
    names = sorted(p.name for p in (folder / "shards").iterdir())
    options = dict(batch_size=batch_size, seconds=seconds, num_image_tokens=num_image_tokens)
    results = {"parquet": bench_loader(parquet, vision_dir, llm_dir, num_workers, **options),
               "tar shards": bench_loader(folder / "shards", vision_dir, llm_dir, num_workers, **options)}
    with http_server(folder) as url:
        braces = f"{url}/shards/{{{names[0][:-4]}..{names[-1][:-4]}}}.tar"
        results["tar shards over HTTP"] = bench_loader(braces, vision_dir, llm_dir, num_workers, **options)
    return results


class http_server:
    """`python -m http.server` on 127.0.0.1 serving `folder`, in its own process, for a `with` block."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> str:
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                         "--directory", str(self.folder)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.process.kill()
                    raise RuntimeError("the HTTP server for the benchmark did not start") from None
                time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def format_shard_results(results: dict[str, list[dict]]) -> str:
    """One row per reader and worker count, with samples/s per worker (the main process counts as
    one worker when there are none) and per CPU second (see bench_loader)."""
    header = (f"{'reader':<22} {'workers':>7} {'samples/s':>10} {'per worker':>10} {'per CPU s':>10} "
              f"{'first batch s':>14}")
    rows = [f"{name:<22} {r['num_workers']:>7} {r['samples_per_s']:>10} "
            f"{r['samples_per_s'] / max(r['num_workers'], 1):>10.1f} {r['samples_per_cpu_s']:>10} {r['first_batch_s']:>14}"
            for name, runs in results.items() for r in runs]
    return "\n".join([header] + rows)
