"""`crossvlm make-model`: write randomly initialised base models (tiny for tests, full for benchmarks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossvlm.make_model import PRESETS, TOWERS


def register(sub) -> None:
    p = sub.add_parser(
        "make-model",
        help="write random base models (DIR/llm, DIR/vision) in Hugging Face format",
        description="Write a randomly initialised Qwen3ForCausalLM + tokenizer (DIR/llm) and a vision "
        "tower + image processor (DIR/vision: CLIP, SigLIP, or SigLIP 2 as a full SiglipModel checkpoint). "
        "'tiny' runs tests, 'demo' (tiny with 8-pixel "
        "patches) the CPU demo; 'full' has the real Qwen3-0.6B and CLIP ViT-B/16 shapes, for benchmarks.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-tower", choices=TOWERS, default="clip", help="the tower to write (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crossvlm.make_model import write_random_models

    llm_dir, vision_dir = write_random_models(args.out, args.preset, args.seed, args.vision_tower)
    print(f"wrote {llm_dir} and {vision_dir}")
    return 0
