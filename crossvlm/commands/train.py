"""`crossvlm train STAGE [--section.key value ...]`: run one training stage."""

from __future__ import annotations

import argparse
import sys

from crossvlm.errors import ConfigError
from crossvlm.train.minimind import FLAGS

EPILOG = """STAGE: a shipped config's name (crossvlm train --list) or a YAML file; a file that exists wins.
overrides: --section.key value, e.g. --run.max_steps 200 --optim.lr 1e-4 --data.sources data/sft.parquet
MiniMind-V's trainer flags are read too (README, "Coming from MiniMind-V"): """ + " ".join(f"--{k}" for k in FLAGS) + """

several GPUs: torchrun --nproc_per_node 8 -m crossvlm.cli train sft ..."""


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="run a training stage (a shipped config's name or a YAML file)",
        description="Run one training stage (pretrain, sft, ...) described by a YAML config.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", metavar="STAGE",
                   help="a shipped config's name (pretrain, sft, ...) or a YAML file")
    p.add_argument("--list", action="store_true", help="list the shipped configs and what each is for, then exit")
    p.add_argument("--resume", help="'auto' (latest checkpoint in run.out_dir), a checkpoint folder, or a run's "
                   "out_dir (its latest checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run.out_dir that holds a run (its checkpoints, final/ and metrics are "
                   "removed); without it such a folder is refused unless resuming")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run, accepts_overrides=True)


def list_configs() -> str:
    from crossvlm.configs import purpose, shipped_configs

    paths = shipped_configs()
    width = max(len(p.stem) for p in paths)
    return "\n".join(f"{p.stem:<{width}}  {purpose(p)}" for p in paths)


def resolve(args: argparse.Namespace, notes: list[str] | None = None):
    """The stage's TrainConfig from the parsed command line (nothing is loaded or run)."""
    from crossvlm.train.config import load_config, parse_overrides

    if args.config is None:
        raise ConfigError("name a stage, e.g. `crossvlm train pretrain` (crossvlm train --list shows them)")
    overrides = parse_overrides(args.overrides, notes)
    if args.resume:
        overrides["run.resume"] = args.resume
    if args.overwrite:
        overrides["run.overwrite"] = True
    return load_config(args.config, overrides)


def require_loggers(cfg) -> None:
    """Stop before any model loads when a logger the config asks for is not installed."""
    if cfg.run.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("run.wandb (--use_wandb) needs Weights & Biases: pip install wandb") from None


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(list_configs())
        return 0
    notes: list[str] = []
    cfg = resolve(args, notes)
    for note in notes:
        print(f"crossvlm train: note: {note}", file=sys.stderr)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    require_loggers(cfg)
    from crossvlm.train.runfolder import preflight

    preflight(cfg)  # before torch loads: a wrong folder or setting costs a fraction of a second
    from crossvlm.train.loop import train

    train(cfg)
    return 0
