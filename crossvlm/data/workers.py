"""What both loaders (random access and streamed) do around torch's DataLoader workers."""

from __future__ import annotations

from typing import Callable, Iterator


def ignore_sigterm(worker_id: int) -> None:
    """SLURM signals every process of a job step: a SIGTERM is the trainer's to act on (it finishes the
    step and checkpoints), and a worker that died of it would fail that step."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def counted(loader, batches: Iterator[dict], take: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """`batches`, each first passed to `take`, then counted in `loader.step` and `loader.tracker`
    (which raises when bad records pass the limit); the workers stop when this generator ends."""
    try:
        for batch in batches:
            if take is not None:
                take(batch)
            loader.step += 1
            loader.tracker.update(batch)
            yield batch
    finally:
        # Stop the worker processes now, not whenever the iterator is collected: they ignore
        # SIGTERM (see ignore_sigterm), so multiprocessing's exit-time terminate() cannot stop
        # one left behind, and the interpreter would wait for it forever.
        shutdown = getattr(batches, "_shutdown_workers", getattr(batches, "close", None))  # or a generator's
        if shutdown is not None:
            shutdown()
