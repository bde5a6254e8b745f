"""The data users already have: Hugging Face datasets (save_to_disk folders, Cauldron / FineVision
parquet, hub ids), webdataset tar shards (files, folders, braces, HTTP), streamed with exact resume.

Every data set here is written by the real libraries (`datasets`, pyarrow, `tarfile` in
img2dataset's layout) and HTTP is a real server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from crossvlm.data.config import DataConfig, SourceConfig
from crossvlm.data.loader import build_dataset, build_loader
from crossvlm.data.readers import open_reader
from crossvlm.data.records import normalize
from crossvlm.data.sources import Shard, expand_braces, resolve_source
from crossvlm.data.streaming import Stream, StreamSource
from crossvlm.errors import ConfigError, DataError

M = 4  # visual tokens per image in these tests


@pytest.fixture(scope="session")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models / "llm"))


@pytest.fixture(scope="session")
def processor(tiny_models):
    from crossvlm.model.processor import load_image_processor

    return load_image_processor(tiny_models / "vision")


def jpeg(i: int = 0, size=(24, 20)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, ((40 * i) % 256, (90 + 7 * i) % 256, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]], keys: list[str]) -> Path:
    """A tar in img2dataset's layout: each sample's files `KEY.EXT`, one sample after another."""
    with tarfile.open(path, "w") as tar:
        for key, files in zip(keys, samples):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def caption_shards(folder: Path, shards: int = 4, per_shard: int = 5, bad: str | None = None) -> list[Path]:
    """img2dataset output: KEY.jpg, KEY.txt, KEY.json (metadata only) with keys 000000000, 000000001, …"""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        keys = [f"{s:05d}{i:04d}" for i in range(per_shard)]
        samples = [{"jpg": jpeg(s * per_shard + i), "txt": f"caption {s * per_shard + i}".encode(),
                    "json": json.dumps({"key": k, "status": "success", "url": f"http://x/{k}.jpg"}).encode()}
                   for i, k in enumerate(keys)]
        if bad is not None and s == 1:
            samples[2] = {"jpg": b"not a jpeg", "txt": b"broken image"}
        paths.append(write_tar(folder / f"{s:05d}.tar", samples, keys))
    return paths


@pytest.fixture()
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path / "www"; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def captions(records) -> list[str]:
    return [normalize(r).messages[-1]["content"] for r in records]


def all_records(source) -> list:
    return [r for shard in source.shards for r in shard.records(caption_prompt="<image>Say what you see.")]


# -- webdataset shards -----------------------------------------------------------------------------------
def test_braces_expand_like_webdataset():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]


def test_tar_shards_from_a_file_a_folder_braces_and_http_give_the_same_records(tmp_path, http_root):
    www, url = http_root
    caption_shards(www / "shards", shards=3, per_shard=4)
    expected = [f"caption {i}" for i in range(12)]
    one = resolve_source(str(www / "shards" / "00001.tar"))
    assert one.readers is None and captions(all_records(one)) == expected[4:8]
    for path in (www / "shards", f"{www}/shards/{{00000..00002}}.tar", f"{url}/shards/{{00000..00002}}.tar"):
        source = resolve_source(str(path))
        records = all_records(source)
        assert captions(records) == expected, path
        assert len(records[0].images) == 1 and records[0].images[0] == jpeg(0)
        assert normalize(records[0]).messages[0]["content"] == "<image>Say what you see."
    assert records[5].location == f"{url}/shards/00001.tar key 000010001"
    # Remote tars are not read ahead to count them: the epoch length is unknown (run.max_steps needed).
    assert StreamSource.of(source, 1.0, "<image>").records is None
    assert StreamSource.of(resolve_source(str(www / "shards")), 1.0, "<image>").records == 12
    # Striding a shard over streams: parts 0 and 1 of 2, and skipping records unread.
    shard = Shard(f"{url}/shards/00000.tar", "tar")
    assert captions(shard.records(1, 2)) == ["caption 1", "caption 3"]
    assert captions(shard.records(0, 1, skip=3)) == ["caption 3"]


def test_tar_json_conversations_and_bad_samples_are_located_by_shard_and_key(tmp_path):
    conv = {"conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    marks_absent = {"conversations": [{"role": "user", "content": "Both?"}, {"role": "assistant", "content": "yes"}]}
    path = write_tar(tmp_path / "c.tar", [
        {"jpg": jpeg(1), "json": json.dumps(conv).encode()},
        {"0.jpg": jpeg(2), "1.png": jpeg(3), "json": json.dumps(marks_absent).encode()},
        {"jpg": jpeg(4)},
        {"json": b"{not json"},
    ], ["a", "b", "c", "d"])
    a, b, c, d = Shard(str(path), "tar").records()
    assert normalize(a).messages == [{"role": "user", "content": "<image>\nWhat colour?"},
                                     {"role": "assistant", "content": "red"}]
    assert normalize(b).messages[0]["content"] == "<image><image>\nBoth?" and b.images == [jpeg(2), jpeg(3)]
    assert (c.kind, c.location) == ("malformed", f"{path} key c") and "caption" in c.detail
    assert (d.kind, d.location) == ("malformed", f"{path} key d")


# -- streaming -------------------------------------------------------------------------------------------
def stream_captions(sources, stream, streams, epochs=1, buffer=0, shuffle=False, seed=0):
    return captions(Stream(sources, stream, streams, seed=seed, shuffle=shuffle, buffer_size=buffer, epochs=epochs))


@pytest.mark.parametrize("shards,streams", [(4, 4), (5, 2), (2, 4), (1, 3)], ids=lambda v: str(v))
def test_streams_split_the_shards_without_overlap(tmp_path, shards, streams):
    """world_size × workers streams: each record read by exactly one (shards cut into parts when fewer)."""
    caption_shards(tmp_path, shards=shards, per_shard=3)
    source = StreamSource.of(resolve_source(str(tmp_path)), 1.0, "<image>")
    assert source.records == shards * 3
    for shuffle in (False, True):
        seen = [stream_captions([source], j, streams, shuffle=shuffle, buffer=4) for j in range(streams)]
        flat = [c for s in seen for c in s]
        assert sorted(flat) == sorted(f"caption {i}" for i in range(shards * 3)), seen
        assert all(seen)


def test_shuffle_buffer_is_bounded_and_mixing_follows_the_weights(tmp_path):
    caption_shards(tmp_path / "a", shards=2, per_shard=50)
    big = StreamSource.of(resolve_source(str(tmp_path / "a")), 1.0, "<image>")
    order = stream_captions([big], 0, 1, buffer=10, shuffle=True)
    numbers = [int(c.split()[1]) for c in order]
    assert sorted(numbers) == list(range(100)) and numbers != sorted(numbers)
    # A record leaves at most `buffer` places ahead of where it was read (within a unit order).
    half = StreamSource.of(resolve_source(str(tmp_path / "a" / "00000.tar")), 3.0, "<image>")
    other = StreamSource.of(resolve_source(str(tmp_path / "a" / "00001.tar")), 1.0, "<image>")
    stream = Stream([half, other], 0, 1, seed=0, shuffle=True, buffer_size=10, epochs=None)
    drawn = [next(stream) for _ in range(400)]
    share = sum(r.location.startswith(str(tmp_path / "a" / "00000.tar")) for r in drawn) / len(drawn)
    assert 0.68 < share < 0.82  # weight 3 : 1 on equal sizes


def streamed_config(*paths, **kw) -> DataConfig:
    base = dict(max_length=64, num_workers=0, shuffle_buffer=6, max_bad_fraction=0.5)
    return DataConfig(sources=[SourceConfig(str(p)) if not isinstance(p, SourceConfig) else p for p in paths],
                      **{**base, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_loader_resumes_exactly_from_its_saved_state(tmp_path, tok, processor, workers):
    """Batches after load_state_dict (through JSON, as meta.json stores it) equal the uninterrupted
    ones, with workers, a shuffle buffer, two mixed sources, and a bad record in the stream."""
    caption_shards(tmp_path / "caps", shards=3, per_shard=7, bad="yes")
    caption_shards(tmp_path / "more", shards=2, per_shard=5)
    cfg = streamed_config(tmp_path / "caps", SourceConfig(str(tmp_path / "more"), weight=2.0), num_workers=workers)
    data = build_dataset(cfg, tok, processor, M)
    full = build_loader(data, cfg, 3, seed=5)
    assert full.steps_per_epoch == (21 + 20) // 3
    it = iter(full)
    whole = [next(it)["input_ids"] for _ in range(12)]
    it.close()
    for stop in (1, 4, 5):
        first = build_loader(data, cfg, 3, seed=5)
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))
        it.close()
        again = build_loader(build_dataset(cfg, tok, processor, M), cfg, 3, seed=5)
        again.load_state_dict(state)
        it = iter(again)
        rest = [next(it)["input_ids"] for _ in range(12 - stop)]
        it.close()
        assert all(torch.equal(a, b) for a, b in zip(rest, whole[stop:])), f"resumed after {stop}"
    assert full.tracker.counts["bad_image"] >= 1
    assert "00001.tar key 000010002" in full.tracker.report()
    other = build_loader(data, cfg, 3, seed=5, world_size=2, rank=0)
    with pytest.raises(DataError, match="same number of processes"):
        other.load_state_dict(state)


# -- Hugging Face datasets --------------------------------------------------------------------------------
def cauldron_rows(n: int = 4) -> dict:
    """The Cauldron's / FineVision's columns: `images` (a list of images) and `texts` ({user, assistant})."""
    from PIL import Image

    images = [[Image.open(io.BytesIO(jpeg(i)))] * (1 + i % 2) for i in range(n)]
    texts = [[{"user": f"Question {i}?", "assistant": f"Answer {i}.", "source": "test"}] +
             ([{"user": "And then?", "assistant": "Done."}] if i % 2 else []) for i in range(n)]
    return {"images": images, "texts": texts}


def cauldron_dataset(n: int = 4):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}]})
    return datasets.Dataset.from_dict(cauldron_rows(n), features=features)


def check_cauldron(records) -> None:
    first, second = (normalize(r) for r in records[:2])
    assert first.messages == [{"role": "user", "content": "<image>\nQuestion 0?"},
                              {"role": "assistant", "content": "Answer 0."}]
    assert second.messages[0]["content"] == "<image><image>\nQuestion 1?" and len(second.messages) == 4
    assert len(second.images) == 2 and isinstance(second.images[0], bytes)


def test_save_to_disk_folder_and_cauldron_parquet_are_read_as_they_are(tmp_path, tok, processor):
    ds = cauldron_dataset()
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "cauldron.parquet"))
    for path in (tmp_path / "saved", tmp_path / "cauldron.parquet"):
        source = resolve_source(str(path))
        assert source.readers[0].format == "cauldron" and len(source.readers[0]) == 4
        check_cauldron([source.readers[0].read(i) for i in range(4)])
        chars, images = source.readers[0].length_estimates()
        assert images.tolist() == [1, 2, 1, 2] and chars[0] == len("Question 0?Answer 0.")
    # The same parquet streamed as a shard.
    check_cauldron(list(Shard(str(tmp_path / "cauldron.parquet"), "parquet").records()))
    data = build_dataset(streamed_config(tmp_path / "saved", streaming=False), tok, processor, M)
    assert data[1].pixel_values.shape[0] == 2


def test_parquet_shards_at_a_url_are_streamed(http_root):
    """Parquet needs its footer first: fetched by range requests where the server has them, else (a
    plain `http.server`, as here) the shard is copied to a temporary file and read from there."""
    www, url = http_root
    cauldron_dataset().to_parquet(str(www / "c.parquet"))
    source = resolve_source(f"{url}/c.parquet")
    assert source.readers is None and [s.kind for s in source.shards] == ["parquet"]
    check_cauldron(all_records(source))
    (third,) = source.shards[0].records(1, 2, skip=1)  # rows 1, 3: skip one -> row 3
    assert third.location == f"{url}/c.parquet row 3"


def hub_layout(root: Path) -> Path:
    """A folder laid out as The Cauldron is on the hub: a config per subfolder, named in README.md."""
    ds = cauldron_dataset(6)
    (root / "vqav2").mkdir(parents=True)
    ds.to_parquet(str(root / "vqav2" / "train-00000-of-00002.parquet"))
    ds.select(range(2)).to_parquet(str(root / "vqav2" / "train-00001-of-00002.parquet"))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: vqav2\n  data_files:\n  - split: train\n    path: vqav2/train-*\n---\n")
    return root


class _NoSuchDataset(http.server.BaseHTTPRequestHandler):
    """A Hub that knows no dataset: 404 with the Hub's error code."""

    def do_GET(self):  # noqa: N802 — http.server's name
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("hub", ["unreachable", "no such dataset"])
def test_a_hub_id_the_hub_cannot_give_is_refused_in_one_line_at_once(tmp_path, hub):
    """`datasets` alone retries for half a minute, printing each try; crossvlm asks the Hub once."""
    import os
    import socket
    import subprocess
    import sys
    import time

    server = None
    if hub == "unreachable":
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchDataset)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.server_port}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "crossvlm.cli", "data", "inspect", "someone/no_such_set:cfg"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    if server is not None:
        server.shutdown()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    says = "the Hub cannot be reached" if hub == "unreachable" else "no such dataset on the Hub"
    assert lines[0].startswith("crossvlm data: error: someone/no_such_set: ") and says in lines[0], lines[0]
    assert seconds < 25, "no retries"


def test_a_hub_id_goes_through_datasets_the_same_code_on_a_local_hub_layout(tmp_path):
    root = hub_layout(tmp_path / "the_cauldron")
    source = resolve_source(f"{root}:vqav2", split="train")
    assert source.readers is not None and len(source.readers[0]) == 8
    check_cauldron([source.readers[0].read(i) for i in range(2)])
    streamed = resolve_source(f"{root}:vqav2", split="train", streaming=True)
    assert [s.kind for s in streamed.shards] == ["parquet", "parquet"]
    check_cauldron(all_records(streamed))
    with pytest.raises(DataError, match="split"):
        resolve_source(f"{root}:vqav2", split="validation")


def test_llava_json_with_a_utf8_bom_is_read(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(records[0]).encode() + b"\n")
    for name in ("a.json", "b.jsonl"):
        assert normalize(open_reader(tmp_path / name).read(0)).messages[1]["content"] == "Hello"


# -- commands ----------------------------------------------------------------------------------------------
def test_inspect_and_convert_every_kind(tmp_path, tiny_models, http_root, capsys):
    from crossvlm.cli import main

    www, url = http_root
    caption_shards(www / "caps", shards=2, per_shard=3)
    cauldron_dataset().save_to_disk(str(tmp_path / "saved"))
    hub = hub_layout(tmp_path / "hub")
    llm = ["--llm", str(tiny_models / "llm"), "--image-tokens", "4"]
    for path, fmt, rows in [(f"{url}/caps/{{00000..00001}}.tar", "webdataset", "?"),
                            (str(www / "caps"), "webdataset", "3"), (str(tmp_path / "saved"), "cauldron", "4"),
                            (f"{hub}:vqav2", "cauldron", "8")]:
        assert main(["data", "inspect", path, *llm]) == 0, path
        out = capsys.readouterr().out
        assert f"format={fmt}  rows={rows}" in out and "usable: yes" in out, out
        assert "[[" in out  # a rendered sample with its trained tokens
    # Tar shards over HTTP -> parquet shards -> webdataset shards: the same conversations all the way.
    assert main(["data", "convert", f"{url}/caps/{{00000..00001}}.tar", "--out", str(tmp_path / "pq"),
                 "--to", "parquet", "--records-per-shard", "4"]) == 0
    assert "wrote 6 records in 2 shards" in capsys.readouterr().out
    assert main(["data", "convert", str(tmp_path / "pq"), "--out", str(tmp_path / "wds"), "--to", "webdataset"]) == 0
    back = all_records(resolve_source(str(tmp_path / "wds")))
    assert captions(back) == [f"caption {i}" for i in range(6)] and back[2].images == [jpeg(2)]
    assert normalize(back[0]).messages[0]["content"] == "<image>\nDescribe the image."
    # A bad record is counted, located and not written; an existing folder is refused, untouched.
    caption_shards(tmp_path / "bad", shards=2, per_shard=3, bad="yes")
    assert main(["data", "convert", str(tmp_path / "bad"), "--out", str(tmp_path / "pq2"), "--to", "parquet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 6 records" in out  # the broken image's bytes are copied as they are: training counts it
    assert main(["data", "convert", str(tmp_path / "bad"), "--out", str(tmp_path / "pq2"), "--to", "parquet"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "pq2").iterdir()) == ["00000.parquet"]
    assert main(["data", "inspect", str(tmp_path / "nowhere.tar")]) == 2


# -- training on streamed shards ----------------------------------------------------------------------------
def stream_run(tiny_models, sources, out: Path, **extra) -> dict:
    return {"model.llm": str(tiny_models / "llm"), "model.vision": str(tiny_models / "vision"),
            "data.sources": sources, "data.num_workers": 1, "data.shuffle_buffer": 8, "run.out_dir": str(out),
            "run.max_steps": 6, "run.save_interval": 3, "run.keep_last": 5, "run.batch_size": 2, **extra}


def test_training_on_http_shards_stopped_by_sigterm_resumes_with_identical_losses(tiny_models, http_root, tmp_path,
                                                                                     monkeypatch):
    """The training loop over tar shards from a real HTTP server mixed with a local Cauldron
    save_to_disk folder and a hub id (on a local hub layout), with a loader worker reading ahead, gets a real SIGTERM during step 3: it
    checkpoints the step it stops after, and `--resume auto` gives every later loss of the uninterrupted run, bit
    for bit. (The SIGTERM to a whole process group, through the CLI: tests/test_faults.py.)"""
    import os
    import signal

    from crossvlm.configs import config_path
    from crossvlm.train.config import load_config
    from crossvlm.train.loop import Trainer, train
    from test_train import losses

    www, url = http_root
    caption_shards(www / "caps", shards=3, per_shard=6)
    cauldron_dataset(6).save_to_disk(str(tmp_path / "saved"))
    hub = hub_layout(tmp_path / "hub")
    sources = [f"{url}/caps/{{00000..00002}}.tar", {"path": str(tmp_path / "saved"), "weight": 0.5},
               {"path": f"{hub}:vqav2", "split": "train", "weight": 0.5}]
    debug = config_path("debug.yaml")
    run = functools.partial(stream_run, tiny_models, sources, **{"run.max_steps": 7, "run.save_interval": 100})
    train(load_config(debug, run(tmp_path / "whole")))

    after_step = Trainer._after_step

    def sigterm_after_step_3(self, *args):
        if self.step == 2:  # this call makes step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(self, *args)

    monkeypatch.setattr(Trainer, "_after_step", sigterm_after_step_3)
    stopped = train(load_config(debug, run(tmp_path / "stopped")))
    monkeypatch.undo()
    stopped_at = max(losses(tmp_path / "stopped"))  # the step that saw the signal, or the one after
    assert stopped.name == f"step-{stopped_at:07d}" and 3 <= stopped_at <= 4
    train(load_config(debug, run(tmp_path / "stopped", **{"run.resume": "auto"})))
    ref, got = losses(tmp_path / "whole"), losses(tmp_path / "stopped")
    assert sorted(ref) == sorted(got) == list(range(1, 8))
    for step in range(stopped_at + 1, 8):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    meta = json.loads((stopped / "meta.json").read_text())
    assert meta["data"]["streaming"] and meta["data"]["batches"] == stopped_at and len(meta["data"]["streams"]) == 1
    # The remote tars' size is unknown, so epochs cannot be turned into steps.
    with pytest.raises(ConfigError, match="run.max_steps is needed"):
        train(load_config(debug, run(tmp_path / "epochs", **{"run.max_steps": 0, "run.epochs": 1})))


def test_two_processes_resume_streamed_shards_with_identical_losses(tiny_models, tmp_path):
    """torchrun, 2 CPU processes (gloo) × 2 loader workers: 4 streams over 3 tar shards and a Cauldron
    parquet file (each cut into parts);
    resuming from its step-3 checkpoint (what `--resume auto` finds after a SIGKILL) gives its losses
    bit for bit. (Another number of processes is refused: the streams are dealt per process and worker.)"""
    from test_distributed import free_port, torchrun

    caption_shards(tmp_path / "caps", shards=3, per_shard=8)
    cauldron_dataset(5).to_parquet(str(tmp_path / "cauldron.parquet"))
    sources = [str(tmp_path / "caps"), {"path": str(tmp_path / "cauldron.parquet"), "weight": 0.5}]
    runs = [{"name": "whole", "overrides": stream_run(tiny_models, sources, tmp_path / "whole", **{
                "data.num_workers": 2, "run.batch_size": 1})},
            {"name": "resumed", "overrides": stream_run(tiny_models, sources, tmp_path / "resumed", **{
                "data.num_workers": 2, "run.batch_size": 1,
                "run.resume": str(tmp_path / "whole/checkpoints/step-0000003")})}]
    from crossvlm.configs import config_path
    from test_train import losses

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": str(config_path("debug.yaml")), "runs": runs,
                                "results": str(tmp_path / "results.json")}))
    launch = torchrun("--master_port", str(free_port()), str(Path(__file__).parent / "train_many.py"), str(spec))
    out = launch.communicate(timeout=300)[0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results.get("whole") == "ok" and results.get("resumed") == "ok", out + json.dumps(results)
    ref, got = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    meta = json.loads((tmp_path / "whole/checkpoints/step-0000003/meta.json").read_text())
    assert len(meta["data"]["streams"]) == 2 and meta["data"]["streams"][0] != meta["data"]["streams"][1]


def test_bench_reads_the_same_jpegs_as_parquet_tar_shards_and_over_http(tiny_models, tmp_path, capsys):
    from crossvlm.cli import main

    assert main(["data", "bench", "--photos", "48", "--shards", "--llm", str(tiny_models / "llm"),
                 "--vision", str(tiny_models / "vision"), "--workers", "1", "--seconds", "0.3",
                 "--batch-size", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["reader", "workers", "samples/s", "per", "worker", "per", "CPU", "s", "first",
                                "batch", "s"]
    rows = {(" ".join(line.split()[:-5]), int(line.split()[-5])): float(line.split()[-4]) for line in lines[1:]}
    assert set(rows) == {(name, w) for name in ("parquet", "tar shards", "tar shards over HTTP") for w in (1,)}
    assert all(rate > 0 for rate in rows.values())


def test_options_that_do_not_apply_to_a_source_are_refused(tmp_path):
    caption_shards(tmp_path / "caps", shards=1, per_shard=2)
    cauldron_dataset().to_parquet(str(tmp_path / "c.parquet"))
    cauldron_dataset().save_to_disk(str(tmp_path / "saved"))
    for path, options, message in [
            (tmp_path / "c.parquet", {"split": "train"}, "has none"),
            (tmp_path / "saved", {"split": "test"}, "not a DatasetDict"),
            (tmp_path / "c.parquet", {"fmt": "webdataset"}, "no tar shards"),
            (tmp_path / "caps", {"fmt": "llava"}, "holds webdataset tar shards"),
            (tmp_path / "c.parquet", {"fmt": "minimind"}, "neither MiniMind-V columns"),
            (tmp_path / "data/missing.parquet", {}, "no such file"),
            (f"{tmp_path}/caps/{{00000..00002}}.tar", {}, "2 of 3 shards do not exist")]:
        with pytest.raises(DataError, match=message):
            resolve_source(str(path), **options)
