"""The training configuration: one YAML file per stage, typed sections, every problem reported at once.

A stage (pretrain, SFT, a debug run) is a YAML file of these sections; command-line overrides are
`--section.key value`, and MiniMind-V's trainer flags are read too (`crossvlm.train.minimind`). A
stage is named by a path or by the name of a shipped config (`crossvlm.configs`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crossvlm.data.config import DataConfig
from crossvlm.errors import ConfigError
from crossvlm.train.minimind import FLAGS, Deferred, translate

LLM_MODES = ("frozen", "full", "lora", "last_n")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DISTRIBUTED = ("ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ModelSection:
    """Which model to train."""

    llm: str = "Qwen/Qwen3-0.6B"
    """Base LLM: a hub id or a local directory (ignored when `init_from` is set)."""
    vision: str = "openai/clip-vit-base-patch16"
    """Base vision tower: a hub id or a local directory (ignored when `init_from` is set)."""
    init_from: str | None = None
    """A saved crossvlm model directory to start from (e.g. the pretrain stage's `final/`)."""
    projector_type: str = "cross_attn"
    """`cross_attn` (M learned queries) or `mlp` (one token per patch, the baseline)."""
    num_queries: int = 64
    """Visual tokens per image for `cross_attn` (a square number)."""
    projector_layers: int = 2
    """Cross-attention blocks in the projector."""
    projector_heads: int | None = None
    """Attention heads per projector block; default: projector width / 64."""
    projector_locality: str = "gaussian"
    """Keep each query to its own image region: `gaussian` (learned per-head 2D distance bias it starts
    from), `cell` (it sees only its own grid cell's patches) or `none`."""
    projector_position: str = "residual"
    """Where the projector's 2D position codes join: `residual` (patch features and queries: the visual
    tokens carry them) or `keys` (only the attention scores' queries and keys)."""
    projector_kv_norm: bool = True
    """LayerNorm the patch features before the projector's keys and values."""
    projector_init: str = "default"
    """`default` (PyTorch's) or `pool`: the projector starts as an average pool of each query's region
    through unit-gain maps (queries and MLP branches zero) and learns from there."""
    projector_output_scale: float = 1.0
    """The projector's output starts at this multiple of the LLM's token-embedding std."""
    max_tiles: int = 1
    """High-resolution images (docs/TRAINING.md, "Tiles"): the most tower-sized tiles an image is cut
    into, the grid that fits its shape best, plus a thumbnail; 1: one view per image. `cross_attn` only."""
    tile_queries: int | None = None
    """Visual tokens per tile (a square number); default: `num_queries`."""
    vision_feature_layer: int = -2
    """Vision hidden state fed to the projector (-2 = penultimate)."""
    attention: str = "auto"
    """The LLM's attention for packed rows (`data.packing`): `auto` (FlexAttention on a GPU), `flex_attention`,
    `varlen` (FlashAttention's variable-length kernel, CUDA) or `sdpa` (a dense block-diagonal mask)."""

    def problems(self) -> list[str]:
        """What is wrong with this section alone (empty when nothing is)."""
        p = []
        if self.projector_type not in ("cross_attn", "mlp"):
            p.append(f"model.projector_type {self.projector_type!r} is not cross_attn or mlp")
        if not isinstance(self.max_tiles, int) or self.max_tiles < 1:
            p.append(f"model.max_tiles {self.max_tiles!r} must be a whole number >= 1 (1: no tiles)")
        elif self.max_tiles > 1 and self.projector_type != "cross_attn":
            p.append("model.max_tiles > 1 needs model.projector_type cross_attn")
        if self.tile_queries is not None and (not isinstance(self.tile_queries, int) or self.tile_queries < 1
                                              or math.isqrt(self.tile_queries) ** 2 != self.tile_queries):
            p.append(f"model.tile_queries {self.tile_queries!r} must be a square number")
        if self.tile_queries is not None and self.max_tiles == 1:
            p.append("model.tile_queries needs model.max_tiles > 1")
        if self.attention not in ("auto", "flex_attention", "varlen", "sdpa"):
            p.append(f"model.attention {self.attention!r} is not one of auto, flex_attention, varlen, sdpa")
        if self.init_from is None and not (self.llm and self.vision):
            p.append("model.llm and model.vision are needed unless model.init_from is set")
        return p


@dataclass
class TrainableSection:
    """What the optimizer updates; everything else is frozen (eval mode, no gradients)."""

    projector: bool = True
    """Train the projector."""
    llm: str = "frozen"
    """`frozen`, `full`, `lora` (peft adapters) or `last_n` (only the last `llm_last_n` layers)."""
    llm_last_n: int = 2
    """Layers trained with `llm: last_n` (the final norm is trained with them)."""
    vision: bool = False
    """Also train the vision tower."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA path."""
    lora_targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers of the LLM that get LoRA adapters."""


@dataclass
class OptimSection:
    """AdamW, warmup then cosine decay, clipping and accumulation."""

    lr: float = 1e-5
    """Peak learning rate of the LLM (and vision tower) parameters."""
    projector_lr: float | None = None
    """Peak learning rate of the projector; default: `lr`."""
    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to norms, biases, embeddings and the projector's queries."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    warmup_ratio: float = 0.0
    """Warmup as a share of all steps (used when `warmup_steps` is 0)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to `lr * min_lr_ratio`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    fused: bool | None = None
    """Fused AdamW; default: on for CUDA."""


@dataclass
class RunSection:
    """Length, precision, logging and checkpoints of the run."""

    out_dir: str = "runs/train"
    """Where checkpoints, metrics and the final model go."""
    epochs: float = 1.0
    """Passes over the data (used when `max_steps` is 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means `epochs` worth."""
    batch_size: int = 16
    """Samples per micro-batch on each process."""
    seed: int = 0
    """Seed of model init, data order and every random number generator."""
    dtype: str = "auto"
    """Autocast precision: `auto` is bfloat16 on a GPU, float32 on the CPU."""
    device: str = "auto"
    """`auto`, `cpu`, or `cuda` (under torchrun each process takes its local rank's GPU)."""
    distributed: str = "ddp"
    """With several processes: `ddp` (replicated) or `fsdp` (FSDP2 sharding)."""
    ddp_bf16_grads: bool = False
    """Under DDP on GPUs, all-reduce gradients in bfloat16 (half the bytes; DDP's bf16_compress_hook)."""
    compile: bool = False
    """`torch.compile` the LLM's decoder layers, the projector, the vision tower's layers and the loss (LM head +
    cross-entropy)."""
    compile_mode: str = "default"
    """`torch.compile` mode; `reduce-overhead` replays each compiled layer as a CUDA graph."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in the backward pass (less memory, ~30% more compute)."""
    log_interval: int = 10
    """Optimizer steps between metric lines."""
    eval_interval: int = 0
    """Optimizer steps between held-out loss evaluations (0: only at the end, if eval data is set)."""
    eval_batches: int = 20
    """Batches of held-out data per evaluation."""
    save_interval: int = 0
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""
    resume: str | None = None
    """`auto` (latest checkpoint in out_dir, if any), a checkpoint folder, or a run's out_dir (its latest
    checkpoint). Resuming restores the optimizer, schedule and random state, so changing optim.lr,
    projector_lr, weight_decay, betas, eps or run.seed on resume is refused."""
    overwrite: bool = False
    """Start over in an out_dir that already holds a run (its checkpoints, final/ and metrics are removed
    first); without it such a folder is refused unless the run resumes."""
    max_nonfinite_in_row: int = 5
    """Steps with a NaN/inf loss are skipped; this many in a row stops the run."""
    tensorboard: bool = False
    """Also write TensorBoard event files to out_dir/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "crossvlm"
    """W&B project name."""
    plot: bool = True
    """Write out_dir/curves.png (loss and learning rate) at the end."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class TrainConfig:
    """A whole training stage."""

    model: ModelSection = field(default_factory=ModelSection)
    trainable: TrainableSection = field(default_factory=TrainableSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig | None = None
    eval_data: DataConfig | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise one ConfigError listing every problem."""
        t, o, r = self.trainable, self.optim, self.run
        p = self.model.problems()
        if t.llm not in LLM_MODES:
            p.append(f"trainable.llm {t.llm!r} is not one of {list(LLM_MODES)}")
        if t.llm == "last_n" and t.llm_last_n < 1:
            p.append("trainable.llm_last_n must be >= 1")
        if not (t.projector or t.vision or t.llm != "frozen"):
            p.append("nothing is trainable: set trainable.projector, trainable.llm or trainable.vision")
        if o.lr <= 0 or (o.projector_lr is not None and o.projector_lr <= 0):
            p.append("optim.lr and optim.projector_lr must be positive")
        if o.accumulation_steps < 1:
            p.append("optim.accumulation_steps must be >= 1")
        if not 0 <= o.min_lr_ratio <= 1:
            p.append("optim.min_lr_ratio must be in [0, 1]")
        if o.grad_clip < 0:
            p.append("optim.grad_clip must be >= 0")
        if r.dtype not in DTYPES:
            p.append(f"run.dtype {r.dtype!r} is not one of {list(DTYPES)}")
        if r.compile_mode not in COMPILE_MODES:
            p.append(f"run.compile_mode {r.compile_mode!r} is not one of {list(COMPILE_MODES)}")
        if r.distributed not in DISTRIBUTED:
            p.append(f"run.distributed {r.distributed!r} is not one of {list(DISTRIBUTED)}")
        if r.batch_size < 1:
            p.append("run.batch_size must be >= 1")
        if r.max_steps < 0 or (r.max_steps == 0 and r.epochs <= 0):
            p.append("set run.max_steps > 0 or run.epochs > 0")
        if r.keep_last < 1:
            p.append("run.keep_last must be >= 1")
        if self.data is None:
            p.append("data: no training data (set data.sources or pass --data_path)")
        if p:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(p))


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def _section_fields() -> dict[str, set[str]]:
    return {"model": set(typing.get_type_hints(ModelSection)), "trainable": set(typing.get_type_hints(TrainableSection)),
            "optim": set(typing.get_type_hints(OptimSection)), "run": set(typing.get_type_hints(RunSection)),
            "data": set(DataConfig.__dataclass_fields__), "eval_data": set(DataConfig.__dataclass_fields__)}


def _key_problem(dotted: str) -> str | None:
    """Why `--section.key` names no config value, or None when it does."""
    fields = _section_fields()
    section, _, key = dotted.partition(".")
    if section not in fields:
        return f"--{dotted}: no section {section!r} (sections: {', '.join(fields)})"
    if key not in fields[section]:
        return f"--{dotted}: {section} has no key {key!r} (known: {', '.join(sorted(fields[section]))})"
    return None


def parse_overrides(args: list[str], notes: list[str] | None = None) -> dict[str, Any]:
    """`--section.key value` / `--section.key=value` / MiniMind-V `--flag value` into dotted keys.

    Values are parsed as YAML scalars; every key must name a config value. MiniMind-V's flags
    (`crossvlm.train.minimind.FLAGS`) are translated; a switch may stand alone (`--use_wandb`), and
    flags that do not apply here add a line to `notes`.
    """
    out: dict[str, Any] = {}
    minimind: dict[str, str] = {}
    problems = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r} (overrides look like --section.key value)")
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_") if "." not in key else key
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("--") or (key in FLAGS and FLAGS[key].bare):
                value = "true"  # a bare flag
            else:
                value, i = nxt, i + 1
        i += 1
        if key in FLAGS:
            minimind[key] = value
        elif "." in key:
            problem = _key_problem(key)
            if problem:
                problems.append(problem)
            else:
                out[key] = _parse_value(value)
        else:
            problems.append(f"unknown option --{key} (use --section.key value, e.g. --run.max_steps 100, "
                            "or a MiniMind-V flag: crossvlm train --help)")
    translated, bad = translate(minimind, notes)
    out.update(translated)
    problems += bad
    if problems:
        raise ConfigError("bad overrides:\n  - " + "\n  - ".join(problems))
    return out


def _wrong(expected: str, value: Any):
    raise ValueError(f"expected {expected}, got {value!r:.60}")


def _coerce(value: Any, hint: Any) -> Any:
    """Bring a YAML / command-line value to the field's type (YAML reads `5e-4` as a string)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None and type(None) in typing.get_args(hint):
        return None
    target = args[0] if len(args) == 1 and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value) if isinstance(value, str) else _wrong("a number", value)
        except ValueError:
            return _wrong("a number", value)
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        return _wrong("an integer", value)
    if target is str and not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `run.out_dir: 2024` names a folder all the same
        return _wrong("a string", value)
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in ("0", "1", "true", "false"):
            return str(value).lower() in ("1", "true")
        raise ValueError(f"expected true or false, got {value!r}")
    if typing.get_origin(target) is tuple and isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return value


def _build_section(cls, raw: dict | None, name: str, problems: list[str]):
    raw = dict(raw or {})
    hints = typing.get_type_hints(cls)
    for key in sorted(set(raw) - set(hints)):
        problems.append(f"{name}.{key} is not a known key (known: {', '.join(sorted(hints))})")
        raw.pop(key)
    for key, value in list(raw.items()):
        try:
            raw[key] = _coerce(value, hints[key])
        except ValueError as err:
            problems.append(f"{name}.{key}: {err}")
            raw.pop(key)
    return cls(**raw)


def model_from_dict(raw: dict) -> ModelSection:
    """A `model` section on its own (what `crossvlm init` builds), every problem raised at once."""
    problems: list[str] = []
    model = _build_section(ModelSection, raw, "model", problems)
    problems += model.problems()
    if problems:
        raise ConfigError("invalid model options:\n  - " + "\n  - ".join(problems))
    return model


def config_from_dict(raw: dict) -> TrainConfig:
    """Build and validate a TrainConfig from a nested mapping."""
    problems: list[str] = []
    raw = dict(raw or {})
    for key in sorted(set(raw) - {"model", "trainable", "optim", "run", "data", "eval_data"}):
        problems.append(f"unknown section {key!r}")
    sections = {
        name: _build_section(cls, raw.get(name), name, problems)
        for name, cls in (("model", ModelSection), ("trainable", TrainableSection),
                          ("optim", OptimSection), ("run", RunSection))
    }
    data = eval_data = None
    for name in ("data", "eval_data"):
        if raw.get(name):
            try:
                value = DataConfig.from_dict(raw[name])
            except ConfigError as err:
                problems.append(f"{name}: {err}")
                continue
            if name == "data":
                data = value
            else:
                eval_data = value
    cfg = TrainConfig(data=data, eval_data=eval_data, **sections)
    try:
        cfg.validate()
    except ConfigError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
    node[leaf] = value


def read_stage(path: str | Path) -> dict:
    """The raw sections of a stage config: a YAML file, or a shipped config's name (`sft`)."""
    from crossvlm.configs import resolve_config

    path = resolve_config(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return raw


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a stage (a YAML file or a shipped config's name), apply dotted overrides, validate.

    Override values that depend on the stage or the disk (MiniMind-V's run names) are resolved
    against the stage as written, after the plain overrides are in.
    """
    raw = read_stage(path) if path is not None else {}
    stage = copy.deepcopy(raw)
    run = stage.get("run") or {}
    if isinstance(run, dict):  # the run folder a deferred value reads: the stage's, else RunSection's
        stage["run"] = {**run, "out_dir": run.get("out_dir") or RunSection.out_dir}
    overrides = overrides or {}
    for dotted, value in overrides.items():
        if not isinstance(value, Deferred):
            _set_dotted(raw, dotted, value)
    for dotted, value in overrides.items():
        if isinstance(value, Deferred):
            _set_dotted(raw, dotted, value.resolve(stage))
    return config_from_dict(raw)
