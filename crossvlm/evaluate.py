"""Evaluation: read a data set, answer its prompts in batches, score the answers.

An example is a conversation whose last assistant turn is the reference and whatever precedes it
the prompt, read by the data readers from any format they accept. Short answers (VQA style) get
exact-match and contains accuracy after normalisation; captions get CIDEr-D and BLEU-1..4 from
pycocoevalcap (the COCO caption scorers; their Java tokenizer is replaced by a plain one here).
Rows that carry a `question_type` (the synthetic shapes set) are also scored per type, next to the
chance level of that type, with the shapes set's own answer normalisation.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections import Counter, defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from itertools import islice
from typing import Callable, Iterable, Iterator

from crossvlm.errors import CrossVLMError, DataError

TASKS = ("auto", "vqa", "caption")
# References of at most this many words (on average) make a short-answer set under --task auto.
SHORT_ANSWER_WORDS = 3.0
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


@dataclass
class Example:
    """One thing to answer: the conversation before the reference answer, and its images."""

    messages: list[dict]
    images: list
    references: list[str]
    location: str
    question_type: str | None = None


@dataclass
class Skipped:
    """Rows that could not be evaluated, counted by kind (with the first few places)."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {where}")


_META_KEYS = ("question_type", "answer", "answers")


class _Metadata:
    """Per-row `question_type` / `answer(s)` fields, which conversations do not carry, read lazily
    through the file's own reader: a row's fields cost one read of that row (parquet: only these columns,
    which are small), so `--limit 5` on a huge file reads 5 rows, and a broken line is the reader's
    `RecordError` (skipped and counted), never a parse of the whole file."""

    def __init__(self, reader):
        self.reader, self.table = reader, None
        from crossvlm.data.readers import ParquetReader

        self.columnar = isinstance(reader, ParquetReader)  # MiniMind-V or Cauldron schema
        if self.columnar:
            import pyarrow.parquet as pq

            columns = [k for k in _META_KEYS if k in pq.read_schema(reader.path).names]
            self.table = pq.read_table(reader.path, columns=columns) if columns else None

    def __call__(self, row: int) -> dict:
        if self.columnar:
            return self.table.slice(row, 1).to_pylist()[0] if self.table is not None else {}
        record = self.reader.record(row)
        return {k: record.get(k) for k in _META_KEYS}


@contextmanager
def replacing(path: str | Path):
    """A text file written beside `path` and moved into place only when the block ends without an
    error: a failed run leaves an earlier file of that name as it was, and no partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_examples(path: str | Path, *, fmt: str | None = None, image_root: str | Path | None = None,
                  limit: int | None = None, skipped: Skipped | None = None) -> Iterator[Example]:
    """Examples of every data file under `path`, in order; bad rows go to `skipped`."""
    from crossvlm.data.readers import find_files, open_reader
    from crossvlm.data.records import RecordError, normalize

    skipped = skipped if skipped is not None else Skipped()
    made = 0
    for file in find_files(path):
        reader = open_reader(file, fmt, image_root)
        meta = _Metadata(reader)
        for row in range(len(reader)):
            if limit is not None and made >= limit:
                return
            where = reader.location(row)
            try:
                conv = normalize(reader.read(row))
                info = meta(row)
            except RecordError as err:
                skipped.add(err.kind, where)
                continue
            last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
            prompt = conv.messages[:last]
            if not any(m["role"] == "user" for m in prompt):
                skipped.add("no_question", where)
                continue
            references = info.get("answers") or [conv.messages[last]["content"]]
            n_images = sum(m["content"].count("<image>") for m in prompt)
            made += 1
            yield Example(prompt, conv.images[:n_images], [str(r) for r in references], where,
                          info.get("question_type"))


# -- short answers --------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, number words as digits: 'Two.' → '2'."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_scores(prediction: str, references: list[str], question_type: str | None = None) -> dict:
    """exact_match: the normalised prediction equals a normalised reference; contains: a reference
    appears in the prediction as whole words. Shapes-set rows use the set's own normalisation."""
    if question_type is not None:
        from crossvlm.data import synth

        norm: Callable[[str], str] = synth.normalize_answer
        exact = any(synth.score_answer(prediction, r) for r in references)
    else:
        norm = normalize_answer
        exact = any(norm(prediction) == norm(r) for r in references)
    pred = f" {norm(prediction)} "
    contains = any(norm(r) and f" {norm(r)} " in pred for r in references)
    return {"exact_match": exact, "contains": contains or exact}


def vqa_metrics(rows: list[dict]) -> dict:
    """Accuracies over all rows and, where rows have a question type, per type with its chance level."""
    def summary(group: list[dict]) -> dict:
        n = len(group)
        return {"n": n, "exact_match": sum(r["exact_match"] for r in group) / n,
                "contains": sum(r["contains"] for r in group) / n}

    out = summary(rows) if rows else {"n": 0}
    by_type = defaultdict(list)
    for row in rows:
        if row.get("question_type"):
            by_type[row["question_type"]].append(row)
    if by_type:
        from crossvlm.data.synth import CHANCE, QUESTION_TYPES

        order = [t for t in QUESTION_TYPES if t in by_type] + sorted(set(by_type) - set(QUESTION_TYPES))
        out["by_question_type"] = {t: {**summary(by_type[t]), "chance": CHANCE.get(t)} for t in order}
    return out


# -- captions -------------------------------------------------------------------------------------
def caption_tokens(text: str) -> str:
    """Lower-cased words without punctuation: what COCO's PTB tokenizer gives for plain captions."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """CIDEr-D and BLEU-1..4 (corpus level) with pycocoevalcap's scorers."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:
        raise CrossVLMError("caption metrics need pycocoevalcap: pip install 'crossvlm[eval]' "
                            "(or pip install pycocoevalcap)") from err
    if not predictions:
        return {"n": 0}
    res = {i: [caption_tokens(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"n": len(predictions), "cider": float(cider), **{f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}}


def pick_task(task: str, examples: list[Example]) -> str:
    """`vqa` or `caption`; `auto` decides by the mean length of the (first batch's) references."""
    if task != "auto":
        return task
    words = [len(r.split()) for e in examples for r in e.references]
    return "vqa" if words and sum(words) / len(words) <= SHORT_ANSWER_WORDS else "caption"


class _Answer:
    """The completion of one submitted prompt, waited for by the evaluating thread."""

    def __init__(self):
        self._ready = threading.Event()
        self._value = None

    def __call__(self, event) -> None:  # from the engine's thread
        self._value = event
        self._ready.set()

    def get(self):
        self._ready.wait()
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value


def evaluate(chat, examples: Iterable[Example], *, task: str = "auto", batch_size: int = 256,
             max_new_tokens: int = 64, enable_thinking: bool = False, skipped: Skipped | None = None,
             on_prediction: Callable[[dict], None] | None = None, progress: bool = False) -> dict:
    """Answer the examples greedily and score the answers; returns the metrics.

    Examples are read `batch_size` at a time and handed to the generation engine, which answers
    them as slots free up; the next group is read and prepared (images decoded, prompts tokenized)
    while the engine works, so up to 2 × `batch_size` prompts are in flight and a large set is never
    held in memory. `on_prediction` receives one record per example, in order (its prediction,
    references and scores); prompts that cannot be answered (an undecodable image, too long) are
    counted in `skipped`.
    """
    from crossvlm.inference import InputError, SamplingParams

    if task not in TASKS:
        raise CrossVLMError(f"unknown task {task!r}; choose one of {TASKS}")
    sampling = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    skipped = skipped if skipped is not None else Skipped()
    rows, predictions, references = [], [], []
    in_flight: deque[tuple[Example, _Answer]] = deque()
    stream = iter(examples)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="example", desc="eval")

    def record(ex: Example, answer: _Answer) -> None:
        text = answer.get().text
        row = {"location": ex.location, "question": _last_user_text(ex.messages), "prediction": text,
               "references": ex.references}
        if ex.question_type is not None:
            row["question_type"] = ex.question_type
        if task == "vqa":
            row.update(vqa_scores(text, ex.references, ex.question_type))
        rows.append(row)
        predictions.append(text)
        references.append(ex.references)
        if on_prediction is not None:
            on_prediction(row)
        if bar is not None:
            bar.update(1)

    while chunk := list(islice(stream, max(1, batch_size))):
        task = pick_task(task, chunk)
        for ex in chunk:
            try:
                prompt = chat.prompt(ex.messages, ex.images, enable_thinking)
            except InputError as err:
                skipped.add(err.code, ex.location)
                continue
            answer = _Answer()
            chat.submit(prompt, sampling, answer)
            in_flight.append((ex, answer))
        while len(in_flight) > batch_size:
            record(*in_flight.popleft())
    while in_flight:
        record(*in_flight.popleft())
    if bar is not None:
        bar.close()
    if not rows:
        raise DataError(f"no example could be evaluated (skipped: {dict(skipped.counts) or 'none'})")
    metrics = vqa_metrics(rows) if task == "vqa" else caption_metrics(predictions, references)
    return {"task": task, **metrics, "skipped": dict(skipped.counts)}


def _last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
