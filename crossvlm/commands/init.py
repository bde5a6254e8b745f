"""`crossvlm init --llm L --vision V --out DIR`: a ready model directory from base models."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossvlm.errors import ConfigError
from crossvlm.train.config import ModelSection


def register(sub) -> None:
    p = sub.add_parser(
        "init", help="build a model directory from base models (untrained projector) for chat, serve, eval, train",
        description="Build a crossvlm model directory from a base LLM and vision tower (hub ids or local "
        "folders) with an untrained projector. chat --model, serve, eval and train --model.init_from take it "
        "as it is.",
        epilog="projector options: --model.key value, as in a training stage, e.g. --model.num_queries 16 "
        "--model.projector_type mlp",
    )
    p.add_argument("--llm", default=ModelSection.llm, help=f"base LLM: hub id or folder (default: {ModelSection.llm})")
    p.add_argument("--vision", default=ModelSection.vision,
                   help=f"base vision tower: hub id or folder (default: {ModelSection.vision})")
    p.add_argument("--out", type=Path, required=True, help="the model directory to write (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the projector's initialisation")
    p.set_defaults(func=run, accepts_overrides=True)


def model_options(overrides: list[str]) -> dict:
    """`--model.key value` arguments as `model` section values (anything else is refused)."""
    from crossvlm.train.config import parse_overrides

    parsed = parse_overrides(overrides)
    others = [key for key in parsed if not key.startswith("model.")]
    if others:
        raise ConfigError(f"crossvlm init takes only --model.* options, not {', '.join('--' + k for k in others)}")
    return {key.removeprefix("model."): value for key, value in parsed.items()}


def run(args: argparse.Namespace) -> int:
    from crossvlm.sources import check, check_writable

    options = model_options(args.overrides)
    check(args.llm, "llm", "--llm")  # before torch loads: a wrong folder costs nothing
    check(args.vision, "vision", "--vision")
    check_writable(args.out, "--out")
    if args.out.is_dir() and any(args.out.iterdir()):
        raise ConfigError(f"--out {args.out} already exists and is not empty; name a new folder")
    from crossvlm.make_model import write_vlm

    out = write_vlm(args.out, args.llm, args.vision, options, seed=args.seed)
    print(f"wrote {out} (from {args.llm} and {args.vision}, projector untrained)")
    return 0
