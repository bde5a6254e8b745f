"""`crossvlm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with a chat page at `/`."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP: OpenAI chat completions and a chat page",
        description="Serve a saved model: POST /v1/chat/completions (OpenAI format, streaming with "
        "\"stream\": true), GET /v1/models, GET /health, and a chat page at /. See docs/SERVING.md.",
    )
    src = p.add_argument_group("model")
    src.add_argument("--model", type=Path, help="a saved crossvlm model directory")
    src.add_argument("--llm", help="or: a base LLM, hub id or directory (with --vision; projector untrained)")
    src.add_argument("--vision", help="base vision tower: hub id or directory (with --llm)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("CROSSVLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: $CROSSVLM_API_KEY)")
    p.add_argument("--model-name", help="the model id clients see (default: the directory's name)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    g = p.add_argument_group("engine")
    add_engine_args(g)
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="requests that may wait for a slot; more are refused with 429 and Retry-After")
    g.add_argument("--max-tokens", type=int, default=512, help="token budget when a request gives none")
    g.add_argument("--thinking", action="store_true", help="thinking mode for requests that do not choose")
    g = p.add_argument_group("images")
    g.add_argument("--max-image-pixels", type=int, default=16_000_000, help="largest width x height accepted")
    g.add_argument("--max-image-mb", type=float, default=20.0, help="largest encoded image, in MB")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (the server then requests URLs its clients choose)")
    g.add_argument("--remote-timeout", type=float, default=10.0, help="seconds one image download may take")
    g.add_argument("--allow-local-images", type=Path, metavar="DIR",
                   help="accept file paths / file:// URLs of images inside DIR")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def add_engine_args(g) -> None:
    """The generation engine's sizes (`crossvlm serve`, `chat`, `eval`)."""
    g.add_argument("--slots", type=int, help="requests generated at once (rows of the decode batch); KV memory is "
                   "handed out by tokens in use, not reserved per slot (default: 1024 on a GPU, 8 on a CPU)")
    g.add_argument("--max-len", type=int, help="the longest prompt + answer of one request "
                   "(default: the model's context, at most 4096)")
    g.add_argument("--kv-memory", type=float, default=0.7, help="share of the GPU memory left free after the model "
                   "and the slots that the KV cache takes (default: 0.7)")
    g.add_argument("--compile", action="store_true", help="fuse the decode step, the prefill and the image path with torch.compile "
                   "(2.5x the decode speed at batch 1 on a GPU, minutes more at start-up; see docs/PERFORMANCE.md)")
    g.add_argument("--attention", choices=("auto", "flash", "triton", "sdpa"), default="auto",
                   help="the engine's attention: flash (FlashAttention's variable-length kernel, each request reading "
                   "its own length), triton (decode steps read the blocks in place with crossvlm's Triton kernel), "
                   "sdpa (scaled_dot_product_attention over a length rung, masked), auto: flash, else triton, where "
                   "it runs")


def engine_config(args: argparse.Namespace):
    from crossvlm.engine import EngineConfig
    from crossvlm.errors import ConfigError

    for name in ("slots", "max_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 < args.kv_memory <= 1:
        raise ConfigError(f"--kv-memory must be in (0, 1], got {args.kv_memory}")
    return EngineConfig(slots=args.slots, max_len=args.max_len, compile=args.compile, kv_memory=args.kv_memory,
                        attention=getattr(args, "attention", "auto"))


def bind(host: str, port: int) -> socket.socket:
    """The server's listening socket, with Nagle's algorithm off for every connection it accepts.

    asyncio turns Nagle off only on sockets whose protocol number is IPPROTO_TCP, and a socket made by
    `socket.create_server` (or by uvicorn itself) has 0 there. With Nagle on, a stream's first event,
    written right after the response's headers, waited for the client's delayed ACK: 40 ms added to
    every time to first token (measured on loopback). Accepted sockets inherit the option (Linux, macOS)."""
    from crossvlm.errors import CrossVLMError

    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        family = socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as err:
        raise CrossVLMError(f"cannot listen on {host}:{port}: {err}") from err
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def run(args: argparse.Namespace) -> int:
    from crossvlm.errors import ConfigError

    problems = []
    if (args.model is None) == (args.llm is None or args.vision is None):
        problems.append("give --model DIR, or both --llm and --vision")
    if args.max_waiting < 0:
        problems.append(f"--max-waiting must be at least 0, got {args.max_waiting}")
    if args.max_tokens < 1:
        problems.append(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.allow_local_images is not None and not args.allow_local_images.is_dir():
        problems.append(f"--allow-local-images {args.allow_local_images} is not a folder")
    if problems:
        raise ConfigError("; ".join(problems))
    from crossvlm.sources import check_model_args

    check_model_args(args.model, args.llm, args.vision)  # before torch loads: a wrong folder costs nothing
    import uvicorn

    from crossvlm.inference import ChatModel
    from crossvlm.serve.app import ServerSettings, create_app
    from crossvlm.serve.images import ImagePolicy

    chat = ChatModel.load(args.model, llm=args.llm, vision=args.vision, device=args.device,
                          engine=engine_config(args))
    settings = ServerSettings(
        model_name=args.model_name or (args.model.resolve().name if args.model else "crossvlm"), api_key=args.api_key or None,
        images=ImagePolicy(max_pixels=args.max_image_pixels, max_bytes=int(args.max_image_mb * 1e6),
                           allow_remote=args.allow_remote_images, remote_timeout=args.remote_timeout,
                           local_root=args.allow_local_images),
        max_waiting=args.max_waiting, default_max_tokens=args.max_tokens, thinking=args.thinking,
    )
    sock = bind(args.host, args.port)  # before the warm-up: a port in use fails at once, not minutes later
    start, engine = time.perf_counter(), chat.engine  # the KV cache is allocated here

    def note(text: str) -> None:
        print(f"crossvlm serve: {text}", file=sys.stderr, flush=True)

    note(f"engine of {engine.slots} slots, a KV cache of {engine.blocks.blocks - 1} blocks × {engine.blocks.block_size} "
         f"tokens, up to {engine.context_limit} tokens a request, on {engine.device}")
    engine.warm_up(lambda text: note(text + " ..."))
    note(f"engine ready in {time.perf_counter() - start:.1f} s")
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"crossvlm serve: {settings.model_name} on http://{url_host}:{port} (chat page at /)", flush=True)
    if settings.api_key is None and not ipaddress.ip_address(host).is_loopback:
        print("crossvlm serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(create_app(chat, settings), log_level=args.log_level))
    try:
        server.run(sockets=[sock])
    finally:
        chat.close()  # the engine's thread ends before the interpreter does
    return 0
