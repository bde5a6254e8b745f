"""`crossvlm data inspect | convert | synth | bench`."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossvlm.data.config import DEFAULT_CAPTION_PROMPT, FORMATS

SOURCE_HELP = ("a .parquet/.json/.jsonl file or folder, a save_to_disk folder, tar shards (file, folder, "
               "braces: 'shards/{00000..00009}.tar'), an http(s)/s3/gs/hf URL of shards, or a hub id owner/name[:config]")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect, synthesise and benchmark training data",
                                   description="Inspect, synthesise and benchmark training data.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("inspect", help="check a data source and show what training would see")
    p.add_argument("path", help=SOURCE_HELP)
    p.add_argument("--llm", type=Path, help="LLM directory whose tokenizer renders the samples")
    _source_options(p)
    p.add_argument("--image-tokens", type=int, default=64, help="visual tokens per image (M)")
    p.add_argument("--limit", type=int, default=1000, help="rows to check, spread over the data")
    p.add_argument("--max-length", type=int, help="report samples that do not fit this many tokens")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--system-prompt", help="system prompt added to conversations without one")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", help="write any readable source as sharded parquet or webdataset tars",
                       description="Read every record of a source in order and write the usable ones as "
                       "MiniMind-V parquet shards or webdataset tar shards (bad records are counted, not written).")
    p.add_argument("path", help=SOURCE_HELP)
    p.add_argument("--out", type=Path, required=True, help="new folder for the shards (must not hold files)")
    p.add_argument("--to", choices=("parquet", "webdataset"), required=True)
    p.add_argument("--records-per-shard", type=int, default=1000)
    p.add_argument("--limit", type=int, help="stop after this many records")
    _source_options(p)
    p.set_defaults(func=_convert)

    p = sub.add_parser("synth", help="write the synthetic shapes data set")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=10_000, help="training images")
    p.add_argument("--test", type=int, default=500, help="held-out images")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.set_defaults(func=_synth)

    p = sub.add_parser("bench", help="measure loader throughput (samples/s, images/s) per worker count")
    p.add_argument("path", nargs="?", help="data to read, any source inspect takes (omit with --photos)")
    p.add_argument("--llm", type=Path, required=True, help="LLM directory (tokenizer)")
    p.add_argument("--vision", type=Path, required=True, help="vision directory (image processor)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per worker count")
    p.add_argument("--image-tokens", type=int, default=64)
    p.add_argument("--photos", type=int, metavar="N", help="bench N generated 640×480 JPEGs instead of PATH")
    p.add_argument("--shards", action="store_true",
                   help="with --photos: the same JPEGs as parquet (random access), as webdataset tar shards on "
                   "disk, and as the same shards from an HTTP server on 127.0.0.1")
    p.set_defaults(func=_bench)


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, help="force the format instead of detecting it")
    p.add_argument("--image-root", type=Path, help="folder LLaVA image paths are relative to")
    p.add_argument("--split", help="split of a hub dataset or a saved DatasetDict (default train)")
    p.add_argument("--caption-prompt", default=DEFAULT_CAPTION_PROMPT,
                   help="user turn that a webdataset .txt caption answers (default: %(default)r)")


def _inspect(args: argparse.Namespace) -> int:
    from crossvlm.sources import check_files

    if args.llm:
        check_files(args.llm, "--llm", tokenizer=True)  # before torch loads
    from crossvlm.data.inspect import format_inspection, inspect_data

    tokenizer = None
    if args.llm:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(args.llm))
    result = inspect_data(args.path, fmt=args.format, image_root=args.image_root, tokenizer=tokenizer,
                          num_image_tokens=args.image_tokens, limit=args.limit, max_length=args.max_length,
                          max_bad_fraction=args.max_bad_fraction, system_prompt=args.system_prompt,
                          split=args.split, caption_prompt=args.caption_prompt)
    print(format_inspection(result, tokenized=tokenizer is not None))
    return 0 if result.usable else 1


def _convert(args: argparse.Namespace) -> int:
    from crossvlm.data.convert import convert

    done = convert(args.path, args.out, args.to, fmt=args.format, image_root=args.image_root, split=args.split,
                   records_per_shard=args.records_per_shard, caption_prompt=args.caption_prompt, limit=args.limit)
    print(f"wrote {done.written} records in {len(done.shards)} shards to {args.out}")
    print("bad records (not written):")
    print("\n".join("  " + line for line in done.tracker.report().splitlines()))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from crossvlm.sources import check_writable

    check_writable(args.out, "--out")  # before torch loads
    from crossvlm.data.synth import write_synthetic

    paths = write_synthetic(args.out, args.seed, args.train, args.test, args.image_size)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import tempfile

    from crossvlm.errors import ConfigError
    from crossvlm.sources import check_files

    check_files(args.llm, "--llm", tokenizer=True)
    check_files(args.vision, "--vision", processor=True)
    from crossvlm.data.bench import bench_loader, bench_shards, format_results, format_shard_results, write_photo_parquet

    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            if not args.photos or args.path:
                raise ConfigError("data bench: --shards compares readers on generated JPEGs: give --photos N, no PATH")
            results = bench_shards(tmp, args.vision, args.llm, args.workers, photos=args.photos,
                                   batch_size=args.batch_size, seconds=args.seconds, num_image_tokens=args.image_tokens)
            print(format_shard_results(results))
            return 0
        if args.photos:
            path = write_photo_parquet(Path(tmp) / "photos.parquet", args.photos)
        elif args.path:
            path = args.path
        else:
            raise ConfigError("data bench: give a data PATH or --photos N")
        results = bench_loader(path, args.vision, args.llm, args.workers, batch_size=args.batch_size,
                               seconds=args.seconds, num_image_tokens=args.image_tokens)
    print(format_results(results))
    return 0
