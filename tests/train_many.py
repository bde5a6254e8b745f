"""Run several training configs one after another in one `torchrun` launch (a test helper).

Starting processes and a process group costs more than a tiny run, so the distributed tests launch
this once: `torchrun --nproc_per_node 2 tests/train_many.py SPEC.json`, where SPEC.json holds
{"config": YAML path, "runs": [{"name": ..., "overrides": {...}}, ...], "results": JSON path}. Each run
is the real `Trainer` on the launch's process group. Rank 0 writes {name: "ok" or the error} to
"results"; after a failed run the launch stops (the group may be out of step). The entry "fsdp2 probe"
says whether FSDP2 itself trains a toy model on these processes, without any crossvlm code.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from crossvlm.train.config import load_config
from crossvlm.train.loop import Trainer
from crossvlm.train.runtime import init_runtime, shutdown


def probe_fsdp2() -> str:
    import torch
    from torch.distributed.fsdp import fully_shard

    try:
        toy = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        fully_shard(toy)
        toy(torch.ones(2, 8)).sum().backward()
        torch.optim.AdamW(toy.parameters()).step()
        return "ok"
    except Exception as err:  # noqa: BLE001 — the reason is what the test reports when it skips
        return f"{type(err).__name__}: {err}"


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rt = init_runtime("cpu")
    results = {"fsdp2 probe": probe_fsdp2()}
    try:
        for run in spec["runs"]:
            try:
                Trainer(load_config(spec["config"], run["overrides"]), rt).run()
                results[run["name"]] = "ok"
            except Exception as err:  # noqa: BLE001 — recorded for the test to report
                results[run["name"]] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
                break
    finally:
        if rt.is_main:
            Path(spec["results"]).write_text(json.dumps(results, indent=1))
        shutdown(rt)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
