"""Which requests run in the next step: admission into free slots, prefill chunks, the decode set.

Requests wait in arrival order. Each step, waiting requests take free slots (lowest first) while
there are any; then the prompts not yet in the cache get prefill chunks up to `prefill_tokens`
tokens in all (a prompt longer than what is left is cut into chunks and goes on next step);
then every request whose prompt is fully in the cache decodes one token. A request joins the
running batch the step its prefill ends and leaves it the step it finishes: nobody waits for
anyone else's longest answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from crossvlm.engine.cache import SlotCache
from crossvlm.engine.request import Request


@dataclass
class Schedule:
    admitted: list[Request]
    """Requests that got a slot this step (their prompts are to be embedded)."""
    prefill: list[tuple[Request, int, int]]
    """(request, start, end): prompt positions to prefill this step."""


class Scheduler:
    def __init__(self, cache: SlotCache, prefill_tokens: int):
        self.cache, self.prefill_tokens = cache, prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # holding a slot, in admission order

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def release(self, request: Request) -> None:
        """Take a finished or cancelled request out: its slot is free for the next step."""
        if request.slot is not None:
            self.running.remove(request)
            self.cache.release(request.slot)
            request.slot = None
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        admitted = []
        while self.waiting and self.cache.free:
            request = self.waiting.popleft()
            request.slot = self.cache.allocate()
            self.running.append(request)
            admitted.append(request)
        prefill, total = [], 0
        pending = [r for r in self.running if r.prefilled < r.prompt_tokens]
        # The oldest first (so none starves), then shortest first: the most first tokens per step.
        pending = pending[:1] + sorted(pending[1:], key=lambda r: r.prompt_tokens)
        for request in pending:
            take = min(request.prompt_tokens - request.prefilled, self.prefill_tokens)
            if prefill and total + take > self.prefill_tokens:
                break  # the rest next step
            prefill.append((request, request.prefilled, request.prefilled + take))
            total += take
        return Schedule(admitted, prefill)

    def decoding(self) -> list[Request]:
        """Requests whose prompts are fully in the cache (call after the step's prefill is launched)."""
        return [r for r in self.running if r.prefilled >= r.prompt_tokens]
