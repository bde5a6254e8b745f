"""Per-token cost of a JSON schema's token mask, llguidance, xgrammar and outlines-core, on this machine's CPU.

    python docs/bench/grammar_mask_cost.py      # needs llguidance, xgrammar and outlines-core installed

No model is downloaded: the vocabulary is a byte-level BPE of Qwen3's size (151,643 tokens + 3 special
ones, logits 151,936 wide) made of random words, punctuation, numbers and CJK characters. A fixed JSON
document is cut into the longest tokens that spell it; for each token, the mask of the allowed next
tokens is filled (timed), then the token is taken. Also timed: the token table (once per server) and
one schema's compilation (once per request with a new schema).
"""

import json
from importlib.metadata import version
import random
import statistics
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

V = 151_936
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}},
                                           "city": {"enum": ["Paris", "Berlin", "Rome"]}},
          "required": ["name", "age", "tags", "city"], "additionalProperties": False}
DOCUMENT = json.dumps({"name": "Ada Lovelace the first programmer", "age": 36,
                       "tags": ["math", "engines", "poetry of science"], "city": "Paris"}, separators=(",", ":"))


def byte_chars() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], n = chr(256 + n), n + 1
    return out


def tokenizer() -> PreTrainedTokenizerFast:
    rng, b2c = random.Random(0), byte_chars()
    vocab = {c: i for i, c in enumerate(sorted(b2c.values()))}
    letters, punct = "abcdefghijklmnopqrstuvwxyz", list('{}[]":,.!?;()<>-_=+*/\\\'`~@#$%^&| \n')
    while len(vocab) < 151_643:
        r = rng.random()
        if r < 0.6:
            w = "".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
            w = (" " if rng.random() < 0.5 else "") + (w.capitalize() if rng.random() < 0.2 else w)
        elif r < 0.7:
            w = "".join(rng.choice(punct) for _ in range(rng.randint(1, 4)))
        elif r < 0.75:
            w = str(rng.randint(0, 999))
        else:
            w = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 3)))
        vocab.setdefault("".join(b2c[b] for b in w.encode()), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def spell(tok, text: str) -> list[int]:
    pieces = {tok.convert_tokens_to_string([t]): i for t, i in tok.get_vocab().items()}
    ids, p = [], 0
    while p < len(text):
        n = next(n for n in range(12, 0, -1) if text[p:p + n] in pieces)
        ids.append(pieces[text[p:p + n]])
        p += n
    return ids + [tok.eos_token_id]


def walk(new_matcher, fill, take, ids, repeats=20) -> str:
    times = []
    for _ in range(repeats):
        m = new_matcher()
        for t in ids:
            start = time.perf_counter()
            fill(m)
            times.append(time.perf_counter() - start)
            assert take(m, t) is not False, t
    times.sort()
    return (f"median {1e6 * statistics.median(times):.0f} us, p90 {1e6 * times[int(0.9 * len(times))]:.0f} us, "
            f"max {1e6 * times[-1]:.0f} us over {len(times)} tokens")


def main() -> None:
    tok = tokenizer()
    ids = spell(tok, DOCUMENT)
    print(f"vocabulary {len(tok)} (logits {V}); the document is {len(ids)} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    start = time.perf_counter()
    table = llguidance.hf.from_tokenizer(tok, n_vocab=V, eos_token=tok.eos_token_id)
    built = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    llguidance.LLMatcher(table, grammar)
    compiled = time.perf_counter() - start
    mask = lt.allocate_token_bitmask(1, V)
    print(f"llguidance {version('llguidance')}: token table {built:.2f} s (once), schema {1000 * compiled:.1f} ms; "
          "mask " + walk(lambda: llguidance.LLMatcher(table, grammar), lambda m: lt.fill_next_token_bitmask(m, mask, 0),
                          lambda m, t: m.consume_token(t), ids))

    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V, stop_token_ids=[tok.eos_token_id])
    built = time.perf_counter() - start
    start = time.perf_counter()
    compiled_grammar = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(SCHEMA))
    compiled = time.perf_counter() - start
    xmask = xgr.allocate_token_bitmask(1, V)
    print(f"xgrammar {version('xgrammar')}: token table {built:.2f} s (once), schema {1000 * compiled:.1f} ms; "
          "mask " + walk(lambda: xgr.GrammarMatcher(compiled_grammar), lambda m: m.fill_next_token_bitmask(xmask),
                          lambda m, t: m.accept_token(t), ids))


    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    specials = {tok.eos_token_id, *tok.all_special_ids}
    strings: dict[str, list[int]] = {}
    for t, i in tok.get_vocab().items():
        if i not in specials:
            strings.setdefault(tok.convert_tokens_to_string([t]), []).append(i)
    start = time.perf_counter()
    vocabulary = Vocabulary(tok.eos_token_id, strings)
    built = time.perf_counter() - start
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    compiled = time.perf_counter() - start
    omask = torch.zeros(1, (V + 31) // 32, dtype=torch.int32)
    print(f"outlines-core {version('outlines-core')}: token table {built:.2f} s (once), schema {1000 * compiled:.1f} ms; "
          "mask " + walk(lambda: Guide(index),
                          lambda m: m.write_mask_into(omask.data_ptr(), omask.numel(), omask.element_size()),
                          lambda m, t: t == tok.eos_token_id or m.advance(t), ids, repeats=5))


if __name__ == "__main__":
    main()
