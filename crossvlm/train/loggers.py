"""Where metrics go: a JSONL file always, TensorBoard and W&B when asked. Non-zero ranks log nothing.

The loop calls `log(step, metrics)` and `close()` without knowing which sinks are on.
"""

from __future__ import annotations

import json
from pathlib import Path

from crossvlm.errors import ConfigError


class JsonlSink:
    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a" if append else "w")

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("run.tensorboard needs the tensorboard package: pip install tensorboard") from err
        self.writer = SummaryWriter(str(log_dir))

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, config: dict, run_dir: Path):
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("run.wandb needs the wandb package: pip install wandb") from err
        self.run = wandb.init(project=project, config=config, dir=str(run_dir))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fans metrics out to the configured sinks; with no sinks it does nothing."""

    def __init__(self, sinks=()):
        self.sinks = list(sinks)

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_logger(is_main: bool, out_dir: Path, *, tensorboard: bool, wandb: bool, wandb_project: str,
                 config: dict, resumed: bool) -> MetricsLogger:
    if not is_main:
        return MetricsLogger()
    sinks = [JsonlSink(out_dir / "metrics.jsonl", append=resumed)]
    if tensorboard:
        sinks.append(TensorBoardSink(out_dir / "tensorboard"))
    if wandb:
        sinks.append(WandbSink(wandb_project, config, out_dir))
    return MetricsLogger(sinks)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
