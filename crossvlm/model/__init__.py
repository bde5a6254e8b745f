"""The CrossVLM model: configuration, projectors, the composed model and its processor."""

from crossvlm.model.configuration import CrossVLMConfig
from crossvlm.model.modeling import CrossVLM, load_llm, load_vision

from transformers import AutoConfig

AutoConfig.register("crossvlm", CrossVLMConfig, exist_ok=True)

__all__ = ["CrossVLM", "CrossVLMConfig", "load_llm", "load_vision"]
