"""High-resolution images as tiles (issue 30): grids, views, tile places, save/load, the engine, packing,
training, and the CPU learning check (a mark only a tiled view can read)."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crossvlm
from crossvlm.engine import EngineConfig, SamplingParams
from crossvlm.errors import ConfigError, ImageTokenMismatch
from crossvlm.model import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor
from crossvlm.model.tiling import Tiling, select_grid, tile_layout
from serving import data_url, live_server

SIDE = 64  # the tiny tower's input side


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiled_dir(tiny_models, tmp_path_factory) -> Path:
    """A saved tiled CrossVLM: up to 4 tiles, 16 queries for the thumbnail, 4 per tile."""
    torch.manual_seed(0)
    model = CrossVLM.from_base_models(tiny_models / "llm", tiny_models / "vision", num_queries=16,
                                      projector_heads=4, max_tiles=4, tile_queries=4)
    out = tmp_path_factory.mktemp("tiled_vlm")
    model.save_pretrained(out)
    CrossVLMProcessor.from_base_models(tiny_models / "llm", tiny_models / "vision", model.num_image_tokens,
                                       Tiling.from_config(model.config)).save_pretrained(out)
    return out


# -- layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, max_tiles, grid", [
    ((2 * SIDE, 2 * SIDE), 4, (2, 2)),  # square, twice the tower: 2 x 2 at full resolution
    ((4 * SIDE, SIDE), 4, (1, 4)),  # wide
    ((SIDE, 3 * SIDE), 4, (3, 1)),  # tall
    ((2 * SIDE, SIDE), 4, (1, 2)),  # 2:1 takes two tiles, not four
    ((3 * SIDE, 3 * SIDE), 4, (2, 2)),  # larger than the budget: the best shape within it
    ((3 * SIDE, 3 * SIDE), 9, (3, 3)),
    ((SIDE // 2, SIDE), 4, (1, 1)),  # no larger than one tile: no tiles
    ((5 * SIDE, 2 * SIDE), 6, (2, 3)),  # 2.5:1 with six: 2 x 3 keeps the most pixels
    ((3 * SIDE, 2 * SIDE), 1, (1, 1)),  # max_tiles 1: always one view
])
def test_grid_fits_the_aspect_ratio_within_the_budget(size, max_tiles, grid):
    assert select_grid(*size, max_tiles, SIDE) == grid


def test_layout_orders_each_images_thumbnail_then_its_tiles():
    layout = tile_layout([(1, 2), (1, 1)], image_tokens=3, tile_tokens=2)
    assert layout.tokens == [3 + 2 * 2, 3]
    assert layout.places.tolist() == [[0, 0], [1, 1], [1, 2], [0, 0]]
    assert layout.is_tile.tolist() == [False, True, True, False]
    # thumbnails' tokens come first in the projector's output (2 images x 3), then the tiles' (2 x 2)
    assert layout.order.tolist() == [0, 1, 2, 6, 7, 8, 9, 3, 4, 5]


def test_processor_views_are_the_thumbnail_and_the_full_resolution_crops(tiled_dir):
    processor = CrossVLMProcessor.from_pretrained(tiled_dir)
    wide = _image(2 * SIDE, SIDE, seed=1)
    small = _image(40, 30, seed=2)
    grids = processor.image_grids([wide, small])
    assert grids == [(1, 2), (1, 1)]
    assert processor.image_token_counts(grids) == [16 + 2 * 4, 16]
    pixels = processor.preprocess_images([wide, small], grids)
    assert pixels.shape == (1 + 2 + 1, 3, SIDE, SIDE)
    halves = [Image.fromarray(np.asarray(wide)[:, c * SIDE:(c + 1) * SIDE]) for c in range(2)]  # cut by hand
    single = processor.image_processor(images=[wide, *halves, small], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, torch.as_tensor(single).float())


# -- the model -----------------------------------------------------------------------------------------
def test_a_tiles_place_reaches_the_projectors_output(tiled_dir):
    model = CrossVLM.from_pretrained(tiled_dir).eval()
    features = torch.randn(2, model.config.num_patches, model.config.vision_config.hidden_size)
    with torch.no_grad():
        torch.nn.init.normal_(model.projector.place_rows, std=0.5)  # larger, as if trained
        torch.nn.init.normal_(model.projector.place_cols, std=0.5)
        a = model.projector(features, torch.tensor([[1, 1], [1, 2]]), tiles=True)  # (2, 4, D)
        b = model.projector(features, torch.tensor([[2, 1], [1, 1]]), tiles=True)
        assert a.shape == (2, 4, model.config.text_config.hidden_size)
        assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])  # row, then column
        model.projector.place_rows.zero_()
        model.projector.place_cols.zero_()
        a = model.projector(features, torch.tensor([[1, 1], [1, 2]]), tiles=True)
        b = model.projector(features, torch.tensor([[2, 1], [1, 1]]), tiles=True)
    torch.testing.assert_close(a, b)  # with the codes zeroed, the place was the only difference


def test_tiled_tokens_go_where_their_image_is(tiled_dir):
    """encode_images puts image 0's thumbnail and tiles before image 1's."""
    model = CrossVLM.from_pretrained(tiled_dir).eval()
    processor = CrossVLMProcessor.from_pretrained(tiled_dir)
    images = [_image(2 * SIDE, SIDE, seed=3), _image(SIDE, SIDE, seed=4)]
    grids = processor.image_grids(images)
    with torch.no_grad():
        both = model.encode_images(processor.preprocess_images(images, grids), torch.tensor(grids))
        first = model.encode_images(processor.preprocess_images(images[:1], grids[:1]), torch.tensor(grids[:1]))
        second = model.encode_images(processor.preprocess_images(images[1:], grids[1:]), torch.tensor(grids[1:]))
    assert both.shape == (24 + 16, model.config.text_config.hidden_size)
    torch.testing.assert_close(both, torch.cat([first, second]))


def test_a_span_that_does_not_hold_its_tiles_is_refused(tiled_dir):
    model = CrossVLM.from_pretrained(tiled_dir)
    ids = model.config
    row = [ids.vision_start_token_id] + [ids.image_token_id] * 16 + [ids.vision_end_token_id]
    with pytest.raises(ImageTokenMismatch, match="sample 0 has 16 where its images' tiles take 24"):
        model.check_image_tokens(torch.tensor([row]), 3, [(1, 2)])
    model.check_image_tokens(torch.tensor([row]), 1, [(1, 1)])


def test_settings_are_checked():
    from crossvlm.model.configuration import CrossVLMConfig

    with pytest.raises(ConfigError) as err:
        CrossVLMConfig(max_tiles=0, tile_queries=5)
    assert "max_tiles=0" in str(err.value) and "tile_queries=5" in str(err.value)
    with pytest.raises(ConfigError, match="needs projector_type='cross_attn'"):
        CrossVLMConfig(max_tiles=4, projector_type="mlp")
    with pytest.raises(ConfigError, match="needs max_tiles > 1"):
        CrossVLMConfig(tile_queries=16)
    from crossvlm.train.config import ModelSection

    assert ModelSection(max_tiles=0, tile_queries=8).problems() == [
        "model.max_tiles 0 must be a whole number >= 1 (1: no tiles)", "model.tile_queries 8 must be a square number"]
    assert ModelSection(tile_queries=16).problems() == ["model.tile_queries needs model.max_tiles > 1"]


def test_save_load_round_trip_keeps_tiling_and_outputs(tiled_dir, tmp_path):
    model = CrossVLM.from_pretrained(tiled_dir).eval()
    processor = CrossVLMProcessor.from_pretrained(tiled_dir)
    assert json.loads((tiled_dir / "config.json").read_text())["max_tiles"] == 4
    assert processor.tiling == Tiling(max_tiles=4, image_tokens=16, tile_tokens=4, side=SIDE)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, again_processor = CrossVLM.from_pretrained(tmp_path).eval(), CrossVLMProcessor.from_pretrained(tmp_path)
    assert again_processor.tiling == processor.tiling and again.config.tile_queries == 4
    assert {"projector.place_rows", "projector.place_cols", "projector.tile_queries"} <= set(again.state_dict())
    image = _image(3 * SIDE, 2 * SIDE, seed=5)
    grids = processor.image_grids([image])
    text = [{"role": "user", "content": "<image>what is it?"}]
    from crossvlm.data.render import encode_prompt

    ids = torch.tensor([encode_prompt(text, processor.tokenizer, processor.image_token_counts(grids))])
    pixels = processor.preprocess_images([image], grids)
    with torch.no_grad():
        expected = model(ids, pixels, image_grids=torch.tensor(grids)).logits
        torch.testing.assert_close(again(ids, pixels, image_grids=torch.tensor(grids)).logits, expected)


def test_single_view_models_have_no_tile_parameters(tiny_vlm_dir):
    model = CrossVLM.from_pretrained(tiny_vlm_dir)
    assert model.config.max_tiles == 1 and CrossVLMProcessor.from_pretrained(tiny_vlm_dir).tiling is None
    assert not any("place" in k or "tile" in k for k in model.state_dict())


# -- the engine ----------------------------------------------------------------------------------------
def test_engine_greedy_equals_generate_with_tiled_images(tiled_dir):
    chat = crossvlm.load(tiled_dir, device="cpu", engine=EngineConfig(slots=3, max_len=512))
    reference = CrossVLM.from_pretrained(tiled_dir).eval()
    cases = [
        ([{"role": "user", "content": "<image>what colour?"}], [_image(4 * SIDE, SIDE, seed=6)]),
        ([{"role": "user", "content": "<image><image>compare"}], [_image(2 * SIDE, 2 * SIDE, seed=7), _image(50, 40)]),
        ([{"role": "user", "content": "hello"}], []),
        ([{"role": "user", "content": "<image>where?"}], [_image(SIDE, 3 * SIDE, seed=8)]),
    ]
    try:
        prompts = [chat.prompt(m, i) for m, i in cases]
        assert [p.image_grids for p in prompts] == [[(1, 4)], [(2, 2), (1, 1)], None, [(3, 1)]]
        n = 12
        sampling = SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True)
        finished = threading.Semaphore(0)
        requests = [chat.submit(p, sampling, lambda _: finished.release()) for p in prompts]  # all at once: batched
        for _ in requests:
            assert finished.acquire(timeout=120)
        for prompt, request, (_, images) in zip(prompts, requests, cases):
            ids = torch.tensor([prompt.input_ids])
            grids = chat.processor.image_grids(images) if images else None
            pixels = chat.processor.preprocess_images(images, grids) if images else None  # made apart
            out = reference.generate(ids, pixels, image_grids=None if grids is None else torch.tensor(grids),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert request.generated == n and request.tokens == out[0, ids.shape[1]:].tolist()
    finally:
        chat.close()


def test_tiles_that_do_not_fit_the_context_fall_back_to_the_thumbnail(tiled_dir):
    big, question = _image(2 * SIDE, 2 * SIDE), [{"role": "user", "content": "<image>hi"}]
    roomy = crossvlm.load(tiled_dir, device="cpu", engine=EngineConfig(slots=1, max_len=512)).prompt(question, [big])
    assert roomy.image_grids == [(2, 2)] and roomy.pixel_values.shape[0] == 5
    tight = crossvlm.load(tiled_dir, device="cpu", engine=EngineConfig(slots=1, max_len=len(roomy.input_ids) - 4))
    prompt = tight.prompt(question, [big])  # the 4 tiles' 16 tokens do not fit: the thumbnail alone does
    assert prompt.image_grids == [(1, 1)] and prompt.pixel_values.shape[0] == 1
    assert prompt.input_ids.count(tight.model.config.image_token_id) == 16
    assert len(prompt.input_ids) == len(roomy.input_ids) - 16
    too_small = crossvlm.load(tiled_dir, device="cpu", engine=EngineConfig(slots=1, max_len=len(prompt.input_ids)))
    with pytest.raises(crossvlm.inference.InputError, match="context"):
        too_small.prompt(question, [big])


# -- data and training ---------------------------------------------------------------------------------
def _parquet(path: Path, sizes: list[tuple[int, int]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for k, size in enumerate(sizes):
        buf = io.BytesIO()
        _image(*size, seed=k).save(buf, format="PNG")
        conv = [{"role": "user", "content": "<image>describe"}, {"role": "assistant", "content": "a picture"}]
        rows.append({"conversations": json.dumps(conv), "image_bytes": buf.getvalue()})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_packing_counts_each_images_tile_tokens(tiled_dir, tmp_path):
    from crossvlm.data.collate import Collator
    from crossvlm.data.config import DataConfig
    from crossvlm.data.loader import build_dataset

    processor = CrossVLMProcessor.from_pretrained(tiled_dir)
    sizes = [(4 * SIDE, SIDE), (SIDE, SIDE), (2 * SIDE, 2 * SIDE), (2 * SIDE, SIDE)]
    data = _parquet(tmp_path / "d.parquet", sizes)
    cfg = DataConfig.from_dict({"sources": [str(data)], "max_length": 104, "packing": True})
    dataset = build_dataset(cfg, processor.tokenizer, processor.image_processor, 16, tiling=processor.tiling)
    samples = [dataset[i] for i in range(len(sizes))]
    pads = [int((s.input_ids == dataset.maker.vision.pad).sum()) for s in samples]
    assert pads == [16 + 4 * 4, 16, 16 + 4 * 4, 16 + 2 * 4]
    assert [len(s.pixel_values) for s in samples] == [5, 1, 5, 3]
    text = {len(s) - p for s, p in zip(samples, pads)}
    assert text == {28}  # the same text: lengths 60, 44, 60, 52 differ by the tiles' tokens alone
    pad_id = processor.tokenizer.pad_token_id
    batch = Collator(pad_id, packing=True, max_length=104)(samples)
    # Counted with their tiles the samples need 3 rows of 104 (60 + 44, 60, 52); at 44 tokens each, 2 would do.
    assert batch["input_ids"].shape == (3, 104)
    assert sorted((batch["input_ids"] != pad_id).sum(1).tolist()) == [52, 60, 104]
    assert batch["pixel_values"].shape[0] == 14
    assert sorted(map(tuple, batch["image_grids"].tolist())) == sorted([(1, 4), (1, 1), (2, 2), (1, 2)])
    model = CrossVLM.from_pretrained(tiled_dir)
    model.check_image_tokens(batch["input_ids"], 14, batch["image_grids"].tolist())  # each span in its image's order


def test_both_stages_train_a_tiled_model(tiny_models, tmp_path):
    """Pretraining makes a tiled model; SFT starts from its saved directory and keeps the tiling."""
    from crossvlm.configs import config_path
    from crossvlm.train.config import load_config
    from crossvlm.train.loop import train

    data = _parquet(tmp_path / "d.parquet", [(4 * SIDE, SIDE), (SIDE, SIDE), (2 * SIDE, 2 * SIDE), (2 * SIDE, SIDE)] * 2)
    common = {"data.sources": [str(data)], "run.max_steps": 2, "run.batch_size": 4, "data.max_length": 128,
              "data.num_workers": 0, "run.save_interval": 0, "run.eval_interval": 0}
    model = {"model.llm": str(tiny_models / "llm"), "model.vision": str(tiny_models / "vision"),
             "model.num_queries": 16, "model.projector_heads": 4, "model.max_tiles": 4, "model.tile_queries": 4}
    final = train(load_config(config_path("pretrain.yaml"), {**common, **model, "run.out_dir": str(tmp_path / "pt")}))
    final = train(load_config(config_path("sft.yaml"), {**common, "model.init_from": str(final),
                                                        "run.out_dir": str(tmp_path / "sft")}))
    saved = CrossVLM.from_pretrained(final)
    assert saved.config.max_tiles == 4 and saved.config.tile_queries == 4
    assert CrossVLMProcessor.from_pretrained(final).tiling.max_tiles == 4


# -- the learning check --------------------------------------------------------------------------------
def test_tiles_read_a_mark_a_single_view_cannot(tiny_models):
    """Same steps, data and seed: one view stays near chance (1/3), four tiles answer far above it."""
    from crossvlm.tiles_check import compare

    one, four = compare(tiny_models, (1, 4), steps=80, n_test=150)
    assert one["tokens_per_image"] == 16 and four["tokens_per_image"] == 16 + 4 * 16 and four["grid"] == [2, 2]
    assert one["accuracy"] < 0.5
    assert four["accuracy"] > 0.85


def test_bench_train_samples_carry_every_view_and_grid(tiled_dir, tmp_path):
    """`crossvlm bench train --max-tiles N`'s fixed-length samples: each JPEG's views, one length for all."""
    from crossvlm.bench.batches import FixedLengthSamples, SampleShape, jpeg_pool
    from crossvlm.data.collate import Collator
    from crossvlm.bench.train import TrainBenchConfig
    from crossvlm.model.tiling import select_grid

    processor = CrossVLMProcessor.from_pretrained(tiled_dir)
    jpegs = jpeg_pool(tmp_path, (4 * SIDE, 2 * SIDE), count=2)
    tokens = processor.tiling.tokens(select_grid(4 * SIDE, 2 * SIDE, 4, SIDE))
    assert tokens == 16 + 2 * 4  # a 2:1 picture of 4 x 2 tiles' pixels: four tiles keep no more of it than 1 x 2
    samples = FixedLengthSamples(jpegs, processor.image_processor, processor.vision_ids, tokens, SampleShape(10, 4),
                                 text_vocab=100, length=2, tiling=processor.tiling)
    batch = Collator(processor.tokenizer.pad_token_id)([samples[0], samples[1]])  # as bench's batch_loader
    assert batch["input_ids"].shape == (2, tokens + 10) and batch["pixel_values"].shape[0] == 2 * 3
    assert batch["image_grids"].tolist() == [[1, 2], [1, 2]]
    CrossVLM.from_pretrained(tiled_dir).check_image_tokens(batch["input_ids"], 10, batch["image_grids"].tolist())
    with pytest.raises(ConfigError, match="--variants ours"):
        TrainBenchConfig(preset="tiny", max_tiles=4).validate()


def test_the_server_answers_with_a_tiled_image(tiled_dir):
    """`crossvlm serve` through the OpenAI client: a 2 × 2 image's prompt counts its tiles' tokens."""
    from openai import OpenAI

    from crossvlm.inference import ChatModel
    from crossvlm.serve.app import create_app

    chat = ChatModel.load(tiled_dir, device="cpu", engine=EngineConfig(slots=2, max_len=512))
    big = _image(2 * SIDE, 2 * SIDE)
    expected = len(chat.prompt([{"role": "user", "content": "<image>what is it?"}], [big]).input_ids)
    with live_server(create_app(chat)) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        out = client.chat.completions.create(model="crossvlm", max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(big)}}, {"type": "text", "text": "what is it?"}]}])
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == expected and expected > 16 + 4 * 4  # the thumbnail's 16 and four tiles' 4 each


def _greedy_reference(model: CrossVLM, prompt, n: int) -> list[int]:
    """`n` greedy tokens from the whole context's forward each time (no cache, no engine)."""
    ids, grids = list(prompt.input_ids), torch.tensor(prompt.image_grids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), pixel_values=prompt.pixel_values, image_grids=grids).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt.input_ids):]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_paged_engine_keys_a_tiled_images_blocks_by_all_its_views(tiled_dir, monkeypatch, device):
    """Two 2 x 2 images behind the same text: the second shares the text's blocks only; the first sent
    again finds its blocks past the image (thumbnail and tiles) and encodes nothing; every answer is
    the model's own greedy answer (on CUDA too: float32, with the decode step's graphs and the tiled
    image path left eager)."""
    from test_engine import _run

    from crossvlm.engine import SamplingParams
    from crossvlm.inference import ChatModel

    model = CrossVLM.from_pretrained(tiled_dir).eval()
    chat = ChatModel.load(tiled_dir, device=device, dtype=torch.float32,
                          engine=EngineConfig(slots=2, max_len=512, block_size=16))
    encoded = []
    encode = chat.engine.runner.model.encode_images
    monkeypatch.setattr(chat.engine.runner.model, "encode_images",
                        lambda pixels, grids=None: encoded.append(len(pixels)) or encode(pixels, grids))
    system = {"role": "system", "content": "a long instruction that fills more than one block of the cache " * 2}
    messages = [system, {"role": "user", "content": "<image>describe the picture"}]
    first, second = (chat.prompt(messages, [_image(2 * SIDE, 2 * SIDE, seed=s)]) for s in (1, 2))
    assert first.image_grids == second.image_grids == [(2, 2)] and first.input_ids == second.input_ids
    start = first.input_ids.index(chat.model.config.image_token_id)
    greedy = SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True)
    try:
        a, = _run(chat, [first], [greedy])
        b, = _run(chat, [second], [greedy])
        again, = _run(chat, [first], [greedy])
    finally:
        chat.close()
    assert a.tokens == again.tokens == _greedy_reference(model, first, 6)
    assert b.tokens == _greedy_reference(model, second, 6)
    assert a.cached_tokens == 0 and b.cached_tokens == start // 16 * 16, "the text before the image, no further"
    assert again.cached_tokens >= start + 16 + 4 * 4, "past the thumbnail's and the four tiles' tokens"
    assert encoded == [5, 5], "each image's five views encoded once; the first again came from the cache"


def test_tile_codes_and_queries_get_no_weight_decay(tiled_dir):
    from crossvlm.train.config import OptimSection
    from crossvlm.train.optim import param_groups

    model = CrossVLM.from_pretrained(tiled_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for g in param_groups(model, OptimSection(weight_decay=0.1)) if g["weight_decay"] == 0
                 for p in g["params"]}
    assert {"projector.place_rows", "projector.place_cols", "projector.tile_queries"} <= undecayed


def test_a_tiled_models_images_without_grids_are_thumbnails(tiled_dir):
    model = CrossVLM.from_pretrained(tiled_dir).eval()
    processor = CrossVLMProcessor.from_pretrained(tiled_dir)
    images = [_image(2 * SIDE, 2 * SIDE, seed=9), _image(SIDE, SIDE, seed=10)]
    pixels = processor.preprocess_images(images)  # one view each
    with torch.no_grad():
        torch.nn.init.normal_(model.projector.place_rows, std=0.5)  # as if trained
        plain = model.encode_images(pixels)
        as_grids = model.encode_images(pixels, torch.tensor([[1, 1], [1, 1]]))
        model.projector.place_rows.zero_()  # the thumbnail's place code was in the plain path's tokens too
        changed = model.encode_images(pixels)
    torch.testing.assert_close(plain, as_grids)
    assert plain.shape == (2 * 16, model.config.text_config.hidden_size) and not torch.allclose(plain, changed)


def test_place_codes_learn(tiled_dir):
    model = CrossVLM.from_pretrained(tiled_dir)
    model.encode_images(torch.randn(3, 3, SIDE, SIDE), torch.tensor([[1, 2]])).pow(2).sum().backward()
    rows, cols = model.projector.place_rows.grad, model.projector.place_cols.grad
    assert rows[:2].abs().sum(1).gt(0).all() and cols[:3].abs().sum(1).gt(0).all()  # the thumbnail's and the tiles'
    assert not rows[2:].any() and not cols[3:].any()  # places no view had
