"""Data: read what users have (MiniMind-V parquet, LLaVA JSON/JSONL, The Cauldron / FineVision,
`datasets` folders and hub ids, webdataset tar shards, local or at a URL), render with the chat
template, batch, check.

Modules: `config` (DataConfig), `sources` (what a path is; reading shards in order), `readers` (lazy
random access), `records` (normalising turns, bad-record kinds), `render` (ids and labels), `images`
(safe decoding), `collate` (padding / packing), `sampler` (deterministic sharded order), `loader`
(dataset + loader), `streaming` (streams over shards with an exact position), `workers` (around
torch's DataLoader workers), `badrecords` (counting), `synth` (the synthetic shapes set), `inspect`,
`convert` and `bench` (the `crossvlm data` commands).
"""

from crossvlm.data.config import DataConfig, SourceConfig

__all__ = ["DataConfig", "SourceConfig"]
