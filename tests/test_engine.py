"""The generation engine against transformers' `generate()`, and its batching, cancelling and sampling."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import crossvlm
from crossvlm.engine import Delta, EngineConfig, Request, SamplingParams
from crossvlm.engine.sampler import Sampler
from crossvlm.model.modeling import CrossVLM
from serving import shapes_image


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir):
    chat = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=4, max_len=512))
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir) -> CrossVLM:
    """The same weights, loaded apart: stock attention, stock `generate()`."""
    return CrossVLM.from_pretrained(str(tiny_vlm_dir)).eval()


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _run(chat, prompts, sampling: list[SamplingParams], start=None) -> list[Request]:
    """Submit requests (after `start()`, if given, returns) and wait for them; returns them with their tokens."""
    done = threading.Semaphore(0)
    requests = []
    for p, s in zip(prompts, sampling):
        if start is not None and requests:
            start(requests)
        requests.append(chat.engine.submit(Request(p.input_ids, p.pixel_values, s, lambda _: done.release(),
                                                   image_grids=p.image_grids)))
    for _ in requests:
        assert done.acquire(timeout=120)
    assert all(r.finish_reason in ("stop", "length") for r in requests)
    return requests


def _hf_tokens(reference, chat, prompt, n: int) -> list[int]:
    ids = torch.tensor([prompt.input_ids])
    pixels = chat.processor.preprocess_images(prompt.images) if prompt.images else None  # made apart
    out = reference.generate(ids, pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


CASES = [  # prompts of different lengths: no image, one, two in one prompt, a longer conversation
    (_user("hello"), []),
    (_user("<image>what colour is the circle?"), [shapes_image(1)]),
    (_user("<image><image>count the shapes in both pictures and say which has more"), [shapes_image(2), shapes_image(3)]),
    ([{"role": "system", "content": "answer briefly"}, *_user("is there a star?"),
      {"role": "assistant", "content": "yes"}, *_user("<image>where?")], [shapes_image(4, (80, 48))]),
    (_user("<image>describe"), [shapes_image(5)]),
]


def test_greedy_equals_generate_token_for_token(chat, reference):
    # Five prompts on four slots: one waits and joins when a slot frees, mid-decode of the others.
    prompts = [chat.prompt(m, i) for m, i in CASES]
    budgets = [24, 17, 30, 9, 21]
    sampling = [SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True) for n in budgets]
    requests = _run(chat, prompts, sampling)
    for request, prompt, n in zip(requests, prompts, budgets):
        assert request.generated == n and request.finish_reason == "length"
        assert request.tokens == _hf_tokens(reference, chat, prompt, n)
    assert len({tuple(r.tokens) for r in requests}) == len(requests), "the tiny model gives distinct answers"


def test_a_request_joining_mid_decode_gets_its_tokens_alone(chat):
    long, late = (chat.prompt(m, i) for m, i in (CASES[2], CASES[1]))
    sampling = [SamplingParams(max_new_tokens=60, greedy=True, ignore_eos=True),
                SamplingParams(max_new_tokens=20, greedy=True, ignore_eos=True)]
    alone = [_run(chat, [p], [s])[0].tokens for p, s in zip((long, late), sampling)]

    def when_decoding(requests):  # hold the second request back until the first is well into its answer
        deadline = time.monotonic() + 60
        while requests[0].generated < 10 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert requests[0].generated >= 10 and not requests[0].done

    together = _run(chat, [long, late], sampling, start=when_decoding)
    assert [r.tokens for r in together] == alone


def test_long_prompts_prefilled_in_chunks_beside_running_answers(tiny_vlm_dir, reference):
    # Prefill at most 16 tokens a step. A one-token request takes slot 0 and leaves; a long answer
    # decodes in slot 1; then a long prompt is prefilled into slot 0 over several steps, while every
    # decode step also covers slot 0 (the first two slots): its prefilled keys must stay untouched.
    chunked = crossvlm.load(tiny_vlm_dir, device="cpu",
                            engine=EngineConfig(slots=2, max_len=512, prefill_tokens=16, block_size=16))
    try:
        prompts = [chunked.prompt(m, i) for m, i in (CASES[0], CASES[4], CASES[2])]
        assert len(prompts[2].input_ids) > 3 * 16
        budgets = [1, 80, 12]
        sampling = [SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True) for n in budgets]

        def third_when_second_decodes(requests):
            deadline = time.monotonic() + 60
            while len(requests) == 2 and not (requests[0].done and requests[1].generated >= 2):
                assert time.monotonic() < deadline
                time.sleep(0.001)

        requests = _run(chunked, prompts, sampling, start=third_when_second_decodes)
        assert [r.slot for r in requests] == [None] * 3 and requests[1].generated == 80
        assert all(r.blocks == [] for r in requests) and chunked.engine.blocks.available == chunked.engine.blocks.blocks - 1
        for request, prompt, n in zip(requests, prompts, budgets):
            assert request.tokens == _hf_tokens(reference, chunked, prompt, n)
        assert chunked.engine.stats["prefills"] >= 5
        # Sampled with a seed and a repetition penalty: the same tokens as alone, though the decode steps
        # ran over its slot while its prompt went in.
        seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=5,
                                repetition_penalty=1.3, ignore_eos=True)
        alone = _run(chunked, prompts[2:], [seeded])[0].tokens
        beside = _run(chunked, prompts, [*sampling[:2], seeded], start=third_when_second_decodes)[2].tokens
        assert beside == alone
        # Every layer's keys of the chunked prompt, in the blocks its full blocks are registered under,
        # are those of one uncached forward.
        ids = torch.tensor([prompts[2].input_ids])
        found = chunked.engine.blocks.lookup(requests[2].hashes)[:ids.shape[1] // 16]  # (the prompt's)
        n = len(found) * 16
        assert n >= 3 * 16
        with torch.no_grad():
            cache = reference(ids, prompts[2].pixel_values, use_cache=True).past_key_values
        for layer, keys in enumerate(chunked.engine.cache.keys):
            torch.testing.assert_close(keys[found].flatten(0, 1).transpose(0, 1), cache.layers[layer].keys[0, :, :n],
                                       atol=1e-4, rtol=1e-4)
    finally:
        chunked.close()


def test_cancelled_stream_frees_its_slot_at_once(tiny_vlm_dir):
    one_slot = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=1, max_len=512))
    try:
        endless = SamplingParams(max_new_tokens=400, greedy=True, ignore_eos=True)
        stream = one_slot.stream(_user("hello"), sampling=endless)
        pieces = iter(stream)
        next(pieces), next(pieces)
        engine = one_slot.engine
        assert engine.running() == 1 and engine.free_slots == 0
        steps = engine.stats["steps"]
        stream.cancel()
        deadline = time.monotonic() + 10
        while engine.free_slots == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.free_slots == 1 and engine.running() == 0 and engine.blocks.available == engine.blocks.blocks - 1
        assert engine.stats["steps"] - steps <= 2, "the slot is free by the next step"
        assert stream.request.finish_reason == "cancelled" and stream.request.generated < 100
        # The freed slot serves the next request.
        answer = one_slot.chat(_user("hello"), sampling=SamplingParams(max_new_tokens=5, greedy=True))
        assert answer.completion_tokens >= 1
        assert not engine.warm_up(), "too late to warm up once requests have run (it would write into their slots)"
    finally:
        one_slot.close()


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(chat):
    prompt = chat.prompt(_user("hello"))
    seeded = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=123, ignore_eos=True)
    alone = _run(chat, [prompt], [seeded])[0].tokens
    others = [chat.prompt(m, i) for m, i in CASES[1:4]]
    noise = [SamplingParams(max_new_tokens=25, temperature=1.0, ignore_eos=True) for _ in others]
    crowded = _run(chat, [*others, prompt], [*noise, seeded])[-1].tokens
    assert crowded == alone
    other_seed = _run(chat, [prompt], [SamplingParams(**{**seeded.__dict__, "seed": 124})])[0].tokens
    greedy = _run(chat, [prompt], [SamplingParams(max_new_tokens=20, greedy=True, ignore_eos=True)])[0].tokens
    assert other_seed != alone and alone != greedy, "sampling draws, and the seed matters"


def test_a_failing_callback_fails_its_requests_and_the_engine_goes_on(chat):
    from crossvlm.engine import GenerationError

    def broken(i, delta):
        raise ValueError("the caller's callback broke")

    prompt = chat.prompt(_user("hello"))
    with pytest.raises(GenerationError, match="callback broke"):
        chat.generate_prompts([prompt], SamplingParams(max_new_tokens=5, greedy=True), on_delta=broken)
    assert chat.engine.running() == 0 and chat.engine.free_slots == chat.engine.slots
    assert chat.chat(_user("hello"), sampling=SamplingParams(max_new_tokens=5, greedy=True)).completion_tokens >= 1


def test_sampler_settings_per_row():
    vocab, eos = 50, 7
    sampler = Sampler(slots=4, vocab=vocab, eos_ids=[eos], device=torch.device("cpu"))
    logits = torch.zeros(4, vocab)
    logits[:, eos] = 10.0  # end of turn is by far the likeliest
    logits[:, 3] = 9.0
    params = [SamplingParams(greedy=True), SamplingParams(greedy=True, min_tokens=2),
              SamplingParams(temperature=1.0, top_k=1, seed=1), SamplingParams(temperature=1.0, top_k=1, min_tokens=1)]
    sampler.admit([0, 1, 2, 3], params)
    sampler.begin([0, 1, 2, 3], [[1], [1], [1], [1]], penalty=False)
    slots = torch.arange(4)
    first = sampler.sample(logits, slots, greedy=False, penalty=False, min_tokens=True).tolist()
    assert first == [eos, 3, eos, 3]  # min_tokens holds back the end of turn; top-k 1 is greedy
    second = sampler.sample(logits, slots, greedy=False, penalty=False, min_tokens=True).tolist()
    assert second == [eos, 3, eos, eos]  # row 3 reached its min_tokens
    logits[1, 0] = float("nan")
    assert sampler.sample(logits, slots, greedy=True, penalty=False, min_tokens=False).tolist()[1] == -1


def test_a_seeded_draw_does_not_depend_on_the_candidates_its_batch_needs():
    """Rows beside a request decide whether a step sorts the vocabulary, takes the top few, or
    neither (`Engine._kinds`); a seeded row draws the same tokens in each case."""
    vocab = 300
    sampler = Sampler(slots=2, vocab=vocab, eos_ids=[0], device=torch.device("cpu"))
    sampler.admit([0, 1], [SamplingParams(temperature=0.9, top_k=20, top_p=0.8, seed=5),
                           SamplingParams(temperature=1.3, top_k=0, top_p=1.0, seed=6)])
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    slots, draws = torch.arange(2), {}
    for step in range(40):
        sampler.generated[:] = step
        for candidates in (None, 20, 64):
            draws.setdefault(("top-k row", candidates), []).append(sampler._draw(logits, slots, candidates)[0].item())
        for candidates in (None, 0):
            draws.setdefault(("plain row", candidates), []).append(sampler._draw(logits, slots, candidates)[1].item())
    assert draws[("top-k row", None)] == draws[("top-k row", 20)] == draws[("top-k row", 64)]
    assert draws[("plain row", None)] == draws[("plain row", 0)]
    assert len(set(draws[("plain row", 0)])) > 5, "the plain row samples the whole vocabulary"
    top20 = set(logits[0].topk(20).indices.tolist())
    assert set(draws[("top-k row", 20)]) <= top20 and len(set(draws[("top-k row", 20)])) > 1


def test_streamed_text_decodes_a_short_window_even_after_tokens_without_text(chat):
    """Tokens that add no text (skipped special ones, a random model's) move the window on: each token
    decodes a few tokens, not the whole answer again (that was quadratic in the answer's length)."""
    tok = chat.tokenizer
    windows = []

    class Counting:
        def decode(self, ids, **kw):
            windows.append(len(ids))
            return tok.decode(ids, **kw)

    silent = tok.convert_tokens_to_ids("<|image_pad|>")  # a special token: decodes to no text
    words = tok("it is a red square and a blue circle", add_special_tokens=False)["input_ids"]
    tokens = [silent] * 200 + words + [silent] * 50 + words
    deltas = []
    request = Request([1], None, SamplingParams(max_new_tokens=1000), deltas.append, max_new_tokens=1000, stream=True)
    for token in tokens:
        request.add_token(token, Counting(), chat.eos_ids)
    assert max(windows) <= 3
    assert "".join(d.text for d in deltas if isinstance(d, Delta)) == tok.decode(tokens, skip_special_tokens=True)


def test_streamed_text_of_any_tokens_equals_the_whole_decode(chat):
    """The fast tokenizer's incremental decoder and the window fallback both stream exactly the text a
    decode of the whole answer gives: characters of several bytes cut across tokens, special tokens,
    and random tokens whose bytes never make characters (the incremental decoder would hold them for
    ever: such a request goes on in windows)."""
    import random

    tok = chat.tokenizer
    special = tok.convert_tokens_to_ids("<|image_pad|>")
    words = tok("the café on the corner: 日本語 🙂 naïve", add_special_tokens=False)["input_ids"]
    assert len(words) > len(tok.tokenize("the cafe on the corner: naive"))  # multi-byte characters took several tokens
    text = (words + [special]) * 20
    noise = [random.Random(3).randrange(len(tok)) for _ in range(2000)]

    class Slow:  # a tokenizer without a Rust backend
        decode = staticmethod(tok.decode)

    for tokens, incremental in ((text, True), (noise, False)):
        expected = tok.decode(tokens, skip_special_tokens=True).strip()
        for tokenizer in (tok, Slow()):
            deltas = []
            request = Request([1], None, SamplingParams(max_new_tokens=5000), deltas.append, max_new_tokens=5000,
                              stream=True)
            for token in tokens:
                request.add_token(token, tokenizer, set())
            assert (request._stream is not False) == (incremental and tokenizer is tok)
            streamed = "".join(d.text for d in deltas if isinstance(d, Delta))
            assert expected.startswith(streamed) and len(expected) - len(streamed) <= 8  # unfinished characters held
            request.finish("length", tokenizer)  # the rest, from a decode of the whole answer
            assert "".join(d.text for d in deltas if isinstance(d, Delta)) == deltas[-1].text == expected


def test_ignore_eos_and_min_tokens_in_the_request(chat):
    tok = chat.tokenizer
    eos = next(iter(chat.eos_ids))
    events = []
    words = tok("yes it is", add_special_tokens=False)["input_ids"]
    plain = Request([1], None, SamplingParams(max_new_tokens=10), events.append, max_new_tokens=10)
    plain.add_token(words[0], tok, chat.eos_ids)
    plain.add_token(eos, tok, chat.eos_ids)
    assert plain.finish_reason == "stop" and plain.generated == 2
    for params in (SamplingParams(max_new_tokens=4, ignore_eos=True), SamplingParams(max_new_tokens=4, min_tokens=3)):
        request = Request([1], None, params, events.append, max_new_tokens=4)
        for token in (words[0], eos, words[1], eos):
            request.add_token(token, tok, chat.eos_ids)
        assert request.finish_reason == ("length" if params.ignore_eos else "stop")
        assert request.generated == 4


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tiny_vlm_dir, reference):
    """`EngineConfig.compile`: the decode step and the prefill fused by torch.compile, each compiled
    once, by `warm_up`, before the first request (here on the CPU, without graphs): one request alone
    and several together, prompts of any length, a prompt's one-token last chunk compile nothing more."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from crossvlm.engine.model_runner import Chunk, ModelRunner

    def compilations() -> list[int]:
        return [len(_debug_get_cache_entry_list(f.__code__)) for f in (ModelRunner._decode_step, ModelRunner._decoder)]

    torch._dynamo.reset()
    compiled = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=4, max_len=512, compile=True))
    try:
        assert compiled.engine.warm_up()
        assert compilations() == [1, 1]
        runner = compiled.engine.runner
        assert not runner.live.any() and (runner.block_table == 0).all(), "warming up leaves every row idle"
        # A prefill of 3 and of 4 prompts after a warm-up of 2 rows (a GPU server stalled for minutes
        # on a recompilation here once: a stride of 3 was tied to the warm-up's 2 rows).
        runner, width = compiled.engine.runner, compiled.model.llm.get_input_embeddings().embedding_dim
        for lengths in ((5, 9, 3), (4, 2, 7, 1)):
            runner.prefill([Chunk(slot, 0, torch.zeros(n, width), last=True, blocks=[1 + slot])
                            for slot, n in enumerate(lengths)],
                           greedy=True, penalty=False, min_tokens=False)
        runner.park_all()
        assert compilations() == [1, 1]
        prompts = [compiled.prompt(m, i) for m, i in CASES[:3]]
        # Prompts cut into chunks, the first prompt's last chunk one token long.
        compiled.engine.scheduler.prefill_tokens = len(prompts[0].input_ids) - 1
        budgets = [12, 7, 9]
        sampling = [SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True) for n in budgets]
        for request, prompt, n in zip(_run(compiled, prompts, sampling), prompts, budgets):
            assert request.tokens == _hf_tokens(reference, compiled, prompt, n)
        alone, = _run(compiled, prompts[2:], sampling[:1])
        assert alone.tokens == _hf_tokens(reference, compiled, prompts[2], budgets[0])
        assert compilations() == [1, 1]
        assert compiled.engine.warm_up(), "warm already: nothing more to do"
    finally:
        compiled.close()


def _flash_forward_on_the_host(query, key, value, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *,
                               scale=None, seqused_k=None, block_table=None):
    """FlashAttention's variable-length forward with a paged cache written out in torch, as its
    documentation states it: sequence b's queries are rows cu_q[b] … cu_q[b+1]-1, its keys the first
    seqused_k[b] positions of its blocks `block_table[b]` in order, a query head attends with key/value
    head h // (Hq / Hkv), causal masks aligned at the sequences' ends."""
    out = torch.zeros_like(query)
    hq, hkv = query.shape[1], key.shape[2]
    for b in range(len(cu_q) - 1):
        q = query[cu_q[b]:cu_q[b + 1]].transpose(0, 1)  # (Hq, n, D)
        k, v = (x[block_table[b].long()].flatten(0, 1)[:seqused_k[b]].transpose(0, 1).repeat_interleave(hq // hkv, 0)
                for x in (key, value))
        n, used = q.shape[1], k.shape[1]
        mask = torch.arange(used)[None, :] <= torch.arange(n)[:, None] + used - n
        out[cu_q[b]:cu_q[b + 1]] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
    return out, None, None, None, None


def test_flash_attention_path_gives_generates_tokens(tiny_vlm_dir, reference, monkeypatch):
    """`EngineConfig(attention="flash")`, with the kernel written out in torch (this machine has no
    GPU): the packed prefill, the block tables and each request's own read length give generate()'s
    tokens, requests joining late and past a block's end."""
    from crossvlm.engine import cache

    monkeypatch.setattr(cache, "_flash_forward", _flash_forward_on_the_host)
    flash = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=3, max_len=512, attention="flash"))
    try:
        runner = flash.engine.runner
        assert runner.flash and runner.kv_ladder == [runner.width * 256]  # one rung
        prompts = [flash.prompt(m, i) for m, i in CASES]
        budgets = [280, 17, 30, 9, 21]
        sampling = [SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True) for n in budgets]
        for request, prompt, n in zip(_run(flash, prompts, sampling), prompts, budgets):
            assert request.tokens == _hf_tokens(reference, flash, prompt, n)
    finally:
        flash.close()


@pytest.mark.parametrize("attention", ["sdpa", "flash"])
def test_a_lone_prompt_padded_to_its_bucket_gives_generates_tokens(tiny_vlm_dir, reference, monkeypatch, attention):
    """On a GPU a prompt prefilled alone is padded to a length bucket, which a CUDA graph replays: the
    padding (a throw-away chunk in the cache's scratch slot) changes none of its tokens. Here the
    padded prefill runs without a graph, with both attention paths (flash's kernel written out in torch)."""
    from crossvlm.engine import cache

    monkeypatch.setattr(cache, "_flash_forward", _flash_forward_on_the_host)
    chat = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=2, max_len=512, attention=attention))
    try:
        runner = chat.engine.runner
        assert runner.prefill_buckets == [] and not runner.use_graphs  # (a CPU: no graphs)
        runner.prefill_buckets = [16, 32, 64, 128, 256]  # what a GPU's runner has (from 128 up), smaller
        lengths = []
        decoder = runner._prefill_decoder
        monkeypatch.setattr(runner, "_prefill_decoder", lambda embeds, *a: lengths.append(embeds.shape[1]) or decoder(embeds, *a))
        for messages, images in CASES:
            prompt = chat.prompt(messages, images)
            request, = _run(chat, [prompt], [SamplingParams(max_new_tokens=12, greedy=True, ignore_eos=True)])
            assert request.tokens == _hf_tokens(reference, chat, prompt, 12)
            bucket = lengths[-1]
            assert bucket in runner.prefill_buckets and len(prompt.input_ids) < bucket, "prefilled padded to its bucket"
    finally:
        chat.close()


def test_flash_asked_where_it_cannot_run_is_a_clear_error(tiny_vlm_dir, monkeypatch):
    from crossvlm.engine import cache
    from crossvlm.errors import ConfigError

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_flash_attention_forward' with arguments from the 'CPU' backend")

    monkeypatch.setattr(cache, "_flash_forward", no_kernel)  # (recent torch runs it on a CPU too)
    for attention, message in (("flash", "FlashAttention does not run on cpu"), ("fast", "auto, flash, triton, sdpa"),
                               ("triton", "Triton decode kernel does not run on cpu")):
        with pytest.raises(ConfigError, match=message):
            crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=2, max_len=64, attention=attention)).engine
    auto = crossvlm.load(tiny_vlm_dir, device="cpu", engine=EngineConfig(slots=2, max_len=64))
    try:
        assert not auto.engine.runner.flash, "auto falls back to SDPA on a CPU"
    finally:
        auto.close()


@pytest.mark.gpu
def test_flash_paged_equals_the_reference_on_cuda():
    """The real kernel against `reference_paged` on a bf16 cache of 256-position blocks: a packed
    prefill of sequences whose blocks lie out of order (one a one-token chunk at the end of a long
    prefix), and a decode step with idle rows (all scratch, one position)."""
    from crossvlm.engine.cache import Plan, flash_available, flash_paged, reference_paged

    cuda = torch.device("cuda")
    if not flash_available(cuda, torch.bfloat16, 4, 2, 64):
        pytest.skip(f"torch {torch.__version__}'s FlashAttention takes no block table (the engine uses another kernel)")
    g = torch.Generator(device=cuda).manual_seed(0)
    keys, values = (torch.randn(8, 256, 2, 64, generator=g, device=cuda, dtype=torch.bfloat16) for _ in "kv")
    i32 = dict(device=cuda, dtype=torch.int32)
    table = torch.tensor([[5, 0, 0], [3, 7, 1], [2, 0, 0]], **i32)
    lengths, used = [7, 1, 30], [7, 700, 41]
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).to(cuda)
    prefill = Plan(table, torch.zeros(38, device=cuda), torch.tensor([0, 7, 8, 38], **i32), torch.tensor(used, **i32),
                   max_q=30, kv_len=768, token_seq=seq, flash=True)
    decode_table = torch.tensor([[0, 0, 0], [3, 7, 1], [6, 4, 0], [0, 0, 0], [2, 0, 0]], **i32)
    decode = Plan(decode_table, torch.zeros(5, device=cuda), torch.arange(6, **i32),
                  torch.tensor([1, 767, 300, 1, 129], **i32), max_q=1, kv_len=768, flash=True)
    for plan, n in ((prefill, 38), (decode, 5)):
        query = torch.randn(n, 4, 64, generator=g, device=cuda, dtype=torch.bfloat16)
        torch.testing.assert_close(flash_paged(query, keys, values, plan, None).float(),
                                   reference_paged(query, keys, values, plan, None).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("compile,warm_up", [(False, False), (False, True), (True, True)],
                         ids=["recorded-when-needed", "recorded-at-start", "compiled-recorded-at-start"])
def test_greedy_equals_generate_on_cuda_with_graphs(tiny_vlm_dir, compile, warm_up):
    """The decode step replayed as CUDA graphs gives generate()'s tokens, whether each batch and length
    rung is recorded when first needed (while other requests are mid-answer) or all before the first
    request (`warm_up`, what the server does); so do a lone prompt's prefill and its image path, replayed
    as graphs of their length bucket and image rung."""
    chat = crossvlm.load(tiny_vlm_dir, device="cuda", dtype=torch.float32,
                         engine=EngineConfig(slots=4, max_len=512, compile=compile))
    reference = CrossVLM.from_pretrained(str(tiny_vlm_dir), dtype=torch.float32).cuda().eval()
    try:
        runner = chat.engine.runner
        if warm_up:
            chat.engine.warm_up()
            assert len(runner.graphs) == len(runner.batch_ladder) * len(runner.kv_ladder)
            assert len(runner.prefill_graphs) == len(runner.prefill_buckets) and len(runner.image_graphs) == len(runner.image_rungs)
        prompts = [chat.prompt(m, i) for m, i in CASES]
        budgets = [300, 17, 30, 9, 21]  # the first runs past the first length rung (256)
        sampling = [SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True) for n in budgets]
        requests = _run(chat, prompts, sampling)
        for k in (2, 1):  # each alone: its prefill (two images, one) replayed from its bucket's graph
            requests += _run(chat, [prompts[k]], [sampling[k]])
        prompts, budgets = prompts + [prompts[2], prompts[1]], budgets + [budgets[2], budgets[1]]
        assert runner.graphs and runner.prefill_graphs and {1, 2} <= set(runner.image_graphs), "all three were captured"
        for request, prompt, n in zip(requests, prompts, budgets):
            ids = torch.tensor([prompt.input_ids], device="cuda")
            pixels = chat.processor.preprocess_images(prompt.images).cuda() if prompt.images else None
            out = reference.generate(ids, pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert request.tokens == out[0, ids.shape[1]:].tolist()
    finally:
        chat.close()


@pytest.mark.gpu
def test_prefill_and_image_graphs_in_bf16_equal_the_plain_path_on_cuda(tiny_vlm_dir):
    """bf16 with the attention `auto` picks (FlashAttention where torch's takes a block table), as a server runs: a lone prompt's prefill replayed from its bucket's
    graph gives the logits of the same prefill unpadded and without a graph (within bf16's rounding;
    the padded row's matrix products may take other kernels), and the image path's graph the plain
    path's visual tokens; a replay gives what the run before its recording gave."""
    from crossvlm.engine.model_runner import Chunk

    chat = crossvlm.load(tiny_vlm_dir, device="cuda", dtype=torch.bfloat16, engine=EngineConfig(slots=2, max_len=512))
    try:
        runner = chat.engine.runner
        assert chat.engine.attention in ("flash", "triton") and runner.prefill_buckets and runner.image_rungs
        seen = []
        sample = runner.sampler.sample
        runner.sampler.sample = lambda logits, *a, **k: seen.append(logits.float().clone()) or sample(logits, *a, **k)
        kinds = dict(greedy=True, penalty=False, min_tokens=False)
        for messages, images in CASES:
            prompt = chat.prompt(messages, images)
            runs, rungs = [], runner.image_rungs
            for plain in (False, False, True):  # recorded (or replayed), replayed, plain
                runner.image_rungs = [] if plain else rungs
                runs.append(runner.embed([prompt.input_ids], prompt.pixel_values)[0].float())
            runner.image_rungs = rungs
            torch.testing.assert_close(runs[0], runs[1], atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(runs[1], runs[2], atol=3e-2, rtol=3e-2)
            embeds = runner.embed([prompt.input_ids], prompt.pixel_values)[0]
            buckets = runner.prefill_buckets
            for plain in (False, False, True):  # recorded (or replayed), replayed, plain
                runner.prefill_buckets = [] if plain else buckets
                runner.prefill([Chunk(0, 0, embeds, True, blocks=[1, 2])], **kinds)
            runner.prefill_buckets = buckets
            torch.testing.assert_close(seen[-3], seen[-2], atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(seen[-2], seen[-1], atol=5e-2, rtol=5e-2)
        assert runner.prefill_graphs and {1, 2} <= set(runner.image_graphs)
    finally:
        chat.close()

