"""`crossvlm eval`: answer an evaluation set in batches, print metrics as JSON, save predictions as JSONL."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on an evaluation set (VQA accuracy or caption CIDEr/BLEU)",
        description="Answer every example of a data set (MiniMind-V parquet, LLaVA JSON/JSONL, or a folder "
        "of them; the last assistant turn of each conversation is the reference) with greedy decoding, "
        "print the metrics as JSON and write one JSON line per prediction. Short answers get "
        "exact-match and contains accuracy (per question type on the synthetic shapes set), captions "
        "CIDEr-D and BLEU-1..4.",
    )
    p.add_argument("--model", type=Path, required=True, help="a saved crossvlm model directory")
    p.add_argument("--data", type=Path, required=True, help="a data file or folder")
    p.add_argument("--format", choices=("minimind", "llava"), help="force the data format (default: detect)")
    p.add_argument("--image-root", type=Path, help="folder LLaVA image paths are relative to")
    p.add_argument("--task", choices=("auto", "vqa", "caption"), default="auto",
                   help="metrics to compute (auto: vqa when references average at most 3 words)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=256,
                   help="prompts read and handed to the generation engine at a time (up to twice this many in flight)")
    from crossvlm.commands.serve import add_engine_args

    add_engine_args(p.add_argument_group("engine"))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--thinking", action="store_true", help="let the model think first (reasoning not scored)")
    p.add_argument("--out", type=Path, default=Path("predictions.jsonl"),
                   help="where to write the predictions, one JSON object a line (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from crossvlm.errors import ConfigError
    from crossvlm.sources import check, check_writable

    problems = []
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit must be at least 1, got {args.limit}")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.out.is_dir():
        problems.append(f"--out {args.out} is a folder; name the predictions file")
    if problems:
        raise ConfigError("; ".join(problems))
    # Every input is checked before torch loads: a wrong folder, data file or --out costs nothing.
    check(args.model, "crossvlm", "--model")
    check_writable(args.out.parent, "--out")
    from crossvlm.data.readers import detect_format, find_files

    for file in find_files(args.data):
        if args.format is None:
            detect_format(file)

    from crossvlm.commands.serve import engine_config
    from crossvlm.evaluate import Skipped, evaluate, read_examples, replacing
    from crossvlm.inference import ChatModel

    chat = ChatModel.load(args.model, device=args.device, engine=engine_config(args))
    skipped = Skipped()
    examples = read_examples(args.data, fmt=args.format, image_root=args.image_root, limit=args.limit,
                             skipped=skipped)
    try:
        with replacing(args.out) as out:  # an earlier file of that name stays whole until this one is
            metrics = evaluate(chat, examples, task=args.task, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, enable_thinking=args.thinking, skipped=skipped,
                               on_prediction=lambda r: out.write(json.dumps(r, ensure_ascii=False) + "\n"),
                               progress=sys.stderr.isatty())
    finally:
        chat.close()
    metrics["predictions"] = str(args.out)
    if skipped.examples:
        metrics["skipped_examples"] = skipped.examples
    print(json.dumps(metrics, indent=2))
    return 0
