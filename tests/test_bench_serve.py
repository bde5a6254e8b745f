"""`crossvlm bench serve` end to end on the tiny models: the real server, client processes, offline, generate()."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_serve_drives_the_server_and_counts_every_token(tiny_models, tmp_path, capsys):
    from crossvlm.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--preset", "tiny", "--models", str(tiny_models), "--requests", "5",
                 "--concurrency", "1", "3", "--prompt-tokens", "10,40", "--output-tokens", "4,12",
                 "--short-requests", "6", "--baseline-requests", "2", "--client-processes", "2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    wanted = report["config"]
    # Every asked-for token arrives (ignore_eos), at every concurrency, and offline.
    assert set(report["server"]) == {"long@1", "long@3", "short@1", "short@3"}
    for name, run in report["server"].items():
        assert run["failed"] == 0 and run["output_tokens_per_s"] > 0
        assert run["ttft_ms"]["p50"] > 0 and run["itl_ms"]["p50"] > 0
    assert report["server"]["short@3"]["output_tokens"] == 6 * wanted["short_tokens"]
    assert report["server"]["short@1"]["output_tokens"] == 6 * wanted["short_tokens"]  # all 6: fewer than 32
    assert report["offline"]["short"]["output_tokens"] == 6 * wanted["short_tokens"]
    assert report["server"]["long@1"]["output_tokens"] == report["server"]["long@3"]["output_tokens"] \
        == report["offline"]["long"]["output_tokens"]
    assert 5 * 4 <= report["offline"]["long"]["output_tokens"] <= 5 * 12
    assert report["baseline"]["requests"] == 2 and report["offline"]["long"]["vs_generate"] > 0
    # The time split by the engine's timers: each run's steps, and a first token's time inside the engine
    # covers its wait for a slot (the server's runs also time the preparation of images and text)
    for run in [*report["server"].values(), report["offline"]["long"], report["offline"]["short"]]:
        b = run["breakdown"]
        assert b["steps"] > 0 and 0 < b["tokens_per_step"] and 0 < b["host_share"] < 1.5  # (a step over the edge: `breakdown`)
        assert 0 <= b["first_token_ms"]["queue"] < b["first_token_ms"]["engine"]
    assert all(r["breakdown"]["first_token_ms"]["prepare"] > 0 for r in report["server"].values())
    # one stream: a step yields at most its decode token and, in a prefill's step, the first token
    assert report["server"]["long@1"]["breakdown"]["tokens_per_step"] <= 2
    printed = capsys.readouterr().out
    assert "| server, long, concurrency 3 | 5 |" in printed and "first token: prepare" in printed


def test_bench_serve_runs_one_part_alone(tiny_models, tmp_path):
    """`--no-server` / `--no-offline`: a GPU call may hold only one compiled engine's start, so each part runs alone."""
    from crossvlm.cli import main

    common = ["bench", "serve", "--preset", "tiny", "--models", str(tiny_models), "--requests", "2", "--concurrency",
              "2", "--prompt-tokens", "10,20", "--output-tokens", "3,5", "--short-requests", "2",
              "--baseline-requests", "0", "--client-processes", "1"]
    out = tmp_path / "offline.json"
    assert main(common + ["--no-server", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["server"] == {} and report["offline"]["short"]["output_tokens"] == 2 * report["config"]["short_tokens"]
    out = tmp_path / "server.json"
    assert main(common + ["--no-offline", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["offline"] == {} and set(report["server"]) == {"long@2", "short@1", "short@2"}
    with pytest.raises(SystemExit):  # not both
        main(common + ["--no-offline", "--no-server"])
