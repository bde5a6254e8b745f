"""What is this folder or id? The one place every loader asks before it builds anything.

A model source given by a user is one of:

| kind       | how it is told                                                         |
| ---------- | ---------------------------------------------------------------------- |
| `crossvlm` | a folder whose config.json says `model_type: crossvlm`                 |
| `llm`      | a folder whose config.json names a causal language model (Qwen3, ...)  |
| `vision`   | a folder whose config.json says clip / siglip (vision-only or full)    |
| `other`    | a folder with a config.json of any other model                         |
| `hub`      | not on the disk and shaped like a hub id (`owner/name`)                |

Anything else is refused at once, naming it: a path that looks local and does not exist (`myrun`,
`/abs/missing`, `runs/x/final`, `m/llm` when `m` is a folder here), a file, a folder without a
config.json, an unreadable config.json. A folder of the wanted kind is checked further (weights,
tokenizer and image-processor files present, every safetensors header whole) before a byte of weights
is read, so a wrong step costs milliseconds and no memory: this module imports neither torch nor
transformers, and commands call it before importing them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from crossvlm.errors import ConfigError, ModelLoadError

KINDS = ("crossvlm", "llm", "vision", "other", "hub")
VISION_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")
_MAX_HEADER = 100 << 20  # safetensors refuses headers past 100 MB too
WHAT = {"crossvlm": "a saved crossvlm model", "llm": "a base LLM", "vision": "a vision tower (CLIP or SigLIP)"}


@dataclass(frozen=True)
class Source:
    """A model source as found on the disk (or a hub id, whose files transformers fetches)."""

    name: str
    """As the user gave it."""
    kind: str
    """One of KINDS."""
    path: Path | None = None
    """The local folder (None for a hub id)."""
    model_type: str | None = None
    """config.json's `model_type` (None for a hub id)."""

    @property
    def local(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        """What it holds, for messages: 'a qwen3 language model', 'a clip_vision_model vision tower'."""
        if self.kind == "crossvlm":
            return "a saved crossvlm model"
        if self.kind == "llm":
            return f"a {self.model_type} language model"
        if self.kind == "vision":
            return f"a {self.model_type} vision tower"
        return f"a {self.model_type or 'unknown'} model"


def looks_like_hub_id(name: str) -> bool:
    """`owner/name`, and not a local path: no leading `.`, `/` or `~`, no `..`, and `owner` is no folder here."""
    if not _HUB_ID.match(name) or ".." in name:
        return False
    return not Path(name.split("/")[0]).exists()


def kind_of_config(config: dict) -> str:
    """The kind a config.json's contents name (see KINDS)."""
    model_type = config.get("model_type")
    if model_type == "crossvlm":
        return "crossvlm"
    if model_type in VISION_TYPES or str(model_type).startswith("siglip"):
        return "vision"
    architectures = config.get("architectures") or []
    if any(str(a).endswith("ForCausalLM") for a in architectures) or model_type in ("qwen3", "qwen2", "llama"):
        return "llm"
    return "other"


def read_config(path: Path) -> dict:
    """config.json of a folder as a dict, or a ModelLoadError naming the file and what is wrong."""
    file = path / "config.json"
    if not file.is_file():
        final = path / "final"  # a training run's folder: its model is in final/
        also = f" (a training run? its model is {final})" if (final / "config.json").is_file() else ""
        raise ModelLoadError(f"{path} has no config.json: it is not a model folder{also}")
    try:
        with open(file, "rb") as f:
            raw = f.read(16 << 20)  # no model config comes near 16 MB: a bigger file is not one
        config = json.loads(raw)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} holds a {type(config).__name__}, not a JSON object")
    return config


def find(name: str | Path) -> Source:
    """The source `name` names, or a ModelLoadError naming it when it cannot be one."""
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        config = read_config(path)
        return Source(text, kind_of_config(config), path, config.get("model_type"))
    if path.exists():
        raise ModelLoadError(f"{text} is a file; give the model's folder (the one holding config.json)")
    if looks_like_hub_id(text):
        return Source(text, "hub")
    parent = next((p for p in path.parents if p.exists()), None)
    where = "" if parent is None or parent in (Path("."), Path("/")) else f" ({parent} exists, {path.relative_to(parent)} does not)"
    raise ModelLoadError(f"{text}: no such folder{where}")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing (header and size), or None; reads only the header."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{file} is empty or cut short ({size} bytes): not a safetensors file"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                return (f"{file} is not a safetensors file, or is cut short (its first 8 bytes announce a "
                        f"{n}-byte header; the file has {size} bytes)")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        return f"{file} is not a safetensors file (its header is not valid: {type(err).__name__})"
    except OSError as err:
        return f"cannot read {file}: {err}"
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"{file} is cut short: its header describes {need} bytes, the file has {size} (copy it again)"
    return None


def weight_problems(path: Path) -> list[str]:
    """Whether the folder holds whole safetensors weights (one file, or shards listed in an index)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            return [f"{index} is not a valid safetensors index ({type(err).__name__})"]
        files = [path / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            return [f"{index} lists shards that are missing: {', '.join(missing)}"]
    else:
        return [f"{path} has no model.safetensors (nor a model.safetensors.index.json)"]
    return [p for f in files if (p := safetensors_problem(f))]


def tokenizer_problems(path: Path) -> list[str]:
    if (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        return []
    return [f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)"]


def processor_problems(path: Path) -> list[str]:
    if (path / "preprocessor_config.json").is_file():
        return []
    return [f"{path} has no preprocessor_config.json (the image processor's settings)"]


def crossvlm_config_problems(config: dict, file: Path | str) -> list[str]:
    """Problems of a crossvlm config.json that loading would otherwise meet as tracebacks."""
    problems = []
    for key in ("text_config", "vision_config"):
        value = config.get(key)
        if value is None:
            problems.append(f"{file} has no {key}")
        elif not isinstance(value, dict):
            problems.append(f"{file}: {key} must be a JSON object, got {type(value).__name__}")
    return problems


def hub_problem(repo_id: str, timeout: float = 10.0) -> str | None:
    """Why the hub id `repo_id` cannot be loaded, asked once (no retries) unless its config.json is
    cached: it is neither here nor on the hub, or the hub cannot be reached (transformers would retry
    for most of a minute before saying so). None: it is cached, or the hub has it."""
    import os

    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return "no such folder here, and no cached copy of that hub id (HF_HUB_OFFLINE is set)"
    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except Exception as err:  # noqa: BLE001 -- told apart by kind: not found, gated, or no network
        kind = type(err).__name__
        if kind in ("RepositoryNotFoundError", "RevisionNotFoundError"):
            return "no such folder here, nor a model of that id on the Hugging Face hub that you can access"
        if kind in ("GatedRepoError", "HfHubHTTPError"):
            return None  # it exists; transformers says what access it needs
        return (f"no such folder here, and the Hugging Face hub cannot be reached to look for it ({kind}); "
                "check the path, or the network")
    return None


def hint(want: str, flag: str, found: str) -> str:
    """What to do instead, for a source of the kind `found` given where `want` goes."""
    if found == "crossvlm":
        return "a saved crossvlm model goes to --model (train: model.init_from)"
    if want == "llm":
        return "give a Qwen3 LLM's folder or hub id (e.g. Qwen/Qwen3-0.6B)"
    if want == "vision":
        return "give a CLIP or SigLIP folder or hub id (e.g. openai/clip-vit-base-patch16)"
    if flag.startswith("model."):
        return "set model.llm and model.vision instead of model.init_from, or build a model folder with `crossvlm init`"
    return "use --llm/--vision, or build a model folder from them with `crossvlm init --llm L --vision V --out DIR`"


def check(name: str | Path, want: str, flag: str = "", parts: bool = True) -> Source:
    """The source `name`, which must be `want` ("crossvlm", "llm" or "vision"); a local folder's config
    and weights are checked, and with `parts` its tokenizer / image-processor files (what a command
    needs; a model class alone does not). Raises one ModelLoadError listing every problem, naming
    `flag` and the file. A hub id passes: its files are checked as they load."""
    source = find(name)
    named = f"{flag} {name}" if flag else str(name)
    if not source.local:
        problem = hub_problem(source.name)
        if problem:
            raise ModelLoadError(f"{named}: {problem}")
        return source
    if source.kind != want:
        raise ModelLoadError(f"{named} holds {source.describe()}, not {WHAT[want]}; {hint(want, flag, source.kind)}")
    path = source.path
    problems = weight_problems(path)
    if want == "crossvlm":
        problems = crossvlm_config_problems(read_config(path), path / "config.json") + problems
    if parts and want in ("crossvlm", "llm"):
        problems += tokenizer_problems(path)
    if parts and want in ("crossvlm", "vision"):
        problems += processor_problems(path)
    if problems:
        head = f"{named} cannot be loaded: "
        raise ModelLoadError(head + problems[0] if len(problems) == 1 else head + "\n  - " + "\n  - ".join(problems))
    return source


def check_config_kind(config: dict, name: str, want: str, flag: str = "") -> None:
    """For a hub id, once its config.json is fetched: it must name the `want` kind."""
    kind = kind_of_config(config)
    if kind != want:
        found = Source(name, kind, None, config.get("model_type"))
        named = f"{flag} {name}" if flag else str(name)
        raise ModelLoadError(f"{named} holds {found.describe()}, not {WHAT[want]}; {hint(want, flag, kind)}")


def check_files(name: str | Path, flag: str, tokenizer: bool = False, processor: bool = False) -> Source:
    """A folder (or hub id) read only for its tokenizer and / or image processor, of any model kind
    (a base LLM or a saved crossvlm model both hold a tokenizer)."""
    source = find(name)
    problems = []
    if source.local and tokenizer:
        problems += tokenizer_problems(source.path)
    if source.local and processor:
        problems += processor_problems(source.path)
    if problems:
        raise ModelLoadError(f"{flag} {name}: " + "; ".join(problems))
    return source


def check_model_args(model, llm, vision) -> None:
    """The `--model` / `--llm` + `--vision` options of chat, serve and eval, checked before anything loads."""
    if model is not None:
        check(model, "crossvlm", "--model")
    else:
        check(llm, "llm", "--llm")
        check(vision, "vision", "--vision")


_VIRTUAL_FS = {"proc", "sysfs", "devtmpfs", "devpts", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2",
               "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs"}


def _mount_of(path: Path) -> tuple[str, list[str]] | None:
    """(file system type, mount options) of the mount holding `path`, from /proc/mounts (Linux), or None."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best = None
    for fields in mounts:
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and (best is None or len(point) > len(best[0])):
            best = (point, fields[2], fields[3].split(","))
    return None if best is None else (best[1], best[2])


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, naming `flag`, a folder that cannot be made or written: one under a file, on a virtual
    or read-only file system (/proc, /sys), or without permission. Nothing is written to find out."""
    import os

    path = Path(path).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), Path("."))
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise ConfigError(f"{flag} {path} {where}, not a folder")
    mount = _mount_of(existing.resolve())
    if mount is not None and mount[0] in _VIRTUAL_FS:
        raise ConfigError(f"{flag} {path}: cannot write in {existing} (a {mount[0]} file system holds no files)")
    if mount is not None and "ro" in mount[1]:
        raise ConfigError(f"{flag} {path}: cannot write in {existing} (its file system is mounted read-only)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {existing} (permission denied)")
