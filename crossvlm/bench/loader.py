"""`crossvlm bench data`: images/s of the real data loader on camera-sized JPEG bytes, per worker count.

A thin wrapper of `crossvlm.data.bench.bench_loader` (the real loader: read, render, decode, process,
collate) over a generated MiniMind-V parquet of JPEGs, with the preset's tokenizer and image processor.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from crossvlm.bench.common import ensure_models, env_info, say


def run_data_bench(preset: str = "full", models: Path | None = None, workers: tuple[int, ...] = (0, 2, 4, 8),
                   seconds: float = 4.0, batch_size: int = 32, photos: int = 512,
                   jpeg_size: tuple[int, int] = (640, 480), num_image_tokens: int = 64, shards: bool = False) -> dict:
    """`shards`: the same JPEGs also as webdataset tar shards, on disk and from an HTTP server on
    127.0.0.1 (crossvlm.data.bench.bench_shards); each row of `results` then names its `reader`."""
    import torch

    from crossvlm.data.bench import bench_loader, bench_shards, write_photo_parquet

    say(f"bench data: {photos} JPEGs of {jpeg_size[0]}x{jpeg_size[1]}, batch {batch_size}, workers {list(workers)}, "
        f"{seconds:g} s each")
    with tempfile.TemporaryDirectory(prefix="crossvlm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        llm_dir, vision_dir = ensure_models(models or tmp / "models", preset)
        if shards:
            by_reader = bench_shards(tmp / "data", vision_dir, llm_dir, tuple(workers), photos=photos,
                                     batch_size=batch_size, seconds=seconds, num_image_tokens=num_image_tokens,
                                     jpeg_size=tuple(jpeg_size))
            for name, rows in by_reader.items():
                for r in rows:
                    say(f"[data] {name}, {r['num_workers']} workers: {r['samples_per_s']} samples/s")
            return {"benchmark": "data", "preset": preset, "config": {
                "workers": list(workers), "seconds": seconds, "batch_size": batch_size, "photos": photos,
                "jpeg_size": list(jpeg_size), "num_image_tokens": num_image_tokens, "shards": True},
                "env": env_info(torch.device("cpu")),
                "results": [{"reader": name, **r} for name, rows in by_reader.items() for r in rows]}
        path = write_photo_parquet(tmp / "photos.parquet", photos, size=tuple(jpeg_size))
        results = bench_loader(path, vision_dir, llm_dir, tuple(workers), batch_size=batch_size, seconds=seconds,
                               num_image_tokens=num_image_tokens)
    for r in results:
        say(f"[data] {r['num_workers']} workers: {r['images_per_s']} images/s")
    return {
        "benchmark": "data",
        "preset": preset,
        "config": {"workers": list(workers), "seconds": seconds, "batch_size": batch_size, "photos": photos,
                   "jpeg_size": list(jpeg_size), "num_image_tokens": num_image_tokens},
        "env": env_info(torch.device("cpu")),
        "results": results,
    }
