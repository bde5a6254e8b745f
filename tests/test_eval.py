"""`crossvlm eval` and its metrics: VQA accuracies, per-question-type breakdown, CIDEr/BLEU."""

from __future__ import annotations

import json

import pytest

from crossvlm.cli import main
from crossvlm.data import synth
from crossvlm.evaluate import caption_metrics, read_examples, vqa_metrics, vqa_scores
from crossvlm.inference import ChatModel, SamplingParams
from serving import shapes_image


def _run_eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_on_the_shapes_set_breaks_down_by_question_type(tiny_vlm_dir, tmp_path, capsys):
    paths = synth.write_synthetic(tmp_path / "shapes", seed=1, n_train=0, n_test=4)
    out = tmp_path / "predictions.jsonl"
    metrics = _run_eval(capsys, "--model", tiny_vlm_dir, "--data", paths["sft_test"], "--out", out,
                        "--batch-size", 8, "--max-new-tokens", 6, "--limit", 15, "--device", "cpu")
    assert metrics["task"] == "vqa" and metrics["n"] == 15 and metrics["skipped"] == {}
    by_type = metrics["by_question_type"]
    assert list(by_type) == list(synth.QUESTION_TYPES)
    assert sum(t["n"] for t in by_type.values()) == 15
    assert all(t["chance"] == synth.CHANCE[name] for name, t in by_type.items())

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 15
    for row in rows:
        assert row["exact_match"] == synth.score_answer(row["prediction"], row["references"][0])
    exact = sum(r["exact_match"] for r in rows) / 15
    assert metrics["exact_match"] == pytest.approx(exact)

    # Batched evaluation answers exactly what the model answers one question at a time.
    chat = ChatModel.load(tiny_vlm_dir, device="cpu")
    first = next(read_examples(paths["sft_test"]))
    alone = chat.chat(first.messages, first.images, SamplingParams(max_new_tokens=6, greedy=True))
    assert rows[0]["prediction"] == alone.text
    assert first.references == [rows[0]["references"][0]] and first.question_type == "colour"


def test_eval_on_llava_captions_reports_cider_bleu_and_skipped_rows(tiny_vlm_dir, tmp_path, capsys):
    records = []
    for i in range(4):
        shapes_image(50 + i).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A picture of {i + 1} round shapes on a coloured background."}]})
    records.append({"image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "Nothing here at all."}]})
    data = tmp_path / "captions.json"
    data.write_text(json.dumps(records))
    metrics = _run_eval(capsys, "--model", tiny_vlm_dir, "--data", data, "--out", tmp_path / "p.jsonl",
                        "--max-new-tokens", 8, "--batch-size", 3, "--device", "cpu")
    assert metrics["task"] == "caption" and metrics["n"] == 4
    assert {"cider", "bleu_1", "bleu_4"} <= set(metrics)
    assert metrics["skipped"] == {"image_not_found": 1}
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4


def test_vqa_scores_normalise_and_match_whole_words():
    assert vqa_scores("Two.", ["2"]) == {"exact_match": True, "contains": True}
    assert vqa_scores("there are 2 shapes", ["two"]) == {"exact_match": False, "contains": True}
    assert vqa_scores("a bluebird", ["blue"])["contains"] is False
    assert vqa_scores("The Center.", ["centre"], question_type="position")["exact_match"] is True
    rows = [{"question_type": "count", "exact_match": True, "contains": True},
            {"question_type": "count", "exact_match": False, "contains": True},
            {"question_type": "colour", "exact_match": False, "contains": False}]
    metrics = vqa_metrics(rows)
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["contains"] == pytest.approx(2 / 3)
    assert list(metrics["by_question_type"]) == ["colour", "count"]
    assert metrics["by_question_type"]["count"] == {"n": 2, "exact_match": 0.5, "contains": 1.0,
                                                    "chance": synth.CHANCE["count"]}


def test_caption_metrics_reward_the_right_caption():
    refs = [["a red circle at the top left", "a red circle in the top left corner"],
            ["two blue squares at the bottom"], ["a green triangle in the centre"]]
    perfect = caption_metrics(["A red circle at the top left.", "Two blue squares at the bottom.",
                               "A green triangle in the centre."], refs)
    wrong = caption_metrics(["a green triangle", "a red circle at the top left", "two blue squares"], refs)
    assert perfect["bleu_1"] == pytest.approx(1.0) and perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["cider"] > 1.0 > wrong["cider"]
    assert perfect["n"] == 3
