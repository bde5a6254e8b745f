"""Shipped stage configs (YAML). `configs/` at the repository root points here."""

from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def config_path(name: str) -> Path:
    """The path of a shipped config, e.g. `config_path("sft.yaml")`."""
    return CONFIG_DIR / name


def shipped_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))
