"""Shipped stage configs (YAML), found by name: `crossvlm train sft` reads `sft.yaml` from here.

Each file's first line is a comment saying in one line what the stage is for; `crossvlm train --list`
prints it.
"""

from pathlib import Path

from crossvlm.errors import ConfigError

CONFIG_DIR = Path(__file__).parent


def config_path(name: str) -> Path:
    """The path of a shipped config, e.g. `config_path("sft.yaml")`."""
    return CONFIG_DIR / name


def shipped_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def purpose(path: Path) -> str:
    """The one-line purpose a config states in its first line (`# ...`)."""
    first = path.read_text().splitlines()[0] if path.stat().st_size else ""
    return first[1:].strip() if first.startswith("#") else ""


def resolve_config(given: str | Path) -> Path:
    """A stage config: the file `given` when it exists, else the shipped config of that name.

    `sft` and `sft.yaml` both name the shipped `sft.yaml`; a path with a folder in it is only ever
    a path, so a typo in one is reported, not swapped for a shipped file.
    """
    path = Path(given)
    if path.is_file():
        return path
    names = {p.stem: p for p in shipped_configs()}
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and stem in names:
        return names[stem]
    what = "config file" if path.parent != Path(".") or path.suffix else "config"
    raise ConfigError(f"{what} {given} does not exist and is not a shipped config; shipped: "
                      f"{', '.join(names)} (e.g. `crossvlm train pretrain`; `crossvlm train --list` says what each is for)")
