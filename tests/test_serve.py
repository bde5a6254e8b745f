"""`crossvlm serve` end to end: a real uvicorn server, the official `openai` client, raw HTTP for errors."""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, OpenAI

from crossvlm.inference import ChatModel, SamplingParams
from crossvlm.serve.app import ServerSettings, create_app
from crossvlm.serve.images import ImagePolicy
from serving import data_url, live_server, png_bytes, shapes_image

KEY = "test-key"
MAX_PIXELS = 100_000


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir) -> ChatModel:
    return ChatModel.load(tiny_vlm_dir, device="cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("served_images")
    (folder / "shapes.png").write_bytes(png_bytes(shapes_image(11)))
    (folder / "big.png").write_bytes(png_bytes(shapes_image(12, (400, 400))))
    return folder


@pytest.fixture(scope="module")
def image_host(image_dir):
    """A local HTTP server for remote-image tests: files from image_dir, plus /slow.png that stalls."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(image_dir), **kwargs)

        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(1.5)
            return super().do_GET()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the crossvlm server hangs up on oversized downloads, as it should

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def url(chat, image_dir):
    """A server with every option on: API key, remote and local images, a small pixel limit."""
    settings = ServerSettings(
        model_name="tiny", api_key=KEY,
        images=ImagePolicy(max_pixels=MAX_PIXELS, max_bytes=200_000, allow_remote=True, remote_timeout=1.0,
                           local_root=image_dir),
    )
    with live_server(create_app(chat, settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _greedy(chat, text: str, images=(), max_tokens: int = 12) -> str:
    messages = [{"role": "user", "content": "<image>" * len(images) + text}]
    return chat.chat(messages, list(images), SamplingParams(max_new_tokens=max_tokens, greedy=True)).text


def _ask(text: str, image=None, image_url: str | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image is not None or image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url or data_url(image)}})
    return [{"role": "user", "content": content}]


def test_openai_client_plain_and_streaming(chat, client):
    image = shapes_image(21)
    expected = _greedy(chat, "what colour is the circle?", [image])
    assert [m.id for m in client.models.list().data] == ["tiny"]

    reply = client.chat.completions.create(model="tiny", messages=_ask("what colour is the circle?", image),
                                           max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt = chat.prompt([{"role": "user", "content": "<image>what colour is the circle?"}], [image])
    assert reply.usage.prompt_tokens == len(prompt.input_ids)
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model="tiny", messages=_ask("what colour is the circle?", image), max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1, "streamed in pieces"
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_stop_seed_and_thinking_options(chat, client):
    expected = _greedy(chat, "is there a star?", max_tokens=16)
    stop = expected[5:9]
    cut = client.chat.completions.create(model="tiny", messages=_ask("is there a star?"), max_tokens=16,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].message.content == expected[: expected.find(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"

    sampled = [client.chat.completions.create(model="tiny", messages=_ask("hello"), max_tokens=10,
                                              temperature=1.0, top_p=1.0, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]

    thought = client.chat.completions.create(model="tiny", messages=_ask("hello"), max_tokens=10, temperature=0,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert isinstance(thought.choices[0].message.reasoning_content, str)  # reasoning kept apart
    plain = client.chat.completions.create(model="tiny", messages=_ask("hello"), max_tokens=10, temperature=0)
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None


def test_concurrent_requests_each_get_their_own_answer(chat, url, client):
    questions = ["hello", "what colour is the circle?", "count the shapes", "describe the image",
                 "is there a star?", "where is the big red square on the left?"]
    images = [None, shapes_image(31), shapes_image(32, (90, 60)), None, shapes_image(33), shapes_image(34)]
    budgets = [12, 8, 12, 5, 12, 10]
    expected = [_greedy(chat, q, [i] if i else [], n) for q, i, n in zip(questions, images, budgets)]
    assert len(set(expected)) == len(expected)
    before = httpx.get(url + "/health").json()["engine"]

    def ask(k: int) -> str:
        kwargs = dict(model="tiny", messages=_ask(questions[k], images[k]), max_tokens=budgets[k], temperature=0)
        if k % 2:  # half of them streamed
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kwargs) if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, range(len(questions))))
    assert answers == expected
    health = httpx.get(url + "/health").json()
    after = health["engine"]
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens >= sum(len(a) > 0 for a in answers)
    assert steps < tokens, "concurrent requests shared the engine's steps"
    # The timers behind `bench serve`'s breakdown: every request counted once, each phase timed
    assert after["first_tokens"] - before["first_tokens"] == len(questions)
    assert health["server"]["prepared"] >= len(questions) and health["server"]["prepare_s"] > 0
    waited = after["queue_s"] - before["queue_s"]
    to_first = after["first_token_s"] - before["first_token_s"]
    assert 0 <= waited < to_first, "a request's wait for a slot is part of its time to the first token"
    for timer in ("admit_s", "prefill_s", "decode_s", "collect_s"):
        assert after[timer] > before[timer], timer


def _bad_requests(chat) -> list[tuple[str, object, int, str]]:
    too_big = png_bytes(shapes_image(0, (400, 300)))  # 120,000 pixels > MAX_PIXELS
    long_text = "word " * (chat.context_length + 10)
    return [
        ("malformed JSON", b'{"messages": [', 400, "invalid_json"),
        ("no messages", {"model": "tiny"}, 400, "invalid_request"),
        ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request"),
        ("wrong content type", {"messages": [{"role": "user", "content": 42}]}, 400, "invalid_request"),
        ("bad temperature", {"messages": _ask("hi"), "temperature": 5}, 400, "invalid_request"),
        ("n > 1", {"messages": _ask("hi"), "n": 2}, 400, "unsupported_parameter"),
        ("bad base64", {"messages": _ask("hi", image_url="data:image/png;base64,@@notbase64@@")}, 400,
         "invalid_base64"),
        ("not an image", {"messages": _ask("hi", image_url="data:image/png;base64,aGVsbG8gd29ybGQ=")}, 400,
         "invalid_image"),
        ("over the pixel limit", {"messages": _ask("hi", image_url="data:image/png;base64,"
                                                   + base64.b64encode(too_big).decode())}, 400, "image_too_large"),
        ("over the context", {"messages": _ask(long_text)}, 400, "context_length_exceeded"),
        ("special tokens in text", {"messages": _ask("<|vision_start|>")}, 400, "invalid_content"),
        ("unsupported scheme", {"messages": _ask("hi", image_url="ftp://example.org/a.png")}, 400,
         "invalid_image_url"),
    ]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(chat, url):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=30) as http:
        for name, body, status, code in _bad_requests(chat):
            if isinstance(body, bytes):
                r = http.post("/v1/chat/completions", content=body, headers={**auth, "Content-Type": "application/json"})
            else:
                r = http.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == status, (name, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error", (name, error)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.post("/v1/chat/completions", json={"messages": _ask("hi")}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200  # open, for load balancers
        r = http.get("/v1/nothing-here", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

        r = http.post("/v1/chat/completions", headers=auth,
                      json={"messages": _ask("count the shapes"), "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == _greedy(chat, "count the shapes")


def test_a_body_over_the_limit_gets_413_before_it_is_read(chat):
    from fastapi.testclient import TestClient

    with TestClient(create_app(chat, ServerSettings(max_request_bytes=1000))) as http:
        r = http.post("/v1/chat/completions", json={"messages": _ask("x" * 2000)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = http.post("/v1/chat/completions", json={"messages": _ask("hi"), "max_tokens": 2})
        assert r.status_code == 200


def test_the_server_sends_each_event_at_once_nagle_off():
    """Nagle's algorithm held a stream's first event back until the client's delayed ACK (40 ms on
    every time to first token): the listening socket turns it off, and connections inherit that."""
    import socket

    from crossvlm.commands.serve import bind

    with bind("127.0.0.1", 0) as server, socket.create_connection(server.getsockname()[:2]):
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_an_event_of_the_stream_is_one_line_whatever_the_text():
    """JSON leaves U+2028, U+2029 and U+0085 raw, and line readers (httpx's aiter_lines) split on them."""
    from crossvlm.serve.app import _sse

    text = "a\u2028b\u2029c\x85d\u00e9\n"
    event = _sse({"choices": [{"delta": {"content": text}}]})
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):])["choices"][0]["delta"]["content"] == text
    assert "\u00e9" in event  # other characters stay as they are


def test_remote_and_local_images_when_enabled(chat, client, image_host, image_dir):
    expected = _greedy(chat, "describe the image", [shapes_image(11)])

    def ask(image_url: str):
        return client.chat.completions.create(model="tiny", messages=_ask("describe the image", image_url=image_url),
                                              max_tokens=12, temperature=0)

    assert ask(f"{image_host}/shapes.png").choices[0].message.content == expected
    assert ask(str(image_dir / "shapes.png")).choices[0].message.content == expected
    assert ask("file://" + str(image_dir / "shapes.png")).choices[0].message.content == expected
    refusals = [(f"{image_host}/big.png", "image_too_large"), (f"{image_host}/slow.png", "image_fetch_timeout"),
                (f"{image_host}/missing.png", "image_fetch_failed"), ("/etc/hostname", "local_image_refused"),
                (str(image_dir / ".." / "x.png"), "local_image_refused")]
    for image_url, code in refusals:
        with pytest.raises(BadRequestError) as err:
            ask(image_url)
        assert err.value.body["code"] == code, image_url


def test_remote_and_local_images_refused_by_default(chat, image_host, image_dir):
    from fastapi.testclient import TestClient

    with TestClient(create_app(chat, ServerSettings())) as http:
        for image_url, code in [(f"{image_host}/shapes.png", "remote_images_disabled"),
                                (str(image_dir / "shapes.png"), "local_images_disabled")]:
            r = http.post("/v1/chat/completions", json={"messages": _ask("hi", image_url=image_url)})
            assert r.status_code == 400 and r.json()["error"]["code"] == code


def test_serve_command_on_loopback_with_api_key_from_env(tiny_vlm_dir):
    env = {**os.environ, "CROSSVLM_API_KEY": "from-env", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "crossvlm.cli", "serve", "--model", str(tiny_vlm_dir),
                             "--port", "0", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # the engine's start (stderr here too), then the address
        assert lines[0].startswith("crossvlm serve: engine of 8 slots") and "engine ready in" in lines[1], lines
        line = lines[2]
        assert " on http://127.0.0.1:" in line, line
        base = line.split(" on ")[1].split()[0]
        assert httpx.get(base + "/health", timeout=30).json()["status"] == "ok"
        assert httpx.get(base + "/v1/models").status_code == 401
        models = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer from-env"})
        assert models.json()["data"][0]["id"] == Path(tiny_vlm_dir).name
    finally:
        proc.terminate()
        proc.wait(10)
