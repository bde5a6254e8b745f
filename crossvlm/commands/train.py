"""`crossvlm train CONFIG.yaml [--section.key value ...]`: run one training stage."""

from __future__ import annotations

import argparse

from crossvlm.train.config import MINIMIND_ALIASES

EPILOG = """overrides: --section.key value, e.g. --run.max_steps 200 --optim.lr 1e-4 --data.sources data/sft.parquet
MiniMind-V flags are accepted too: """ + " ".join(f"--{k}" for k in MINIMIND_ALIASES) + """

several GPUs: torchrun --nproc_per_node 8 -m crossvlm.cli train CONFIG.yaml ..."""


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="run a training stage from a YAML config",
        description="Run one training stage (pretrain, sft, ...) described by a YAML config.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="stage config (YAML), e.g. configs/pretrain.yaml")
    p.add_argument("--resume", help="'auto' (latest checkpoint in run.out_dir) or a checkpoint folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    import yaml

    from crossvlm.train.config import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["run.resume"] = args.resume
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from crossvlm.train.loop import train

    train(cfg)
    return 0
