"""`Engine`: continuous batching over a paged KV cache, driven by one worker thread.

`submit` queues a request from any thread; the worker loops: take new requests and cancellations,
schedule (room for the decoding requests, preempting the newest when blocks run out; admission by
free slots and blocks, prefix-cache lookups; prefill chunks), launch the prefill and then one decode step for every request
whose prompt is in the cache, and only then read back the tokens of the *previous* launch and hand
them to their requests. The host's bookkeeping (detokenizing, stop strings, streaming) thus runs
while the device computes the next step, and the only host sync per step is that read-back of one
token per row, which streaming needs anyway. A request that finished while its next token was
already being computed gets that token thrown away; its slot and blocks are free from the next step
on, the full blocks it wrote kept in the prefix cache.

Faults stay with the request that caused them: logits that are not finite fail only their row;
an exception in a prefill (an out-of-memory on a large batch, say) retries each of its requests
alone, and only those that fail alone get the error; an exception in a decode step fails the
requests of that step. The worker itself goes on serving.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from crossvlm.engine import constraints
from crossvlm.engine.blocks import BlockManager, image_spans
from crossvlm.engine.cache import (FLASH_BLOCK, PagedCache, flash_available, triton_decode_available,
                                   use_engine_attention)
from crossvlm.engine.model_runner import Chunk, ModelRunner
from crossvlm.engine.request import Request
from crossvlm.engine.sampler import Sampler, to_device
from crossvlm.engine.scheduler import Scheduler
from crossvlm.errors import ConfigError, CrossVLMError


class GenerationError(CrossVLMError, RuntimeError):
    """A request's generation failed (its logits were not finite, or its step raised)."""


class QueueFull(CrossVLMError, RuntimeError):
    """Every slot is busy and the waiting line is at its limit."""


@dataclass
class EngineConfig:
    """Sizes of the engine; None picks a default for the device."""

    slots: int | None = None
    """Requests running at once: the rows of the decode batch, each with its sampling settings. KV
    memory is not reserved per row but handed out in blocks as requests grow (`kv_memory`), so
    a row costs little (its logits and sampling state, ~2.4 MB for Qwen3's vocabulary). Default:
    1,024 on a GPU, 8 on a CPU."""
    max_len: int | None = None
    """The longest prompt + answer of one request. Default: the model's context, at most 4,096."""
    prefill_tokens: int = 8192
    """Most prompt tokens prefilled in one step (packed into one row); longer prompts are prefilled in chunks."""
    graphs: bool | None = None
    """Replay the decode step, a lone prompt's prefill and the image path as CUDA graphs (default: on a GPU)."""
    compile: bool = False
    """Fuse the decode step, the prefill and the image path with `torch.compile` (Inductor), the decode step before its
    graphs are recorded: minutes more at start-up, 2.5x the decode speed at batch 1 on an H200
    (docs/PERFORMANCE.md, "Generation engine")."""
    kv_memory: float = 0.7
    """Share of the device memory left free after the model and the rows' buffers that the KV cache
    takes (a GPU; measured when the engine starts), when `kv_blocks` is not given; never more than
    every slot at `max_len` would need."""
    kv_blocks: int | None = None
    """KV-cache blocks of `block_size` positions (one of them scratch). Default: from `kv_memory` on a
    GPU; on a CPU enough for every row's `max_len`."""
    block_size: int = 256
    """Positions per KV block (FlashAttention's paged kernel takes multiples of 256); also the prefix
    cache's unit: only whole blocks are shared."""
    attention: str = "auto"
    """`flash`: FlashAttention's variable-length kernel (the build inside torch) reading each request's
    blocks in place, each its own length; `triton`: decode steps read them in place with the Triton
    kernel of crossvlm.engine.paged_decode, prefills as sdpa; `sdpa`: `scaled_dot_product_attention`
    over a length rung that holds the longest running request, its blocks gathered, masked; `auto`:
    flash where it runs (a CUDA GPU of the Ampere generation or later, bf16/fp16, blocks of a multiple
    of 256, a torch whose kernel takes a block table), else triton where it runs (a CUDA GPU, bf16/fp16,
    Triton installed), else sdpa."""

    def max_len_for(self, text_config) -> int:
        """The longest request for an LLM of this config: `max_len`, or its context up to 4,096."""
        return min(self.max_len or 4096, text_config.max_position_embeddings)


ATTENTION = ("auto", "flash", "triton", "sdpa")

ROW_BYTES_PER_VOCAB = 16
"""Device bytes a row of the decode batch takes per vocabulary entry, estimated: its logits (2), its
seen-token flags (1) and the sampler's float32 temporaries at its peak (~13)."""


TIMERS = {
    "admit_s": "host time embedding new prompts (the image path) and writing their sampling settings",
    "prefill_s": "host time launching prefills",
    "decode_s": "host time launching decode steps and their sampling",
    "collect_s": "host time handing tokens to requests (detokenizing, stop strings, streaming callbacks)",
    "wait_s": "time the engine's thread waited for the device to finish a step",
    "queue_s": "summed over requests: from submission to a slot",
    "first_token_s": "summed over requests: from submission to the first token on the host",
}
"""The engine's timers (`Engine.stats`, seconds). Per step, the host's share (admit + prefill + decode +
collect) against `wait_s` says whether the host or the device sets the pace; `first_token_s` /
`first_tokens` is the mean time to a first token inside the engine."""


@dataclass
class _Launch:
    """Tokens being computed for these requests (in row order), copied back without blocking."""

    requests: list[Request | None]
    tokens: torch.Tensor
    ready: torch.cuda.Event | None = None


def kv_blocks(cfg: EngineConfig, text, dtype: torch.dtype, max_len: int, slots: int, free: int | None) -> int:
    """The KV cache's size in blocks for `free` bytes of device memory (None: a CPU, sized by the rows'
    `max_len`, as is the most a GPU's takes); refused in one line where the rows or the cache cannot fit."""
    per_block = PagedCache.bytes_per_token(text, dtype) * cfg.block_size
    per_request = -(-max_len // cfg.block_size)
    if free is None:
        return cfg.kv_blocks or slots * per_request + 1
    rows = slots * text.vocab_size * ROW_BYTES_PER_VOCAB
    if rows > free:
        raise ConfigError(f"{slots} slots: their logits and sampling state need {rows / 1e9:.1f} GB; this device "
                          f"has {free / 1e9:.1f} GB free (a slot is a request running; KV memory goes by tokens, "
                          "so a few hundred to a few thousand slots is the useful range)")
    if cfg.kv_blocks is not None:
        if cfg.kv_blocks * per_block + rows > free:
            raise ConfigError(f"the KV cache needs {cfg.kv_blocks * per_block / 1e9:.1f} GB for {cfg.kv_blocks} blocks "
                              f"(and {slots} slots {rows / 1e9:.1f} GB); this device has {free / 1e9:.1f} GB free")
        return cfg.kv_blocks
    # Never more than every slot at `max_len` needs (a small model would otherwise take most of the device)
    blocks = min(int((free - rows) * cfg.kv_memory // per_block), slots * per_request + 1)
    if blocks < per_request + 1:
        raise ConfigError(f"the KV cache needs {(per_request + 1) * per_block / 1e9:.2f} GB for one request of "
                          f"{max_len} tokens; {cfg.kv_memory:.0%} of the {(free - rows) / 1e9:.1f} GB this device "
                          "has free beside the slots gives less (lower --max-len or --slots, or raise --kv-memory)")
    return blocks


class Engine:
    """Generation for one CrossVLM: `submit` requests, receive their events on their callbacks."""

    def __init__(self, model, tokenizer, eos_ids: set[int], config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.eos_ids = eos_ids
        cfg = config or EngineConfig()
        text = model.config.text_config
        device = next(model.llm.parameters()).device
        self.max_len = cfg.max_len_for(text)
        self.config = cfg
        if cfg.attention not in ATTENTION:
            raise ConfigError(f"the engine's attention must be one of {', '.join(ATTENTION)}, not {cfg.attention!r}")
        if cfg.block_size < 1 or (cfg.kv_blocks is not None and cfg.kv_blocks < 2) or not 0 < cfg.kv_memory <= 1:
            raise ConfigError(f"the engine's KV cache needs block_size >= 1, kv_blocks >= 2 and kv_memory in (0, 1], "
                              f"got {cfg.block_size}, {cfg.kv_blocks}, {cfg.kv_memory}")
        slots = cfg.slots or (1024 if device.type == "cuda" else 8)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # auto: GPUs only (torch may also run the kernel on a CPU, where SDPA is the measured path)
        asked = cfg.attention == "flash" or (cfg.attention == "auto" and device.type == "cuda")
        paged = cfg.block_size % FLASH_BLOCK == 0
        flash = asked and paged and flash_available(device, model.llm.dtype, text.num_attention_heads,
                                                    text.num_key_value_heads, head_dim)
        if cfg.attention == "flash" and not flash:
            raise ConfigError(f"attention flash: FlashAttention does not run on {device} in {model.llm.dtype} with "
                              f"blocks of {cfg.block_size} (it needs a CUDA GPU of the Ampere generation or later, "
                              f"bf16 or fp16, a torch whose kernel takes a block table, and blocks of a multiple of "
                              f"{FLASH_BLOCK}); use auto or sdpa")
        triton_decode = not flash and cfg.attention in ("auto", "triton") and triton_decode_available(
            device, model.llm.dtype, text.num_attention_heads, text.num_key_value_heads, head_dim, cfg.block_size)
        if cfg.attention == "triton" and not triton_decode:
            raise ConfigError(f"attention triton: the Triton decode kernel does not run on {device} in "
                              f"{model.llm.dtype} with blocks of {cfg.block_size} (it needs Triton, a CUDA GPU, bf16 or "
                              "fp16, and blocks of a multiple of 16); use auto or sdpa")
        self.attention = "flash" if flash else "triton" if triton_decode else "sdpa"
        """The attention the engine runs (what `auto` chose)."""
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        blocks = kv_blocks(cfg, text, model.llm.dtype, self.max_len, slots, free)
        use_engine_attention(model.llm)
        self.cache = PagedCache(text, blocks, cfg.block_size, model.llm.dtype, device)
        self.blocks = BlockManager(blocks, cfg.block_size)
        self.sampler = Sampler(slots, text.vocab_size, sorted(eos_ids), device)
        graphs = device.type == "cuda" if cfg.graphs is None else cfg.graphs
        self.runner = ModelRunner(model, self.cache, self.sampler, slots, self.max_len, graphs, cfg.compile, flash=flash,
                                  triton_decode=triton_decode)
        self.scheduler = Scheduler(slots, self.blocks, cfg.prefill_tokens, model.config.image_token_id)
        self.device = device
        self._lock = threading.Condition()
        self._incoming: list[Request] = []
        self._cancelled: list[Request] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self._warm = False
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "largest_batch": 0, "failed": 0, "first_tokens": 0,
                      "cached_tokens": 0, "preempted": 0, **{k: 0.0 for k in TIMERS}}
        """Counts and seconds since the start (`TIMERS` says what each timer holds); `/health` shows them.
        `cached_tokens`: prompt tokens found in the prefix cache; `preempted`: requests that gave their
        blocks back to be recomputed."""

    def warm_up(self, say=None) -> bool:
        """Record every decode step's CUDA graph now (and, with `compile`, compile the steps), which
        otherwise happens the first time a batch size and context length are met (a fraction of a
        second each in some request's time; a compilation takes a minute). Only possible before the
        first request (this writes into the cache): afterwards it does nothing and returns False.
        `say(text)` hears of each phase as it starts (compiling, recording)."""
        with self._lock:
            if self._warm:
                return True
            if self._thread is not None or self._incoming:
                return False
            self.runner.warm_up(say)
            self._warm = True
            return True

    @property
    def context_limit(self) -> int:
        """The most positions one request may take: `max_len`, or less where the whole cache holds fewer."""
        return min(self.max_len, (self.blocks.blocks - 1) * self.blocks.block_size)

    @property
    def slots(self) -> int:
        return self.runner.rows

    @property
    def free_slots(self) -> int:
        return self.scheduler.free_slots

    # -- from any thread ---------------------------------------------------------------------------
    def submit(self, request: Request, max_waiting: int | None = None) -> Request:
        """Queue a request; raise `QueueFull` if `max_waiting` requests already wait for a slot (beyond
        those the free slots will take at the next step)."""
        request.submitted = time.perf_counter()
        request.sampling.check_vocab(self.sampler.vocab)
        if (request.sampling.json_schema is None) != (request.matcher is None):
            raise CrossVLMError("a request with a json_schema needs its matcher (ChatModel.submit makes it), and only it")
        limit = self.context_limit
        if request.prompt_tokens >= limit:
            raise CrossVLMError(f"the prompt takes {request.prompt_tokens} tokens; the engine's limit is {limit - 1}")
        request.max_new_tokens = max(1, min(request.sampling.max_new_tokens, limit - request.prompt_tokens))
        with self._lock:
            if max_waiting is not None and self.waiting() >= max_waiting + self.scheduler.free_slots:
                raise QueueFull(f"all {self.slots} slots are busy and {self.waiting()} requests wait")
            self._incoming.append(request)
            self._lock.notify()
        self._start()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (its client has gone); its slot is free at the next step."""
        with self._lock:
            request.cancelled = True
            self._cancelled.append(request)
            self._lock.notify()

    def waiting(self) -> int:
        """Requests not yet holding a slot."""
        return len(self._incoming) + len(self.scheduler.waiting)

    def running(self) -> int:
        return len(self.scheduler.running)

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._work, name="crossvlm-engine", daemon=True)
                self._thread.start()

    # -- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        pending: list[_Launch] = []
        while True:
            with self._lock:
                while not (self._stop or self._incoming or self._cancelled or self.scheduler.busy or pending):
                    self._lock.wait()
                if self._stop:
                    break
                incoming, self._incoming = self._incoming, []
                cancelled, self._cancelled = self._cancelled, []
            try:
                for request in incoming:
                    self.scheduler.add(request)
                for request in cancelled:
                    request.finish("cancelled")
                    self._release(request)
                if pending and self._lockstep():
                    with self._timer("collect_s"):
                        for launch in pending:
                            self._collect(launch)
                    pending = []
                launched = self._launch() if self.scheduler.busy else []
                with record_function("engine.collect"), self._timer("collect_s"):  # (labels: `bench generate --profile`)
                    for launch in pending:
                        self._collect(launch)
                pending = launched
            except Exception as err:  # noqa: BLE001 — a bug (or a caller's callback) must not leave requests hanging
                pending = []
                self._fail_all(err)
        self._fail_all(GenerationError("the engine was closed"))

    def _launch(self) -> list[_Launch]:
        """Schedule and start one step (prefill, then decode); nothing here waits for the device."""
        schedule = self.scheduler.schedule()
        launches = []
        if schedule.preempted:
            self.stats["preempted"] += len(schedule.preempted)
            self.runner.park([slot for _, slot in schedule.preempted])
        if schedule.grown:
            self.runner.grow(*map(list, zip(*schedule.grown)))
        if schedule.admitted:
            now = time.perf_counter()
            for request in schedule.admitted:
                if not request.preemptions:
                    request.admitted = now
                    self.stats["queue_s"] += now - request.submitted
                    self.stats["cached_tokens"] += request.cached_tokens
            with record_function("engine.admit"), self._timer("admit_s"):
                self._admit(schedule.admitted)
        # While a constrained request runs the decode step goes first: a prompt prefilled in this step then
        # decodes from the next one on, once its first token is read back and its grammar has taken it.
        lockstep = self._lockstep()
        if lockstep:
            launches += self._decode_running()
        if schedule.prefill:
            with record_function("engine.prefill"), self._timer("prefill_s"):
                launches += self._prefill(schedule.prefill)
        if not lockstep:
            launches += self._decode_running()
        self.stats["steps"] += 1
        return launches

    def _decode_running(self) -> list[_Launch]:
        # A request whose last token is already being computed needs no more steps.
        decode = [r for r in self.scheduler.decoding() if not r.done and r.launched < r.max_new_tokens]
        if not decode:
            return []
        with record_function("engine.decode"), self._timer("decode_s"):
            return self._decode(decode)

    @contextmanager
    def _timer(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats[name] += time.perf_counter() - start

    def _kinds(self, requests: list[Request]) -> dict:
        params = [r.sampling for r in requests]
        sampled = [p for p in params if not p.is_greedy]
        if not any(p.top_k > 0 or p.top_p < 1 for p in sampled):
            candidates = 0  # nothing to sort
        elif all(p.top_k > 0 for p in sampled):
            candidates = max(p.top_k for p in sampled)  # the likeliest few, not a sort of the vocabulary
        else:
            candidates = None
        return dict(greedy=not sampled, penalty=any(p.repetition_penalty != 1 for p in params),
                    min_tokens=any(p.min_tokens for p in params), candidates=candidates)

    def _admit(self, requests: list[Request]) -> None:
        """Embed the new contexts (their images encoded here, once; not those the prefix cache holds)
        and write their sampling settings."""
        self.runner.park([r.slot for r in requests])  # idle until their prefill ends
        try:
            self._embed(requests)
        except Exception:  # noqa: BLE001 — find the request that fails alone
            for request in requests:
                try:
                    self._embed([request])
                except Exception as err:  # noqa: BLE001
                    self._fail(request, err)
        live = [r for r in requests if not r.done]
        if live:
            self.sampler.admit([r.slot for r in live], [r.sampling for r in live])

    def _embed(self, requests: list[Request]) -> None:
        """Embeddings of each context from its first position not in the cache, or from the start of the
        image that position falls in (an image's visual tokens are made together); the images before
        are not encoded. Tokens generated before a preemption are text, whatever their ids."""
        prompts, images, grids = [], [], []
        for request in requests:
            spans = image_spans(request.input_ids, self.model.config.image_token_id)
            start = min([request.prefilled] + [s for s, e in spans if e > request.prefilled])
            request.embed_from = min(start, request.prompt_tokens)
            prompts.append(request.input_ids[request.embed_from:])
            kept = [i for i, (s, _) in enumerate(spans) if s >= request.embed_from]
            views = request.image_views()
            images += [views[i] for i in kept]
            if request.image_grids is not None:
                grids += [request.image_grids[i] for i in kept]
        pixels = torch.cat(images) if images else None  # (N, 3, H, W): the views of the images embedded, in order
        grids = grids or None  # a tiled model's: those images' grids
        embedded = self.runner.embed(prompts, pixels, grids) if any(prompts) else [None] * len(requests)
        for request, embeds in zip(requests, embedded):
            generated = request.context[max(request.prompt_tokens, request.embed_from):]
            if generated:  # a preempted request's answer so far
                tokens = self.runner.embed_text(generated)
                embeds = tokens if embeds is None or not len(embeds) else torch.cat([embeds, tokens])
            request.embeds = embeds

    def _prefill(self, work: list[tuple[Request, int, int]]) -> list[_Launch]:
        self._constrain([r for r, _, end in work if end == r.prompt_tokens])
        work = [(r, s, e) for r, s, e in work if not r.done]
        if not work:
            return []
        chunks = [Chunk(r.slot, start, r.embeds[start - r.embed_from:end - r.embed_from], end == len(r.context), r.blocks)
                  for r, start, end in work]
        ending = [r for r, _, end in work if end == len(r.context)]
        if ending:
            self.sampler.begin([r.slot for r in ending], [r.context for r in ending], self._kinds(ending)["penalty"])
            resumed = [r for r in ending if r.generated]
            if resumed:  # the noise's step and min_tokens go on from where the preemption left them
                self.sampler.generated[to_device([r.slot for r in resumed], self.device)] = to_device(
                    [r.generated for r in resumed], self.device)
        try:
            tokens = self.runner.prefill(chunks, **self._kinds([r for r, _, _ in work]))
        except Exception as err:  # noqa: BLE001
            if len(work) == 1:
                self._fail(work[0][0], err)
                return []
            return [launch for item in work for launch in self._prefill([item])]  # each alone
        for request, _, end in work:
            request.prefilled = end
            if end == len(request.context):
                request.embeds = None
                request.launched = request.generated + 1
                self.scheduler.prefilled(request)
        self.stats["prefills"] += 1
        if tokens is None:
            return []
        return [self._start_copy(ending, tokens)]

    def _decode(self, requests: list[Request]) -> list[_Launch]:
        requests = self._constrain(requests)
        if not requests:
            return []
        rows = max(r.slot for r in requests) + 1
        # Each writes its newest token at position prompt + launched - 1 and attends to it.
        kv_needed = max(r.prompt_tokens + r.launched for r in requests)
        try:
            tokens = self.runner.decode(rows, kv_needed, **self._kinds(requests))
        except Exception as err:  # noqa: BLE001
            for request in requests:
                self._fail(request, err)
            return []
        by_slot: list[Request | None] = [None] * tokens.shape[0]
        for request in requests:
            by_slot[request.slot] = request
            request.launched += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(requests))
        return [self._start_copy(by_slot, tokens)]

    # -- structured outputs (`constraints`) -------------------------------------------------------
    def _lockstep(self) -> bool:
        """Whether a constrained request holds a slot: its next mask needs its last token, so while one
        runs each step's tokens are read back before the next step is launched (no host/device overlap)."""
        return any(r.matcher is not None for r in self.scheduler.running)

    def _constrain(self, requests: list[Request]) -> list[Request]:
        """Write the masks of the constrained ones among requests about to sample a token into the
        sampler; fail those whose grammar cannot go on. Returns the requests still live."""
        constrained = [r for r in requests if r.matcher is not None and not r.done]
        for request in constrained:
            if request.matcher.error:
                self._fail(request, GenerationError(f"structured output: {request.matcher.error}"))
        live = [r for r in constrained if not r.done]
        if live:
            host = torch.empty(len(live), self.sampler.allowed.shape[1], dtype=torch.int32)  # (n, words)
            constraints.fill([r.matcher for r in live], host)
            self.sampler.allowed.index_copy_(0, to_device([r.slot for r in live], self.device), to_device(host, self.device))
        return [r for r in requests if not r.done]

    def _start_copy(self, requests: list[Request | None], tokens: torch.Tensor) -> _Launch:
        if tokens.device.type != "cuda":
            return _Launch(requests, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launch(requests, host, ready)

    def _collect(self, launch: _Launch) -> None:
        """Hand the tokens of a finished launch to their requests; free the slots of those that end."""
        if launch.ready is not None:
            start = time.perf_counter()
            launch.ready.synchronize()
            waited = time.perf_counter() - start
            self.stats["wait_s"] += waited
            self.stats["collect_s"] -= waited  # (collect_s counts the host's own work)
        now = time.perf_counter()
        for request, token in zip(launch.requests, launch.tokens.tolist()):
            if request is None or request.done:
                continue
            if not request.generated:
                self.stats["first_tokens"] += 1
                self.stats["first_token_s"] += now - request.submitted
            if token < 0:
                self._fail(request, GenerationError(
                    "the model's logits are not finite for this request (a numerical fault in its generation)"))
                continue
            request.add_token(token, self.tokenizer, self.eos_ids)
            self.stats["tokens"] += 1
            if request.done:
                self._release(request)

    def _release(self, request: Request, failed: bool = False) -> None:
        """Free a finished, cancelled or failed request's row and blocks (or take it out of the waiting
        line); the full blocks of what it wrote stay in the prefix cache, unless it failed."""
        slot = request.slot
        written = 0
        if slot is not None and not failed:
            prefilled = request.prefilled >= len(request.context)
            # the prompt, and each generated token but the last (which no step has fed back yet)
            written = request.prompt_tokens + request.generated - 1 if prefilled else request.prefilled
        self.scheduler.release(request, written)
        if slot is not None:
            self.runner.park([slot])  # idle from now on: it must not read its old blocks in decode steps

    def _fail_all(self, err: BaseException) -> None:
        for request in [*self.scheduler.waiting, *self.scheduler.running]:
            self._fail(request, err)

    def _fail(self, request: Request, err: BaseException) -> None:
        self.stats["failed"] += 1
        if request.slot is not None:
            self.blocks.forget(request.blocks)
            self.cache.clear([b for b in request.blocks if self.blocks.ref[b] == 1])  # queued after steps writing them
        if request.slot is not None or request in self.scheduler.waiting:
            self._release(request, failed=True)
        try:
            request.fail(err if isinstance(err, GenerationError) else GenerationError(f"{type(err).__name__}: {err}"))
        except Exception:  # noqa: BLE001 — the caller's callback failed too; the request is over either way
            pass
