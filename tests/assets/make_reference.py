"""Regenerate tests/assets/debug_losses.json, the regression guard's reference losses.

Run only after checking that a change in the loss curve is intended:
    python tests/assets/make_reference.py
It trains the debug config (crossvlm/configs/debug.yaml) on freshly made tiny models and synthetic
data, exactly as tests/test_train.py::test_debug_run_matches_reference_losses does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from crossvlm.configs import config_path
from crossvlm.data.synth import write_synthetic
from crossvlm.make_model import write_random_models
from crossvlm.train.config import load_config
from crossvlm.train.loggers import read_metrics
from crossvlm.train.loop import train


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_models(tmp / "models", "tiny", seed=0)
        data = write_synthetic(tmp / "shapes", seed=0, n_train=96, n_test=8)
        cfg = load_config(config_path("debug.yaml"), {
            "model.llm": str(tmp / "models" / "llm"), "model.vision": str(tmp / "models" / "vision"),
            "data.sources": [str(data["sft_train"])], "run.out_dir": str(tmp / "run")})
        train(cfg)
        losses = {m["step"]: m["loss"] for m in read_metrics(tmp / "run" / "metrics.jsonl") if "loss" in m}
    out = Path(__file__).parent / "debug_losses.json"
    out.write_text(json.dumps({"config": "crossvlm/configs/debug.yaml", "losses": losses}, indent=1) + "\n")
    print(f"wrote {out}: {losses}")


if __name__ == "__main__":
    main()
