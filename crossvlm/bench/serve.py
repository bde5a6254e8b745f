"""`crossvlm bench serve`: the real server under concurrent streaming clients, offline, and generate().

The workload is nano-vllm's, with an image: request i has a text of 100–1024 tokens after one
camera-sized JPEG and asks for 100–1024 tokens with `ignore_eos` (lengths uniform, seeded), plus a
short-answer case (a question about the image, 16 tokens, as `crossvlm eval` asks). The model is a
CrossVLM of the preset's random base models, saved to a folder and served by `crossvlm serve` in a
subprocess on 127.0.0.1 (uvicorn, real sockets). Client processes (asyncio + httpx, no torch) hold
`c` streams open at once for each concurrency c; output tok/s = completion tokens (as the server
counts them) / wall time from the first request sent to the last answer. TTFT is the time to the
first chunk (sent with the first token), ITL a request's mean time per token after the first.

In the same run, with the server stopped: the offline engine (`ChatModel.generate_prompts`, what
`crossvlm.load(...).generate(many)` runs) on the same requests, and the baseline, stock
`generate()` (dynamic cache) on the first `baseline_requests` of them in one left-padded batch;
its useful tokens are each request's own budget (the batch runs to the longest).
"""

from __future__ import annotations

import base64
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from crossvlm.bench.common import ensure_models, env_info, free_memory, peak_memory_gib, say
from crossvlm.errors import ConfigError

SHORT_QUESTION = "What colour is the largest shape in the picture? Answer in one word."


@dataclass
class ServeBenchConfig:
    """One `crossvlm bench serve` run."""

    preset: str = "full"
    models: Path | None = None
    """Folder with (or to receive) the preset's random base models; None: a temporary folder."""
    requests: int = 256
    """Requests of the long workload (each concurrency c sends min(requests, max(8, 4c)) of them)."""
    concurrency: tuple[int, ...] = (1, 8, 64, 256)
    prompt_tokens: tuple[int, int] = (100, 1024)
    """Range of a request's text tokens (the image's tokens come on top)."""
    output_tokens: tuple[int, int] = (100, 1024)
    short_requests: int = 1000
    """Requests of the short-answer case (offline, and through the server at the largest concurrency <= 64;
    the first 32 of them also from one client alone)."""
    short_tokens: int = 16
    baseline_requests: int = 32
    """Requests stock generate() answers, in one batch (0: no baseline)."""
    slots: int | None = None
    """The engine's slots (default: the largest concurrency)."""
    client_processes: int = 4
    compile: bool = False
    """Start the engines with `compile` (the decode step, the prefill and the image path fused by torch.compile)."""
    attention: str = "auto"
    """The engines' attention (`EngineConfig.attention`)."""
    server: bool = True
    """Measure through the HTTP server."""
    offline: bool = True
    """Measure the engine offline (one GPU call may not hold both parts with `compile`: each compiles)."""
    jpeg_size: tuple[int, int] = (640, 480)
    seed: int = 0
    json_schema: Path | None = None
    """A JSON schema file: each concurrency's long workload runs again through the server as `schema@c`, every
    request with `response_format` of this schema (no ignore_eos: an answer ends with its document), so the
    report holds tokens/s with and without structured outputs."""

    def schema(self) -> dict | None:
        import json

        return None if self.json_schema is None else json.loads(Path(self.json_schema).read_text())

    def validate(self) -> None:
        from crossvlm.make_model import PRESETS

        p = []
        if self.preset not in PRESETS:
            p.append(f"preset {self.preset!r} is not one of {sorted(PRESETS)}")
        for name in ("prompt_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                p.append(f"{name} must be a range LO,HI with 1 <= LO <= HI, got {lo},{hi}")
        if min(self.requests, *self.concurrency, self.short_tokens, self.client_processes) < 1:
            p.append("requests, concurrency, short tokens and client processes must be >= 1")
        if not (self.server or self.offline):
            p.append("nothing to measure: both the server and the offline part are off")
        if min(self.short_requests, self.baseline_requests) < 0:
            p.append("short requests and baseline requests must be >= 0")
        if self.json_schema is not None:
            try:
                if not isinstance(self.schema(), dict):
                    p.append(f"--json-schema {self.json_schema}: not a JSON object")
            except (OSError, ValueError) as err:
                p.append(f"--json-schema {self.json_schema}: {err}")
        if p:
            raise ConfigError("invalid bench serve arguments:\n  - " + "\n  - ".join(p))

    @property
    def max_len(self) -> int:
        """Slot length: the longest text + an image + the chat template + the longest answer, in 256s."""
        return -(-(self.prompt_tokens[1] + 256 + self.output_tokens[1]) // 256) * 256


@dataclass
class Work:
    """One request of the workload."""

    text: str
    image: bytes
    max_tokens: int

    def payload(self, schema: dict | None = None) -> dict:
        """The request's body; with `schema`, a structured output of it (ending with its document)."""
        url = "data:image/jpeg;base64," + base64.b64encode(self.image).decode()
        body = {"model": "bench", "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": self.text}]}]}
        if schema is not None:
            del body["ignore_eos"]
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
        return body


def workload(tokenizer, images: list[bytes], cfg: ServeBenchConfig) -> tuple[list[Work], list[Work]]:
    """The long requests (random text of the drawn length, decoded from random token ids) and the short ones."""
    rng = random.Random(cfg.seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    long = []
    for k in range(cfg.requests):
        ids = [rng.choice(vocab) for _ in range(rng.randint(*cfg.prompt_tokens))]
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("<image>", "")
        long.append(Work(text, images[k % len(images)], rng.randint(*cfg.output_tokens)))
    short = [Work(SHORT_QUESTION, images[k % len(images)], cfg.short_tokens) for k in range(cfg.short_requests)]
    return long, short


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": 1000 * pick(0.50), "p95": 1000 * pick(0.95)}


def summarise(records: list[dict], seconds: float) -> dict:
    errors = [r["error"] for r in records if "error" in r]
    done = [r for r in records if "error" not in r]
    tokens = sum(r["completion_tokens"] for r in done)
    itl = [(r["end"] - r["first"]) / (r["completion_tokens"] - 1) for r in done if r["completion_tokens"] > 1]
    return {"requests": len(records), "failed": len(errors), "first_errors": errors[:3], "seconds": seconds,
            "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "prompt_tokens_mean": sum(r["prompt_tokens"] for r in done) / max(1, len(done)),
            "ttft_ms": _percentiles([r["first"] - r["sent"] for r in done]), "itl_ms": _percentiles(itl)}


class Server:
    """`crossvlm serve` in a subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, slots: int, max_len: int, waiting: int, compile: bool, attention: str = "auto"):
        command = [sys.executable, "-m", "crossvlm.cli", "serve", "--model", str(model_dir), "--model-name", "bench",
                   "--host", "127.0.0.1",
                   "--port", "0", "--slots", str(slots), "--max-len", str(max_len), "--max-waiting", str(waiting),
                   "--max-image-pixels", "100000000", "--log-level", "warning", "--attention", attention] + (["--compile"] if compile else [])
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if " on http://" not in line:
            self.process.kill()
            raise RuntimeError(f"crossvlm serve did not start (exit {self.process.wait()}): {line!r}")
        self.url = line.split(" on ")[1].split()[0]

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=30).json()

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def drive(pool, processes: int, server: Server, works: list[Work], concurrency: int, schema: dict | None = None) -> dict:
    """Send the works with `concurrency` streams open at once, spread over the pool's client processes."""
    from crossvlm.bench.clients import run_clients

    payloads = [w.payload(schema) for w in works]
    shares = max(1, min(processes, concurrency, len(payloads)))
    jobs = [(server.url, payloads[i::shares], max(1, concurrency // shares + (i < concurrency % shares)))
            for i in range(shares)]
    before = server.health()
    start = time.perf_counter()
    records = [r for part in pool.map(run_clients, jobs) for r in part]
    seconds = time.perf_counter() - start
    after = server.health()  # (the breakdown's wall time: between the two readings)
    return {**summarise(records, seconds), "breakdown": breakdown(before, after, time.perf_counter() - start)}


def breakdown(before: dict, after: dict, seconds: float) -> dict:
    """Where the time went between two `/health` readings (or two `Engine.stats`) `seconds` apart: the
    engine's host time per step by phase against its wait for the device, and the time to a first token
    split into the server's preparation, the wait for a slot and the rest (admission, prefill, hand-over).
    A timer counts a phase when it ends, so a step under way at the first reading counts whole: on a
    CPU, where the host's time is the computation, the host's share can pass 1 by that step."""
    from crossvlm.engine.engine import TIMERS

    engine = {k: after["engine"][k] - before["engine"][k] for k in ("steps", "tokens", "first_tokens", *TIMERS)}
    steps, firsts = max(1, engine["steps"]), max(1, engine["first_tokens"])
    host = ("admit_s", "prefill_s", "decode_s", "collect_s")
    out = {"steps": engine["steps"], "tokens_per_step": engine["tokens"] / steps,
           "step_ms": 1000 * seconds / steps,
           "ms_per_step": {k[:-2]: 1000 * engine[k] / steps for k in (*host, "wait_s")},
           "host_share": sum(engine[k] for k in host) / max(1e-9, seconds),
           "first_token_ms": {"queue": 1000 * engine["queue_s"] / firsts, "engine": 1000 * engine["first_token_s"] / firsts}}
    if "server" in after:
        server = {k: after["server"][k] - before["server"][k] for k in after["server"]}
        out["first_token_ms"]["prepare"] = 1000 * server["prepare_s"] / max(1, server["prepared"])
    return out


def breakdown_line(b: dict) -> str:
    """One line of a `breakdown`."""
    phases = ", ".join(f"{k} {v:.2f}" for k, v in b["ms_per_step"].items())
    first = ", ".join(f"{k} {v:.1f}" for k, v in b["first_token_ms"].items())
    return (f"engine: {b['steps']} steps of {b['step_ms']:.2f} ms, {b['tokens_per_step']:.1f} tokens each; "
            f"ms per step: {phases}; host busy {100 * b['host_share']:.0f}%; first token ms: {first}")


def offline(chat, works: list[Work]) -> dict:
    """The same requests through `ChatModel.generate_prompts` (no HTTP); prompts prepared beforehand."""
    from crossvlm.engine import SamplingParams
    from crossvlm.model.tokens import IMAGE_MARK

    prompts = [chat.prompt([{"role": "user", "content": IMAGE_MARK + w.text}], [w.image]) for w in works]
    sampling = [SamplingParams(max_new_tokens=w.max_tokens, greedy=True, ignore_eos=True) for w in works]
    before = {"engine": dict(chat.engine.stats)}
    start = time.perf_counter()
    done = chat.generate_prompts(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(c.completion_tokens for c in done)
    return {"requests": len(works), "seconds": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "prompt_tokens_mean": sum(len(p.input_ids) for p in prompts) / len(prompts),
            "breakdown": breakdown(before, {"engine": dict(chat.engine.stats)}, seconds)}


@torch.inference_mode()
def baseline(model, processor, works: list[Work], device: torch.device) -> dict:
    """Stock `generate()` (dynamic cache) on the works in one left-padded batch, greedy, EOS ignored."""
    import io

    from PIL import Image

    from crossvlm.model.tokens import IMAGE_MARK

    texts = [processor.render([{"role": "user", "content": IMAGE_MARK + w.text}]) for w in works]
    images = [Image.open(io.BytesIO(w.image)).convert("RGB") for w in works]
    start = time.perf_counter()
    batch = {k: v.to(device) for k, v in processor(texts, images=images).items()}
    longest = max(w.max_tokens for w in works)
    model.generate(**batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    useful = sum(w.max_tokens for w in works)
    return {"requests": len(works), "seconds": seconds, "output_tokens": useful, "output_tokens_per_s": useful / seconds,
            "generated_tokens_per_s": len(works) * longest / seconds}


def _serve_part(cfg: ServeBenchConfig, report: dict, model_dir: Path, slots: int, long: list[Work],
                short: list[Work]) -> None:
    """`crossvlm serve` in a subprocess, driven at each concurrency, then with the short answers."""
    say("[serve] starting crossvlm serve ...")
    start = time.perf_counter()
    server = Server(model_dir, slots, cfg.max_len, waiting=max(len(long), len(short)), compile=cfg.compile,
                    attention=cfg.attention)
    pool = multiprocessing.get_context("spawn").Pool(cfg.client_processes)  # clients apart from the server
    try:
        drive(pool, cfg.client_processes, server, long[:1], 1)  # the first request warms the server and the client processes
        report["server_start_s"] = time.perf_counter() - start
        for c in cfg.concurrency:
            n = min(len(long), max(8, 4 * c))
            say(f"[serve] long workload, concurrency {c}: {n} requests ...")
            result = report["server"][f"long@{c}"] = {"concurrency": c, **drive(pool, cfg.client_processes, server, long[:n], c)}
            say(f"  {result['output_tokens_per_s']:.0f} tok/s, TTFT p50 {result['ttft_ms']['p50']:.1f} ms, "
                f"ITL p50 {result['itl_ms']['p50'] or 0:.2f} ms, failed {result['failed']}")
            say("  " + breakdown_line(result["breakdown"]))
            if cfg.json_schema is not None:
                say(f"[serve] long workload with response_format {cfg.json_schema.name}, concurrency {c} ...")
                result = report["server"][f"schema@{c}"] = {
                    "concurrency": c, **drive(pool, cfg.client_processes, server, long[:n], c, cfg.schema())}
                say(f"  {result['output_tokens_per_s']:.0f} tok/s, ITL p50 {result['itl_ms']['p50'] or 0:.2f} ms, "
                    f"failed {result['failed']}")
        if short:
            # One client first: the time to the first token of a lone request with an image (the target),
            # then many at once, where it includes the wait for a turn.
            many = max([c for c in cfg.concurrency if c <= 64] or [min(cfg.concurrency)])
            runs = [(many, short)] if many == 1 else [(1, short[:32]), (many, short)]
            for c, works in runs:
                say(f"[serve] short answers, concurrency {c}: {len(works)} requests ...")
                result = report["server"][f"short@{c}"] = {"concurrency": c,
                                                           **drive(pool, cfg.client_processes, server, works, c)}
                say(f"  {result['output_tokens_per_s']:.0f} tok/s, TTFT p50 {result['ttft_ms']['p50']:.1f} ms")
                say("  " + breakdown_line(result["breakdown"]))
    finally:
        pool.terminate()
        server.close()


def run_serve_bench(cfg: ServeBenchConfig) -> dict:
    from crossvlm.bench.batches import jpeg_pool
    from crossvlm.engine import EngineConfig
    from crossvlm.inference import ChatModel
    from crossvlm.model.modeling import CrossVLM
    from crossvlm.model.processor import CrossVLMProcessor

    cfg.validate()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    slots = cfg.slots or max(cfg.concurrency)
    report = {"benchmark": "serve", "preset": cfg.preset, "dtype": str(dtype), "slots": slots, "max_len": cfg.max_len,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              "env": env_info(device), "server": {}, "offline": {}}
    with tempfile.TemporaryDirectory(prefix="crossvlm-bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        llm_dir, vision_dir = ensure_models(cfg.models or tmp / "models", cfg.preset)
        torch.manual_seed(cfg.seed)
        model = CrossVLM.from_base_models(llm_dir, vision_dir, dtype=dtype)
        processor = CrossVLMProcessor.from_base_models(llm_dir, vision_dir, model.num_image_tokens)
        model_dir = tmp / "vlm"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        images = jpeg_pool(tmp, cfg.jpeg_size, count=16, seed=cfg.seed)
        long, short = workload(processor.tokenizer, images, cfg)
        say(f"bench serve: preset {cfg.preset}, {dtype} on {device}, {len(long)} long requests, {len(short)} short, "
            f"{slots} slots of {cfg.max_len} tokens")

        if cfg.baseline_requests:
            model = model.to(device).eval()
            say(f"[serve] baseline: stock generate() on {min(cfg.baseline_requests, len(long))} requests in one batch ...")
            report["baseline"] = baseline(model, processor, long[:cfg.baseline_requests], device)
            say(f"[serve] baseline: {report['baseline']['output_tokens_per_s']:.0f} tok/s")
        del model
        free_memory(device)

        if cfg.server:
            _serve_part(cfg, report, model_dir, slots, long, short)
        if cfg.offline:
            chat = ChatModel.load(model_dir, device=device.type, engine=EngineConfig(slots=slots, max_len=cfg.max_len,
                                                                                   compile=cfg.compile, attention=cfg.attention))
            chat.engine.warm_up()  # every graph recorded (and compiled) before the clock starts, as the server does
            offline(chat, long[:1])
            for name, works in (("long", long), ("short", short)):
                if works:
                    say(f"[serve] offline {name}: {len(works)} requests through ChatModel.generate_prompts ...")
                    result = report["offline"][name] = offline(chat, works)
                    say(f"  {result['output_tokens_per_s']:.0f} tok/s in {result['seconds']:.1f} s")
                    say("  " + breakdown_line(result["breakdown"]))
            report["offline"]["engine_stats"] = dict(chat.engine.stats)
            report["peak_memory_gib"] = peak_memory_gib(device)
            chat.close()
    base = (report.get("baseline") or {}).get("output_tokens_per_s")
    for part in (report["server"], report["offline"]):
        for r in part.values():
            if base and "output_tokens_per_s" in r:
                r["vs_generate"] = r["output_tokens_per_s"] / base
    return report
