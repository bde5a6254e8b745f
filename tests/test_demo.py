"""`crossvlm demo` end to end on a tiny budget: every stage runs and every promised output appears."""

from __future__ import annotations

import json

import pytest

from crossvlm.data.synth import QUESTION_TYPES


# The MLP run also skips the tower's teaching step (--vision-steps 0).
@pytest.mark.parametrize("projector,tokens,vision_steps", [("cross_attn", 9, 2), ("mlp", 64, 0)])
def test_demo_runs_both_stages_and_reports(tmp_path, capsys, projector, tokens, vision_steps):
    from crossvlm.cli import main

    assert main(["demo", "--out", str(tmp_path), "--train-images", "64", "--test-images", "4",
                 "--vision-steps", str(vision_steps), "--pretrain-steps", "2", "--sft-steps", "3", "--projector", projector]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "demo_result.json").read_text())
    assert set(result["accuracy"]["per_type"]) == set(QUESTION_TYPES)
    assert result["accuracy"]["counts"] == {q: 4 for q in QUESTION_TYPES}
    assert result["visual_tokens"] == tokens
    if vision_steps:
        assert 0 <= result["vision_kind_accuracy"] <= 1 and "vision_s" in result["timings"]
    else:
        assert result["vision_kind_accuracy"] is None and "vision: skipped" in out
    assert " bad of " not in out.split("[demo] held-out")[0].lower()  # no record lost (the run now says "no bad records")
    for q in QUESTION_TYPES:
        assert q in out  # the table, with the chance level beside each type
    assert "chance" in out and "expected:" in out
    pictures = ("pretrain/curves.png", "sft/curves.png") + (("query_attention.png",) if projector == "cross_attn" else ())
    for picture in pictures:
        assert (tmp_path / picture).stat().st_size > 1000
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()
    if projector == "cross_attn":  # the demo's projector form survives both stages' save and load
        saved = json.loads((tmp_path / "sft" / "final" / "config.json").read_text())
        assert {k: saved[k] for k in ("projector_locality", "projector_position", "projector_kv_norm",
                                      "projector_init", "projector_output_scale")} == {
            "projector_locality": "cell", "projector_position": "keys", "projector_kv_norm": False,
            "projector_init": "pool", "projector_output_scale": 14}


def test_the_demo_process_exits_when_done(tmp_path):
    """Loader workers ignore SIGTERM (it is the trainer's to act on), so multiprocessing cannot stop
    one left behind when the interpreter exits: a run must stop its own workers, or the command never
    returns (seen: `crossvlm demo` printed its results, then waited forever)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "crossvlm.cli", "demo", "--out", str(tmp_path), "--train-images", "64",
         "--test-images", "4", "--vision-steps", "0", "--pretrain-steps", "2", "--sft-steps", "3",
         "--projector", "mlp"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
