"""Dynamic batching: one worker thread owns the model and answers queued requests in batches.

Requests wait in a queue. When the worker is free it takes the oldest one, waits `batch_wait`
seconds for more to arrive, and answers up to `max_batch_size` of those whose sampling settings
can share a `generate` call in one left-padded batch (see `SamplingParams.batch_key`). Each answer
is handed back as soon as it ends, while longer ones go on; requests that arrive meanwhile form the
next batch. This is batching per wave, not continuous batching: a new request waits for the
running batch to end. docs/SERVING.md has the measurements behind the defaults.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque

from crossvlm.inference import ChatModel, Completion, Delta, Prompt, SamplingParams

_STOP = object()


class Job:
    """One request's place in the engine; its events arrive on the asyncio loop that submitted it."""

    def __init__(self, prompt: Prompt, sampling: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt, self.sampling, self.loop = prompt, sampling, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self._tracker, self._row = None, None

    def post(self, kind: str, payload) -> None:
        """Called from the worker thread: ("delta", Delta), ("done", Completion) or ("error", exception)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def attach(self, tracker, row: int) -> None:
        self._tracker, self._row = tracker, row
        if self.cancelled:
            tracker.cancel(row)

    def cancel(self) -> None:
        """The client has gone: skip the request, or stop generating for it."""
        self.cancelled = True
        if self._tracker is not None:
            self._tracker.cancel(self._row)

    async def events(self):
        """Deltas, then the completion; raises the worker's exception if the batch failed."""
        while True:
            kind, payload = await self.queue.get()
            if kind == "error":
                raise payload
            yield payload
            if kind == "done":
                return


class BatchEngine:
    """Serialises access to the model and batches concurrent requests.

    Args:
        chat: the loaded model.
        max_batch_size: most requests answered by one `generate` call (1 = a plain queue).
        batch_wait: seconds the worker waits, after taking a request, for others to join its batch.
    """

    def __init__(self, chat: ChatModel, max_batch_size: int = 8, batch_wait: float = 0.005):
        self.chat = chat
        self.max_batch_size = max(1, max_batch_size)
        self.batch_wait = batch_wait
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.requests = 0
        self.largest_batch = 0
        self.busy = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="crossvlm-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt: Prompt, sampling: SamplingParams) -> Job:
        """Queue a prepared prompt; call from the event loop that will read the job's events."""
        job = Job(prompt, sampling, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    def stats(self) -> dict:
        return {"waiting": self._queue.qsize(), "busy": self.busy, "requests": self.requests,
                "batches": self.batches, "largest_batch": self.largest_batch,
                "max_batch_size": self.max_batch_size}

    def _work(self) -> None:
        pending: deque[Job] = deque()
        while True:
            if not pending:
                job = self._queue.get()
                if job is _STOP:
                    return
                pending.append(job)
                deadline = time.monotonic() + self.batch_wait
            else:
                deadline = time.monotonic()  # these have waited already: take only what is there
            stop = False
            while len(pending) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                pending.append(job)
            key = pending[0].sampling.batch_key()
            batch = [j for j in pending if j.sampling.batch_key() == key][: self.max_batch_size]
            for job in batch:
                pending.remove(job)
            self._run([j for j in batch if not j.cancelled])
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self.busy = True
        self.batches += 1
        self.requests += len(jobs)
        self.largest_batch = max(self.largest_batch, len(jobs))
        finished = [False] * len(jobs)

        def done(i: int, completion: Completion) -> None:
            finished[i] = True
            jobs[i].post("done", completion)

        def delta(i: int, d: Delta) -> None:
            jobs[i].post("delta", d)

        def ready(tracker) -> None:
            for i, job in enumerate(jobs):
                job.attach(tracker, i)

        try:
            self.chat.generate_prompts([j.prompt for j in jobs], [j.sampling for j in jobs],
                                       on_delta=delta, on_done=done, tracker_ready=ready)
        except Exception as err:  # noqa: BLE001 — the batch's requests get the error; the server goes on
            for i, job in enumerate(jobs):
                if not finished[i]:
                    job.post("error", err)
        finally:
            self.busy = False
