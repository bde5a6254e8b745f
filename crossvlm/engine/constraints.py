"""Structured outputs: a JSON schema turned into a per-token mask of the vocabulary (llguidance).

`Grammars` (one per tokenizer) compiles a request's schema into a `Matcher`, which follows the
answer token by token and says, before each token is sampled, which tokens keep the text a
prefix of a document the schema accepts; once the document is complete only the end-of-turn
token is allowed. The mask is a bitmask (rows, ceil(V / 32)) of int32 filled on the host
(llguidance's Rust parser, ~20 µs a token here for Qwen3's 151k-token vocabulary, in parallel
threads without the GIL for a batch) and applied by the sampler on the device.

Why llguidance (docs/SERVING.md, "Structured outputs"): one abi3 wheel with no dependencies for
every Python and torch (xgrammar pulls in triton and tvm-ffi and is built per Python version),
a schema compiled in a few ms (xgrammar compiles its mask cache up front: ~30 ms), and the
same per-token cost as xgrammar within the noise of a shared CPU.
"""

from __future__ import annotations

import json
import threading

import torch

from crossvlm.errors import CrossVLMError

ANY_OBJECT = {"type": "object"}
"""OpenAI's `response_format: {"type": "json_object"}`: any JSON object."""


class SchemaError(CrossVLMError, ValueError):
    """A JSON schema that cannot constrain generation (invalid, or using what llguidance does not support)."""


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def words(vocab: int) -> int:
    """Int32 words of one row of a bitmask over `vocab` tokens."""
    return (vocab + 31) // 32


class Matcher:
    """One answer's place in its grammar (llguidance's `LLMatcher`)."""

    def __init__(self, inner):
        self.inner = inner

    def accept(self, token: int) -> None:
        self.inner.consume_token(token)

    @property
    def error(self) -> str:
        """Why the grammar cannot go on ('' while it can)."""
        return self.inner.get_error() if self.inner.is_error() else ""


class Grammars:
    """Schemas to matchers for one tokenizer. The tokenizer's token table is built on first use
    (seconds for a 151k vocabulary), once; compiled grammars are cached by schema text."""

    def __init__(self, tokenizer, eos_ids: set[int], vocab: int):
        self.tokenizer, self.vocab = tokenizer, vocab
        # The token a finished document allows (one: llguidance before 1.7 takes one): the tokenizer's own
        # end of sequence, for Qwen3's chat models the end of turn.
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id in eos_ids else min(eos_ids)
        self._table = None
        self._grammars: dict[str, str] = {}
        self._lock = threading.Lock()

    def _tokens(self):
        with self._lock:
            if self._table is None:
                import llguidance.hf

                self._table = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab, eos_token=self.eos)
            return self._table

    def matcher(self, schema: dict) -> Matcher:
        """A matcher at the start of a document `schema` accepts; raises `SchemaError`."""
        import llguidance

        key = json.dumps(schema, sort_keys=True) if isinstance(schema, dict) else ""
        grammar = self._grammars.get(key) or grammar_of(schema, self._tokens())
        if len(self._grammars) < 256:
            self._grammars[key] = grammar
        inner = llguidance.LLMatcher(self._tokens(), grammar, log_level=0)
        if inner.is_error():
            raise SchemaError("unsupported JSON schema: " + " ".join(inner.get_error().split()))
        matcher = Matcher(inner)
        # The first mask does lazy work (2.5 s for the first grammar of a token table, here): in this thread,
        # not in the engine's, where it would stall every request. Computing a mask changes no state.
        fill([matcher], torch.empty(1, words(self.vocab), dtype=torch.int32))
        return matcher


def grammar_of(schema: dict, tokens=None) -> str:
    """llguidance's grammar of a JSON schema (checked against the token table `tokens` if given, else on
    its own: `crossvlm chat` checks a schema file before loading the model); raises `SchemaError`."""
    if not available():
        raise SchemaError("structured outputs need llguidance: pip install 'crossvlm[serve]' (or llguidance)")
    import llguidance

    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be a JSON object, not {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as err:
        raise SchemaError(f"invalid JSON schema: {err}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar, tokens)
    if problem:
        raise SchemaError("unsupported JSON schema: " + " ".join(problem.split()))  # one line
    return grammar


_executor = None


def fill(matchers: list[Matcher], bitmask: torch.Tensor) -> None:
    """Write each matcher's allowed tokens into row i of `bitmask` (n, words) int32 on the host;
    several at once in llguidance's threads (the GIL released)."""
    global _executor
    import llguidance
    import llguidance.torch as lt

    if len(matchers) == 1:
        lt.fill_next_token_bitmask(matchers[0].inner, bitmask, 0)
        return
    if _executor is None:
        _executor = llguidance.LLExecutor()
    lt.fill_next_token_bitmask_par(_executor, [(m.inner, i) for i, m in enumerate(matchers)], bitmask)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool (n, vocab) of a bitmask (n, words) int32: bit b of word w allows token 32 w + b."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (n, words, 32)
    return bits.flatten(1)[:, :vocab].bool()
