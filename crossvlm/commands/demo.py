"""`crossvlm demo`: the whole tool end to end on the CPU in minutes, with nothing to download."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossvlm.demo import VISION_STEPS


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="train a tiny VLM on synthetic shapes (pretrain + SFT) and report held-out accuracy",
        description="Make tiny random base models and the synthetic shapes set, teach the tiny vision tower "
        "the shapes, run the pretrain and SFT stages, evaluate on held-out images and write loss curves "
        "and a picture of where the projector's queries look. About 5 minutes on 2 CPU cores.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--test-images", type=int, default=300)
    p.add_argument("--vision-steps", type=int, default=VISION_STEPS,
                   help=f"steps teaching the tiny vision tower the shapes first (default: {VISION_STEPS}; 0 skips it)")
    p.add_argument("--pretrain-steps", type=int, help="override the demo config's pretrain steps")
    p.add_argument("--sft-steps", type=int, help="override the demo config's SFT steps")
    p.add_argument("--projector", choices=("cross_attn", "mlp"), default="cross_attn")
    p.add_argument("--compare-projectors", action="store_true",
                   help="run the demo with each projector on the same budget and print them side by side")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crossvlm.demo import compare_projectors, run_demo

    budget = dict(seed=args.seed, n_train=args.train_images, n_test=args.test_images,
                  vision_steps=args.vision_steps, pretrain_steps=args.pretrain_steps, sft_steps=args.sft_steps)
    if args.compare_projectors:
        compare_projectors(args.out, **budget)
    else:
        run_demo(args.out, projector=args.projector, **budget)
    return 0
