"""Measure a running `crossvlm serve`: throughput and latency under concurrent streamed requests.

    python -m crossvlm.serve.loadtest --url http://127.0.0.1:8000 --requests 32 --concurrency 8

Each of `--concurrency` client threads sends its share of `--requests` streamed chat completions
one after another (every other one with a generated image), greedy with `--max-tokens`; the JSON
summary gives requests/s, completion tokens/s, and latency and time-to-first-token percentiles.
Only the standard library is used, so it runs wherever the server's clients do.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import threading
import time
import urllib.request

QUESTIONS = ("What colour is the circle?", "How many shapes are there?", "Where is the square?",
             "Describe the image.", "Is there a triangle?", "What is in the top left corner?")


def _image_url(seed: int) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), (230, 230 - seed % 50, 210))
    ImageDraw.Draw(image).ellipse([20 + seed % 100, 40, 120 + seed % 100, 140], fill=(200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(url: str, k: int, max_tokens: int, api_key: str | None) -> dict:
    """Send request k (streamed); returns its latency, time to first token and completion tokens."""
    content = [{"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}]
    if k % 2:
        content.insert(0, {"type": "image_url", "image_url": {"url": _image_url(k)}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", json.dumps(body).encode(), headers)
    start = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(url: str, requests: int, concurrency: int, max_tokens: int, api_key: str | None = None) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def worker(ids: range) -> None:
        for k in ids:
            result = one_request(url, k, max_tokens, api_key)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker, args=(range(w, requests, concurrency),)) for w in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = [r["latency"] for r in results]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 2), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "latency_s": {"p50": round(statistics.median(latencies), 2), "p95": round(_percentile(latencies, 0.95), 2)},
        "ttft_s": {"p50": round(statistics.median(ttfts), 2), "p95": round(_percentile(ttfts, 0.95), 2)} if ttfts else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m crossvlm.serve.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key")
    args = p.parse_args(argv)
    one_request(args.url, 0, 2, args.api_key)  # warm-up, not counted
    print(json.dumps(run(args.url, args.requests, args.concurrency, args.max_tokens, args.api_key), indent=2))


if __name__ == "__main__":
    main()
