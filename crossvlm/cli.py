"""The `crossvlm` console script: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed arguments; its return value is the exit code). Heavy imports stay
inside the functions so `crossvlm --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from crossvlm.errors import CrossVLMError

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = (
    "crossvlm.commands.demo",
    "crossvlm.commands.train",
    "crossvlm.commands.chat",
    "crossvlm.commands.serve",
    "crossvlm.commands.eval",
    "crossvlm.data.cli",
    "crossvlm.commands.bench",
    "crossvlm.commands.make_model",
    "crossvlm.commands.init",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossvlm",
        description="Train and serve a small vision-language model (CLIP + cross-attention + Qwen3).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Weight-loading progress bars drown a CLI's output; HF reads this before it is imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except CrossVLMError as err:
        print(f"crossvlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
