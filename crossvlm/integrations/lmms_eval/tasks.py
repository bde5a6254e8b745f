"""Task functions for running a crossvlm VQA set (LLaVA JSON / JSONL) as an lmms-eval task.

`task_yaml(name, data_file)` writes the task YAML that points lmms-eval's `json` loader at the file
and these functions at its rows; save it as NAME.yaml in a folder and run
`lmms-eval --model crossvlm --model_args pretrained=DIR --tasks NAME --include_path FOLDER`.

Rows are single-question records: `image` (a path, or a list of them, absolute or relative to the
directory lmms-eval runs in), `conversations` = [{from: human, value: "<image>\\nquestion"},
{from: gpt, value: answer}], and optionally `answers` (several accepted answers). Scores are those
of `crossvlm eval` (`crossvlm.evaluate.vqa_scores`), so both report the same numbers for the same
answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from crossvlm.data.records import ROLE_ALIASES
from crossvlm.evaluate import vqa_scores
from crossvlm.inference import open_image

_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_visual: !function {module}.doc_to_visual
doc_to_text: !function {module}.doc_to_text
doc_to_target: !function {module}.doc_to_target
process_results: !function {module}.process_results
generation_kwargs: {{max_new_tokens: {max_new_tokens}, until: []}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
  - {{metric: contains, aggregation: mean, higher_is_better: true}}
"""


def task_yaml(task: str, data_file: str | Path, max_new_tokens: int = 64) -> str:
    """An lmms-eval task over a LLaVA JSON / JSONL VQA file, scored like `crossvlm eval --task vqa`
    (greedy answers of at most `max_new_tokens`, no stop strings)."""
    return _TASK_YAML.format(task=task, data=json.dumps(str(Path(data_file).resolve())), module=__name__,
                             max_new_tokens=max_new_tokens)


def _turns(doc: dict) -> tuple[str, str]:
    """(question, reference) of a single-question record."""
    turns = [(ROLE_ALIASES.get(t.get("from") or t.get("role")), t.get("value") or t.get("content") or "")
             for t in doc["conversations"]]
    users = [text for role, text in turns if role == "user"]
    answers = [text for role, text in turns if role == "assistant"]
    if len(users) != 1 or len(answers) != 1:
        raise ValueError(f"an lmms-eval row must hold one question and one answer, got {len(users)} and "
                         f"{len(answers)} (image {doc.get('image')!r})")
    return users[0], answers[0]


def doc_to_visual(doc: dict) -> list:
    paths = doc.get("image") or []
    return [open_image(p) for p in ([paths] if isinstance(paths, str) else paths)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return _turns(doc)[0]


def doc_to_target(doc: dict) -> str:
    return _turns(doc)[1]


def _references(doc: dict) -> list[str]:
    return [str(a) for a in doc.get("answers") or [doc_to_target(doc)]]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match and contains of the answer, as `crossvlm eval` scores it."""
    scores = vqa_scores(results[0], _references(doc))
    return {name: float(value) for name, value in scores.items()}
