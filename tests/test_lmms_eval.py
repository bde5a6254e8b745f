"""crossvlm as an lmms-eval model: the plugin entry point, the `lmms` interface, and a local task run
through the `lmms-eval` command whose scores must equal `crossvlm eval`'s on the same examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (.ci/run installs it; see docs/EVALUATION.md)")

from lmms_eval.api.instance import Instance  # noqa: E402

from crossvlm.cli import main  # noqa: E402
from crossvlm.inference import ChatModel, SamplingParams  # noqa: E402
from crossvlm.integrations.lmms_eval.model import CrossVLMLmms, sampling_from_gen_kwargs  # noqa: E402
from crossvlm.integrations.lmms_eval.tasks import task_yaml  # noqa: E402
from serving import shapes_image  # noqa: E402

TASK = "crossvlm_local"


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir) -> ChatModel:
    return ChatModel.load(tiny_vlm_dir, device="cpu")


def _requests(model: CrossVLMLmms, docs: list[dict], gen_kwargs: list[dict]) -> list[Instance]:
    """Instances as lmms-eval builds them for a simple model's generate_until."""
    from crossvlm.integrations.lmms_eval.tasks import doc_to_text, doc_to_visual

    model.task_dict = {"t": {"test": docs}}
    return [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                     arguments=(doc_to_text(doc), dict(kw), doc_to_visual, i, "t", "test"))
            for i, (doc, kw) in enumerate(zip(docs, gen_kwargs))]


def _doc(image: Path, question: str, answer: str = "x") -> dict:
    return {"image": str(image), "conversations": [{"from": "human", "value": question},
                                                   {"from": "gpt", "value": answer}]}


def test_entry_point_registers_the_model():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    registered = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert registered.get("crossvlm") == "crossvlm.integrations.lmms_eval:manifest", \
        "install this checkout (pip install -e .) so its lmms_eval.models entry point is registered"
    assert get_model("crossvlm") is CrossVLMLmms


def test_generate_until_batches_and_answers_as_crossvlm_does(tiny_vlm_dir, chat, tmp_path):
    model = CrossVLMLmms(pretrained=str(tiny_vlm_dir), device="cpu", batch_size="2")
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        shapes_image(10 + i).save(images[-1])
    docs = [_doc(images[0], "<image>\nWhat colour is the shape?"),  # the prompt places its image
            _doc(images[1], "How many shapes are there?"),  # MME style: no mark, the image leads
            _doc(images[2], "Where is the circle?"),
            {"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hi"}]}]
    budgets = [{"max_new_tokens": 6, "until": []}, {"max_new_tokens": 9, "temperature": 0},
               {"max_new_tokens": 4, "do_sample": False, "until": "\n\n"}, {"max_new_tokens": 5}]
    answers = model.generate_until(_requests(model, docs, budgets))

    # Each answer is the one ChatModel gives that prompt alone, with that prompt's budget and stop.
    prompts = ["<image>\nWhat colour is the shape?", "<image>\nHow many shapes are there?",
               "<image>\nWhere is the circle?", "Say hello."]
    stops = [(), (), ("\n\n",), ()]
    pictures = [[shapes_image(10)], [shapes_image(11)], [shapes_image(12)], []]
    expected = [chat.chat([{"role": "user", "content": p}], imgs,
                          SamplingParams(max_new_tokens=kw["max_new_tokens"], greedy=True, stop=s)).text
                for p, imgs, kw, s in zip(prompts, pictures, budgets, stops)]
    assert answers == expected
    assert len(set(answers)) > 1  # the prompts are told apart


def test_task_generation_kwargs_map_onto_crossvlm_sampling():
    mme = sampling_from_gen_kwargs({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                    "do_sample": False, "until": ["ASSISTANT:"]}, 256)
    assert (mme.is_greedy, mme.max_new_tokens, mme.stop) == (True, 16, ("ASSISTANT:",))
    sampled = sampling_from_gen_kwargs({"temperature": 0.7, "do_sample": True, "top_p": 0.9, "until": "END"}, 32)
    assert (sampled.is_greedy, sampled.temperature, sampled.top_p, sampled.top_k, sampled.max_new_tokens,
            sampled.stop) == (False, 0.7, 0.9, 0, 32, ("END",))
    assert sampling_from_gen_kwargs({"temperature": 0.7}, 8).is_greedy  # sampling only when asked for


def test_bad_requests_and_arguments_say_what_is_wrong(tiny_vlm_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown crossvlm model_args: colour.*batch_size must be .* got 'auto'"):
        CrossVLMLmms(pretrained=str(tiny_vlm_dir), device="cpu", colour="red", batch_size="auto")
    model = CrossVLMLmms(pretrained=str(tiny_vlm_dir), device="cpu")
    shapes_image(0).save(tmp_path / "a.png")
    two_marks = _doc(tmp_path / "a.png", "<image><image>\ncompare")
    with pytest.raises(ValueError, match="t/test doc 0: the prompt has 2 <image> marks but the task gives 1"):
        model.generate_until(_requests(model, [two_marks], [{}]))
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate_until(_requests(model, [_doc(tmp_path / "a.png", "hi")], [{"num_beams": 3}]))
    with pytest.raises(NotImplementedError, match="generate_until"):
        model.loglikelihood([])


@pytest.mark.slow
def test_lmms_eval_command_scores_a_local_task_as_crossvlm_eval_does(tiny_vlm_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    questions = ["How many shapes?", "What colour is the square?", "Where is the circle?",
                 "Is there a star?", "What is at the top?", "Name the largest shape."]
    docs = []
    for i, question in enumerate(questions):
        shapes_image(30 + i).save(images / f"{i}.png")
        docs.append(_doc((images / f"{i}.png").resolve(), f"<image>\n{question}", "zebra"))
    data = tmp_path / "vqa.json"

    def crossvlm_eval() -> tuple[dict, list[dict]]:
        data.write_text(json.dumps(docs))
        out = tmp_path / "predictions.jsonl"
        assert main(["eval", "--model", str(tiny_vlm_dir), "--data", str(data), "--task", "vqa", "--out", str(out),
                     "--batch-size", "4", "--max-new-tokens", "6", "--device", "cpu"]) == 0
        return json.loads(capsys.readouterr().out), [json.loads(line) for line in out.read_text().splitlines()]

    # Make half the references the model's own answers, so the scores are neither 0 nor 1.
    _, first = crossvlm_eval()
    for i in (0, 2, 3):
        docs[i]["conversations"][1]["value"] = first[i]["prediction"]
    ours, predictions = crossvlm_eval()
    assert ours["n"] == 6 and ours["exact_match"] == pytest.approx(0.5)

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(task_yaml(TASK, data, max_new_tokens=6))
    out = tmp_path / "lmms_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        # `python -m lmms_eval` is the `lmms-eval` command, run by this interpreter (so it sees this
        # environment's crossvlm even where lmms-eval itself is installed outside it).
        [sys.executable, "-m", "lmms_eval", "--model", "crossvlm", "--model_args", f"pretrained={tiny_vlm_dir},device=cpu",
         "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(out),
         "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    found = sorted(out.rglob("*_results.json"))
    assert found, "lmms-eval wrote no results:\n" + run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(found[0].read_text())["results"][TASK]
    assert results["exact_match,none"] == pytest.approx(ours["exact_match"])
    assert results["contains,none"] == pytest.approx(ours["contains"])
    samples = [json.loads(line) for line in next(out.rglob(f"*_samples_{TASK}.jsonl")).read_text().splitlines()]
    by_doc = {s["doc_id"]: s["filtered_resps"] for s in samples}
    assert [by_doc[i] for i in range(6)] == [p["prediction"] for p in predictions]
