"""`crossvlm bench train | generate | data | all`: speed benchmarks on random models of real shapes.

See docs/PERFORMANCE.md for what each measures and how MFU is defined.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crossvlm.errors import ConfigError


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list; 'none' is the empty one."""
    return () if text.strip() in ("", "none") else tuple(n.strip() for n in text.split(",") if n.strip())


def _levers(text: str) -> tuple[str, ...]:
    from crossvlm.bench.catalog import LEVERS

    return tuple(LEVERS) if text.strip() == "all" else _names(text)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from None
    return w, h


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, e.g. 100,1024, got {text!r}") from None
    return lo, hi


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--preset", choices=("full", "tiny"), default="full",
                   help="random base models with Qwen3-0.6B + CLIP ViT-B/16 shapes (full) or tiny ones (CPU tests)")
    p.add_argument("--models", type=Path, help="folder holding (or to receive) the preset's random base models, "
                   "reused between runs; default: a temporary folder")
    p.add_argument("--out", type=Path, help=out_help)


def _train_options(p: argparse.ArgumentParser) -> None:
    from crossvlm.bench.catalog import LEVERS

    p.add_argument("--batch-size", type=int, default=16, help="samples per step per process, every variant")
    p.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=5,
                   help="unmeasured steps first (workers × 2 more fill the loader's queue)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap on the measured time of one variant")
    p.add_argument("--compile", action="store_true", help="compile (run.compile) the decoder layers, vision layers and projector of ours and mlp")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: cores per process - 1, <= 8)")
    p.add_argument("--jpeg-size", type=_size, default=(640, 480), metavar="WxH", help="size of the decoded JPEGs")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also profile a few steps per variant: DIR/*.trace.json.gz and DIR/*.kernels.txt")
    p.add_argument("--levers", type=_levers, default=None,
                   help="comma-separated extra 'ours' variants, one lever each, or 'all' / 'none': "
                   + "; ".join(f"{k} ({v})" for k, v in LEVERS.items()))


def _train_config(args: argparse.Namespace, stage: str, levers_default: tuple[str, ...]):
    from crossvlm.bench.catalog import TRAIN_VARIANTS
    from crossvlm.bench.train import TrainBenchConfig

    return TrainBenchConfig(
        preset=args.preset, stage=stage, models=args.models, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, max_seconds=args.max_seconds, compile=args.compile,
        variants=(TRAIN_VARIANTS if getattr(args, "variants", None) is None or getattr(args, "data", None)
                  else args.variants),  # "none": levers only
        levers=args.levers if args.levers is not None else levers_default, workers=args.workers,
        jpeg_size=args.jpeg_size, profile=args.profile, **_data_options_of(args),
        max_tiles=getattr(args, "max_tiles", 1), tile_queries=getattr(args, "tile_queries", None),
    )


def _data_options_of(args: argparse.Namespace) -> dict:
    """`bench train --data`'s settings (absent from `bench all`)."""
    data = getattr(args, "data", None)
    if data is None:
        return {}
    out = {"data": data, "max_length": args.max_length}
    if args.variants is not None:
        out["data_variants"] = args.variants
    return out


def register(sub) -> None:
    parser = sub.add_parser("bench", help="speed benchmarks: training step, generation, serving, data loader",
                            description="Speed benchmarks on random models of the real shapes (docs/PERFORMANCE.md).")
    actions = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    p = actions.add_parser("train", help="training step: ours vs the MLP path vs the tutorial baseline",
                           description="Time one stage's training step for crossvlm's design, its MLP-projector "
                           "path and the naive tutorial design (bench/naive.py), fed by a DataLoader over JPEG "
                           "bytes. Under torchrun each process runs its own batch; rank 0 reports the aggregate.")
    _common(p, "write the report as JSON to this file")
    p.add_argument("--stage", choices=("pretrain", "sft"), default="sft")
    p.add_argument("--variants", type=_names, default=None,
                   help="comma-separated subset of ours,mlp,naive; with --data, of "
                   "packed,flex,varlen,sdpa,padded,fixed (default packed,fixed)")
    p.add_argument("--data", nargs="?", const="generate", metavar="FILE",
                   help="run the real training loop (crossvlm train's) on FILE (any format the loader reads), beside "
                   "the fixed-length step of the same shapes; --data alone generates a variable-length set")
    p.add_argument("--max-length", type=int, help="with --data: data.max_length, the packed row length "
                   "(default: the stage config's)")
    p.add_argument("--max-tiles", type=int, default=1, help="model.max_tiles of ours: each JPEG cut into the "
                   "best-fitting grid of at most this many tiles plus a thumbnail (docs/TRAINING.md, Tiles)")
    p.add_argument("--tile-queries", type=int, help="model.tile_queries of ours with tiles (default: num_queries)")
    _train_options(p)
    p.set_defaults(func=_train)

    p = actions.add_parser("generate", help="time to first token, decode speed, batch throughput",
                           description="TTFT with one image, decode tokens/s at batch 1 and aggregate tokens/s at "
                           "batch B, for the dynamic cache, the static cache, and the static cache compiled.")
    _common(p, "write the report as JSON to this file")
    _generate_options(p)
    p.set_defaults(func=_generate)

    p = actions.add_parser("serve", help="the real server under concurrent streaming clients, offline, generate()",
                           description="Start `crossvlm serve` on 127.0.0.1 with a random model of the preset and "
                           "drive it with concurrent streaming clients on a nano-vllm-like workload (text + one image, "
                           "ignore_eos), then the same requests offline through the engine and through stock "
                           "generate() (docs/PERFORMANCE.md).")
    _common(p, "write the report as JSON to this file")
    p.add_argument("--requests", type=int, default=256, help="requests of the long workload")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256], help="streams open at once")
    p.add_argument("--prompt-tokens", type=_range, default=(100, 1024), metavar="LO,HI", help="text tokens per request")
    p.add_argument("--output-tokens", type=_range, default=(100, 1024), metavar="LO,HI", help="tokens asked per request")
    p.add_argument("--short-requests", type=int, default=1000, help="requests of the short-answer case")
    p.add_argument("--short-tokens", type=int, default=16, help="tokens per short answer")
    p.add_argument("--baseline-requests", type=int, default=32, help="requests stock generate() answers (0: none)")
    p.add_argument("--slots", type=int, help="the engine's slots (default: the largest concurrency)")
    p.add_argument("--client-processes", type=int, default=4, help="processes the streaming clients run in")
    p.add_argument("--compile", action="store_true", help="the engine's decode step, prefill and image path fused by torch.compile")
    p.add_argument("--attention", choices=("auto", "flash", "triton", "sdpa"), default="auto",
                   help="the engine's attention (crossvlm serve --attention)")
    p.add_argument("--json-schema", type=Path, metavar="FILE",
                   help="also run each concurrency's long workload with response_format of this JSON schema (schema@c)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--no-offline", dest="offline", action="store_false", help="through the server only")
    part.add_argument("--no-server", dest="server", action="store_false", help="the offline engine only")
    p.set_defaults(func=_serve)

    p = actions.add_parser("data", help="data loader images/s per worker count on camera-sized JPEGs",
                           description="The real loader (crossvlm.data.bench.bench_loader) over generated JPEGs.")
    _common(p, "write the report as JSON to this file")
    _data_options(p)
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time per worker count")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--photos", type=int, default=512, help="JPEGs in the generated data set")
    p.add_argument("--jpeg-size", type=_size, default=(640, 480), metavar="WxH")
    p.add_argument("--shards", action="store_true", help="also as webdataset tar shards, on disk and over HTTP "
                   "on 127.0.0.1, beside the parquet reader (samples/s per worker)")
    p.set_defaults(func=_data)

    p = actions.add_parser("all", help="train (both stages), generate and data in one go",
                           description="Every benchmark; DIR gets train_pretrain.json, train_sft.json, "
                           "generate.json, data.json and summary.md (rewritten after each part).")
    p.add_argument("--preset", choices=("full", "tiny"), default="full")
    p.add_argument("--models", type=Path, help="folder holding (or to receive) the random base models")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder")
    _train_options(p)
    _generate_options(p, prefix="gen-")
    _data_options(p, flag="--data-workers")
    p.set_defaults(func=_all)


def _generate_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from crossvlm.bench.catalog import DEFAULT_GENERATE_VARIANTS, GENERATE_VARIANTS as VARIANTS

    p.add_argument(f"--{prefix}variants", dest="gen_variants", type=_names, default=DEFAULT_GENERATE_VARIANTS,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: {','.join(DEFAULT_GENERATE_VARIANTS)})")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per decode call")
    p.add_argument(f"--{prefix}batch-size", dest="gen_batch_size", type=int, default=64,
                   help="prompts in the throughput call")
    if not prefix:  # `bench all` has its own --profile (the training parts')
        p.add_argument("--profile", type=Path, metavar="DIR",
                       help="also profile one batch-1 call per variant: DIR/generate_*.trace.json.gz and *.kernels.txt")


def _data_options(p: argparse.ArgumentParser, flag: str = "--workers") -> None:
    p.add_argument(flag, dest="data_workers", type=int, nargs="+", default=[0, 2, 4, 8],
                   help="worker counts to measure")


def _generate_config(args: argparse.Namespace):
    from crossvlm.bench.generate import GenerateBenchConfig

    return GenerateBenchConfig(preset=args.preset, models=args.models, variants=args.gen_variants,
                               new_tokens=args.new_tokens, batch_size=args.gen_batch_size,
                               profile=args.profile if args.bench_command == "generate" else None)  # `all`: training's


def _finish(report: dict, out: Path | None) -> int:
    from crossvlm.bench.common import write_json
    from crossvlm.bench.report import table

    if out is not None:
        print(f"wrote {write_json(out, report)}", flush=True)
    print("\n" + table(report), flush=True)
    failed = [r["variant"] for r in report.get("variants", []) if "error" in r]
    return 1 if failed else 0


def _train(args: argparse.Namespace) -> int:
    from crossvlm.bench.train import run_train_bench
    from crossvlm.train.runtime import init_runtime, shutdown

    cfg = _train_config(args, args.stage, ())
    rt = init_runtime("auto")
    try:
        report = run_train_bench(cfg, rt)
        return _finish(report, args.out) if rt.is_main else 0
    finally:
        shutdown(rt)


def _generate(args: argparse.Namespace) -> int:
    from crossvlm.bench.generate import run_generate_bench

    return _finish(run_generate_bench(_generate_config(args)), args.out)


def _serve(args: argparse.Namespace) -> int:
    from crossvlm.bench.serve import ServeBenchConfig, run_serve_bench

    cfg = ServeBenchConfig(preset=args.preset, models=args.models, requests=args.requests,
                           concurrency=tuple(args.concurrency), prompt_tokens=args.prompt_tokens,
                           output_tokens=args.output_tokens, short_requests=args.short_requests,
                           short_tokens=args.short_tokens, baseline_requests=args.baseline_requests, slots=args.slots,
                           client_processes=args.client_processes, compile=args.compile, attention=args.attention, server=args.server,
                           offline=args.offline, json_schema=args.json_schema)
    report = run_serve_bench(cfg)
    code = _finish(report, args.out)
    failed = sum(r.get("failed", 0) for r in report["server"].values())
    return 1 if failed else code


def _data(args: argparse.Namespace) -> int:
    from crossvlm.bench.loader import run_data_bench

    if args.seconds <= 0 or args.photos < args.batch_size:
        raise ConfigError("bench data: --seconds must be > 0 and --photos at least --batch-size")
    report = run_data_bench(args.preset, args.models, tuple(args.data_workers), args.seconds, args.batch_size,
                            args.photos, args.jpeg_size, shards=args.shards)
    return _finish(report, args.out)


def _all(args: argparse.Namespace) -> int:
    from crossvlm.bench.suite import run_all

    train, generate = _train_config(args, "sft", ("compile",)), _generate_config(args)
    train.validate()
    generate.validate()
    summary = run_all(args.out, train, generate, tuple(args.data_workers))
    print("\n" + summary.read_text(), flush=True)
    return 0
