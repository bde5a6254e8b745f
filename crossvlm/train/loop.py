"""One training loop for every stage. What a stage trains and on what data is its config.

The loop knows nothing of file formats (the data loader's job) or of the model's internals; it
builds the parts, steps the optimizer, and keeps the run observable and resumable.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import record_function
from tqdm import tqdm

from crossvlm.data.images import ImageTransform
from crossvlm.data.loader import build_dataset, build_loader
from crossvlm.errors import CheckpointError, ConfigError, TrainingError
from crossvlm.train.checkpoint import find_resume, load_checkpoint, save_checkpoint
from crossvlm.train.config import TrainConfig
from crossvlm.train.loggers import build_logger, read_metrics
from crossvlm.train.optim import build_optimizer, build_scheduler
from crossvlm.train.runfolder import clear_run, overridden_changes, preflight, refused_changes
from crossvlm.train.runtime import Runtime, StopRequest, init_runtime, seed_everything, shutdown
from crossvlm.model.modeling import image_positions_of, label_positions_of
from crossvlm.model.packing import VARLEN, choose_kernel, register_varlen
from crossvlm.model.vision import vision_layers
from crossvlm.train.throughput import COUNTS, SpeedWindow, llm_grad_of, step_counts
from crossvlm.train.setup import apply_trainable, build_model, count_parameters, merge_adapters, set_train_mode

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "document_ids", "labels", "pixel_values",
                "image_positions", "label_positions")


def train(cfg: TrainConfig) -> Path:
    """Run a stage; returns the final model directory (out_dir/final), or, when a SIGTERM stopped the
    run early, the checkpoint it wrote to resume from."""
    preflight(cfg)  # model sources, the run folder: refused before anything loads
    rt = init_runtime(cfg.run.device)
    trainer = None
    try:
        with _cpu_threads(cfg, rt):
            trainer = Trainer(cfg, rt)
            with trainer.stop:
                return trainer.run()
    finally:
        # Free the DDP/FSDP engine before its process group goes: freed after, its last reference
        # to a gloo group runs the group's destructor under the GIL, which waits for a gloo thread
        # that waits for the GIL (seen: a hang after a SIGTERM stop, 1 run in 4).
        del trainer
        shutdown(rt)


@contextlib.contextmanager
def _cpu_threads(cfg: TrainConfig, rt: Runtime):
    """On a CPU, leave the loader's worker processes cores of their own.

    torch's intra-op threads default to every core, so with loader workers the cores are
    oversubscribed and a small model's step slows down (the demo's SFT on 2 cores with 1 worker:
    354 s with 2 threads, ~250 s with 1). OMP_NUM_THREADS, when set, wins.
    """
    if rt.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))  # this machine's, under torchrun
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, cores // processes - cfg.data.num_workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resume_command(argv: list[str], env: dict) -> str:
    """The command that continues a stopped run: the one that started it, with `--resume auto`."""
    args, skip = [], False
    for arg in argv[1:]:
        if skip or arg in ("--resume", "--run.resume"):
            skip = not skip
            continue
        if not arg.startswith(("--resume=", "--run.resume=")):
            args.append(arg)
    args += ["--resume", "auto"]
    if "train" not in args:  # not started from the command line (the Python API, a test)
        return "the same call with run.resume = 'auto'"
    if "TORCHELASTIC_RUN_ID" in env:  # under torchrun
        per_node = int(env["LOCAL_WORLD_SIZE"])
        nodes = int(env["WORLD_SIZE"]) // per_node
        command = shlex.join(["torchrun", "--nnodes", str(nodes), "--nproc_per_node", str(per_node),
                              "-m", "crossvlm.cli", *args])
        return command + (" (on every node, with the --rdzv-* options used before)" if nodes > 1 else "")
    prog = ["crossvlm"] if Path(argv[0]).name == "crossvlm" else ["python", "-m", "crossvlm.cli"]
    return shlex.join([*prog, *args])


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast precision, or None for plain float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[name]


class Launched:
    """A step the trainer launched; `result()` is its outcome, waiting for the GPU only if it must."""

    def __init__(self, counts: dict, lr: float, outcome: tuple | None = None, why: str | None = None):
        self.counts, self.lr, self.why = counts, lr, why
        self.outcome = outcome  # (loss, grad norm, stop) once on the host
        self._host, self._ready = None, None

    @property
    def deferred(self) -> bool:
        """Whether the host launched the step without waiting for its outcome."""
        return self.outcome is None

    def read_later(self, stats: torch.Tensor) -> None:
        """Copy (loss, grad norm, stop) to the host behind the step's own kernels, waited for in `result`."""
        if stats.device.type != "cuda":
            self._host = stats
            return
        self._host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        self._host.copy_(stats, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()

    def result(self) -> dict:
        if self.outcome is None:
            if self._ready is not None:
                with record_function("train.wait"):
                    self._ready.synchronize()  # this step's kernels, not those of steps launched since
            self.outcome = tuple(self._host.tolist())
        loss, grad_norm, stop = self.outcome
        why = self.why or ("non-finite loss" if not math.isfinite(loss)
                           else "non-finite gradient" if not math.isfinite(grad_norm) else None)
        return {"loss": loss, "grad_norm": grad_norm, "skipped": why is not None, "why": why, "counts": self.counts,
                "lr": self.lr, "stop": bool(stop > 0)}


class Trainer:
    def __init__(self, cfg: TrainConfig, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.out_dir = Path(cfg.run.out_dir)
        self.amp = autocast_dtype(cfg.run.dtype, rt.device)
        seed_everything(cfg.run.seed)

        model, self.processor = build_model(cfg.model)
        apply_trainable(model, cfg.trainable)
        if self.amp is not None and rt.device.type == "cuda":
            # Frozen weights only ever feed bf16 matmuls under autocast: keep them in bf16.
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.amp)
        model.to(rt.device)
        self.cfg = cfg = self._choose_packing(cfg, model)
        if cfg.run.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.run.compile:
            # Layer by layer: one compiled graph serves every decoder layer, so compiling takes
            # seconds, and the HF glue between layers (masks, rotary, cache) stays eager. The LM
            # head and cross-entropy compile as one more graph.
            for layer in [*model.llm.model.layers, *vision_layers(model.vision), model.projector]:
                layer.compile(mode=cfg.run.compile_mode)
            model.compile_loss()
        self.model = model  # the plain module (saving, evaluation)
        self.engine = self._wrap(model)  # what the forward/backward runs on

        self.num_trainable, self.num_total = count_parameters(model)
        self.llm_grad = llm_grad_of(cfg.trainable.llm)
        tok, improc = self.processor.tokenizer, self.processor.image_processor
        tiling = self.processor.tiling  # a tiled model's (crossvlm.model.tiling), else None
        self.dataset = build_dataset(cfg.data, tok, improc, model.num_image_tokens, tiling=tiling)
        self.pixels = ImageTransform(improc)  # the loader's uint8 crops to the processor's floats, on the device
        self.loader = build_loader(self.dataset, cfg.data, cfg.run.batch_size, seed=cfg.run.seed,
                                   rank=rt.rank, world_size=rt.world_size)
        self.eval_dataset = (build_dataset(cfg.eval_data, tok, improc, model.num_image_tokens, tiling=tiling)
                             if cfg.eval_data else None)
        accum = cfg.optim.accumulation_steps
        if self.loader.steps_per_epoch is None and not cfg.run.max_steps:
            raise ConfigError("run.max_steps is needed: the streamed data's size is unknown (remote tar shards "
                              "are not read ahead to count them), so run.epochs cannot say how many steps")
        self.steps_per_epoch = max(1, (self.loader.steps_per_epoch or cfg.run.max_steps * accum) // accum)
        self.total_steps = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(model, cfg.optim, rt.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        # A fused AdamW skips a non-finite step on the device, so the host can read a step's outcome one
        # step late (see launch_step). FSDP's sharded parameters take the plain path.
        self.defer = bool(self.optimizer.defaults.get("fused")) and not (rt.distributed and cfg.run.distributed == "fsdp")
        self.step = 0
        self.stop = StopRequest()  # installed around run() by train()
        self.last_checkpoint: Path | None = None
        resume = find_resume(self.out_dir, cfg.run.resume,
                             warn=lambda message: rt.print(f"warning: {message}", file=sys.stderr))
        if resume is not None:
            meta = load_checkpoint(resume, self.engine, self.optimizer, self.scheduler)
            self._check_samples_per_step(resume, meta)
            changed = overridden_changes(meta["config"], cfg.to_dict())
            if changed:
                raise CheckpointError(refused_changes(str(resume), changed))
            self.step = int(meta["step"])
            self.loader.load_state_dict(meta["data"])
            rt.print(f"resumed from {resume} at step {self.step}")
        elif cfg.run.overwrite and rt.is_main:
            removed = clear_run(self.out_dir)
            if removed:
                rt.print(f"run.overwrite: removed the earlier run's {', '.join(removed)} from {self.out_dir}")
        rt.barrier()
        self._truncation_noted = False
        self.launched = self.step  # steps launched (see launch_step); the host may be one ahead of self.step
        self.logger = build_logger(
            rt.is_main, self.out_dir, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
            wandb_project=cfg.run.wandb_project, config=cfg.to_dict(), resumed=resume is not None,
        )

    def _check_samples_per_step(self, path: Path, meta: dict) -> None:
        """A run may resume on another number of processes, but each optimizer step must take as many
        samples as before: the step count, the schedule and the data position are counted in them."""
        old_batch, old_world = meta["config"]["run"]["batch_size"], meta["world_size"]
        old_accum = meta["config"]["optim"]["accumulation_steps"]
        batch, world, accum = self.cfg.run.batch_size, self.rt.world_size, self.cfg.optim.accumulation_steps
        old = old_batch * old_world * old_accum
        if old != batch * world * accum:
            hint = f" (here: --run.batch_size {old // (world * accum)})" if old % (world * accum) == 0 else ""
            raise CheckpointError(
                f"{path} was written with {old} samples per optimizer step (run.batch_size × processes × "
                f"optim.accumulation_steps = {old_batch} × {old_world} × {old_accum}); this run takes "
                f"{batch * world * accum} ({batch} × {world} × {accum}). Resume with the same product{hint}."
            )

    def _choose_packing(self, cfg: TrainConfig, model) -> TrainConfig:
        """Resolve `data.packing: auto` and set the LLM's attention for packed rows; say which."""
        if cfg.data.packing is False:
            kernel, why = None, "data.packing false"
        else:
            kernel, why = choose_kernel(cfg.model.attention, self.rt.device, model.llm)
            if kernel is None and cfg.data.packing is True:  # asked for: transformers' dense mask works anywhere
                kernel, why = "sdpa", why.replace("batches are padded", "packing uses sdpa's dense mask")
        if kernel == VARLEN:
            register_varlen()
        if kernel is not None and kernel != model.llm.config._attn_implementation:
            model.llm.set_attn_implementation(kernel)
        if kernel is None:
            self.rt.print(f"batches: padded to their longest sample ({why})")
        else:
            self.rt.print(f"batches: samples packed into rows of {cfg.data.max_length} tokens, attention kept "
                          f"within each sample by {kernel} ({why})")
        packing = kernel is not None
        eval_data = cfg.eval_data and replace(cfg.eval_data, packing=packing)
        return replace(cfg, data=replace(cfg.data, packing=packing), eval_data=eval_data)

    def _wrap(self, model):
        if not self.rt.distributed:
            return model
        if self.cfg.run.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.llm.model.layers:
                fully_shard(layer)
            return fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
        # Gradients as views into the communication buckets: no copy into them, less memory.
        engine = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        if self.cfg.run.ddp_bf16_grads and self.rt.device.type == "cuda":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            engine.register_comm_hook(None, bf16_compress_hook)
        return engine

    # -- steps --------------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        if batch["input_ids"].numel() == 0:
            # Every record of this micro-batch was bad (counted by the loader). Run one unlabelled
            # pad token instead, so this process still joins the step's gradient exchange.
            pad = self.processor.tokenizer.pad_token_id
            batch = {"input_ids": torch.tensor([[pad]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
                     "labels": torch.tensor([[-100]])}
        pixels = batch.get("pixel_values")
        grids = batch.get("image_grids")  # tiled images' (rows, columns): stay on the host, as a list (DDP moves tensors)
        grids = None if grids is None else grids.tolist()
        self.model.check_image_tokens(batch["input_ids"], 0 if pixels is None else len(pixels), grids)  # on the host copy
        # use_cache=False: no KV cache in training, and packed rows need it off for transformers to
        # derive the per-sample attention mask from the restarting position ids.
        batch = dict(batch)
        # Where the images and the labelled tokens are, found here on the host copy: the step on the
        # GPU then needs no boolean-mask indexing, whose `nonzero` waits for the GPU (three times a
        # step: the loss's forward and backward, the image scatter's backward), so the host could
        # never run ahead of it.
        pin = self.rt.device.type == "cuda"  # (the loader pins the rest of the batch)
        if pixels is not None:
            batch["image_positions"] = image_positions_of(batch["input_ids"], self.model.config.image_token_id, pin)
        if batch.get("labels") is not None:
            batch["label_positions"] = label_positions_of(batch["labels"], pin)
        inputs = {k: batch[k].to(self.rt.device, non_blocking=True) for k in MODEL_INPUTS if batch.get(k) is not None}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = self.pixels.normalize(inputs["pixel_values"])
        if grids is not None:
            inputs["image_grids"] = grids
        return {"use_cache": False, **inputs}

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.amp)

    def launch_step(self, batches: list[dict]) -> "Launched":
        """Forward/backward over the micro-batches of one optimizer step, then the optimizer and the
        schedule; returns before the GPU is done when it can (`Launched.deferred`).

        A step whose loss or gradient is not finite is skipped. With a fused AdamW the skip is decided on
        the device (the optimizer's `found_inf`, as torch's GradScaler uses it), so the host need not
        wait for the GPU before it launches the next step: the loss, gradient norm and stop flag come
        back through a pinned buffer, read one step later. Otherwise the host waits for them here, once a
        step. Token counts come from the collator on the host.
        """
        rt, world = self.rt, self.rt.world_size
        self.launched += 1
        lr = self.scheduler.get_last_lr()[-1]
        counts = torch.tensor(step_counts(batches, self.model.config, self.llm_grad), dtype=torch.float64)
        if rt.distributed:
            counts = rt.all_reduce_sum(counts.to(rt.device)).cpu()
        counts = dict(zip(COUNTS, counts.tolist()))
        global_tokens = counts["labelled"]
        if global_tokens == 0:  # every sample of the step, on every rank, was bad (the loader counted them)
            self.scheduler.step()
            return Launched(counts, lr, outcome=(float("nan"), None, rt.any(self.stop.requested)),
                            why="no labelled token")
        # Each process divides its token-sum loss by (global tokens / world): after DDP averages the
        # gradients, every labelled token of the step weighs the same, whatever the split.
        denom = global_tokens / world
        if self.cfg.run.compile and self.cfg.run.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free to reuse
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or not hasattr(self.engine, "no_sync")
            with record_function("train.to_device"):
                inputs = self._to_device(batch)
            with (contextlib.nullcontext() if sync else self.engine.no_sync()), self._autocast(), \
                    record_function("train.forward"):
                loss = self.engine(**inputs, num_items_in_batch=denom).loss
            with record_function("train.backward"):
                loss.backward()
            loss_sum += loss.detach().float()
        # A SIGTERM on any rank rides on the loss's all-reduce, so every rank stops after this same step
        # without a collective of its own.
        # Filled on the device: `torch.tensor(x, device=...)` copies from pageable memory and waits for the
        # GPU to finish the backward (~100 ms a step of the host's lead lost; docs/PERFORMANCE.md, run 6).
        stop = torch.full((), float(self.stop.requested), device=rt.device)
        reduced = rt.all_reduce_sum(torch.stack([loss_sum, stop]))
        loss_sum, stop = reduced[0] / world, reduced[1]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.cfg.optim.grad_clip or float("inf")
        with record_function("train.clip"):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
                grad_norm = grad_norm.full_tensor()
        stats = torch.stack([loss_sum, grad_norm.float(), stop])  # the same on every rank
        launched = Launched(counts, lr)
        with record_function("train.optimizer"):
            if self.defer:
                self.optimizer.found_inf = (~torch.isfinite(stats[:2]).all()).float()  # 1: the step is skipped
                self.optimizer.step()
                launched.read_later(stats)
            else:
                with record_function("train.sync"):
                    launched.outcome = tuple(stats.tolist())  # the host waits for the GPU here
                if math.isfinite(launched.outcome[0]) and math.isfinite(launched.outcome[1]):
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return launched

    def train_step(self, batches: list[dict]) -> dict:
        """One optimizer step, waited for: `Launched.result()`."""
        return self.launch_step(batches).result()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per labelled token over the first `eval_batches` held-out batches."""
        if self.eval_dataset is None:
            return None
        self.model.eval()
        eval_cfg = replace(self.cfg.eval_data, shuffle=False)
        loader = build_loader(self.eval_dataset, eval_cfg, self.cfg.run.batch_size, seed=0, rank=self.rt.rank,
                              world_size=self.rt.world_size, epochs=1, drop_last=False)
        total = torch.zeros(2, device=self.rt.device)  # (loss sum, tokens)
        with contextlib.closing(iter(loader)) as batches:  # its workers stop when this ends
            for i, batch in enumerate(batches):
                if i >= self.cfg.run.eval_batches:
                    break
                n = int(batch["num_tokens"])
                if n == 0:
                    continue
                with self._autocast():
                    loss = self.model(**self._to_device(batch)).loss
                total += torch.tensor([loss.float().item() * n, n], device=self.rt.device)
        set_train_mode(self.model)
        total = self.rt.all_reduce_sum(total)
        return (total[0] / total[1]).item() if total[1] > 0 else None

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, rt = self.cfg, self.rt
        rt.print(f"training {self.num_trainable:,} of {self.num_total:,} parameters for {self.total_steps} steps "
                 f"({self.steps_per_epoch} per epoch) on {rt.world_size} process(es), device {rt.device}")
        set_train_mode(self.model)
        with contextlib.closing(iter(self.loader)) as batches:  # the loader's workers stop with the run
            bar = tqdm(total=self.total_steps, initial=self.step, disable=not (rt.is_main and cfg.run.progress),
                       desc=Path(cfg.run.out_dir).name, dynamic_ncols=True)
            self._nonfinite_in_row, speed = 0, SpeedWindow(rt.device, rt.world_size)
            if speed.note:
                rt.print(speed.note)
            pending = None  # a launched step whose outcome the host has not read yet
            while self.step < self.total_steps:
                # (The record_function labels name the loop's phases in a profile: `bench train --data --profile`.)
                pending = pending or self._launch(batches, speed)  # step self.step + 1
                # While the GPU runs it, the host launches the step after, unless the host must see the model
                # as this step leaves it (evaluation, a checkpoint, the end) or the step was not deferred.
                ahead = None
                if pending.deferred and not self._settles(self.step + 1):
                    ahead = self._launch(batches, speed)
                with record_function("train.report"):
                    stop = self._after_step(pending.result(), speed, bar)
                pending = ahead
                if stop and pending is not None:  # launched before the stop was known: every rank ran it too
                    self._after_step(pending.result(), speed, bar)
                    pending = None
                if stop and self.step < self.total_steps:
                    bar.close()
                    return self._stopped()
        bar.close()
        rt.print("data: " + self.loader.tracker.report(one_line=True))
        self._log_eval()
        self.save_checkpoint()
        final = self.save_final()
        self.logger.close()
        if rt.is_main and cfg.run.plot:
            from crossvlm.train.plots import plot_curves

            plot_curves(read_metrics(self.out_dir / "metrics.jsonl"), self.out_dir / "curves.png",
                        title=self.out_dir.name)
        return final

    def _launch(self, batches, speed: SpeedWindow) -> Launched:
        with record_function("train.next_batch"):
            micro = speed.next_batches(batches, self.cfg.optim.accumulation_steps)
        return self.launch_step(micro)

    def _evaluates_after(self, step: int) -> bool:
        every = self.cfg.run.eval_interval
        return bool(every) and step % every == 0 and step < self.total_steps

    def _checkpoints_after(self, step: int) -> bool:
        every = self.cfg.run.save_interval
        return bool(every) and step % every == 0 and step < self.total_steps

    def _settles(self, step: int) -> bool:
        """Whether the host needs the model as `step` leaves it: to evaluate, checkpoint or finish."""
        return step >= self.total_steps or self._evaluates_after(step) or self._checkpoints_after(step)

    def _after_step(self, result: dict, speed: SpeedWindow, bar) -> bool:
        """Count, report, evaluate and checkpoint after a step; whether the run must stop now (SIGTERM)."""
        cfg, rt = self.cfg, self.rt
        lr = result["lr"]
        self.step += 1
        speed.add(result["counts"])
        if result["skipped"] and result["why"] == "no labelled token":
            rt.print(f"step {self.step}: no labelled token in the whole step, step skipped")
            self.logger.log(self.step, {"skipped_empty": 1})
        elif result["skipped"]:
            self._nonfinite_in_row += 1
            rt.print(f"step {self.step}: {result['why']} ({result['loss']}), step skipped")
            self.logger.log(self.step, {"skipped_nonfinite": 1, "loss_raw": str(result["loss"])})
            if self._nonfinite_in_row >= cfg.run.max_nonfinite_in_row:
                raise TrainingError(
                    f"the loss or gradient was NaN/inf for {self._nonfinite_in_row} steps in a row (last at step "
                    f"{self.step}); lower optim.lr, check the data, or use run.dtype bfloat16 instead of float16"
                )
        else:
            self._nonfinite_in_row = 0
        bar.update(1)
        if not result["skipped"] and (self.step % cfg.run.log_interval == 0 or self.step == self.total_steps):
            rates = speed.rates()
            metrics = {"loss": result["loss"], "lr": lr, **rates, "grad_norm": result.get("grad_norm"),
                       "epoch": self.step / self.steps_per_epoch}
            metrics["bad_records"] = self.loader.tracker.bad
            metrics.update(self._truncation())
            self.logger.log(self.step, metrics)
            mfu = {} if rates["mfu"] is None else {"mfu": f"{100 * rates['mfu']:.1f}%"}
            bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}",
                            samples_s=f"{rates['samples_per_s']:.1f}", tok_s=f"{rates['tokens_per_s']:.0f}",
                            pad=f"{100 * rates['padding_share']:.0f}%", **mfu)
            speed.reset()
        if not self._truncation_noted and self.loader.tracker.truncated:
            self._truncation_noted = True  # said once, near the run's first lines; counted in metrics.jsonl
            t = self._truncation()
            rt.print(f"data: {t['truncated']} of the {self.loader.tracker.seen} samples read so far "
                     f"({t['truncated_share']:.1%}) are longer than data.max_length={cfg.data.max_length} and "
                     "were truncated (never inside an image); metrics.jsonl counts them (truncated, truncated_share)")
        if self._evaluates_after(self.step):
            self._log_eval()
        if self._checkpoints_after(self.step):
            self.save_checkpoint()
        # Every rank stops after the same step, whichever of them got the signal (see launch_step).
        return self.step < self.total_steps and bool(result["stop"])

    def _truncation(self) -> dict:
        """Samples cut to data.max_length so far on this process, and their share of those read."""
        tracker = self.loader.tracker
        return {"truncated": tracker.truncated, "truncated_share": tracker.truncated / max(tracker.seen, 1)}

    def _log_eval(self) -> None:
        loss = self.evaluate()
        if loss is not None:
            self.logger.log(self.step, {"eval_loss": loss})
            self.rt.print(f"step {self.step}: held-out loss {loss:.4f}")

    def save_checkpoint(self) -> Path:
        self.last_checkpoint = save_checkpoint(
            self.rt, self.out_dir, self.step, self.engine, self.optimizer, self.scheduler,
            data_state=self.loader.state_dict(), config=self.cfg.to_dict(), keep_last=self.cfg.run.keep_last)
        return self.last_checkpoint

    def _stopped(self) -> Path:
        """After a SIGTERM: checkpoint this step (unless that is done) and say how to go on."""
        done = self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.step:07d}"
        path = self.last_checkpoint if done else self.save_checkpoint()
        self.logger.close()
        self.rt.print(f"stopped by SIGTERM after step {self.step} of {self.total_steps}; checkpoint {path}\n"
                      f"resume with: {resume_command(sys.argv, dict(os.environ))}")
        return path

    def save_final(self) -> Path:
        """The trained model as a directory `crossvlm chat` and the next stage load."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        final = self.out_dir / "final"
        full_state = None
        if self.rt.distributed and self.cfg.run.distributed == "fsdp":
            full_state = get_model_state_dict(self.engine, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
        if self.rt.is_main:
            model = merge_adapters(self.model) if full_state is None else self.model
            model.config.freeze_vision = True  # a saved model starts frozen; the next stage decides
            model.save_pretrained(final, state_dict=full_state)
            self.processor.save_pretrained(final)
            self.rt.print(f"saved the model to {final}")
        self.rt.barrier()
        return final
