"""Where the GPU waits for the host: idle gaps in a profiler trace, charged to the host's labelled phases.

A step that takes longer than its kernels is host-bound somewhere; the kernel table cannot say
where. This reads the Chrome trace `torch.profiler` writes: the GPU is busy while any kernel, copy or
memset runs; every gap between them inside the profiled window is idle time, and each moment of a gap
is charged to the innermost `record_function` range the host was in then (the training loop labels
its phases `train.*`, the model `model.*`, the generation engine `engine.*`), or to "(unlabelled)".
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_LABEL = "user_annotation"


def read_trace(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def gpu_idle(events: list[dict], prefixes: tuple[str, ...] = ("train.", "engine.", "model."), min_gap_us: float = 20.0) -> dict | None:
    """The GPU's busy and idle time (ms) between the first and last labelled host range (the whole
    trace without labels), idle time charged to the innermost labelled host range; None when the
    trace holds no GPU work (a CPU run)."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    busy = _merged([(e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("cat") in GPU_WORK])
    if not busy:
        return None
    labels = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in spans
              if e.get("cat") == HOST_LABEL and e.get("name", "").startswith(prefixes)]
    if labels:
        lo, hi = min(s for s, _, _ in labels), max(e for _, e, _ in labels)
    else:
        lo, hi = busy[0][0], busy[-1][1]
    gaps, cursor = [], lo
    for start, end in busy:
        if start > cursor and min(start, hi) - cursor >= min_gap_us:
            gaps.append((cursor, min(start, hi)))
        cursor = max(cursor, end)
    if hi - cursor >= min_gap_us:
        gaps.append((cursor, hi))
    charged: dict[str, float] = defaultdict(float)
    for a, b in gaps:
        cuts = sorted({a, b, *(t for s, e, _ in labels for t in (s, e) if a < t < b)})
        for x, y in zip(cuts, cuts[1:]):
            inside = [(e - s, name) for s, e, name in labels if s <= x and e >= y]
            charged[min(inside)[1] if inside else "(unlabelled)"] += y - x
    window = hi - lo
    busy_in = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in busy)
    return {
        "window_ms": window / 1000,
        "gpu_busy_ms": busy_in / 1000,
        "gpu_busy_share": busy_in / window if window > 0 else None,
        "idle_ms": sum(b - a for a, b in gaps) / 1000,
        "gaps": len(gaps),
        "longest_gap_ms": max((b - a for a, b in gaps), default=0.0) / 1000,
        "idle_by_host_phase_ms": {k: v / 1000 for k, v in sorted(charged.items(), key=lambda kv: -kv[1])},
    }


def describe(report: dict | None) -> str:
    if report is None:
        return "GPU idle time: no GPU work in this trace."
    lines = [f"GPU busy {report['gpu_busy_ms']:.1f} ms of the {report['window_ms']:.1f} ms window "
             f"({100 * report['gpu_busy_share']:.1f}%); idle {report['idle_ms']:.1f} ms in {report['gaps']} gaps of 20 µs or more "
             f"(longest {report['longest_gap_ms']:.1f} ms), charged to the host's innermost labelled phase:"]
    lines += [f"  {name:<32} {ms:9.2f} ms" for name, ms in report["idle_by_host_phase_ms"].items()]
    return "\n".join(lines)
