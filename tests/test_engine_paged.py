"""The engine's paged KV cache: prefix reuse across chat turns (images hashed, not only ids),
preemption under a small block budget, requests bounded by tokens in use rather than by slots, and
the attention the engine registers staying on its own model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import crossvlm
from crossvlm.engine import EngineConfig, SamplingParams
from crossvlm.model.modeling import CrossVLM
from serving import shapes_image
from test_engine import _hf_tokens, _run, _user

BLOCK = 16


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir) -> CrossVLM:
    return CrossVLM.from_pretrained(str(tiny_vlm_dir)).eval()


@pytest.fixture(scope="module")
def paged(tiny_vlm_dir):
    """Blocks of 16 positions (the prefix cache shares whole blocks only)."""
    chat = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=4, max_len=512, block_size=BLOCK))
    yield chat
    chat.close()


def _count_images(chat, monkeypatch) -> list[int]:
    """Record how many images each admission encodes."""
    encoded = []
    encode = chat.engine.runner._encode
    monkeypatch.setattr(chat.engine.runner, "_encode", lambda pixels: encoded.append(len(pixels)) or encode(pixels))
    return encoded


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True)


def test_a_chat_reuses_its_earlier_turns_and_their_image(paged, reference, monkeypatch):
    """Three turns of one chat, each re-sending the conversation with its image: turns 2 and 3 find the
    earlier turns' blocks (whole blocks of what the previous turn wrote, prompt and answer), encode no
    image, and answer with generate()'s tokens on the whole conversation."""
    encoded = _count_images(paged, monkeypatch)
    messages = [{"role": "system", "content": "you look at pictures and answer in a few words"},
                *_user("<image>what is in this picture?")]
    image = [shapes_image(7)]
    previous = None  # (ids written into the cache by the previous turn)
    for turn, follow_up in enumerate(["and what colour is the largest disc?", "is there anything else?", None]):
        prompt = paged.prompt(messages, image)
        request, = _run(paged, [prompt], [_greedy(12)])
        assert request.tokens == _hf_tokens(reference, paged, prompt, 12)
        if previous is None:
            assert request.cached_tokens == 0 and encoded == [1]
        else:
            # Everything the previous turn wrote that this prompt starts with, in whole blocks, less the
            # last position (its logits give the first token).
            expected = min(_common(prompt.input_ids, previous), len(prompt.input_ids) - 1) // BLOCK * BLOCK
            assert request.cached_tokens == expected >= 3 * BLOCK
            assert encoded[-1:] == [1] and len(encoded) == 1, "the image was not encoded again"
        previous = (prompt.input_ids + request.tokens)[:len(prompt.input_ids) + request.generated - 1]
        answer = paged.tokenizer.decode(request.tokens, skip_special_tokens=True)
        if follow_up:
            messages = [*messages, {"role": "assistant", "content": answer}, *_user(follow_up)]
    assert paged.engine.stats["cached_tokens"] >= 6 * BLOCK


def test_two_chats_with_the_same_text_and_different_images_share_no_image_keys(paged, reference, monkeypatch):
    """The image's pad ids are the same for every image: the blocks holding them are keyed by the image
    too. The text before the image is shared; the image's blocks and all after are not."""
    encoded = _count_images(paged, monkeypatch)
    system = {"role": "system", "content": "a long instruction that fills more than one block of the cache " * 2}
    messages = [system, *_user("<image>describe the picture")]
    first, second = (paged.prompt(messages, [shapes_image(seed)]) for seed in (11, 12))
    assert first.input_ids == second.input_ids
    image_start = first.input_ids.index(paged.model.config.image_token_id)
    assert image_start >= 2 * BLOCK
    a, = _run(paged, [first], [_greedy(10)])
    b, = _run(paged, [second], [_greedy(10)])
    assert b.cached_tokens == image_start // BLOCK * BLOCK, "the text before the image, no further"
    assert b.tokens == _hf_tokens(reference, paged, second, 10) != a.tokens
    again, = _run(paged, [first], [_greedy(10)])
    assert again.cached_tokens > image_start + paged.model.num_image_tokens and again.tokens == a.tokens
    assert encoded == [1, 1], "the first image again came from the cache"


def test_preemption_under_a_tiny_block_budget_gives_every_request_its_tokens(tiny_vlm_dir, reference):
    """Four requests whose answers together need more blocks than the cache has: the newest running one
    gives its blocks back and is recomputed later (its prompt and the tokens it had), and every request
    ends with the tokens it gets alone, greedy ones generate()'s, a seeded one with a repetition
    penalty its own."""
    from test_engine import CASES

    small = crossvlm.load(tiny_vlm_dir, device="cpu",
                          engine=EngineConfig(slots=4, max_len=512, block_size=BLOCK, kv_blocks=1 + 14))
    try:
        prompts = [small.prompt(m, i) for m, i in (CASES[0], CASES[1], CASES[4], CASES[3])]
        assert sum(len(p.input_ids) for p in prompts) + 4 * 70 > 14 * BLOCK  # more than the cache holds at once
        seeded = SamplingParams(max_new_tokens=70, temperature=1.0, top_k=0, top_p=1.0, seed=9,
                                repetition_penalty=1.3, ignore_eos=True)
        sampling = [_greedy(70), _greedy(70), _greedy(70), seeded]
        alone = _run(small, prompts[3:], [seeded])[0].tokens
        requests = _run(small, prompts, sampling)
        assert small.engine.stats["preempted"] >= 1 and sum(r.preemptions for r in requests) >= 1
        for request, prompt in zip(requests[:3], prompts):
            assert request.tokens == _hf_tokens(reference, small, prompt, 70)
        assert requests[3].tokens == alone
        assert small.engine.blocks.available == 14 and small.engine.free_slots == 4
    finally:
        small.close()


def test_more_short_requests_run_at_once_than_slots_of_the_old_size_would_allow(tiny_vlm_dir):
    """The memory four whole-length slots took (4 × 512 positions) holds 24 short requests at once:
    they are admitted together and decode in one batch."""
    many = crossvlm.load(tiny_vlm_dir, device="cpu",
                         engine=EngineConfig(slots=32, max_len=512, block_size=BLOCK, kv_blocks=1 + 4 * 512 // BLOCK))
    try:
        prompt = many.prompt(_user("hi"))
        requests = _run(many, [prompt] * 24, [_greedy(6)] * 24)
        assert all(r.generated == 6 for r in requests)
        assert many.engine.stats["largest_batch"] == 24
    finally:
        many.close()


def test_the_engine_attention_stays_on_its_model(tiny_vlm_dir, reference):
    """Building an engine routes its model's attention through the engine only for the engine's own
    steps: the same model called by anything else gives the logits of the model it was (its own kernel)."""
    model = CrossVLM.from_pretrained(str(tiny_vlm_dir)).eval()
    before = model.llm.config._attn_implementation
    chat = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=2, max_len=256, block_size=BLOCK))
    try:
        from crossvlm.engine import Engine

        Engine(model, chat.tokenizer, chat.eos_ids, EngineConfig(slots=2, max_len=256, block_size=BLOCK))
        assert model.llm.config._attn_implementation == f"crossvlm_engine+{before}"
        assert reference.llm.config._attn_implementation == before, "another model instance is untouched"
        ids = torch.tensor([chat.prompt(_user("hello")).input_ids])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)
    finally:
        chat.close()


def test_kv_cache_sizing_refuses_in_one_line_what_the_device_cannot_hold(tiny_vlm_dir):
    """GPU sizing from the free memory (given here): `slots` rows cost their logits and sampling state,
    the cache takes `kv_memory` of the rest; what cannot fit is refused before anything is allocated."""
    from crossvlm.engine.engine import ROW_BYTES_PER_VOCAB, kv_blocks
    from crossvlm.errors import ConfigError

    text = CrossVLM.from_pretrained(str(tiny_vlm_dir)).config.text_config
    per_block = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4 * 256  # fp32, 256 positions
    row = text.vocab_size * ROW_BYTES_PER_VOCAB
    cfg = EngineConfig(kv_memory=0.5)
    assert kv_blocks(cfg, text, torch.float32, 512, 64, 64 * row + 100 * per_block) == 50
    assert kv_blocks(cfg, text, torch.float32, 512, 8, 8 * row + 100 * per_block) == 8 * 2 + 1, "at most every slot's max_len"
    with pytest.raises(ConfigError, match=r"^100000 slots: .* need .* GB; this device has .* GB free"):
        kv_blocks(cfg, text, torch.float32, 512, 100_000, 10**9)
    with pytest.raises(ConfigError, match=r"^the KV cache needs .* GB for 1000 blocks .* this device has"):
        kv_blocks(EngineConfig(kv_blocks=1000), text, torch.float32, 512, 8, 8 * row + 10 * per_block)
    with pytest.raises(ConfigError, match="for one request of 4096 tokens"):
        kv_blocks(cfg, text, torch.float32, 4096, 8, 8 * row + 20 * per_block)


def test_the_server_reports_cached_prompt_tokens_as_openai_does(paged):
    """`usage.prompt_tokens_details.cached_tokens`: 0 the first time, the shared whole blocks the second,
    in a plain answer and in a stream's usage chunk."""
    import httpx

    from crossvlm.serve.app import ServerSettings, create_app
    from serving import data_url, live_server

    content = [{"type": "image_url", "image_url": {"url": data_url(shapes_image(21))}},
               {"type": "text", "text": "what do you see in this picture, in detail?"}]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 4}
    prompt_tokens = None
    with live_server(create_app(paged, ServerSettings())) as base:
        for expected_cached in (False, True):
            usage = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()["usage"]
            prompt_tokens = usage["prompt_tokens"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            assert cached == ((prompt_tokens - 1) // BLOCK * BLOCK if expected_cached else 0)
        with httpx.stream("POST", base + "/v1/chat/completions", timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: {")]
        usage = json.loads(events[-1][len("data: "):])["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == (prompt_tokens - 1) // BLOCK * BLOCK > 0
        health = httpx.get(base + "/health").json()["engine"]
    engine = paged.engine
    assert health["kv_blocks"] == engine.blocks.blocks - 1 and health["kv_block_size"] == BLOCK
    assert health["kv_blocks_free"] == engine.blocks.available and health["cached_tokens"] >= 2 * ((prompt_tokens - 1) // BLOCK * BLOCK)


def test_serve_refuses_a_bad_kv_memory_in_one_line(tiny_vlm_dir, capsys):
    from crossvlm.cli import main

    assert main(["serve", "--model", str(tiny_vlm_dir), "--kv-memory", "1.5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv-memory must be in (0, 1], got 1.5" in err[0]


def _request(ids: list[int]):
    from crossvlm.engine import Request

    return Request(ids, None, SamplingParams(max_new_tokens=8), lambda event: None, max_new_tokens=8)


def test_the_scheduler_shares_only_written_blocks_and_preempts_the_newest():
    """Bookkeeping alone (no model): a request cancelled after its first prefill chunk leaves only the
    blocks it wrote in the prefix cache; when a decoding request needs a block and none is free, the
    newest running request gives its blocks back and waits at the head of the line."""
    from crossvlm.engine.blocks import BlockManager
    from crossvlm.engine.scheduler import Scheduler

    blocks = BlockManager(blocks=8, block_size=4)  # 7 usable
    scheduler = Scheduler(slots=3, blocks=blocks, prefill_tokens=4, image_token_id=99)
    cut = _request(list(range(10)))
    scheduler.add(cut)
    schedule = scheduler.schedule()
    assert schedule.admitted == [cut] and schedule.prefill == [(cut, 0, 4)] and len(cut.blocks) == 3  # 10 + 1 positions
    cut.prefilled = 4  # (the engine launched that chunk)
    scheduler.release(cut, written=cut.prefilled)
    assert blocks.available == 7 and len(blocks.lookup(cut.hashes)) == 1 == len(blocks.cached)

    old, new = _request([1] * 7), _request([2] * 7)
    for request in (old, new):
        scheduler.add(request)
    scheduler.watermark = 0
    scheduler.schedule()
    assert scheduler.running == [old, new] and blocks.available == 3
    for request in (old, new):  # prompts in the cache, two tokens out: the next writes position 7 + 2 - 1 = 8
        request.prefilled, request.launched, request.generated = 7, 2, 2
    filler = _request([3] * 7)
    scheduler.add(filler)
    scheduler.schedule()  # old and new grow to 3 blocks each; the filler needs 2 and 1 is left
    assert [len(r.blocks) for r in (old, new)] == [3, 3] and filler.slot is None and blocks.available == 1
    old.launched = old.generated = new.launched = new.generated = 6  # position 12: a fourth block each, one left
    schedule = scheduler.schedule()
    assert [r for r, _ in schedule.preempted] == [new] and list(scheduler.waiting) == [new, filler]
    assert len(old.blocks) == 4 and new.blocks == [] and new.slot is None and new.context is None
    assert new.preemptions == 1 and blocks.available == 3 and schedule.admitted == [], "no admission while preempting"


# -- the Triton decode kernel (crossvlm.engine.paged_decode) ----------------------------------------
def _decode_case(device, dtype, block_size: int, heads: int, kv_heads: int, rows: int, kv_len: int, seed: int = 0):
    """A cache of shuffled blocks, rows of random lengths, an idle row (all scratch, one position)."""
    from crossvlm.engine.cache import Plan

    g = torch.Generator().manual_seed(seed)
    blocks, d = 48, 64
    keys, values = (torch.randn(blocks, block_size, kv_heads, d, generator=g).to(device, dtype) for _ in "kv")
    width = kv_len // block_size
    table = torch.stack([torch.randperm(blocks - 1, generator=g)[:width] + 1 for _ in range(rows)]).int()
    used = torch.randint(1, kv_len + 1, (rows,), generator=g).int()
    table[0], used[0], used[-1] = 0, 1, kv_len  # idle; and one reading every position
    query = torch.randn(rows, heads, d, generator=g).to(device, dtype)
    plan = Plan(table.to(device), torch.zeros(rows, device=device), torch.arange(rows + 1, dtype=torch.int32, device=device),
                used.to(device), max_q=1, kv_len=kv_len)
    return query, keys, values, plan


DECODE_CASES = [  # block size, query heads, key/value heads, rows, positions, splits
    (16, 4, 2, 3, 64, 1), (16, 16, 8, 5, 256, 4), (64, 6, 2, 2, 256, 3), (256, 16, 8, 4, 512, 2), (32, 2, 2, 1, 128, None)]


def test_the_triton_decode_kernel_equals_the_reference_in_triton_s_interpreter():
    """The kernel's program, run by Triton's interpreter on the CPU (a subprocess: the interpreter is
    chosen when the kernel is defined): grouped heads, idle rows, blocks out of order, one split or several."""
    pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch come without it)")
    import subprocess
    import sys

    code = f"""
import torch
from test_engine_paged import _decode_case
from crossvlm.engine.cache import reference_paged, triton_decode_available
from crossvlm.engine.paged_decode import paged_decode
assert triton_decode_available(torch.device("cpu"), torch.float32, 16, 8, 64, 256, check_only=True)  # the engine's trial
for bs, hq, hkv, rows, kv_len, splits in {DECODE_CASES!r}:
    q, k, v, plan = _decode_case("cpu", torch.float32, bs, hq, hkv, rows, kv_len)
    out = paged_decode(q, k, v, plan.block_table, plan.used, kv_len, None, splits=splits)
    torch.testing.assert_close(out, reference_paged(q, k, v, plan, None), atol=1e-5, rtol=1e-5)
print("ok")
"""
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([tests, *sys.path])})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.gpu
def test_the_triton_decode_kernel_equals_the_reference_on_cuda():
    from crossvlm.engine.cache import reference_paged
    from crossvlm.engine.paged_decode import paged_decode

    for bs, hq, hkv, rows, kv_len, splits in [*DECODE_CASES, (256, 16, 8, 64, 1280, None), (256, 16, 8, 1, 2304, None)]:
        q, k, v, plan = _decode_case("cuda", torch.bfloat16, bs, hq, hkv, rows, kv_len)
        out = paged_decode(q, k, v, plan.block_table, plan.used, kv_len, None, splits=splits)
        torch.testing.assert_close(out.float(), reference_paged(q, k, v, plan, None).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_an_engine_on_the_triton_kernel_answers_as_one_on_sdpa_on_cuda(tiny_vlm_dir):
    """bf16, graphs recorded: the same greedy tokens with `attention="triton"` as with `"sdpa"`."""
    from test_engine import CASES

    answers = {}
    for attention in ("sdpa", "triton"):
        chat = crossvlm.load(tiny_vlm_dir, device="cuda", dtype=torch.bfloat16,
                             engine=EngineConfig(slots=4, max_len=512, attention=attention))
        try:
            assert chat.engine.attention == attention and chat.engine.runner.triton_decode == (attention == "triton")
            prompts = [chat.prompt(m, i) for m, i in CASES]
            answers[attention] = [r.tokens for r in _run(chat, prompts, [_greedy(n) for n in (40, 17, 30, 9, 21)])]
        finally:
            chat.close()
    assert answers["triton"] == answers["sdpa"]
