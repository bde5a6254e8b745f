"""MiniMind-V's trainer flags (`trainer/train_pretrain_vlm.py`, `trainer/train_sft_vlm.py`) as
`crossvlm train` reads them.

Every flag of those scripts is either mapped to a crossvlm config key or answered with one line that
says what crossvlm does instead; the README's table lists them and a test keeps the two in step.

Run names: `--save_weight NAME` saves the run in SAVE_DIR/NAME (its model in SAVE_DIR/NAME/final;
SAVE_DIR is `--save_dir`, default `runs`), and a later `--from_weight NAME` starts from that model.
Which folder a name means is only known once the stage's YAML is read and the disk looked at, so
those two flags give `Deferred` values that `load_config` resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from crossvlm.errors import ConfigError

SAVE_DIR = "runs"
"""Where named runs go when `--save_dir` is not given (the shipped stages write runs/pretrain, runs/sft)."""

BASE_MODELS = ("none", "llm")
"""`--from_weight` values that mean "no crossvlm weights": start from the base LLM and vision tower."""


class Deferred:
    """An override value that needs the stage's YAML (`raw`, before overrides, with `run.out_dir`
    defaulted) or the disk to become final."""

    def resolve(self, raw: dict) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class RunFolder(Deferred):
    """`run.out_dir` from `--save_dir` / `--save_weight`: SAVE_DIR/NAME, NAME defaulting to the stage's own
    run folder name (`runs/pretrain` → `pretrain`)."""

    save_dir: str
    name: str | None

    def resolve(self, raw: dict) -> str:
        name = self.name or Path(raw["run"]["out_dir"]).name  # `load_config` fills in the default
        return str(Path(self.save_dir) / name)


@dataclass(frozen=True)
class FromWeight(Deferred):
    """`model.init_from` from `--from_weight NAME`: the final model of the run NAME, else the model directory NAME."""

    name: str
    save_dir: str

    def resolve(self, raw: dict) -> str:
        final = Path(self.save_dir) / self.name / "final"
        if (final / "config.json").is_file():
            return str(final)
        if (Path(self.name) / "config.json").is_file():
            return self.name
        raise ConfigError(
            f"--from_weight {self.name}: no run named {self.name!r} (looked for {final}/config.json, written by a "
            f"run with --save_weight {self.name}) and no model directory {self.name}/config.json; "
            f"use --from_weight none to start from the base models")


def _switch(value: str) -> bool:
    if value.lower() in ("1", "true"):
        return True
    if value.lower() in ("0", "false"):
        return False
    raise ValueError("takes 0 or 1")


def _freeze_llm(value: str) -> str:
    if value in ("0", "1"):
        return "frozen" if value == "1" else "full"
    raise ValueError("takes 1 (LLM frozen) or 0 (trained in full); other splits: "
                     "--trainable.llm last_n --trainable.llm_last_n N, or --trainable.llm lora")


def _dtype(value: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(value, value)


def _number(kind: type) -> Callable[[str], Any]:
    def convert(value: str):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
    return convert


@dataclass(frozen=True)
class Flag:
    """One MiniMind-V flag."""

    key: str | None
    """The crossvlm config key it sets; None for a flag that has no counterpart here."""
    note: str
    """How it maps, or what crossvlm does instead (one line; the README table's text)."""
    convert: Callable[[str], Any] | None = str
    """Command-line text → config value; None: the flag is explained and otherwise ignored."""
    bare: bool = False
    """An on/off switch given alone (`--use_wandb`)."""


NOT_APPLIED = "shapes MiniMind's own LLM; crossvlm trains `model.llm` (Qwen3-0.6B) at the size its config gives: ignored"

FLAGS: dict[str, Flag] = {
    "epochs": Flag("run.epochs", "passes over the data", _number(float)),
    "batch_size": Flag("run.batch_size", "samples per micro-batch on each process", _number(int)),
    "learning_rate": Flag("optim.lr", "peak learning rate", _number(float)),
    "data_path": Flag("data.sources", "one file or folder (several, weighted: `--data.sources`)"),
    "images_path": Flag("data.sources", "the image folder of JSON/JSONL data: `image_root` of the `--data_path` source"),
    "save_dir": Flag("run.out_dir", "the folder named runs go in (default `runs`)"),
    "out_dir": Flag("run.out_dir", "older MiniMind-V's name for `--save_dir`"),
    "save_weight": Flag("run.out_dir", "the run's name: it saves in SAVE_DIR/NAME, its model in SAVE_DIR/NAME/final"),
    "from_weight": Flag("model.init_from", "`none`/`llm`: the base models; a run's name: SAVE_DIR/NAME/final; "
                        "else a model directory"),
    "from_resume": Flag("run.resume", "`1`: resume the run's latest checkpoint (`run.resume: auto`)", _switch),
    "freeze_llm": Flag("trainable.llm", "`1`: `frozen`, `0`: `full`", _freeze_llm),
    "max_seq_len": Flag("data.max_length", "longest sample in tokens", _number(int)),
    "device": Flag("run.device", "`cuda:0`, `cpu`, ... (under torchrun each process takes its own GPU)"),
    "dtype": Flag("run.dtype", "`bfloat16`, `float16`, `float32`", _dtype),
    "num_workers": Flag("data.num_workers", "data loader processes", _number(int)),
    "accumulation_steps": Flag("optim.accumulation_steps", "micro-batches per optimizer step", _number(int)),
    "grad_clip": Flag("optim.grad_clip", "global gradient-norm clip", _number(float)),
    "warmup_iters": Flag("optim.warmup_steps", "linear warmup steps", _number(int)),
    "log_interval": Flag("run.log_interval", "optimizer steps between metric lines", _number(int)),
    "save_interval": Flag("run.save_interval", "optimizer steps between checkpoints", _number(int)),
    "use_wandb": Flag("run.wandb", "log to Weights & Biases (`pip install wandb`)", _switch, bare=True),
    "wandb_project": Flag("run.wandb_project", "W&B project"),
    "use_compile": Flag("run.compile", "`1`: `torch.compile` the model", _switch),
    "hidden_size": Flag(None, NOT_APPLIED, None),
    "num_hidden_layers": Flag(None, NOT_APPLIED, None),
    "use_moe": Flag(None, NOT_APPLIED, None),
    "ddp": Flag(None, "is not needed: DDP starts by itself under `torchrun --nproc_per_node N -m crossvlm.cli train ...`; "
                "ignored", None, bare=True),
    "local_rank": Flag(None, "is torchrun's, read from its environment: ignored", None),
}


def translate(given: dict[str, str], notes: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """MiniMind-V flags (name → command-line text) → (dotted config overrides, problems found).

    Flags that do not apply add a line to `notes`.
    """
    out: dict[str, Any] = {}
    problems = []
    for flag, text in given.items():
        spec = FLAGS[flag]
        if spec.convert is None:
            if notes is not None:
                notes.append(f"--{flag} {spec.note}")
            continue
        if flag in ("save_dir", "out_dir", "save_weight", "from_weight", "images_path", "data_path"):
            continue  # combined below
        try:
            out[spec.key] = spec.convert(text)
        except ValueError as err:
            problems.append(f"--{flag} {text}: {err}")
    if out.pop("run.resume", None):
        out["run.resume"] = "auto"
    save_dir = given.get("save_dir") or given.get("out_dir")
    if save_dir or "save_weight" in given:
        out["run.out_dir"] = RunFolder(save_dir or SAVE_DIR, given.get("save_weight"))
    if "from_weight" in given:
        name = given["from_weight"]
        out["model.init_from"] = None if name.lower() in BASE_MODELS else FromWeight(name, save_dir or SAVE_DIR)
    if "data_path" in given:
        source = {"path": given["data_path"]}
        if "images_path" in given:
            source["image_root"] = given["images_path"]
        out["data.sources"] = [source]
    elif "images_path" in given:
        problems.append("--images_path needs --data_path (the JSON/JSONL file whose images it holds)")
    return out, problems
