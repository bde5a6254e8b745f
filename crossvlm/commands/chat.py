"""`crossvlm chat`: talk to a model, with or without images, answers streamed as they are generated.

With `--prompt` it answers once and exits; without, it is an interactive multi-turn chat whose
slash commands add images (`/image PATH`), start over (`/reset`) or leave (`/quit`). The answer goes
to stdout; the reasoning of `--thinking` goes to stderr, so `crossvlm chat ... > answer.txt` keeps
only the answer.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

HELP = """commands:
  /image PATH   attach an image to your next message (repeat for several)
  /reset        forget the conversation and pending images
  /quit         leave (Ctrl-D works too)"""


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The decoding options of `crossvlm chat` and `crossvlm eval`."""
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--greedy", action="store_true", help="deterministic greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=20, help="0 turns top-k filtering off")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="seed the sampler (reproducible sampled answers)")
    g.add_argument("--thinking", action="store_true", help="let the model think before answering (Qwen3 <think>)")


def sampling_from_args(args: argparse.Namespace):
    from crossvlm.inference import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def register(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a saved model or base models, with images (streams the answer)",
        description="Chat with a saved VLM (--model DIR), or with a base LLM and vision tower (--llm, "
        "--vision; hub ids or local paths) and an untrained projector. With --prompt: answer once. "
        "Without: an interactive chat.\n\n" + HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model")
    src.add_argument("--model", type=Path, help="a saved crossvlm model directory")
    src.add_argument("--llm", help="base LLM: hub id or directory (with --vision)")
    src.add_argument("--vision", help="base vision tower: hub id or directory (with --llm)")
    src.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="an image file for the first message (repeat for several); placed before the text")
    p.add_argument("--prompt", help="answer this one message and exit (default: interactive chat)")
    p.add_argument("--system", help="an optional system prompt")
    p.add_argument("--json-schema", type=Path, metavar="FILE",
                   help="answer with JSON this schema (a JSON file) accepts, enforced token by token; "
                   '{"type": "object"} for any JSON object')
    add_sampling_args(p)
    p.set_defaults(func=run)


class _Printer:
    """Writes streamed deltas: reasoning to stderr (dimmed on a terminal), the answer to stdout."""

    def __init__(self):
        self.thinking = False

    def __call__(self, delta) -> None:
        if delta.reasoning:
            if not self.thinking:
                self.thinking = True
                sys.stderr.write("\033[2m" if sys.stderr.isatty() else "")
            sys.stderr.write(delta.reasoning)
            sys.stderr.flush()
        if delta.text:
            self.end_thinking()
            sys.stdout.write(delta.text)
            sys.stdout.flush()

    def end_thinking(self) -> None:
        if self.thinking:
            self.thinking = False
            sys.stderr.write(("\033[0m" if sys.stderr.isatty() else "") + "\n")
            sys.stderr.flush()


def answer(chat, messages: list[dict], images: list, sampling, thinking: bool) -> str:
    """Stream one answer to the terminal; returns its text."""
    printer = _Printer()
    stream = chat.stream(messages, images, sampling, enable_thinking=thinking)
    for delta in stream:
        printer(delta)
    printer.end_thinking()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.completion.text


def read_schema(path: Path) -> dict:
    """A JSON schema file's object; raises `CrossVLMError` saying what is wrong with it."""
    import json

    from crossvlm.errors import CrossVLMError

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CrossVLMError(f"--json-schema {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise CrossVLMError(f"--json-schema {path}: not valid JSON ({err})") from None
    from crossvlm.engine.constraints import SchemaError, grammar_of

    try:
        grammar_of(schema)  # before the model loads
    except SchemaError as err:
        raise CrossVLMError(f"--json-schema {path}: {err}") from None
    return schema


def run(args: argparse.Namespace) -> int:
    from crossvlm.errors import CrossVLMError

    if args.model is None and (args.llm is None or args.vision is None):
        raise CrossVLMError("give --model DIR, or both --llm and --vision")
    from crossvlm.sources import check_model_args

    check_model_args(args.model, args.llm, args.vision)  # before torch loads: a wrong folder costs nothing
    from crossvlm.inference import ChatModel, open_image

    sampling = sampling_from_args(args)
    if args.json_schema is not None:
        sampling = replace(sampling, json_schema=read_schema(args.json_schema))
        if args.thinking:
            raise CrossVLMError("--json-schema cannot go with --thinking: the answer must start with the document")
    for path in args.image:  # a bad image is refused before the model loads
        open_image(path, param=str(path))
    from crossvlm.engine import EngineConfig

    # One conversation: one slot (a small KV cache; its CUDA graphs are recorded as the answer grows).
    chat = ChatModel.load(args.model, llm=args.llm, vision=args.vision, device=args.device,
                          engine=EngineConfig(slots=1))
    try:  # the engine's thread is stopped before the interpreter exits, whatever ends the chat
        return converse(chat, args, sampling)
    finally:
        chat.close()


def converse(chat, args: argparse.Namespace, sampling) -> int:
    """Answer `--prompt` once, or chat turn by turn on stdin until /quit or its end."""
    from crossvlm.errors import CrossVLMError
    from crossvlm.inference import open_image
    from crossvlm.model.tokens import IMAGE_MARK

    # Decoded once more, as training decodes them, and kept decoded: every turn resends the history's images.
    images = [open_image(path, param=str(path), draft_size=chat.draft_size) for path in args.image]
    system = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt is not None:
        messages = system + [{"role": "user", "content": IMAGE_MARK * len(images) + args.prompt}]
        answer(chat, messages, images, sampling, args.thinking)
        return 0

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"crossvlm chat — {HELP.splitlines()[1].strip()}; /help lists the commands", file=sys.stderr)
    messages, history_images, pending = list(system), [], list(images)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                messages, history_images, pending = list(system), [], []
                print("(conversation reset)", file=sys.stderr)
            elif command == "/image" and rest.strip():
                try:
                    pending.append(open_image(Path(rest.strip()).expanduser(), param=rest.strip(),
                                              draft_size=chat.draft_size))
                    print(f"(image attached: {rest.strip()})", file=sys.stderr)
                except CrossVLMError as err:
                    print(f"error: {err}", file=sys.stderr)
            else:
                print(HELP, file=sys.stderr)
            continue
        turn = {"role": "user", "content": IMAGE_MARK * len(pending) + line}
        try:
            text = answer(chat, messages + [turn], history_images + pending, sampling, args.thinking)
        except CrossVLMError as err:  # e.g. the conversation outgrew the context: say so, keep going
            print(f"error: {err}", file=sys.stderr)
            continue
        messages += [turn, {"role": "assistant", "content": text}]
        history_images += pending
        pending = []
