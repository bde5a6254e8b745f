"""Streaming chat-completion clients for `crossvlm bench serve`, one asyncio loop per process.

Kept free of torch so the client processes start fast and spend their time on the sockets. Each
request records when it was sent, when its first chunk arrived (the server sends it with the first
token), when each content chunk arrived, when it ended, and the usage the server reported.
"""

from __future__ import annotations

import asyncio
import json
import time


async def _one(client, gate: asyncio.Semaphore, payload: dict) -> dict:
    async with gate:
        sent = time.perf_counter()
        first, chunks, usage = None, [], None
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            if response.status_code != 200:
                return {"error": f"{response.status_code}: {(await response.aread())[:300]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                first = first or now
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    return {"error": str(chunk["error"])}
                usage = chunk.get("usage") or usage
                if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    chunks.append(now)
        end = time.perf_counter()
        if usage is None or first is None:
            return {"error": "the stream ended without usage"}
        return {"sent": sent, "first": first, "end": end, "chunks": chunks,
                "completion_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"]}


async def _drive(url: str, payloads: list[dict], concurrency: int) -> list[dict]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        return await asyncio.gather(*(_one(client, gate, p) for p in payloads))


def run_clients(job: tuple[str, list[dict], int]) -> list[dict]:
    """(url, payloads, concurrency) -> one record per payload; at most `concurrency` streams at once."""
    url, payloads, concurrency = job
    return asyncio.run(_drive(url, payloads, concurrency))
