"""The generation engine behind `crossvlm.load`, `chat`, `serve` and `eval` (docs/SERVING.md).

`engine` (the worker loop) drives `scheduler` (who runs this step), `cache` (the KV slots and the
attention over them), `model_runner` (embedding, prefill, CUDA-graphed decode) and `sampler`
(per-request token choice on the device); `request` holds what a request asks for and its state.
"""

from crossvlm.engine.engine import Engine, EngineConfig, GenerationError, QueueFull
from crossvlm.engine.request import Completion, Delta, Request, SamplingParams

__all__ = ["Completion", "Delta", "Engine", "EngineConfig", "GenerationError", "QueueFull", "Request",
           "SamplingParams"]
