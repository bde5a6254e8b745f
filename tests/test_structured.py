"""Structured outputs (JSON schemas enforced by llguidance) and the sampler's OpenAI penalties and logit bias,
in the engine, `crossvlm.load(...).generate`, `crossvlm serve` and `crossvlm chat --json-schema`."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from crossvlm.engine.request import SamplingParams
from crossvlm.engine.sampler import Sampler
from crossvlm.inference import ChatModel, InputError

pytest.importorskip("llguidance")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "colour": {"enum": ["red", "green", "blue"]},
                                      "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "ok": {"type": "boolean"}},
     "required": ["name", "colour", "count", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"shapes": {"type": "array", "maxItems": 3,
                                                 "items": {"type": "string", "maxLength": 5}}},
     "required": ["shapes"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir) -> ChatModel:
    return ChatModel.load(tiny_vlm_dir, device="cpu")


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_schemas_hold_batched_with_free_requests_in_the_same_steps(chat):
    """Constrained answers (greedy and sampled) parse and validate, and the free requests beside them in the
    same engine steps answer exactly as alone."""
    free = [SamplingParams(max_new_tokens=24, greedy=True), SamplingParams(max_new_tokens=24, temperature=1.0, seed=3)]
    alone = chat.generate([_ask("describe it"), _ask("count them")], sampling=free)
    constrained = [SamplingParams(max_new_tokens=150, greedy=True, json_schema=s) for s in SCHEMAS]
    constrained += [SamplingParams(max_new_tokens=150, temperature=1.0, seed=k, json_schema=SCHEMAS[0]) for k in range(2)]
    constrained += [SamplingParams(max_new_tokens=150, temperature=0.8, seed=5, json_schema={"type": "object"})]
    before = dict(chat.engine.stats)
    out = chat.generate([_ask("describe it"), _ask("count them")] + [_ask(f"question {k}") for k in range(len(constrained))],
                        sampling=free + constrained)
    assert [c.text for c in out[:2]] == [c.text for c in alone]
    schemas = SCHEMAS + [SCHEMAS[0], SCHEMAS[0], {"type": "object"}]
    for completion, schema in zip(out[2:], schemas):
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), schema)
    steps = chat.engine.stats["steps"] - before["steps"]
    assert steps < sum(c.completion_tokens for c in out) / 2, "the requests shared the engine's steps"


@pytest.mark.gpu
def test_schemas_penalties_and_bias_on_cuda_with_graphs(tiny_vlm_dir):
    """On a GPU (decode steps as CUDA graphs, masks and penalties applied on the device): constrained answers
    validate, and free ones beside them, in the same steps, equal their answers alone."""
    from crossvlm.engine import EngineConfig

    chat = ChatModel.load(tiny_vlm_dir, device="cuda", dtype=torch.float32, engine=EngineConfig(slots=8, max_len=512))
    try:
        free = [SamplingParams(max_new_tokens=24, greedy=True), SamplingParams(max_new_tokens=24, temperature=1.0, seed=3),
                SamplingParams(max_new_tokens=24, greedy=True, frequency_penalty=1.5, logit_bias={300: 5.0})]
        prompts = [_ask("describe it"), _ask("count them"), _ask("again")]
        alone = [c.text for c in chat.generate(prompts, sampling=free)]
        constrained = [SamplingParams(max_new_tokens=150, greedy=True, json_schema=s) for s in SCHEMAS]
        out = chat.generate(prompts + [_ask(f"question {k}") for k in range(len(SCHEMAS))], sampling=free + constrained)
        assert [c.text for c in out[:3]] == alone
        for completion, schema in zip(out[3:], SCHEMAS):
            assert completion.finish_reason == "stop", completion
            jsonschema.validate(json.loads(completion.text), schema)
    finally:
        chat.close()


def test_a_bad_schema_is_refused_before_generation(chat):
    for schema, words in [({"type": "nonsense"}, "unsupported JSON schema"), ([1, 2], "JSON object"),
                          ({"$ref": "#/missing"}, "unsupported JSON schema")]:
        with pytest.raises(InputError) as err:
            chat.chat(_ask("hi"), sampling=SamplingParams(max_new_tokens=4, json_schema=schema))
        assert words in str(err.value) and err.value.code == "invalid_json_schema"
    with pytest.raises(InputError, match="thinking"):
        chat.chat(_ask("hi"), sampling=SamplingParams(json_schema={"type": "object"}), enable_thinking=True)
    with pytest.raises(Exception, match="min_tokens or ignore_eos"):
        SamplingParams(json_schema={"type": "object"}, ignore_eos=True)


def _sampler(**params) -> Sampler:
    sampler = Sampler(slots=2, vocab=8, eos_ids=[7], device=torch.device("cpu"))
    sampler.admit([0, 1], [SamplingParams(greedy=True, **params), SamplingParams(greedy=True)])
    sampler.begin([0, 1], [[1], [1]], penalty=False)
    return sampler


def _greedy(sampler: Sampler, logits: list[float], steps: int) -> list[list[int]]:
    rows = torch.tensor([logits, logits])
    return [sampler.sample(rows.clone(), torch.arange(2), greedy=True, penalty=False, min_tokens=False).tolist()
            for _ in range(steps)]


def test_frequency_and_presence_penalties_and_logit_bias_per_row():
    """OpenAI's rules: logit - frequency * (times generated) - presence * (generated at all), plus the bias; only
    the row that asked is changed."""
    logits = [0.0, 0.0, 0.0, 3.0, 2.2, 1.0, 0.0, -9.0]
    # frequency 0.5: token 3 falls below token 4 after 2 uses (3 - 1.0 < 2.2), token 4 after 1 (2.2 - 0.5 < 3 - 1.0)
    assert _greedy(_sampler(frequency_penalty=0.5), logits, 4) == [[3, 3], [3, 3], [4, 3], [3, 3]]
    # presence 1.0: each used token drops by 1 once: 3, then 4 (2.2 > 2), then 3 (2 > 1.2), then 3 again
    assert _greedy(_sampler(presence_penalty=1.0), logits, 4) == [[3, 3], [4, 3], [3, 3], [3, 3]]
    assert _greedy(_sampler(logit_bias={5: 2.5}), logits, 2) == [[5, 3], [5, 3]]
    assert _greedy(_sampler(logit_bias={3: -100}), logits, 1) == [[4, 3]]
    # a later request in the same slot starts clean, while the row beside it is penalised and biased
    sampler = _sampler(frequency_penalty=2.0, logit_bias={5: 50})
    sampler.admit([0, 1], [SamplingParams(greedy=True), SamplingParams(greedy=True, frequency_penalty=2.0,
                                                                       logit_bias={6: 2.9})])
    sampler.begin([0, 1], [[1], [1]], penalty=False)
    assert _greedy(sampler, logits, 2) == [[3, 3], [3, 6]]


def test_penalties_and_bias_through_generate(chat):
    vocab = chat.model.config.text_config.vocab_size
    token = chat.tokenizer.convert_tokens_to_ids("red") if "red" in chat.tokenizer.get_vocab() else 300
    biased = chat.chat(_ask("hi"), sampling=SamplingParams(max_new_tokens=6, greedy=True, logit_bias={token: 100}))
    assert biased.text == chat.tokenizer.decode([token] * 6).strip()
    plain = chat.chat(_ask("tell me more"), sampling=SamplingParams(max_new_tokens=30, greedy=True))
    penalised = chat.chat(_ask("tell me more"), sampling=SamplingParams(max_new_tokens=30, greedy=True,
                                                                        frequency_penalty=2.0, presence_penalty=2.0))
    ids = chat.tokenizer(penalised.text)["input_ids"]
    assert penalised.text != plain.text and len(set(ids)) > len(set(chat.tokenizer(plain.text)["input_ids"]))
    with pytest.raises(Exception, match="outside the vocabulary"):
        chat.chat(_ask("hi"), sampling=SamplingParams(max_new_tokens=2, logit_bias={vocab: 1.0}))


def test_chat_command_json_schema(tiny_vlm_dir, tmp_path, capsys):
    from crossvlm.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[0]))
    assert main(["chat", "--model", str(tiny_vlm_dir), "--prompt", "describe it", "--greedy",
                 "--max-new-tokens", "150", "--json-schema", str(schema)]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS[0])
    for text, words in [("{not json", "not valid JSON"), ('{"type": "nonsense"}', "unsupported JSON schema"),
                        ("[1]", "JSON object")]:
        schema.write_text(text)
        assert main(["chat", "--model", str(tiny_vlm_dir), "--prompt", "hi", "--json-schema", str(schema)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and str(schema) in err, err
    assert main(["chat", "--model", str(tiny_vlm_dir), "--prompt", "hi", "--json-schema",
                 str(tmp_path / "missing.json")]) == 2
    assert "cannot read it" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_serve_measures_tokens_per_second_with_and_without_a_schema(tiny_models, tmp_path):
    from crossvlm.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "string"}},
                                  "required": ["answer"]}))
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--preset", "tiny", "--models", str(tiny_models), "--requests", "2",
                 "--concurrency", "2", "--prompt-tokens", "10,20", "--output-tokens", "6,10", "--short-requests", "0",
                 "--baseline-requests", "0", "--client-processes", "1", "--no-offline", "--json-schema", str(schema),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["server"]) == {"long@2", "schema@2"}
    plain, constrained = report["server"]["long@2"], report["server"]["schema@2"]
    assert plain["failed"] == constrained["failed"] == 0
    assert constrained["output_tokens_per_s"] > 0 and 2 <= constrained["output_tokens"] <= plain["output_tokens"]
    schema.write_text("[1]")
    assert main(["bench", "serve", "--preset", "tiny", "--json-schema", str(schema)]) == 2
