"""Readers, bad records, images, the loader, sampling, resume and `crossvlm data inspect`."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from crossvlm.data.config import DataConfig, SourceConfig
from crossvlm.data.images import load_image
from crossvlm.data.loader import build_dataset, build_loader
from crossvlm.data.readers import JsonReader, ParquetReader, open_reader
from crossvlm.data.records import BadRecord, RawRecord, RecordError, normalize
from crossvlm.data.sampler import ShardedBatchSampler, epoch_order
from crossvlm.errors import ConfigError, DataError

M = 4


@pytest.fixture(scope="session")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models / "llm")


@pytest.fixture(scope="session")
def processor(tiny_models):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(tiny_models / "vision")


def jpeg(colour=(200, 30, 30), size=(40, 30), fmt="JPEG", mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt, **save)
    return buf.getvalue()


def turns(question="<image>\nWhat colour?", answer="red"):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_minimind(path, rows, row_group_size=None, list_images=False):
    """A parquet exactly as MiniMind-V writes it: `conversations` JSON string, `image_bytes` binary."""
    image_type = pa.list_(pa.binary()) if list_images else pa.binary()
    table = pa.table({
        "conversations": pa.array([json.dumps(c, ensure_ascii=False) for c, _ in rows], pa.string()),
        "image_bytes": pa.array([img for _, img in rows], image_type),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture()
def llava(tmp_path):
    """A LLaVA JSON file with an image folder: one image, two images, text-only, a system turn."""
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    for name, colour in (("a.jpg", (255, 0, 0)), ("b.png", (0, 0, 255))):
        (root / "coco" / name).write_bytes(jpeg(colour, fmt="PNG" if name.endswith("png") else "JPEG"))
    records = [
        {"id": "1", "image": "coco/a.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "2", "image": ["coco/a.jpg", "coco/b.png"],
         "conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    return path, root


def test_minimind_parquet_json_string_list_turns_and_roleless(tmp_path):
    path = write_minimind(tmp_path / "mm.parquet", [(turns(), jpeg()), (turns("<image> é ü", "ok"), jpeg())])
    reader = open_reader(path)
    assert isinstance(reader, ParquetReader) and len(reader) == 2
    conv = normalize(reader.read(1))
    assert conv.messages == turns("<image> é ü", "ok") and len(conv.images) == 1
    assert conv.location == f"{path} row 1"

    # conversations as a list of structs, several images per row, and old files without roles
    table = pa.table({
        "conversations": [[{"role": "user", "content": "<image><image> two"}, {"role": "assistant", "content": "yes"}],
                          [{"content": "<image> hi"}, {"content": "hello"}]],
        "image_bytes": [[jpeg(), jpeg()], [jpeg()]],
    })
    pq.write_table(table, tmp_path / "list.parquet")
    reader = open_reader(tmp_path / "list.parquet")
    assert len(normalize(reader.read(0)).images) == 2
    assert [m["role"] for m in normalize(reader.read(1)).messages] == ["user", "assistant"]
    chars, marks = reader.length_estimates()
    assert marks.tolist() == [2, 1] and chars[0] == len("<image><image> two") + len("yes")


def test_llava_json_and_jsonl_with_image_root(llava, tmp_path):
    path, root = llava
    reader = open_reader(path, image_root=root)
    assert isinstance(reader, JsonReader) and len(reader) == 3
    two = normalize(reader.read(1))
    assert two.images == [root / "coco/a.jpg", root / "coco/b.png"]
    assert [m["role"] for m in two.messages] == ["system", "user", "assistant"]
    assert normalize(reader.read(2)).images == []  # text-only record

    lines = tmp_path / "llava.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in json.loads(path.read_text())) + "\n\n")
    jsonl = open_reader(lines, image_root=root)
    assert len(jsonl) == 3 and normalize(jsonl.read(1)).messages == two.messages
    assert jsonl.location(2) == f"{lines} record 2"

    with pytest.raises(DataError, match="suffix"):
        open_reader(tmp_path / "data.csv")
    (tmp_path / "obj.json").write_text('{\n "not": "records"\n}')
    with pytest.raises(DataError, match="neither"):
        open_reader(tmp_path / "obj.json")


@pytest.mark.parametrize("conversations, images, kind", [
    ("not json", [], "malformed"),
    ([], [], "empty_conversation"),
    ([{"role": "user", "content": "hi"}], [], "no_assistant_turn"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], [], "unknown_role"),
    ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}], [], "non_text_content"),
    (turns("<image><image>"), [b"x"], "image_count_mismatch"),
    (turns("no mark"), [b"x"], "image_count_mismatch"),
    ([{"role": "assistant", "content": "x"}], [], "turn_order"),
])
def test_record_checks_name_the_kind(conversations, images, kind):
    with pytest.raises(RecordError) as err:
        normalize(RawRecord(conversations, images, "f row 0"))
    assert err.value.kind == kind


def test_images_orientation_modes_and_pixel_limit(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue(), 10_000).size == (10, 20)

    clear = load_image(jpeg((0, 0, 0, 0), fmt="PNG", mode="RGBA"), 10_000)
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)  # alpha over white
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 200, 30] * 256)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert load_image(buf.getvalue(), 10_000).getpixel((0, 0)) == (10, 200, 30)
    assert load_image(jpeg(128, fmt="PNG", mode="L"), 10_000).getpixel((1, 1)) == (128, 128, 128)
    assert load_image(jpeg((0, 0), fmt="PNG", mode="LA"), 10_000).getpixel((1, 1)) == (255, 255, 255)

    for source, limit, kind in ((jpeg(size=(200, 200)), 100 * 100, "image_too_large"),
                                (b"\xff\xd8 not a jpeg", 10_000, "bad_image"),
                                (jpeg()[:200], 10_000, "bad_image"),
                                (tmp_path / "missing.jpg", 10_000, "missing_image")):
        with pytest.raises(RecordError) as err:
            load_image(source, limit)
        assert err.value.kind == kind


def bad_rows():
    """10 good rows and one row of each bad kind a parquet can hold."""
    good = [(turns(f"<image>\nQ{i}", f"A{i}"), jpeg()) for i in range(10)]
    bad = [
        (turns(), b"\x00garbage"),  # bad_image
        (turns("<image> <image>"), jpeg()),  # image_count_mismatch
        ([{"role": "user", "content": "<image>"}], jpeg()),  # no_assistant_turn
        ([{"role": "narrator", "content": "<image>"}, {"role": "assistant", "content": "x"}], jpeg()),
        (turns("<image>" + " long" * 400, "x"), jpeg()),  # too_long at max_length 64
    ]
    return good + bad


def config(*paths, **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("num_workers", 0)
    return DataConfig(sources=[SourceConfig(str(p)) for p in paths], **kw)


def test_dataset_returns_samples_or_located_bad_records(tmp_path, tok, processor):
    path = write_minimind(tmp_path / "d.parquet", bad_rows(), row_group_size=4)
    ds = build_dataset(config(path), tok, processor, M)
    items = [ds[i] for i in range(len(ds))]
    good = items[:10]
    assert all(s.pixel_values.shape == (1, 3, 64, 64) and s.pixel_values.dtype == torch.uint8 for s in good)
    kinds = [(b.kind, b.location) for b in items[10:]]
    assert kinds == [("bad_image", f"{path} row 10"), ("image_count_mismatch", f"{path} row 11"),
                     ("no_assistant_turn", f"{path} row 12"), ("unknown_role", f"{path} row 13"),
                     ("too_long", f"{path} row 14")]


def test_images_travel_as_uint8_crops_that_normalize_to_the_processors_pixels(tmp_path, tok, processor):
    """Workers hand over the processor's crop as uint8 (a quarter of float32's bytes); `normalize` (in
    training, on the GPU) gives exactly the floats the processor itself makes of the image."""
    import io

    import numpy as np
    from PIL import Image

    from crossvlm.data.images import ImageTransform, load_image

    transform = ImageTransform(processor)
    assert transform.uint8
    rng = np.random.default_rng(3)
    images = []
    for size, fmt in (((480, 640), "JPEG"), ((50, 300), "PNG"), ((97, 97), "JPEG")):
        buf = io.BytesIO()
        Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(buf, fmt)
        images.append(load_image(buf.getvalue(), 10**8, transform.draft_size))
    crops = transform(images)
    assert crops.dtype == torch.uint8 and crops.shape == (3, 3, 64, 64)
    expected = torch.as_tensor(processor(images=images, return_tensors="pt")["pixel_values"], dtype=torch.float32)
    assert torch.equal(transform.normalize(crops), expected)
    assert transform.normalize(expected) is expected  # float pixels pass through


def test_bad_records_counted_across_workers_and_stop_the_run(tmp_path, tok, processor):
    path = write_minimind(tmp_path / "d.parquet", bad_rows(), row_group_size=4)
    ds = build_dataset(config(path, num_workers=2, max_bad_fraction=0.4), tok, processor, M)
    loader = build_loader(ds, ds.cfg, batch_size=5, seed=0, epochs=1)
    batches = list(loader)
    assert sum(b["num_samples"] for b in batches) == 10
    assert all(isinstance(r, BadRecord) for b in batches for r in b["bad_records"])
    assert dict(loader.tracker.counts) == {"bad_image": 1, "image_count_mismatch": 1, "no_assistant_turn": 1,
                                           "unknown_role": 1, "too_long": 1}
    assert loader.tracker.seen == 15
    report = loader.tracker.report()
    assert f"{path} row 10" in report and "too_long: 1" in report

    strict = build_loader(ds, dataclasses.replace(ds.cfg, max_bad_fraction=0.1), 5, seed=0, epochs=1)
    with pytest.raises(DataError, match="too many bad records.*bad_image"):
        list(strict)


def test_loader_reads_llava_text_only_and_multi_image(llava, tok, processor):
    path, root = llava
    cfg = DataConfig(sources=[SourceConfig(str(path), image_root=str(root))], max_length=256, num_workers=0,
                     shuffle=False)
    ds = build_dataset(cfg, tok, processor, M)
    (batch,) = list(build_loader(ds, cfg, batch_size=3, seed=0, epochs=1))
    assert batch["pixel_values"].shape == (3, 3, 64, 64)  # 1 + 2 + 0 images, sample by sample
    red, blue = batch["pixel_values"][0, :, 0, 0], batch["pixel_values"][2, :, 0, 0]
    assert red[0] > red[2] and blue[2] > blue[0]  # a.jpg (red) first, b.png (blue) last
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == pad).sum(1).tolist() == [M, 2 * M, 0]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["num_tokens"] == int((batch["labels"] != -100).sum())


def test_sharding_matches_one_process_with_the_global_batch():
    ranges = [(0, 37, 1.0), (37, 50, 0.5)]
    one = ShardedBatchSampler(ranges, 8, seed=3, epochs=2)
    ranks = [ShardedBatchSampler(ranges, 4, seed=3, rank=r, world_size=2, epochs=2) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == 2 * 5
    for whole, a, b in zip(one, *ranks):
        assert whole == a + b
    epochs = [epoch_order(ranges, seed=3, epoch=e) for e in (0, 1)]
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(epochs[0], epoch_order(ranges, seed=3, epoch=0))  # a function of (seed, epoch)


def test_mixture_weights_set_each_source_share():
    order = epoch_order([(0, 100, 2.0), (100, 300, 0.25)], seed=0, epoch=0)
    first, second = order[order < 100], order[order >= 100]
    assert len(first) == 200 and np.bincount(first).max() == 2
    assert len(second) == 50 and len(set(second.tolist())) == 50
    other = epoch_order([(0, 100, 2.0), (100, 300, 0.25)], seed=0, epoch=1)
    assert set(other[other >= 100].tolist()) != set(second.tolist())  # a fresh quarter each epoch


def test_group_by_length_batches_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 800).astype(float)
    grouped = ShardedBatchSampler([(0, 800, 1.0)], 8, seed=0, lengths=lengths, epochs=1)
    plain = ShardedBatchSampler([(0, 800, 1.0)], 8, seed=0, epochs=1)
    spread = lambda s: np.mean([np.ptp(lengths[b]) for b in s])  # noqa: E731
    assert spread(grouped) < spread(plain) / 5
    assert sorted(i for b in grouped for i in b) == list(range(800))


def test_resume_skips_batches_without_reading_them(tmp_path, tok, processor, monkeypatch):
    rows = [(turns(f"<image>\nQ{i}", f"A{i}"), jpeg()) for i in range(24)]
    path = write_minimind(tmp_path / "d.parquet", rows, row_group_size=5)
    cfg = config(path, max_length=128)
    ds = build_dataset(cfg, tok, processor, M)
    full = [b["input_ids"] for b in build_loader(ds, cfg, 4, seed=1, epochs=2)]
    assert len(full) == 12

    reads = []
    original = ParquetReader.read
    monkeypatch.setattr(ParquetReader, "read", lambda self, row: reads.append(row) or original(self, row))
    resumed = build_loader(ds, cfg, 4, seed=1, epochs=2, start_step=7)
    tail = [b["input_ids"] for b in resumed]
    assert len(reads) == 5 * 4  # only the batches after step 7 were read
    assert all(torch.equal(a, b) for a, b in zip(tail, full[7:])) and len(tail) == 5

    loader = build_loader(ds, cfg, 4, seed=1, epochs=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    again = build_loader(ds, cfg, 4, seed=1, epochs=2)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["input_ids"], full[3])
    with pytest.raises(DataError, match="seed"):
        build_loader(ds, cfg, 4, seed=2).load_state_dict(state)


def test_parquet_is_read_by_row_group_with_a_small_cache(tmp_path):
    rows = [(turns(f"<image>\nQ{i}", "A"), jpeg()) for i in range(50)]
    reader = ParquetReader(write_minimind(tmp_path / "d.parquet", rows, row_group_size=10), row_group_cache=2)
    assert reader.group_starts.tolist() == [0, 10, 20, 30, 40, 50] and not reader._cache
    for row in (3, 15, 27, 49, 4):
        assert json.loads(reader.read(row).conversations)[0]["content"] == f"<image>\nQ{row}"
    assert list(reader._cache) == [4, 0]  # the two most recent groups only


def test_config_validate_reports_every_problem(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(str(tmp_path / "nope"), format="csv", weight=0)], max_length=2,
                     max_bad_fraction=2.0, num_workers=-1)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    message = str(err.value)
    for field in ("does not exist", "format", "weight", "max_length", "max_bad_fraction", "num_workers"):
        assert field in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="unknown keys"):
        DataConfig.from_dict({"sources": [str(tmp_path)], "max_lenght": 5})
    assert DataConfig.from_dict({"sources": [str(tmp_path)], "packing": True}).packing


def test_inspect_cli_reports_and_fails_on_unusable_data(tmp_path, tiny_models, capsys):
    from crossvlm.cli import main

    good = write_minimind(tmp_path / "good.parquet", [(turns(), jpeg())] * 30)
    assert main(["data", "inspect", str(good), "--llm", str(tiny_models / "llm"), "--image-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "format=minimind" in out and "rows: 30" in out and "images in good checked rows: 30" in out
    assert "[[red<|im_end|>]]" in out and "median" in out and "usable: yes" in out

    bad = write_minimind(tmp_path / "bad.parquet", [(turns(), b"broken")] * 5 + [(turns(), jpeg())])
    assert main(["data", "inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad_image: 5" in out and f"{bad} row 0" in out and "usable: NO" in out
    assert main(["data", "inspect", str(tmp_path / "absent.json")]) == 2


def test_packed_batches_from_the_loader_give_the_vlm_the_same_loss(tmp_path, tiny_vlm_dir):
    """Synthetic shapes through the loader, packed with images, into the real CrossVLM: the summed loss
    equals the per-sample one (so positions, the block-diagonal mask and image order all agree)."""
    from crossvlm.data.collate import Collator
    from crossvlm.data.synth import write_synthetic
    from crossvlm.model import CrossVLM
    from crossvlm.model.processor import CrossVLMProcessor

    paths = write_synthetic(tmp_path, seed=0, n_train=6, n_test=1)
    vlm = CrossVLM.from_pretrained(tiny_vlm_dir).eval()
    proc = CrossVLMProcessor.from_pretrained(tiny_vlm_dir)
    cfg = config(paths["sft_train"], paths["pretrain_train"], max_length=512, packing=True, group_by_length=True)
    ds = build_dataset(cfg, proc.tokenizer, proc.image_processor, vlm.num_image_tokens)
    (batch,) = list(build_loader(ds, cfg, batch_size=12, seed=0, epochs=1))
    assert batch["attention_mask"] is None and batch["input_ids"].shape[0] < 12  # several samples per row
    assert batch["pixel_values"].shape[0] == 12

    def loss_sum(b):
        with torch.no_grad():
            return vlm(input_ids=b["input_ids"], pixel_values=ds.transform.normalize(b["pixel_values"]), labels=b["labels"],
                       attention_mask=b["attention_mask"], position_ids=b.get("position_ids"), use_cache=False,
                       num_items_in_batch=1).loss

    samples = [ds[i] for i in range(len(ds))]
    unpacked = sum(loss_sum(Collator(proc.tokenizer.pad_token_id)([s])) for s in samples)
    assert torch.allclose(loss_sum(batch), unpacked, rtol=1e-4), (loss_sum(batch), unpacked)


def test_folder_sources_split_and_unexpected_errors_become_counted_records(tmp_path, tok, processor, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    write_minimind(folder / "sft_train.parquet", [(turns(), jpeg())] * 6)
    write_minimind(folder / "sft_test.parquet", [(turns(), jpeg())] * 2)
    (folder / "extra_train.jsonl").write_text(json.dumps({"conversations": turns("hi", "hello")}) + "\n")
    cfg = config(folder, max_length=128, num_workers=2, max_bad_fraction=0.9)
    assert len(build_dataset(cfg, tok, processor, M, split="train")) == 7
    assert len(build_dataset(cfg, tok, processor, M)) == 9

    def broken(self, images):
        raise RuntimeError("processor exploded")

    monkeypatch.setattr("crossvlm.data.images.ImageTransform.__call__", broken)
    ds = build_dataset(cfg, tok, processor, M, split="train")
    loader = build_loader(ds, cfg, batch_size=7, seed=0, epochs=1)
    (batch,) = list(loader)  # in two worker processes: reported, not raised
    assert batch["num_samples"] == 1 and loader.tracker.counts["error"] == 6
    assert "RuntimeError: processor exploded" in loader.tracker.report()
