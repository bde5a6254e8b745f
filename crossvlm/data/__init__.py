"""Data: read MiniMind-V parquet and LLaVA JSON/JSONL, render with the chat template, batch, check.

Modules: `config` (DataConfig), `readers` (lazy file access), `records` (normalising turns, bad-record
kinds), `render` (ids and labels), `images` (safe decoding), `collate` (padding / packing),
`sampler` (deterministic sharded order), `loader` (dataset + loader), `badrecords` (counting),
`synth` (the synthetic shapes set), `inspect` and `bench` (the `crossvlm data` commands).
"""

from crossvlm.data.config import DataConfig, SourceConfig

__all__ = ["DataConfig", "SourceConfig"]
