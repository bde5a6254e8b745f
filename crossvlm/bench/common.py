"""What the benchmarks share: the random base models, the device clock, memory, the environment record."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from crossvlm.errors import ConfigError

# The file write_random_models writes last: its presence means the folder is complete.
_LAST_WRITTEN = Path("vision") / "preprocessor_config.json"


def say(*args) -> None:
    """A progress line, flushed at once (benchmarks run for minutes)."""
    print(*args, flush=True)


def ensure_models(folder: Path, preset: str, rt=None) -> tuple[Path, Path]:
    """`folder/llm` and `folder/vision` of `preset`: written once (by rank 0), then reused.

    Raises ConfigError if the folder holds models of another preset.
    """
    from crossvlm.make_model import PRESETS, write_random_models

    folder = Path(folder)
    if (rt is None or rt.is_main) and not (folder / _LAST_WRITTEN).is_file():
        say(f"writing random {preset} base models to {folder} ...")
        start = time.perf_counter()
        write_random_models(folder, preset)
        say(f"  wrote them in {time.perf_counter() - start:.1f} s")
    if rt is not None:
        rt.barrier()
    config = json.loads((folder / "llm" / "config.json").read_text())
    expected = PRESETS[preset].llm
    if (config["hidden_size"], config["num_hidden_layers"]) != (expected["hidden_size"], expected["num_hidden_layers"]):
        raise ConfigError(f"{folder} holds models of another preset than {preset!r} (hidden size "
                          f"{config['hidden_size']}); point --models at an empty folder or one of that preset")
    return folder / "llm", folder / "vision"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of `fn()`, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def profiler(device: torch.device):
    """An unstarted torch.profiler session recording the host (every thread: the generation engine
    works in a thread of its own) and, on a GPU, its kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        options = {"experimental_config": torch._C._profiler._ExperimentalConfig(profile_all_threads=True)}
    except (AttributeError, TypeError):  # a torch without the option
        options = {}
    return profile(activities=activities, **options)


def write_profile(prof, device: torch.device, stem: Path, title: str, sort: str | None = None) -> dict:
    """Write a stopped profile: `stem.trace.json.gz` (Perfetto, chrome://tracing) and `stem.kernels.txt`
    (the 30 ops with the most self GPU time, self CPU time on a CPU, or by `sort`, e.g.
    "cpu_time_total" for where the host's time goes), and on a GPU where it waited for the host
    (`crossvlm.bench.idle`)."""
    from crossvlm.bench.idle import describe, gpu_idle, read_trace

    cuda = device.type == "cuda"
    stem.parent.mkdir(parents=True, exist_ok=True)
    trace = Path(f"{stem}.trace.json.gz")  # gzipped: Perfetto and chrome://tracing open it as is
    prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    sort = sort or ("self_device_time_total" if cuda else "self_cpu_time_total")
    try:
        table = averages.table(sort_by=sort, row_limit=30)
    except (AttributeError, KeyError):  # torch versions before the cuda -> device renaming
        table = averages.table(sort_by="self_cuda_time_total", row_limit=30)
    idle = gpu_idle(read_trace(trace)) if cuda else None
    kernels = Path(f"{stem}.kernels.txt")
    kernels.write_text(f"{title}, sorted by {sort}\n\n{table}\n" + (f"\n{describe(idle)}\n" if cuda else ""))
    say(f"  profile: {trace} and {kernels}")
    return {"trace": str(trace), "kernels": str(kernels), **({"gpu_idle": idle} if idle else {})}


def profiled(fn, device: torch.device, stem: Path, title: str, enabled: bool = True, sort: str | None = None) -> dict:
    """Run `fn()` under torch.profiler and write the profile (`write_profile`). With `enabled` False
    (the other ranks of a distributed run) `fn` runs unprofiled and nothing is written."""
    if not enabled:
        fn()
        return {}
    with profiler(device) as prof:
        fn()
        synchronize(device)
    return write_profile(prof, device, stem, title, sort)


def compiled_graphs() -> int | None:
    """Graphs torch.compile has made in this process so far (dynamo's count); None where it keeps none."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, TypeError):
        return None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def free_memory(device: torch.device) -> None:
    """Drop what the last variant left (its tensors must be unreferenced) and reset the peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak tensor memory since the last `free_memory` (torch.cuda.max_memory_allocated); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def default_workers(world_size: int = 1) -> int:
    """DataLoader workers per process: the cores left for each process after its main thread, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // world_size - 1))


def env_info(device: torch.device, world_size: int = 1) -> dict:
    """The facts a reader needs to compare two benchmark files."""
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "world_size": world_size,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
