"""`crossvlm serve` under a hostile or careless client (issue 28): every row of the issue's table, a fuzzer over
the request's fields, one client's oversized requests beside another's small one, structured outputs, /metrics."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from crossvlm.inference import ChatModel
from crossvlm.serve.app import ServerSettings, create_app
from serving import data_url, live_server, shapes_image

pytest.importorskip("llguidance")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "count"], "additionalProperties": False}


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir) -> ChatModel:
    return ChatModel.load(tiny_vlm_dir, device="cpu")


@pytest.fixture(scope="module")
def url(chat):
    with live_server(create_app(chat, ServerSettings(model_name="tiny", default_max_tokens=8))) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _msg(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert code is None or error["code"] == code, error
    assert param is None or error["param"] == param, error
    return error["message"]


def _healthy(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/chat/completions", json={"messages": _msg(), "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_the_issue_table_rows(http, chat):
    # A 30 MB prompt without whitespace: refused from its size, before the tokenizer sees it
    start = time.perf_counter()
    message = _error(http.post("/v1/chat/completions", json={"messages": _msg("x" * 30_000_000)}), 400,
                     "context_length_exceeded", "messages")
    assert "characters" in message and time.perf_counter() - start < 10
    # More images than the context holds: refused from their count, before any is decoded (these would not decode)
    images = chat.context_length // chat.processor.num_image_tokens + 1
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * images
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]}), 400,
           "context_length_exceeded", "messages")
    # Sizes in range: the engine's context decides, after tokenizing
    _error(http.post("/v1/chat/completions", json={"messages": _msg("word " * (chat.context_length + 5))}), 400,
           "context_length_exceeded")
    message = _error(http.post("/v1/chat/completions", json={"messages": _msg(), "seed": 2**70}), 400, param="seed")
    assert "9223372036854775807" in message
    message = _error(http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": _msg()}), 404,
                     "model_not_found", "model")
    assert "'tiny'" in message
    message = _error(http.post("/v1/chat/completions", json={"messages": _msg(), "max_tokens": 1_000_000}), 400,
                     "context_length_exceeded", "max_tokens")
    assert f"context is {chat.context_length} tokens" in message
    for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
                         ("functions", [{"name": "f"}]), ("function_call", "auto")]:
        message = _error(http.post("/v1/chat/completions", json={"messages": _msg(), field: value}), 400,
                         "unsupported_parameter", field)
        assert message.startswith("this server does not do tool (function) calling"), message
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "42"}]}), 400,
           "unsupported_parameter")
    for field, value in [("top_logprobs", 3), ("logprobs", True), ("audio", {"voice": "x"}), ("n", 2),
                         ("modalities", ["text", "audio"]), ("store", True),
                         ("stream_options", {"include_usage": True})]:
        _error(http.post("/v1/chat/completions", json={"messages": _msg(), field: value}), 400, param=field)
    message = _error(http.post("/v1/chat/completions", json={"messages": _msg(), "guided_json": {}}), 400,
                     "invalid_request", "guided_json")
    assert "unknown field" in message
    message = _error(http.post("/v1/chat/completions", content=json.dumps({"messages": _msg()}),
                               headers={"Content-Type": "text/plain"}), 400, "invalid_content_type")
    assert "application/json" in message
    _error(http.post("/v1/chat/completions", json={"messages": _msg(), "logit_bias": {"abc": 1}}), 400, param="logit_bias")
    _error(http.post("/v1/chat/completions", json={"messages": _msg(), "stop": ["x"] * 17}), 400, param="stop")
    # Cheap to send, costly to parse: a million small objects, or arrays nested 200,000 deep
    parts = [{"type": "text", "text": ""}] * 1_000_000
    start = time.perf_counter()
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]}), 400,
           "request_too_complex")
    _error(http.post("/v1/chat/completions", content=b"[" * 10_000 + b"]" * 10_000,
                     headers={"Content-Type": "application/json"}), 400, "invalid_json")  # (Python's recursion limit)
    _error(http.post("/v1/chat/completions", content=b"[" * 500 + b"]" * 500,
                     headers={"Content-Type": "application/json"}), 400, "invalid_request")
    _error(http.post("/v1/chat/completions", content=b'{"messages": ' + b"[" * 19_000,
                     headers={"Content-Type": "application/json"}), 400, "invalid_json")
    assert time.perf_counter() - start < 5
    # Fields honoured, as vLLM does: accepted and changing the answer
    plain = http.post("/v1/chat/completions", json={"messages": _msg(), "max_tokens": 4, "temperature": 0}).json()
    token = chat.tokenizer.convert_tokens_to_ids("red") if "red" in chat.tokenizer.get_vocab() else 300
    biased = http.post("/v1/chat/completions", json={"messages": _msg(), "max_tokens": 4, "temperature": 0,
                                                     "logit_bias": {str(token): 100}, "frequency_penalty": 0.5,
                                                     "presence_penalty": 0.5, "user": "u1", "metadata": {"a": "b"}})
    assert biased.status_code == 200, biased.text
    assert biased.json()["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]
    _healthy(http)


def test_a_chunked_body_over_the_cap_gets_413(chat):
    """No Content-Length: the body is read up to the cap and refused there, in OpenAI's error format."""
    with live_server(create_app(chat, ServerSettings(max_request_bytes=1_000_000))) as base:
        def body():
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(70):
                yield b"x" * 100_000
            yield b'"}]}'

        with httpx.Client(base_url=base, timeout=30) as client:
            try:
                r = client.post("/v1/chat/completions", content=body(), headers={"Content-Type": "application/json"})
            except httpx.TransportError:  # the server may close before the client has sent it all
                pytest.fail("the server hung up without an answer")
            _error(r, 413, "request_too_large")
            small = client.post("/v1/chat/completions", content=b"".join([b'{"messages": [{"role": "user", '
                                                                          b'"content": "hi"}], "max_tokens": 2}']),
                                headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
            assert small.status_code == 200, small.text


def test_oversized_requests_do_not_delay_a_small_one(url, http):
    """Four clients send 10 MB prompts and malformed bodies over and over; another's 2-token request takes no more
    than a few hundred ms longer than alone."""
    small = {"messages": _msg("hello"), "max_tokens": 2, "temperature": 0}

    def latency() -> float:
        start = time.perf_counter()
        assert http.post("/v1/chat/completions", json=small).status_code == 200
        return time.perf_counter() - start

    alone = sorted(latency() for _ in range(5))[2]
    big = json.dumps({"messages": _msg("y" * 10_000_000)}).encode()
    stop = threading.Event()
    statuses: list[int] = []

    def abuse(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                body = big if k % 2 == 0 else big[: len(big) // 2]  # whole, and cut off mid-string
                statuses.append(client.post("/v1/chat/completions", content=body,
                                            headers={"Content-Type": "application/json"}).status_code)

    def resident() -> int:  # this process's (the server's and its clients') resident bytes
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    peak = [resident()]

    def watch() -> None:
        while not stop.is_set():
            peak.append(resident())
            time.sleep(0.01)

    threads = [threading.Thread(target=abuse, args=(k,)) for k in range(4)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        beside = [latency() for _ in range(8)]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    print(f"a 2-token request: {alone:.3f} s alone, at most {max(beside):.3f} s beside {len(statuses)} refused 10 MB "
          f"bodies; resident memory +{(max(peak) - peak[0]) / 1e6:.0f} MB at most")
    assert statuses and set(statuses) == {400}, set(statuses)
    assert max(beside) < alone + 0.4, (alone, beside)
    # Each 10 MB body lives a few times over (bytes, text, the clients' copies), never tokenized (2.4 GB it was)
    assert max(peak) - peak[0] < 500e6, (max(peak) - peak[0]) / 1e6


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)
PNG = data_url(shapes_image(5, (32, 32)))
# Each field's values a client could mean (edges and refusable ones included); a broken request then has one
# field replaced by any JSON value.
FIELDS = {
    "model": st.sampled_from(["tiny", "other"]),
    "max_tokens": st.integers(1, 6) | st.integers(10**6, 2**70), "max_completion_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50) | st.just(2**31),
    "seed": st.integers(-(2**63), 2**63 - 1), "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "5", "100", "999999999"]), st.floats(-100, 100), max_size=3),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=4),
    "min_tokens": st.integers(0, 4), "ignore_eos": st.booleans(), "stream": st.booleans(), "n": st.just(1),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"},
                                        {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
                                        {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 5}}}]),
    "logprobs": st.just(False), "tools": st.just([]), "tool_choice": st.just("none"),
    "chat_template_kwargs": st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()}),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": st.text(max_size=5), "metadata": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
}
PART = st.sampled_from([{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": PNG}},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}])
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                 "content": st.text(max_size=40) | st.lists(PART, max_size=3)})
VALID = st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=3)}, optional=FIELDS)
BROKEN = st.tuples(VALID, st.sampled_from([*FIELDS, "messages", "guided_json"]), JSON_VALUES).map(
    lambda t: {**t[0], t[1]: t[2]})
REQUESTS = VALID | BROKEN | JSON_VALUES


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=REQUESTS)
def test_fuzzed_requests_never_get_a_5xx(http, body):
    """Property: whatever JSON a client sends, the answer is a 200 or a 4xx in OpenAI's format, never a 5xx."""
    # (json.dumps writes inf and nan as Infinity and NaN, as Python clients send them)
    r = http.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body, r.text[:500])
    if r.status_code != 200:
        _error(r, r.status_code)
    elif not (isinstance(body, dict) and body.get("stream")):
        assert r.json()["choices"][0]["message"]["content"] is not None


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzzed_bodies_never_get_a_5xx(http, raw):
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500 and r.status_code != 200, r.text[:300]
    _error(r, r.status_code)


def test_after_the_fuzzers_the_server_is_fine(http):
    _healthy(http)


def test_structured_outputs_through_the_openai_client(url, chat):
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(model="tiny", messages=_msg("which colour?"), max_tokens=100,
                                           temperature=0, response_format=fmt)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    chunks = client.chat.completions.create(model="tiny", messages=_msg("which colour?"), max_tokens=100,
                                            temperature=0.9, seed=4, response_format=fmt, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SCHEMA)
    anything = client.chat.completions.create(model="tiny", messages=_msg("hi"), max_tokens=200, temperature=0,
                                              response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:  # the budget ran out inside the object: what was written is its beginning
        assert anything.choices[0].message.content.startswith("{")
    with httpx.Client(base_url=url) as http:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
        _error(http.post("/v1/chat/completions", json={"messages": _msg(), "response_format": bad}), 400,
               "invalid_json_schema", "response_format")
        _error(http.post("/v1/chat/completions", json={"messages": _msg(), "response_format": {"type": "json_object"},
                                                       "chat_template_kwargs": {"enable_thinking": True}}), 400)


def test_metrics_in_prometheus_format_under_vllm_names(chat):
    with live_server(create_app(chat, ServerSettings(model_name="tiny"))) as base, httpx.Client(base_url=base) as http:
        tokens = prompt = cached = 0
        for k in range(3):
            body = {"messages": _msg(f"question {k}"), "max_tokens": 5, "temperature": 0, "stream": k == 1,
                    "stream_options": {"include_usage": True} if k == 1 else None, "ignore_eos": True}
            r = http.post("/v1/chat/completions", json=body)
            usage = json.loads(r.text.split("data: ")[-2])["usage"] if k == 1 else r.json()["usage"]
            tokens, prompt = tokens + usage["completion_tokens"], prompt + usage["prompt_tokens"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
        long = " ".join(f"word{i}" for i in range(400))  # more than a KV block: the second finds it cached
        for _ in range(2):
            usage = http.post("/v1/chat/completions", json={"messages": _msg(long), "max_tokens": 5, "temperature": 0,
                                                            "ignore_eos": True}).json()["usage"]
            tokens, prompt = tokens + usage["completion_tokens"], prompt + usage["prompt_tokens"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0
        http.post("/v1/chat/completions", json={"messages": _msg(), "model": "other"})
        r = http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in prometheus_parser.text_string_to_metric_families(r.text) for s in family.samples}
        model = (("model_name", "tiny"),)
        assert samples[("vllm:generation_tokens_total", model)] == tokens == 25
        assert samples[("vllm:prompt_tokens_total", model)] == prompt
        assert samples[("vllm:request_success_total", (("finished_reason", "length"), *model))] == 5
        assert samples[("vllm:time_to_first_token_seconds_count", model)] == 5
        assert samples[("vllm:inter_token_latency_seconds_count", model)] == 5 * 4
        assert samples[("vllm:e2e_request_latency_seconds_count", model)] == 5
        assert samples[("vllm:request_queue_time_seconds_count", model)] == 5
        assert 0 < samples[("vllm:time_per_output_token_seconds_sum", model)]
        assert samples[("vllm:num_requests_running", model)] == 0 == samples[("vllm:num_requests_waiting", model)]
        assert samples[("vllm:kv_cache_usage_perc", model)] == 0
        assert samples[("vllm:prefix_cache_queries_total", model)] == prompt
        assert samples[("vllm:prefix_cache_hits_total", model)] == cached
        assert samples[("vllm:num_preemptions_total", model)] == 0
        assert samples[("crossvlm:requests_refused_total", (("model_name", "tiny"), ("status", "404")))] == 1


def test_the_openapi_document_describes_the_request(http):
    """The body is parsed off the event loop, not by FastAPI: its schema is still in /openapi.json, every
    reference resolved, for clients and fuzzers that read it."""
    import re

    doc = http.get("/openapi.json").json()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["messages"] and {"response_format", "logit_bias", "seed"} <= set(body["properties"])
    refs = {r.rsplit("/", 1)[1] for r in re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc))}
    assert refs and refs <= set(doc["components"]["schemas"])


def test_constrained_streams_left_mid_answer_free_their_slots(url, chat):
    """Clients that hang up inside a JSON document: their slots are freed, the engine leaves lockstep, and the
    constrained and free requests after them are answered as before."""
    schemas = [SCHEMA, {"type": "array", "items": {"type": "string", "maxLength": 4}},
               {"type": "object", "properties": {"n": {"type": "integer"}}}]
    body = lambda k: {"messages": _msg(f"q{k}"), "max_tokens": 300, "temperature": 0, "stream": True,  # noqa: E731
                      "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schemas[k % 3]}}}

    def leave_early(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client, client.stream("POST", "/v1/chat/completions",
                                                                             json=body(k)) as r:
            for n, _line in enumerate(r.iter_lines()):
                if n >= 3:
                    return  # hang up after a few events

    threads = [threading.Thread(target=leave_early, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    deadline = time.monotonic() + 30
    while chat.engine.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chat.engine.running() == 0 and not chat.engine._lockstep()
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={**body(0), "stream": False, "max_tokens": 100})
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)
        _healthy(http)
