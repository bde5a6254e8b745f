"""Markdown tables of the benchmark reports (the JSON files hold every number; the tables the main ones)."""

from __future__ import annotations


def _num(value, fmt: str = ".1f", scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:{fmt}}{suffix}"


def _error_row(r: dict, columns: int) -> str:
    reason = r.get("skipped") or (r["error"].strip().splitlines() or ["error"])[-1]
    return f"| {r['variant']} | {'skipped' if 'skipped' in r else 'FAILED'}: {reason[:120]} |" + " |" * (columns - 2)


def _heading(report: dict) -> str:
    env = report["env"]
    device = env.get("gpu") or env["device"]
    return f"{device} × {env['world_size']}, torch {env['torch']}, transformers {env['transformers']}"


def _markdown(title: str, cols: list[str], records: list[dict], done_key: str, cells) -> list[str]:
    """A titled table: one row per record, `cells(record)` for those that have `done_key`."""
    lines = [title, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(cells(r)) + " |" if done_key in r else _error_row(r, len(cols)))
    return lines


def real_data_table(report: dict) -> str:
    d = report["data"]
    source = "a generated variable-length set" if d["generated"] else f"`{d['path']}`"
    title = (f"Training on {source}, stage `{report['stage']}`, preset `{report['preset']}`: the real loop "
             f"(`Trainer.run`), batch {report['config']['batch_size']} samples, rows of {d['max_length']} tokens; "
             f"`fixed`: the fixed-length step on rows of the same shape; {_heading(report)}")
    cols = ["variant", "attention", "samples/s", "real tokens/s", "× fixed", "padding", "MFU", "rows/step", "step ms",
            "peak GiB"]
    lines = _markdown(title, cols, report["variants"], "samples_per_s", lambda r: [
        r["variant"], str(r.get("attention") or ("padded" if r["variant"] != "fixed" else "sdpa, no mask")),
        _num(r["samples_per_s"]), _num(r["tokens_per_s"], ".0f"), _num(r.get("tokens_vs_fixed"), ".2f", suffix="×"),
        _num(r.get("padding_share", 0.0), ".1f", 100, "%"), _num(r["mfu"], ".1f", 100, "%"),
        _num(r.get("rows_per_step")), _num(r["step_s_median"], ".1f", 1000), _num(r["peak_memory_gib"]),
    ])
    if report.get("mfu_note"):
        lines += ["", f"MFU: {report['mfu_note']}."]
    return "\n".join(lines)


def train_table(report: dict) -> str:
    if report.get("data"):
        return real_data_table(report)
    s = report["sample"]
    title = (f"Training, stage `{report['stage']}`, preset `{report['preset']}`: batch "
             f"{report['config']['batch_size']} per process, {s['text_tokens']} text tokens ({s['labelled']} labelled) "
             f"+ one {s['jpeg_size'][0]}×{s['jpeg_size'][1]} JPEG per sample, {s['loader_workers']} loader workers; "
             f"{_heading(report)}")
    cols = ["variant", "samples/s", "× naive", "samples/s with data", "tokens/s", "MFU", "MFU own work", "step ms",
            "data wait", "peak GiB"]
    lines = _markdown(title, cols, report["variants"], "samples_per_s", lambda r: [
        r["variant"], _num(r["samples_per_s"]), _num(r.get("vs_naive"), ".2f", suffix="×"),
        _num(r["samples_per_s_with_data"]), _num(r["tokens_per_s"], ".0f"), _num(r["mfu"], ".1f", 100, "%"),
        _num(r["mfu_executed"], ".1f", 100, "%"), _num(r["step_s_median"], ".1f", 1000),
        _num(r["data_wait_share"], ".0f", 100, "%"), _num(r["peak_memory_gib"]),
    ])
    if report.get("mfu_note"):
        lines += ["", f"MFU: {report['mfu_note']}."]
    return "\n".join(lines)


def generate_table(report: dict) -> str:
    title = (f"Generation, preset `{report['preset']}`, {report['dtype']}: prompt {report['prompt_tokens']} tokens "
             f"({report['image_tokens']} image tokens), {report['config']['new_tokens']} new tokens, B = "
             f"{report['config']['batch_size']}; image preprocessing {report['preprocess_ms']:.1f} ms on the CPU; "
             f"{_heading(report)}")
    cols = ["variant", "TTFT ms", "decode tok/s, batch 1", "× dynamic", "tok/s, batch B", "× dynamic", "peak GiB",
            "warmup s"]
    return "\n".join(_markdown(title, cols, report["variants"], "ttft_ms", lambda r: [
        r["variant"], _num(r["ttft_ms"]), _num(r["decode_tokens_per_s_bs1"]),
        _num(r.get("decode_vs_dynamic"), ".2f", suffix="×"), _num(r["aggregate_tokens_per_s"], ".0f"),
        _num(r.get("aggregate_vs_dynamic"), ".2f", suffix="×"), _num(r["peak_memory_gib"]), _num(r["warmup_s"]),
    ]))


def data_table(report: dict) -> str:
    c = report["config"]
    lines = [
        f"Data loader, {c['photos']} JPEGs of {c['jpeg_size'][0]}×{c['jpeg_size'][1]}, batch {c['batch_size']}, "
        f"{c['seconds']:g} s per setting, {report['env']['cpu_count']} CPU cores",
        "",
        "| workers | images/s | samples/s | first batch s |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['num_workers']} | {r['images_per_s']} | {r['samples_per_s']} | {r['first_batch_s']} |"
              for r in report["results"]]
    if any("reader" in r for r in report["results"]):  # `bench data --shards`: one row per reader and count
        lines[2:] = ["| reader | workers | samples/s | per worker | samples per CPU s | first batch s |",
                     "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['reader']} | {r['num_workers']} | {r['samples_per_s']} | "
                  f"{r['samples_per_s'] / max(r['num_workers'], 1):.1f} | {r['samples_per_cpu_s']} | {r['first_batch_s']} |"
                  for r in report["results"]]
    return "\n".join(lines)


def serve_table(report: dict) -> str:
    c = report["config"]
    lines = [
        f"Serving, preset `{report['preset']}`, {report['dtype']}: {report['slots']} slots of {report['max_len']} "
        f"tokens; long workload: text {c['prompt_tokens'][0]}–{c['prompt_tokens'][1]} tokens + one "
        f"{c['jpeg_size'][0]}×{c['jpeg_size'][1]} JPEG, {c['output_tokens'][0]}–{c['output_tokens'][1]} tokens out, "
        f"ignore_eos; short: {c['short_tokens']} tokens; {_heading(report)}",
        "",
        "| run | requests | output tok/s | × generate() | TTFT p50 / p95 ms | ITL p50 / p95 ms | failed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    runs = [(f"server, {name.replace('@', ', concurrency ')}", r) for name, r in report["server"].items()]
    runs += [(f"offline engine, {name}", r) for name, r in report["offline"].items() if "requests" in r]
    if report.get("baseline"):
        runs.append(("stock generate(), one batch", report["baseline"]))
    for name, r in runs:
        ttft, itl = r.get("ttft_ms") or {}, r.get("itl_ms") or {}
        lines.append(f"| {name} | {r['requests']} | {r['output_tokens_per_s']:.0f} | "
                     f"{_num(r.get('vs_generate'), '.1f', suffix='×')} | {_num(ttft.get('p50'))} / {_num(ttft.get('p95'))} | "
                     f"{_num(itl.get('p50'), '.2f')} / {_num(itl.get('p95'), '.2f')} | {r.get('failed', 0)} |")
    lines += ["", "Where the time went (the engine's timers, `/health`): per step, the host's time by phase against "
              "its wait for the GPU; a first token's mean time in the server's preparation, waiting for a slot, "
              "and from submission to the host in all (the wait included)", "",
              "| run | steps | step ms | tokens / step | admit · prefill · decode · collect ms | GPU wait ms | host busy "
              "| first token: prepare · queue · engine ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in runs:
        b = r.get("breakdown")
        if b:
            ms, first = b["ms_per_step"], b["first_token_ms"]
            lines.append(f"| {name} | {b['steps']} | {b['step_ms']:.2f} | {b['tokens_per_step']:.1f} | "
                         + " · ".join(f"{ms[k]:.2f}" for k in ("admit", "prefill", "decode", "collect"))
                         + f" | {ms['wait']:.2f} | {100 * b['host_share']:.0f}% | {_num(first.get('prepare'))} · "
                         f"{first['queue']:.1f} · {first['engine']:.1f} |")
    return "\n".join(lines)


TABLES = {"train": train_table, "generate": generate_table, "serve": serve_table, "data": data_table}


def table(report: dict) -> str:
    return TABLES[report["benchmark"]](report)
