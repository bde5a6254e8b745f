"""`CrossVLMConfig`: the VLM's configuration, saved as config.json beside its weights."""

from __future__ import annotations

import math

from transformers import CLIPVisionConfig, PretrainedConfig, Qwen3Config

from crossvlm.errors import ConfigError

PROJECTOR_TYPES = ("cross_attn", "mlp")


class CrossVLMConfig(PretrainedConfig):
    """Configuration of a CrossVLM: the LLM's and vision tower's own configs plus the projector.

    Args:
        text_config: the `Qwen3Config` (or its dict) of the language model.
        vision_config: the `CLIPVisionConfig` (or its dict) of the vision tower.
        projector_type: "cross_attn" (learned queries, M tokens per image) or "mlp"
            (LLaVA / MiniMind-V baseline, one token per patch).
        num_queries: M, the number of visual tokens per image for "cross_attn"; a square number
            (the queries sit on a sqrt(M) x sqrt(M) grid).
        projector_layers: number of pre-LN cross-attention + MLP blocks.
        projector_heads: attention heads in each block; default: width / 64.
        projector_hidden_size: width inside the projector; defaults to the vision width.
        projector_locality: add a learned per-head 2D distance bias so query (i, j) starts by
            attending to its own region of the image.
        vision_feature_layer: which hidden state of the vision tower feeds the projector
            (-2 = penultimate); the CLS token is always dropped.
        freeze_vision: keep the vision tower frozen and in eval mode.
        image_token_id / vision_start_token_id / vision_end_token_id: ids read from the tokenizer
            when the model is built; stored so a saved model needs only its directory.
        llm_name_or_path / vision_name_or_path: where the base models came from (for the record).
    """

    model_type = "crossvlm"

    def __init__(
        self,
        text_config: dict | Qwen3Config | None = None,
        vision_config: dict | CLIPVisionConfig | None = None,
        projector_type: str = "cross_attn",
        num_queries: int = 64,
        projector_layers: int = 2,
        projector_heads: int | None = None,
        projector_hidden_size: int | None = None,
        projector_locality: bool = True,
        vision_feature_layer: int = -2,
        freeze_vision: bool = True,
        image_token_id: int | None = None,
        vision_start_token_id: int | None = None,
        vision_end_token_id: int | None = None,
        llm_name_or_path: str | None = None,
        vision_name_or_path: str | None = None,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = Qwen3Config(**{k: v for k, v in text_config.items() if k != "model_type"})
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.text_config = text_config if text_config is not None else Qwen3Config()
        self.vision_config = vision_config if vision_config is not None else CLIPVisionConfig()
        self.projector_type = projector_type
        self.num_queries = num_queries
        self.projector_layers = projector_layers
        self.projector_hidden_size = projector_hidden_size
        self.projector_heads = projector_heads or max(1, self.projector_width // 64)
        self.projector_locality = projector_locality
        self.vision_feature_layer = vision_feature_layer
        self.freeze_vision = freeze_vision
        self.image_token_id = image_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.llm_name_or_path = llm_name_or_path
        self.vision_name_or_path = vision_name_or_path
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)
        self.validate_projector()

    # -- derived shapes -------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def projector_width(self) -> int:
        return self.projector_hidden_size or self.vision_config.hidden_size

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: M for the cross-attention projector, one per patch for the MLP."""
        return self.num_queries if self.projector_type == "cross_attn" else self.num_patches

    def get_text_config(self, *args, **kwargs):
        return self.text_config

    def validate_projector(self) -> None:
        """Collect every projector problem and raise them together."""
        problems = []
        if self.projector_type not in PROJECTOR_TYPES:
            problems.append(f"projector_type={self.projector_type!r} is not one of {PROJECTOR_TYPES}")
        if self.projector_type == "cross_attn":
            if self.num_queries < 1 or math.isqrt(self.num_queries) ** 2 != self.num_queries:
                problems.append(f"num_queries={self.num_queries} must be a square number (queries sit on a grid)")
            width = self.projector_width
            if self.projector_heads < 1 or width % self.projector_heads:
                problems.append(
                    f"projector_heads={self.projector_heads} must divide the projector width {width}"
                )
            if self.projector_layers < 1:
                problems.append(f"projector_layers={self.projector_layers} must be at least 1")
        n_layers = self.vision_config.num_hidden_layers
        if not -n_layers <= self.vision_feature_layer <= n_layers or self.vision_feature_layer == 0:
            problems.append(
                f"vision_feature_layer={self.vision_feature_layer} is outside the vision tower's "
                f"{n_layers} layers (use 1..{n_layers} or -1..-{n_layers})"
            )
        if problems:
            raise ConfigError("invalid CrossVLM config:\n  - " + "\n  - ".join(problems))

    def to_dict(self):
        out = super().to_dict()
        for key in ("text_config", "vision_config"):
            value = getattr(self, key)
            out[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return out
