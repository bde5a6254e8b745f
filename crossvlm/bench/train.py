"""`crossvlm bench train`: one stage's training step, crossvlm's design against the MLP path and the
tutorial baseline, in one process, fed by a DataLoader over real JPEG bytes.

Variants:
- `ours`: the cross-attention projector (M = 64) trained by the real loop's building blocks: the
  stage's shipped config (crossvlm/configs/<stage>.yaml), `Trainer` (build_model, apply_trainable,
  frozen weights in bf16, compile if asked, DDP under torchrun, fused AdamW) and `Trainer.train_step`
  (autocast, loss only at labelled positions, clipping);
- `mlp`: the same loop with the MLP projector (one token per patch);
- `naive`: `bench/naive.py`, the tutorial design;
- `ours+LEVER`: `ours` with one lever of `crossvlm.bench.levers.LEVERS` changed.

Every variant sees the same samples: the same text length, labelled positions and images, one image
each. Under torchrun each process runs its own batch; rank 0 reports the aggregate.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from crossvlm.bench.batches import FixedLengthSamples, SampleShape, batch_loader, jpeg_pool
from crossvlm.bench.catalog import DATA_VARIANTS, LEVERS
from crossvlm.bench.catalog import TRAIN_VARIANTS as BASE_VARIANTS
from crossvlm.bench.common import (compiled_graphs, default_workers, ensure_models, env_info, free_memory, median,
                                   peak_memory_gib, profiled, say, synchronize)
from crossvlm.model.flops import (PEAK_BF16_FLOPS, LLMShape, VisionShape, Workload, projector_forward_flops,
                                  required_step_flops, step_flops)
from crossvlm.bench.levers import apply_model_levers
from crossvlm.errors import ConfigError

STAGES = {"pretrain": SampleShape(text_tokens=128, labelled=96), "sft": SampleShape(text_tokens=384, labelled=192)}
PREFETCH_FACTOR = 2
NAIVE_PATH = Path(__file__).resolve().parents[2] / "bench" / "naive.py"


@dataclass
class TrainBenchConfig:
    """One `crossvlm bench train` run."""

    preset: str = "full"
    """Random base models of this preset (`tiny` runs on a CPU in seconds)."""
    stage: str = "sft"
    """`pretrain` (projector only) or `sft` (projector + full LLM), as the shipped stage configs say."""
    models: Path | None = None
    """Folder with (or to receive) the preset's random base models; None: a temporary folder."""
    batch_size: int = 16
    """Samples per step per process, for every variant."""
    steps: int = 20
    """Measured steps per variant."""
    warmup: int = 5
    """Unmeasured steps before them (plus workers × prefetch steps, so the loader's queue is in its
    steady state when measuring starts)."""
    max_seconds: float = 60.0
    """Stop measuring a variant after this long (at least 3 steps are kept)."""
    compile: bool = False
    """Compile (`run.compile`) the decoder layers, vision layers and projector of `ours` and `mlp`."""
    variants: tuple[str, ...] = BASE_VARIANTS
    """Which of ours, mlp, naive to run."""
    levers: tuple[str, ...] = ()
    """Extra `ours` variants, one lever each (see LEVERS)."""
    workers: int | None = None
    """DataLoader workers per process; None: the cores per process minus one, at most 8."""
    jpeg_size: tuple[int, int] = (640, 480)
    """Width and height of the JPEGs the loader decodes."""
    profile: Path | None = None
    """Write a torch.profiler trace and a kernel table of a few steps per variant into this folder."""
    profile_steps: int = 3
    seed: int = 0
    data: str | None = None
    """Run the real loop on this data file (crossvlm.bench.realdata); `generate`: on a generated
    variable-length set; None: the fixed-length variants above."""
    data_variants: tuple[str, ...] = ("packed", "fixed")
    """With `data`: which of crossvlm.bench.catalog.DATA_VARIANTS to run."""
    max_length: int | None = None
    """With `data`: `data.max_length` (the packed row length); None: the stage config's."""
    max_tiles: int = 1
    """`model.max_tiles` of `ours` (docs/TRAINING.md, "Tiles"): each sample's JPEG cut into the grid of at
    most this many tiles that fits it, plus its thumbnail; 1: one view."""
    tile_queries: int | None = None
    """`model.tile_queries` of `ours` with tiles; None: num_queries."""

    def validate(self) -> None:
        from crossvlm.make_model import PRESETS

        p = []
        if self.preset not in PRESETS:
            p.append(f"preset {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.stage not in STAGES:
            p.append(f"stage {self.stage!r} is not one of {sorted(STAGES)}")
        bad = [v for v in self.variants if v not in BASE_VARIANTS]
        if bad:
            p.append(f"unknown variants {bad}; choose from {list(BASE_VARIANTS)}")
        if self.data is not None:
            bad = [v for v in self.data_variants if v not in DATA_VARIANTS]
            if bad or not self.data_variants:
                p.append(f"unknown data variants {bad}; choose from {list(DATA_VARIANTS)}")
            if self.levers:
                p.append("--levers apply to the fixed-length variants, not to --data runs")
        bad = [lever for lever in self.levers if lever not in LEVERS]
        if bad:
            p.append(f"unknown levers {bad}; choose from {sorted(LEVERS)} or 'all'")
        if not self.variants and not self.levers:
            p.append("nothing to run: give at least one variant or lever")
        if self.batch_size < 1 or self.steps < 1 or self.warmup < 0 or self.profile_steps < 1:
            p.append("batch size, steps and profile steps must be >= 1, warmup >= 0")
        if self.data not in (None, "generate") and not Path(self.data).is_file():
            p.append(f"--data {self.data}: no such file")
        if self.workers is not None and self.workers < 0:
            p.append("workers must be >= 0")
        if self.max_tiles != 1 or self.tile_queries is not None:
            if self.max_tiles < 1:
                p.append("--max-tiles must be >= 1")
            if self.data is not None or set(self.variants) - {"ours"} or self.levers:
                p.append("--max-tiles and --tile-queries time the fixed-length `ours` step: give --variants ours, "
                         "no --data and no --levers")
        if p:
            raise ConfigError("invalid bench train arguments:\n  - " + "\n  - ".join(p))


@dataclass(frozen=True)
class Variant:
    name: str
    design: str  # cross_attn | mlp | naive
    levers: tuple[str, ...] = ()
    compile: bool = False
    batch_size: int = 16


@dataclass
class Runner:
    """A built variant: `step(batch)` runs one optimizer step and returns the loss."""

    step: Callable[[dict], float]
    num_image_tokens: int
    executed: dict
    """FLOPs of one step as the variant runs it (its own sequence, logits and projector)."""
    close: Callable[[], None] = lambda: None
    compiled_graphs: Callable[[], int | None] = lambda: None
    tiling: object = None
    """A tiled model's `Tiling`: each sample's image becomes its views (FLOPs still count one view)."""


@dataclass
class _Context:
    cfg: TrainBenchConfig
    rt: object
    llm_dir: Path
    vision_dir: Path
    tmp: Path
    photos: Path
    jpegs: list
    stage_config: object
    reference: object  # CrossVLMConfig of the design, for the required FLOPs
    tokenizer: object
    image_processor: object
    amp: torch.dtype | None
    llm_grad: str
    workers: int
    results: list = field(default_factory=list)
    sample_shape: SampleShape | None = None
    """The fixed-length samples' shape; None: the stage's (STAGES)."""

    @property
    def shape(self) -> SampleShape:
        return self.sample_shape or STAGES[self.cfg.stage]


def plan(cfg: TrainBenchConfig) -> list[Variant]:
    """The variants of a run, in the order they run."""
    b = cfg.batch_size
    base = {"ours": Variant("ours", "cross_attn", (), cfg.compile, b),
            "mlp": Variant("mlp", "mlp", (), cfg.compile, b),
            "naive": Variant("naive", "naive", (), False, b)}
    out = [base[v] for v in BASE_VARIANTS if v in cfg.variants]
    for lever in cfg.levers:
        if lever == "compile" and cfg.compile:
            continue  # already in `ours`
        out.append(Variant(f"ours+{lever}", "cross_attn", (lever,), cfg.compile or lever in ("compile", "cudagraphs"),
                           2 * b if lever == "batch2x" else b))
    return out


def load_naive():
    """The tutorial baseline module, `bench/naive.py` of the source checkout."""
    if not NAIVE_PATH.is_file():
        raise ConfigError(f"the naive baseline {NAIVE_PATH} is missing: it is part of the crossvlm source "
                          "checkout (bench/naive.py); run from one, or leave 'naive' out of --variants")
    spec = importlib.util.spec_from_file_location("crossvlm_bench_naive", NAIVE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _llm_grad(trainable) -> str:
    if trainable.llm == "frozen":
        return "through"
    if trainable.llm == "full":
        return "trained"
    raise ConfigError(f"bench train counts FLOPs for trainable.llm frozen or full, not {trainable.llm!r}")


def _stage_overrides(ctx: _Context, v: Variant) -> dict:
    cfg = ctx.cfg
    overrides = {
        "model.init_from": None, "model.llm": str(ctx.llm_dir), "model.vision": str(ctx.vision_dir),
        "run.out_dir": str(ctx.tmp / "runs" / v.name), "run.max_steps": 10_000, "run.seed": cfg.seed,
        "run.progress": False, "run.plot": False, "data.num_workers": 0,
        # Fixed-length rows have no padding and one sample each: the LLM's stock attention, no packing.
        "data.packing": False,
        # The loop's own loader is built but never read (the bench feeds its batches); its epoch must
        # still hold one global batch, so the small photo file is repeated as often as needed.
        "data.sources": [{"path": str(ctx.photos),
                          "weight": math.ceil(v.batch_size * ctx.rt.world_size / len(ctx.jpegs))}],
    }
    overrides.update({"model.projector_type": v.design, "run.batch_size": v.batch_size, "run.compile": v.compile})
    if v.design == "cross_attn":
        overrides.update({"model.max_tiles": cfg.max_tiles, "model.tile_queries": cfg.tile_queries})
    if "bf16-allreduce" in v.levers:
        overrides["run.ddp_bf16_grads"] = True
    if "cudagraphs" in v.levers:
        overrides["run.compile_mode"] = "reduce-overhead"
    if "unfused-adamw" in v.levers:
        overrides["optim.fused"] = False
    return overrides


def _build_ours(ctx: _Context, v: Variant) -> Runner:
    from crossvlm.configs import config_path
    from crossvlm.train.config import load_config
    from crossvlm.train.loop import Trainer
    from crossvlm.train.setup import set_train_mode

    trainer = Trainer(load_config(config_path(f"{ctx.cfg.stage}.yaml"), _stage_overrides(ctx, v)), ctx.rt)
    model = trainer.model
    apply_model_levers(model, v.levers)
    set_train_mode(model)

    def step(batch: dict) -> float:
        return trainer.train_step([batch])["loss"]

    m, shape, tiling = model.num_image_tokens, ctx.shape, trainer.processor.tiling
    if tiling is not None:  # every JPEG has the same size: one grid, one length
        from crossvlm.model.tiling import select_grid

        m = tiling.tokens(select_grid(*ctx.cfg.jpeg_size, tiling.max_tiles, tiling.side))
    seq = m + shape.text_tokens
    work = Workload(seq_len=seq, logits=seq - 1 if "full-logits" in v.levers else shape.labelled)
    llm, vision = LLMShape.from_config(model.config.text_config), VisionShape.from_config(model.config.vision_config)
    executed = step_flops(llm, vision, projector_forward_flops(model.config), work, ctx.llm_grad, v.batch_size)
    if "chunked-ce" in v.levers:  # the chunks' logits are computed again in backward
        recompute = 2.0 * llm.head_params * shape.labelled * v.batch_size
        executed["lm_head"] += recompute
        executed["total"] += recompute
    close = trainer.logger.close
    if "no-cudnn-attention" in v.levers:  # chosen when a graph is traced: set before the first step
        cudnn_was = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)

        def close() -> None:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_was)
            trainer.logger.close()
    return Runner(step, m, executed, close=close, compiled_graphs=compiled_graphs, tiling=tiling)


def _build_naive(ctx: _Context, v: Variant) -> Runner:
    from crossvlm.model.tokens import VisionTokenIds
    from crossvlm.train.runtime import seed_everything

    naive = load_naive()
    rt, shape = ctx.rt, ctx.shape
    seed_everything(ctx.cfg.seed)
    image_token_id = VisionTokenIds.from_tokenizer(ctx.tokenizer).pad
    model = naive.NaiveVLM.from_pretrained(ctx.llm_dir, ctx.vision_dir, image_token_id,
                                           vision_feature_layer=ctx.reference.vision_feature_layer)
    model.set_stage(ctx.cfg.stage)
    model.to(rt.device).train()
    engine = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        engine = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    optimizer = naive.build_optimizer(model)

    def step(batch: dict) -> float:
        return naive.train_step(engine, optimizer, batch, rt.device, ctx.amp)

    patches = ctx.reference.num_patches
    seq = patches + shape.text_tokens
    executed = step_flops(LLMShape.from_config(model.llm.config), VisionShape.from_config(model.vision.config),
                          model.projector_forward_flops(), Workload(seq_len=seq, logits=seq), ctx.llm_grad,
                          v.batch_size)
    return Runner(step, patches, executed)


def _reduce(rt, values: list[float], op: str) -> list[float]:
    """Combine per-process numbers over the ranks ("max" or "mean")."""
    if not rt.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (t / (1 if op == "max" else rt.world_size)).tolist()


def _profile(ctx: _Context, v: Variant, runner: Runner, batches) -> dict:
    """A few steps under torch.profiler (rank 0): a Chrome trace and a table of the top kernels."""
    def steps():
        for _ in range(ctx.cfg.profile_steps):
            runner.step(next(batches))

    stem = Path(ctx.cfg.profile) / f"train_{ctx.cfg.stage}_{v.name.replace('+', '_')}"
    return profiled(steps, ctx.rt.device, stem, f"{v.name}, stage {ctx.cfg.stage}, {ctx.cfg.profile_steps} steps",
                    enabled=ctx.rt.is_main)


def _measure(ctx: _Context, v: Variant, runner: Runner) -> dict:
    cfg, rt = ctx.cfg, ctx.rt
    data_warmup = ctx.workers * PREFETCH_FACTOR
    warm = cfg.warmup + data_warmup
    total = warm + cfg.steps + (cfg.profile_steps if cfg.profile else 0)
    dataset = FixedLengthSamples(ctx.jpegs, ctx.image_processor, _vision_ids(ctx), runner.num_image_tokens,
                                 ctx.shape, _text_vocab(ctx), length=total * v.batch_size,
                                 seed=cfg.seed + 7919 * rt.rank,  # each process its own samples
                                 float_pixels=v.design == "naive", tiling=runner.tiling)
    batches = iter(batch_loader(dataset, v.batch_size, ctx.workers, ctx.tokenizer.pad_token_id, PREFETCH_FACTOR))
    waits, computes, losses = [], [], []
    for i in range(warm + cfg.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        losses.append(runner.step(batch))
        synchronize(rt.device)
        t2 = time.perf_counter()
        if i == 0 and rt.is_main:
            rest = (f", a warmup step: {warm} unmeasured in all, {data_warmup} of them for the loader's queue"
                    if warm else " (measured: no warmup)")
            say(f"  first step {t2 - t0:.2f} s{rest}")
        if i >= warm:
            waits.append(t1 - t0)
            computes.append(t2 - t1)
        over = len(computes) >= 3 and sum(waits) + sum(computes) > cfg.max_seconds
        if _reduce(rt, [float(over)], "max")[0]:
            rt.print(f"  stopped after {len(computes)} measured steps (--max-seconds {cfg.max_seconds:g})")
            break
    profile = _profile(ctx, v, runner, batches) if cfg.profile else {}
    del batches  # shuts the workers down
    wall = sum(waits) + sum(computes)
    step_s, wall_max = _reduce(rt, [median(computes), wall], "max")  # the slowest process sets the pace
    wait_share = _reduce(rt, [sum(waits) / wall], "mean")[0]
    world = rt.world_size
    samples = v.batch_size * world
    seq = runner.num_image_tokens + ctx.shape.text_tokens
    required = required_step_flops(ctx.reference, ctx.shape.text_tokens, ctx.shape.labelled, ctx.llm_grad,
                                   v.batch_size)
    cuda = rt.device.type == "cuda"
    peak = peak_memory_gib(rt.device)
    return {
        "steps_measured": len(computes),
        "step_s_median": step_s,
        "step_s_min": min(computes),
        "wall_step_s_median": median([w + c for w, c in zip(waits, computes)]),
        "samples_per_s": samples / step_s,
        "samples_per_s_with_data": samples * len(computes) / wall_max,
        "tokens_per_s": samples * seq / step_s,
        "data_wait_share": wait_share,
        "seq_len": seq,
        "image_tokens": runner.num_image_tokens,
        "flops_required_per_step": required["total"] * world,
        "flops_executed_per_step": runner.executed["total"] * world,
        "flops_executed_breakdown": {k: val * world for k, val in runner.executed.items()},
        "mfu": required["total"] / (step_s * PEAK_BF16_FLOPS) if cuda else None,
        "mfu_executed": runner.executed["total"] / (step_s * PEAK_BF16_FLOPS) if cuda else None,
        "peak_memory_gib": _reduce(rt, [peak], "max")[0] if peak is not None else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "compiled_graphs": runner.compiled_graphs() if v.compile else None,
        **profile,
    }


def _vision_ids(ctx: _Context):
    from crossvlm.model.tokens import VisionTokenIds

    return VisionTokenIds.from_tokenizer(ctx.tokenizer)


def _text_vocab(ctx: _Context) -> int:
    """Ids drawn for text: the tokenizer's ordinary vocabulary (no special tokens)."""
    return min(ctx.tokenizer.vocab_size, ctx.reference.text_config.vocab_size)


def _run_variant(ctx: _Context, v: Variant) -> dict:
    rt = ctx.rt
    record = {"variant": v.name, "design": v.design, "levers": list(v.levers), "compile": v.compile,
              "batch_size": v.batch_size, "world_size": rt.world_size,
              "description": LEVERS[v.levers[0]] if v.levers else _DESCRIPTIONS[v.design]}
    rt.print(f"[{ctx.cfg.stage}] {v.name}: building ...")
    free_memory(rt.device)
    runner = None
    try:
        start = time.perf_counter()
        runner = (_build_naive if v.design == "naive" else _build_ours)(ctx, v)
        record["build_s"] = time.perf_counter() - start
        record.update(_measure(ctx, v, runner))
        rt.print(f"[{ctx.cfg.stage}] {v.name}: {_summary_line(record)}")
    except Exception:  # noqa: BLE001 — one failing variant (OOM, compile error) must not lose the others
        if rt.distributed:
            raise  # the other ranks would wait forever in the next collective
        record["error"] = traceback.format_exc(limit=8)
        say(f"[{ctx.cfg.stage}] {v.name}: FAILED\n{record['error']}")
    finally:
        if runner is not None:
            runner.close()
        del runner
        if v.compile:
            torch._dynamo.reset()
        free_memory(rt.device)
    return record


def _run_fixed(ctx: _Context, rows: int, max_length: int, labelled_share: float) -> dict:
    """`ours` on `rows` fixed-length rows of `max_length` tokens, one image and sample a row: the
    reference of `--data` runs (crossvlm.bench.realdata)."""
    m = ctx.reference.num_queries
    text = max_length - m
    ctx.sample_shape = SampleShape(text_tokens=text, labelled=max(1, min(text - 2, round(labelled_share * max_length))))
    v = Variant("fixed", "cross_attn", (), ctx.cfg.compile, rows)
    runner = _build_ours(ctx, v)
    try:
        record = _measure(ctx, v, runner)
    finally:
        runner.close()
    record.update(rows_per_step=rows, text_tokens=text, labelled=ctx.sample_shape.labelled)
    return record


_DESCRIPTIONS = {
    "cross_attn": "crossvlm: cross-attention projector (M learned queries), the real loop's train_step",
    "mlp": "crossvlm's loop with the MLP projector (one token per patch)",
    "naive": "tutorial baseline (bench/naive.py): fp32 HF models under autocast, per-sample Python loop, "
             "placeholder-query MHA, full logits, plain AdamW",
}


def _summary_line(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    mem = f", peak {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else ""
    return (f"{r['steps_measured']} steps, {1000 * r['step_s_median']:.1f} ms/step, {r['samples_per_s']:.1f} samples/s"
            f"{mfu}, data wait {100 * r['data_wait_share']:.0f}%{mem}, "
            f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")


def add_ratios(records: list[dict]) -> None:
    """`vs_naive`: each variant's throughput (and memory) as a multiple of the naive baseline's."""
    naive = next((r for r in records if r["variant"] == "naive" and "error" not in r), None)
    for r in records:
        if naive is None or "error" in r:
            continue
        r["vs_naive"] = r["samples_per_s"] / naive["samples_per_s"]
        r["vs_naive_with_data"] = r["samples_per_s_with_data"] / naive["samples_per_s_with_data"]
        if r.get("peak_memory_gib") and naive.get("peak_memory_gib"):
            r["memory_vs_naive"] = r["peak_memory_gib"] / naive["peak_memory_gib"]


def _reference_config(llm_dir: Path, vision_dir: Path, model_section):
    """The design's CrossVLMConfig without building a model: the stage's model section as
    `crossvlm train` applies it (`model_options`), with the cross-attention projector."""
    from transformers import PretrainedConfig, Qwen3Config

    from crossvlm.model.configuration import CrossVLMConfig
    from crossvlm.model.vision import tower_kind
    from crossvlm.train.setup import model_options

    tower, _ = PretrainedConfig.get_config_dict(str(vision_dir))
    _, vision_config_class = tower_kind(tower.get("model_type"), str(vision_dir)).classes()
    return CrossVLMConfig(text_config=Qwen3Config.from_pretrained(str(llm_dir)),
                          vision_config=vision_config_class.from_pretrained(str(vision_dir)),
                          **{**model_options(model_section), "projector_type": "cross_attn"})


def run_train_bench(cfg: TrainBenchConfig, rt=None) -> dict:
    """Run every planned variant; returns the report (variants, shapes, environment)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from crossvlm.configs import config_path
    from crossvlm.train.config import load_config
    from crossvlm.train.loop import autocast_dtype
    from crossvlm.train.runtime import init_runtime

    cfg.validate()
    rt = rt or init_runtime("auto")
    if rt.distributed and cfg.models is None:
        raise ConfigError("under torchrun, pass --models DIR (a folder every process can read) so the base "
                          "models are written once")
    with tempfile.TemporaryDirectory(prefix="crossvlm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        llm_dir, vision_dir = ensure_models(cfg.models or tmp / "models", cfg.preset, rt)
        jpegs = jpeg_pool(tmp, cfg.jpeg_size, seed=cfg.seed)
        photos = tmp / "bench_photos.parquet"
        stage_config = load_config(config_path(f"{cfg.stage}.yaml"),
                                   {"model.init_from": None, "data.sources": [str(photos)]})
        workers = cfg.workers if cfg.workers is not None else default_workers(rt.world_size)
        ctx = _Context(
            cfg=cfg, rt=rt, llm_dir=llm_dir, vision_dir=vision_dir, tmp=tmp, photos=photos, jpegs=jpegs,
            stage_config=stage_config, reference=_reference_config(llm_dir, vision_dir, stage_config.model),
            tokenizer=AutoTokenizer.from_pretrained(str(llm_dir)),
            image_processor=AutoImageProcessor.from_pretrained(str(vision_dir)),
            amp=autocast_dtype("auto", rt.device), llm_grad=_llm_grad(stage_config.trainable), workers=workers,
        )
        variants = plan(cfg)
        shape = ctx.shape
        data_info = None
        if cfg.data is not None:
            from crossvlm.bench.realdata import run_data_variants

            rt.print(f"bench train: stage {cfg.stage}, preset {cfg.preset}, real loop on "
                     f"{'a generated variable-length set' if cfg.data == 'generate' else cfg.data}, batch "
                     f"{cfg.batch_size} samples x {rt.world_size} process(es), {workers} loader workers, device "
                     f"{rt.device}; variants: {', '.join(cfg.data_variants)}")
            records, data_info = run_data_variants(
                ctx, None if cfg.data == "generate" else Path(cfg.data), cfg.max_length, cfg.data_variants,
                stage_overrides=lambda name: _stage_overrides(ctx, Variant(name, "cross_attn", (), cfg.compile,
                                                                           cfg.batch_size)),
                run_fixed=lambda rows, max_length, share: _run_fixed(ctx, rows, max_length, share))
        else:
            rt.print(f"bench train: stage {cfg.stage}, preset {cfg.preset}, batch {cfg.batch_size} x {rt.world_size} "
                     f"process(es), {shape.text_tokens} text tokens ({shape.labelled} labelled) per sample, "
                     f"{workers} loader workers, device {rt.device}; variants: {', '.join(v.name for v in variants)}")
            records = [_run_variant(ctx, v) for v in variants]
    add_ratios(records)
    cuda = rt.device.type == "cuda"
    return {
        "benchmark": "train",
        "stage": cfg.stage,
        "preset": cfg.preset,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "sample": {"text_tokens": shape.text_tokens, "labelled": shape.labelled, "images": 1,
                   "jpeg_size": list(cfg.jpeg_size), "loader_workers": workers},
        "mfu_peak_flops": PEAK_BF16_FLOPS if cuda else None,
        "mfu_note": None if cuda else "not applicable: MFU is defined against the GPU's bf16 peak",
        "data": data_info,
        "env": env_info(rt.device, rt.world_size),
        "variants": records,
    }
