"""The synthetic shapes set (crossvlm.data.synth) and `crossvlm data synth`."""

from __future__ import annotations

import hashlib
import io
import json
import random
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from crossvlm.data.records import RawRecord, normalize
from crossvlm.data.synth import (CHANCE, COLOURS, KINDS, POSITIONS, QUESTION_TYPES, SIZES, render_scene,
                                 sample_scene,
                                 score_answer, write_synthetic)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return write_synthetic(out, seed=7, n_train=60, n_test=20, image_size=64)


def rows(path):
    return pq.read_table(path).to_pylist()


def test_files_are_minimind_parquet_with_a_checkable_test_split(shapes):
    assert set(shapes) == {"pretrain_train", "pretrain_test", "sft_train", "sft_test"}
    assert len(rows(shapes["pretrain_train"])) == len(rows(shapes["sft_train"])) == 60
    test = rows(shapes["sft_test"])
    assert len(test) == 20 * len(QUESTION_TYPES)
    assert {r["question_type"] for r in test} == set(QUESTION_TYPES)
    for r in test + rows(shapes["sft_train"]) + rows(shapes["pretrain_train"]):
        conv = normalize(RawRecord(r["conversations"], [r["image_bytes"]], "x"))
        assert conv.messages[0]["content"].startswith("<image>\n")
        assert Image.open(io.BytesIO(r["image_bytes"])).size == (64, 64)
    for r in test:
        messages = json.loads(r["conversations"])
        assert messages[-1] == {"role": "assistant", "content": r["answer"]}
        assert len(messages) == (4 if r["question_type"] == "multi" else 2)
    answers = {qt: {r["answer"] for r in test if r["question_type"] == qt} for qt in QUESTION_TYPES}
    assert answers["colour"] <= set(COLOURS) and answers["shape"] <= set(KINDS)
    assert answers["count"] <= {"1", "2", "3"} and answers["position"] | answers["multi"] <= set(POSITIONS)
    train_turns = json.loads(rows(shapes["sft_train"])[0]["conversations"])
    assert len(train_turns) == 12  # four one-turn blocks and the two-turn exchange



def test_one_question_per_row_splits_the_same_conversations(shapes, tmp_path):
    rowwise = write_synthetic(tmp_path, seed=7, n_train=60, n_test=20, one_question_per_row=True)
    for name in ("pretrain_train", "pretrain_test", "sft_test"):
        assert rows(rowwise[name]) == rows(shapes[name])  # same images, captions and held-out questions
    conversations = {r["image_id"]: json.loads(r["conversations"]) for r in rows(shapes["sft_train"])}
    split = rows(rowwise["sft_train"])
    assert len(split) == 60 * len(QUESTION_TYPES)
    by_image = {}
    for r in split:
        messages = json.loads(r["conversations"])
        assert messages[0]["content"].startswith("<image>\n") and len(messages) in (2, 4)
        by_image.setdefault(r["image_id"], []).append(messages)
    for image_id, blocks in by_image.items():
        # Concatenated in order (the image mark only on the first), the blocks are the image's conversation.
        joined = [dict(m, content=m["content"].removeprefix("<image>\n")) for b in blocks for m in b]
        whole = conversations[image_id]
        assert joined == [whole[0] | {"content": whole[0]["content"].removeprefix("<image>\n")}, *whole[1:]]

def test_deterministic_and_held_out_images_are_new(shapes, tmp_path):
    again = write_synthetic(tmp_path / "again", seed=7, n_train=60, n_test=20)
    other = write_synthetic(tmp_path / "other", seed=8, n_train=60, n_test=20)
    for name in shapes:
        assert rows(shapes[name]) == rows(again[name])
    assert rows(shapes["sft_train"]) != rows(other["sft_train"])
    digest = lambda rs: {hashlib.sha1(r["image_bytes"]).hexdigest() for r in rs}  # noqa: E731
    assert not digest(rows(shapes["sft_test"])) & digest(rows(shapes["sft_train"]))


def test_scenes_are_unambiguous_and_cover_the_attributes():
    rng = random.Random(0)
    seen = {"kind": set(), "colour": set(), "size": set(), "cell": set(), "n": set()}
    for _ in range(500):
        scene = sample_scene(rng)
        for attr in ("kind", "colour", "cell"):
            values = [getattr(s, attr) for s in scene]
            assert len(set(values)) == len(values)
        for attr in ("kind", "colour", "size", "cell"):
            seen[attr] |= {getattr(s, attr) for s in scene}
        seen["n"].add(len(scene))
    assert seen["kind"] == set(KINDS) and len(KINDS) >= 4 and len(seen["colour"]) == 6
    assert seen["size"] == set(SIZES) and len(seen["cell"]) == 9 and seen["n"] == {1, 2, 3}


def test_captions_parse_back_into_their_scenes(shapes):
    from crossvlm.data.synth import caption, parse_caption, sample_scene

    rng = random.Random(3)
    for _ in range(500):
        scene = sample_scene(rng)
        assert parse_caption(caption(scene)) == scene
    for row in pq.read_table(shapes["pretrain_test"], columns=["conversations"]).to_pylist()[:50]:
        text = json.loads(row["conversations"])[-1]["content"]
        assert 1 <= len(parse_caption(text)) <= 3
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("Two shapes.")


def test_chance_levels_and_scoring():
    assert set(CHANCE) == set(QUESTION_TYPES)
    assert CHANCE["colour"] == pytest.approx(1 / 6) and CHANCE["count"] == pytest.approx(1 / 3)
    assert CHANCE["position"] == pytest.approx(1 / 9)
    assert score_answer(" Red.", "red") and score_answer("the circle", "circle")
    assert score_answer("two", "2") and score_answer("Top Left!", "top left")
    assert score_answer("center", "centre") and score_answer("top middle", "top")
    assert not score_answer("blue", "red") and not score_answer("top left", "top")
    assert not score_answer("red circle", "red")


def test_rendering_is_fast():
    start = time.perf_counter()
    rng = random.Random(0)
    for _ in range(500):
        render_scene(sample_scene(rng), rng, 64)
    assert time.perf_counter() - start < 2.5  # 10k images well under a minute


def test_synth_cli(tmp_path, capsys):
    from crossvlm.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--seed", "1", "--train", "8", "--test", "2"]) == 0
    assert "sft_test" in capsys.readouterr().out
    assert len(rows(tmp_path / "sft_test.parquet")) == 10
