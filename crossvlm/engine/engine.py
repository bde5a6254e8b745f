"""`Engine`: continuous batching over a slot KV cache, driven by one worker thread.

`submit` queues a request from any thread; the worker loops: take new requests and cancellations,
schedule (admission, prefill chunks), launch the prefill and then one decode step for every request
whose prompt is in the cache, and only then read back the tokens of the *previous* launch and hand
them to their requests. The host's bookkeeping (detokenizing, stop strings, streaming) thus runs
while the device computes the next step, and the only host sync per step is that read-back of one
token per row, which streaming needs anyway. A request that finished while its next token was
already being computed gets that token thrown away; its slot is free from the next step on.

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
from crossvlm.engine.cache import SlotCache, flash_available, use_slot_attention
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
    """Requests running at once (each holds one KV slot). Default: 256 on a GPU (fewer if memory is
    short: at most `memory_fraction` of the free memory goes to the cache), 8 on a CPU."""
    max_len: int | None = None
    """Positions per slot: the longest prompt + answer. Default: the model's context, at most 4,096."""
    prefill_tokens: int = 8192
    """Most prompt tokens prefilled in one step (packed into one row); longer prompts are prefilled in chunks."""
    graphs: bool | None = None
    """Replay the decode step, a lone prompt's prefill and the image path as CUDA graphs (default: on a GPU)."""
    compile: bool = False
    """Fuse the decode step, the prefill and the image path with `torch.compile` (Inductor), the decode step before its
    graphs are recorded: minutes more at start-up, 2.5x the decode speed at batch 1 on an H200
    (docs/PERFORMANCE.md, "Generation engine")."""
    memory_fraction: float = 0.6
    """Share of the free device memory the KV cache may take when `slots` is not given."""
    attention: str = "auto"
    """`flash`: FlashAttention's variable-length kernel (the build inside torch), each request reading
    its own length of its slot; `sdpa`: `scaled_dot_product_attention` over a length rung that holds the
    longest running request, masked; `auto`: flash where it runs (a CUDA GPU of the Ampere generation
    or later, bf16/fp16), else sdpa."""

    def max_len_for(self, text_config) -> int:
        """The slot length for an LLM of this config: `max_len`, or its context up to 4,096."""
        return min(self.max_len or 4096, text_config.max_position_embeddings)


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


class Engine:
    """Generation for one CrossVLM: `submit` requests, receive their events on their callbacks."""

    def __init__(self, model, tokenizer, eos_ids: set[int], config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.eos_ids = eos_ids
        cfg = config or EngineConfig()
        text = model.config.text_config
        device = next(model.llm.parameters()).device
        self.max_len = cfg.max_len_for(text)
        slots = cfg.slots or self._default_slots(text, device, cfg.memory_fraction)
        self.config = cfg
        use_slot_attention(model.llm)
        self.cache = SlotCache(text, slots, self.max_len, model.llm.dtype, device)
        self.sampler = Sampler(slots, text.vocab_size, sorted(eos_ids), device)
        graphs = device.type == "cuda" if cfg.graphs is None else cfg.graphs
        if cfg.attention not in ("auto", "flash", "sdpa"):
            raise ConfigError(f"the engine's attention must be auto, flash or sdpa, not {cfg.attention!r}")
        heads = (text.num_attention_heads, text.num_key_value_heads, self.cache.keys[0].shape[-1])
        # auto: GPUs only (torch may also run the kernel on a CPU, where SDPA is the measured path)
        asked = cfg.attention == "flash" or (cfg.attention == "auto" and device.type == "cuda")
        flash = asked and flash_available(device, model.llm.dtype, *heads)
        if cfg.attention == "flash" and not flash:
            raise ConfigError(f"attention flash: FlashAttention does not run on {device} in {model.llm.dtype} "
                              "(it needs a CUDA GPU of the Ampere generation or later, bf16 or fp16); use auto or sdpa")
        self.runner = ModelRunner(model, self.cache, self.sampler, graphs, cfg.compile, flash=flash)
        self.scheduler = Scheduler(self.cache, cfg.prefill_tokens)
        self.device = device
        self._lock = threading.Condition()
        self._incoming: list[Request] = []
        self._cancelled: list[Request] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self._warm = False
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "largest_batch": 0, "failed": 0, "first_tokens": 0,
                      **{k: 0.0 for k in TIMERS}}
        """Counts and seconds since the start (`TIMERS` says what each timer holds); `/health` shows them."""

    def _default_slots(self, text, device: torch.device, fraction: float) -> int:
        if device.type != "cuda":
            return 8
        free, _ = torch.cuda.mem_get_info(device)
        per_slot = SlotCache.bytes_per_token(text, self.model.llm.dtype) * self.max_len
        return max(1, min(256, int(free * fraction // per_slot)))

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
    def slots(self) -> int:
        return self.cache.slots

    # -- from any thread ---------------------------------------------------------------------------
    def submit(self, request: Request, max_waiting: int | None = None) -> Request:
        """Queue a request; raise `QueueFull` if `max_waiting` requests already wait for a slot (beyond
        those the free slots will take at the next step)."""
        request.submitted = time.perf_counter()
        request.sampling.check_vocab(self.sampler.vocab)
        if (request.sampling.json_schema is None) != (request.matcher is None):
            raise CrossVLMError("a request with a json_schema needs its matcher (ChatModel.submit makes it), and only it")
        if request.prompt_tokens >= self.max_len:
            raise CrossVLMError(f"the prompt takes {request.prompt_tokens} tokens; the engine's limit is "
                                f"{self.max_len - 1}")
        request.max_new_tokens = max(1, min(request.sampling.max_new_tokens, self.max_len - request.prompt_tokens))
        with self._lock:
            if max_waiting is not None and self.waiting() >= max_waiting + self.cache.free:
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
        if schedule.admitted:
            now = time.perf_counter()
            for request in schedule.admitted:
                request.admitted = now
                self.stats["queue_s"] += now - request.submitted
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
        """Embed the new prompts (their images encoded here, once) and write their sampling settings."""
        self.runner.park([r.slot for r in requests])
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
        images = [r.pixel_values for r in requests if r.pixel_values is not None]
        pixels = torch.cat(images) if images else None  # (N, 3, H, W), the prompts' images in order
        grids = [g for r in requests if r.image_grids is not None for g in r.image_grids] or None  # tiled images
        for request, embeds in zip(requests, self.runner.embed([r.input_ids for r in requests], pixels, grids)):
            request.embeds = embeds

    def _prefill(self, work: list[tuple[Request, int, int]]) -> list[_Launch]:
        self._constrain([r for r, _, end in work if end == r.prompt_tokens])
        work = [(r, s, e) for r, s, e in work if not r.done]
        if not work:
            return []
        chunks = [Chunk(r.slot, start, r.embeds[start:end], end == r.prompt_tokens) for r, start, end in work]
        ending = [r for r, _, end in work if end == r.prompt_tokens]
        if ending:
            self.sampler.begin([r.slot for r in ending], [r.input_ids for r in ending], self._kinds(ending)["penalty"])
        try:
            tokens = self.runner.prefill(chunks, **self._kinds([r for r, _, _ in work]))
        except Exception as err:  # noqa: BLE001
            if len(work) == 1:
                self._fail(work[0][0], err)
                return []
            return [launch for item in work for launch in self._prefill([item])]  # each alone
        for request, _, end in work:
            request.prefilled = end
            if end == request.prompt_tokens:
                request.embeds = None
                request.launched = 1
        self.stats["prefills"] += 1
        if tokens is None:
            return []
        return [self._start_copy([r for r, _, end in work if end == r.prompt_tokens], tokens)]

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

    def _release(self, request: Request) -> None:
        """Free a finished, cancelled or failed request's slot (or take it out of the waiting line)."""
        slot = request.slot
        self.scheduler.release(request)
        if slot is not None:
            self.runner.park([slot])  # a hole from now on: it must not read its old length in decode steps

    def _fail_all(self, err: BaseException) -> None:
        for request in [*self.scheduler.waiting, *self.scheduler.running]:
            self._fail(request, err)

    def _fail(self, request: Request, err: BaseException) -> None:
        self.stats["failed"] += 1
        if request.slot is not None:
            self.cache.clear(request.slot)  # queued after any step still writing into it
        if request.slot is not None or request in self.scheduler.waiting:
            self._release(request)
        try:
            request.fail(err if isinstance(err, GenerationError) else GenerationError(f"{type(err).__name__}: {err}"))
        except Exception:  # noqa: BLE001 — the caller's callback failed too; the request is over either way
            pass
