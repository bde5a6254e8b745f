"""`crossvlm chat`: talk to a model, with or without images."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="answer a prompt about images with a saved model or base models",
        description="Answer a prompt with a saved VLM (--model DIR), or with a base LLM and vision "
        "tower (--llm, --vision; hub ids or local paths) and an untrained projector.",
    )
    src = p.add_argument_group("model")
    src.add_argument("--model", type=Path, help="a saved crossvlm model directory")
    src.add_argument("--llm", help="base LLM: hub id or directory (with --vision)")
    src.add_argument("--vision", help="base vision tower: hub id or directory (with --llm)")
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="an image file (repeat for several); each is placed before the prompt")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--system", help="an optional system prompt")
    p.add_argument("--greedy", action="store_true", help="deterministic greedy decoding")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--thinking", action="store_true", help="let the model think before answering")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from crossvlm.errors import CrossVLMError
    from crossvlm.inference import ChatModel, SamplingParams
    from crossvlm.model.tokens import IMAGE_MARK

    if args.model is None and (args.llm is None or args.vision is None):
        raise CrossVLMError("give --model DIR, or both --llm and --vision")
    images = []
    for path in args.image:
        try:
            images.append(Image.open(path))
        except (OSError, ValueError) as err:
            raise CrossVLMError(f"cannot read image {path}: {err}") from err
    chat = ChatModel.load(args.model, llm=args.llm, vision=args.vision, device=args.device)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": IMAGE_MARK * len(images) + args.prompt})
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
    )
    print(chat.chat(messages, images, sampling, enable_thinking=args.thinking))
    return 0
