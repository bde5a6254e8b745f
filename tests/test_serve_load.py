"""`crossvlm serve` under load and faults: queueing, 429, disconnects, failed generations, vLLM's fields."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

import crossvlm
from crossvlm.engine import EngineConfig, SamplingParams
from crossvlm.serve.app import ServerSettings, create_app
from serving import data_url, live_server, shapes_image

NAN_IMAGE = Image.new("RGB", (64, 64), (0, 0, 0))  # the fault injected below knows these two by their pixels
OOM_IMAGE = Image.new("RGB", (64, 64), (255, 255, 255))


def _ask(text: str, image=None, **fields) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def _health(base: str) -> dict:
    return httpx.get(base + "/health").json()["engine"]


def _wait_for(condition, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def two_slots(tiny_vlm_dir):
    """A server with two slots and room for two waiting requests."""
    chat = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=2, max_len=1024))
    with live_server(create_app(chat, ServerSettings(max_waiting=2, retry_after=3))) as base:
        yield chat, base


def test_busy_slots_queue_then_429_with_retry_after(two_slots):
    chat, base = two_slots
    long = _ask("hello", max_tokens=400, ignore_eos=True)
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(httpx.post, base + "/v1/chat/completions", json=long, timeout=120) for _ in range(4)]
        _wait_for(lambda: (e := _health(base))["running"] == 2 and e["waiting"] == 2, "2 running and 2 waiting")
        refused = httpx.post(base + "/v1/chat/completions", json=_ask("hello", max_tokens=5))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
        error = refused.json()["error"]
        assert error["code"] == "server_busy" and error["type"] == "rate_limit_error" and "2 slots" in error["message"]
        answers = [c.result() for c in calls]
    assert [r.status_code for r in answers] == [200] * 4  # the waiting ones were answered once slots freed
    assert all(r.json()["usage"]["completion_tokens"] == 400 for r in answers)
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in answers)  # ignore_eos
    ok = httpx.post(base + "/v1/chat/completions", json=_ask("hello", max_tokens=5), timeout=60)
    assert ok.status_code == 200


def test_client_disconnect_mid_stream_frees_its_slot(two_slots):
    chat, base = two_slots
    body = _ask("hello", max_tokens=1000, ignore_eos=True, stream=True)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(line for line in lines if line.startswith("data:"))
            assert _health(base)["running"] == 1
    # The connection is closed with most of the answer still to come.
    _wait_for(lambda: _health(base)["running"] == 0, "the slot to be freed", seconds=5)
    assert chat.engine.free_slots == 2


def test_min_tokens_and_context_limit(two_slots):
    chat, base = two_slots
    reply = httpx.post(base + "/v1/chat/completions", json=_ask("hello", max_tokens=6, min_tokens=6), timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 6
    long = httpx.post(base + "/v1/chat/completions", json=_ask("word " * 1100, max_tokens=5), timeout=60)
    assert long.status_code == 400
    error = long.json()["error"]
    assert error["code"] == "context_length_exceeded" and "1024 tokens" in error["message"]
    bad = httpx.post(base + "/v1/chat/completions", json=_ask("hi", min_tokens=-1))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens"


@pytest.fixture(scope="module")
def faulty(tiny_vlm_dir):
    """A server whose image path fails for two images: non-finite features (black), out of memory (white)."""
    chat = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=8, max_len=512))
    encode = chat.model.encode_images

    def failing_encode(pixel_values: torch.Tensor) -> torch.Tensor:
        plain = pixel_values.flatten(2).std(2).amax(1) < 1e-4  # (N,): one colour, constant in every channel
        white = plain & (pixel_values.flatten(1).mean(1) > 0)
        if white.any():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        visual = encode(pixel_values)
        return visual.masked_fill((plain & ~white)[:, None, None], float("nan"))

    chat.model.encode_images = failing_encode
    with live_server(create_app(chat, ServerSettings())) as base:
        yield chat, base


def test_a_failing_generation_gets_a_500_and_the_others_finish(faulty):
    chat, base = faulty
    questions = [("what colour is the circle?", shapes_image(41)), ("count the shapes", shapes_image(42)),
                 ("hello", None)]
    expected = [chat.chat([{"role": "user", "content": ("<image>" if im else "") + q}], [im] if im else [],
                          SamplingParams(max_new_tokens=40, greedy=True, ignore_eos=True)).text for q, im in questions]
    short = chat.chat([{"role": "user", "content": "hi"}], [], SamplingParams(max_new_tokens=8, greedy=True)).text
    results: dict[str, object] = {}

    def stream(k: int) -> None:
        q, im = questions[k]
        text = ""
        with httpx.stream("POST", base + "/v1/chat/completions", timeout=120,
                          json=_ask(q, im, max_tokens=40, ignore_eos=True, stream=True)) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    text += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
                    results.setdefault("streaming", threading.Event()).set()
        results[k] = text

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(len(questions))]
    for t in threads:
        t.start()
    _wait_for(lambda: "streaming" in results and _health(base)["running"] >= 1, "answers in flight")
    for image in (NAN_IMAGE, OOM_IMAGE):  # while the others are mid-answer
        for stream_it in (False, True):
            r = httpx.post(base + "/v1/chat/completions", timeout=60,
                           json=_ask("what is this?", image, max_tokens=10, stream=stream_it))
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "server_error" and error["code"] == "generation_failed"
            assert ("not finite" if image is NAN_IMAGE else "OutOfMemoryError") in error["message"]
    for t in threads:
        t.join(120)
    assert [results[k] for k in range(len(questions))] == expected
    after = httpx.post(base + "/v1/chat/completions", json=_ask("count the shapes", shapes_image(42), max_tokens=40,
                                                                ignore_eos=True), timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected[1]
    # A short prompt in a slot a failed request left: nothing of the failure leaks into its answer.
    reused = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 8, "temperature": 0}, timeout=60)
    assert reused.status_code == 200 and reused.json()["choices"][0]["message"]["content"] == short
