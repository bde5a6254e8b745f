"""The `crossvlm` console script: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed arguments; its return value is the exit code). Heavy imports stay
inside the functions so `crossvlm --help` is instant.

A `CrossVLMError` (a wrong input: a model folder, data, a config value, a folder to write) ends the
command with one line on stderr and exit code 2; an `OSError` the command did not expect (a disk
that filled up, a permission) with one line and exit code 1. `--debug` (anywhere on the line) or
CROSSVLM_DEBUG=1 shows the traceback instead.
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
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also: CROSSVLM_DEBUG=1); allowed anywhere on the line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Weight-loading progress bars drown a CLI's output; HF reads this before it is imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CROSSVLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # after the subcommand too
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except CrossVLMError as err:
        if debug:
            raise
        print(f"crossvlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as err:
        if debug:
            raise
        print(f"crossvlm {args.command}: error: {type(err).__name__}: {err} (--debug shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
