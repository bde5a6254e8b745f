"""Which requests run in the next step: room in the KV cache, admission, prefill chunks, preemption.

Requests wait in arrival order. Each step:
1. every decoding request gets room for the token it writes this step (a new block when its context
   crosses a block's end); when no block is free, the newest running request is preempted: it gives
   its blocks and its row back and goes to the head of the waiting line, to be recomputed later
   (vLLM's recompute policy), its prompt then followed by the tokens it had generated;
2. waiting requests are admitted while there are free rows and free blocks for their whole context
   (and its first generated token), less the blocks found in the prefix cache (`blocks`): those are
   shared, and their positions count as prefilled already;
3. the contexts not yet in the cache get prefill chunks up to `prefill_tokens` tokens in all (a
   context longer than what is left is cut into chunks and goes on next step).
Then every request whose context is fully in the cache decodes one token. A request joins the running
batch the step its prefill ends and leaves it the step it finishes: nobody waits for anyone else's
longest answer.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from crossvlm.engine.blocks import BlockManager, block_hashes, image_digest, image_spans
from crossvlm.engine.request import Request


@dataclass
class Schedule:
    admitted: list[Request]
    """Requests that got a row and blocks this step (their contexts are to be embedded)."""
    prefill: list[tuple[Request, int, int]]
    """(request, start, end): context positions to prefill this step."""
    preempted: list[tuple[Request, int]] = field(default_factory=list)
    """(request, the row it left): requests that gave their blocks back this step."""
    grown: list[tuple[int, int, int]] = field(default_factory=list)
    """(row, column, block): block-table entries added for decoding requests."""


class Scheduler:
    def __init__(self, slots: int, blocks: BlockManager, prefill_tokens: int, image_token_id: int):
        self.blocks, self.prefill_tokens, self.image_token_id = blocks, prefill_tokens, image_token_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # holding a row, in admission order
        self._free_slots = list(range(slots))  # a heap: the lowest free row first
        # Blocks kept free at admission, so the running requests can grow a while before anyone is preempted.
        self.watermark = max(1, blocks.blocks // 100)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def release(self, request: Request, written: int = 0) -> None:
        """Take a finished, cancelled or failed request out: its row and blocks are free for the next
        step. `written`: its first positions whose keys are in the cache and may be shared (their full
        blocks are registered for the prefix cache)."""
        if request.slot is not None:
            self.running.remove(request)
            if written:  # (only blocks whose every position was written: a cancelled prefill's later ones were not)
                ids = request.input_ids + request.tokens
                full = min(written, len(ids)) // self.blocks.block_size
                request.hashes = block_hashes(ids, self._spans(request), request.images or [], self.blocks.block_size,
                                              full * self.blocks.block_size, request.hashes[:full])
                self.blocks.register(request.blocks, request.hashes)
            self._give_back(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def _give_back(self, request: Request) -> None:
        self.blocks.release(request.blocks)
        request.blocks = []
        heapq.heappush(self._free_slots, request.slot)
        request.slot = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        schedule = Schedule([], [])
        self._grow(schedule)
        if not schedule.preempted:  # (memory is short: let the running requests finish first)
            self._admit(schedule)
        total = 0
        pending = [r for r in self.running if r.prefilled < len(r.context)]
        # The oldest first (so none starves), then shortest first: the most first tokens per step.
        pending = pending[:1] + sorted(pending[1:], key=lambda r: len(r.context))
        for request in pending:
            take = min(len(request.context) - request.prefilled, self.prefill_tokens)
            if schedule.prefill and total + take > self.prefill_tokens:
                break  # the rest next step
            schedule.prefill.append((request, request.prefilled, request.prefilled + take))
            total += take
        return schedule

    def _grow(self, schedule: Schedule) -> None:
        """Room for this step's decode writes: the request decoding its `launched`-th token writes position
        prompt + launched - 1. The newest running request is preempted while no block is free."""
        for request in list(self.running):
            if request.slot is None or request.done or request.launched >= request.max_new_tokens:
                continue  # (preempted just now, or no more steps)
            if request.prefilled < len(request.context):
                continue  # its prefill has its blocks already
            need = self.blocks.needed(request.prompt_tokens + request.launched)
            while len(request.blocks) < need and request.slot is not None:
                if self.blocks.available:
                    block = self.blocks.allocate()
                    schedule.grown.append((request.slot, len(request.blocks), block))
                    request.blocks.append(block)
                else:
                    self._preempt(self.running[-1], schedule)

    def _preempt(self, request: Request, schedule: Schedule) -> None:
        schedule.preempted.append((request, request.slot))
        schedule.grown = [g for g in schedule.grown if g[0] != request.slot]
        self.running.remove(request)
        self._give_back(request)
        request.prefilled, request.embeds, request.context = 0, None, None
        request.preemptions += 1
        self.waiting.appendleft(request)

    def _admit(self, schedule: Schedule) -> None:
        while self.waiting and self._free_slots:
            request = self.waiting[0]
            if request.launched != request.generated:
                break  # preempted with a token still on its way: its context is not known yet
            context = request.input_ids + request.tokens[:request.generated]
            if request.images is None:  # an image's digest covers all its views (a tiled image's tiles too)
                request.images = [image_digest(views) for views in request.image_views()]
            bs = self.blocks.block_size
            # (a context only grows, by the tokens generated before a preemption: the known hashes stay)
            request.hashes = block_hashes(context, self._spans(request), request.images, bs, len(context),
                                          request.hashes[:len(context) // bs])
            # Whole blocks only, and never the last position: its logits give the first token.
            found = self.blocks.lookup(request.hashes[:(len(context) - 1) // bs])
            fresh = self.blocks.needed(len(context) + 1) - len(found)
            cost = fresh + sum(1 for b in found if self.blocks.ref[b] == 0)
            if cost + (self.watermark if self.running else 0) > self.blocks.available:
                break
            self.waiting.popleft()
            for block in found:
                self.blocks.take(block)
            request.blocks = found + [self.blocks.allocate() for _ in range(fresh)]
            request.context, request.prefilled = context, len(found) * bs
            if not request.preemptions:
                request.cached_tokens = request.prefilled
            request.slot = heapq.heappop(self._free_slots)
            self.running.append(request)
            schedule.admitted.append(request)

    def _spans(self, request: Request) -> list[tuple[int, int]]:
        """Its images' positions: in the prompt (a generated <|image_pad|> id is text)."""
        return image_spans(request.input_ids, self.image_token_id)

    def prefilled(self, request: Request) -> None:
        """Its context is in the cache: its full blocks may be shared from now on."""
        self.blocks.register(request.blocks, request.hashes)

    def decoding(self) -> list[Request]:
        """Requests whose contexts are fully in the cache (call after the step's prefill is launched)."""
        return [r for r in self.running if r.prefilled >= len(r.context)]

    def fits(self, tokens: int) -> bool:
        """Whether a request of this many positions fits the cache at all (alone)."""
        return self.blocks.needed(tokens) <= self.blocks.blocks - 1
