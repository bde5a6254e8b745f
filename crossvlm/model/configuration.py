"""`CrossVLMConfig`: the VLM's configuration, saved as config.json beside its weights."""

from __future__ import annotations

import math
import typing

from transformers import CLIPVisionConfig, PretrainedConfig, Qwen3Config

from crossvlm.errors import ConfigError

try:  # transformers 5 checks config fields through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older huggingface_hub: plain TypeErrors
    StrictDataclassError = TypeError
from crossvlm.model.vision import tower_kind

PROJECTOR_TYPES = ("cross_attn", "mlp")
LOCALITIES = ("gaussian", "cell", "none")
"""How the cross-attention projector keeps a query to its region: learned distance bias, own-cell mask, none."""
PROJECTOR_INITS = ("default", "pool")
"""How the cross-attention projector starts: PyTorch's default initialisation, or as a pooling step
(uniform attention over each query's region through unit-gain maps, MLP branches zero)."""
POSITIONS = ("residual", "keys")
"""Where the projector's 2D position codes join: patch features and queries (residual), or only the
attention scores' queries and keys (keys)."""


def listed(head: str, problems: list[str]) -> str:
    """One problem on the head's line; several, one a line under it."""
    return f"{head}: {problems[0]}" if len(problems) == 1 else f"{head}:\n  - " + "\n  - ".join(problems)


def _accepts(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(kind) or kind)


def field_type_problems(values: dict) -> list[str]:
    """One line per argument of `CrossVLMConfig` whose value is not of its annotated type (field-driven:
    a field added to `__init__` with an annotation is checked too)."""
    hints = typing.get_type_hints(CrossVLMConfig.__init__)
    problems = []
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None:
            continue
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
        if not any(_accepts(value, k) for k in kinds):
            names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in kinds)
            problems.append(f"{name}: expected {names}, got {value!r:.60}")
    return problems


def _sub_config(name: str, value, config_class):
    """A sub-config from its dict (`config_class()` gives the class, from the dict's model_type); the
    error of a bad field names the section."""
    if not isinstance(value, dict):
        return value
    try:
        return config_class()(**{k: v for k, v in value.items() if k != "model_type"})
    except (TypeError, ValueError, StrictDataclassError) as err:
        raise ConfigError(f"invalid CrossVLM config: {name}: {' '.join(str(err).split())}") from None


class CrossVLMConfig(PretrainedConfig):
    """Configuration of a CrossVLM: the LLM's and vision tower's own configs plus the projector.

    Args:
        text_config: the `Qwen3Config` (or its dict) of the language model.
        vision_config: the vision tower's config (or its dict): a `CLIPVisionConfig` or a
            `SiglipVisionConfig`, told apart by its `model_type` (a dict without one is CLIP's).
        projector_type: "cross_attn" (learned queries, M tokens per image) or "mlp"
            (LLaVA / MiniMind-V baseline, one token per patch).
        num_queries: M, the number of visual tokens per image for "cross_attn"; a square number
            (the queries sit on a sqrt(M) x sqrt(M) grid).
        projector_layers: number of pre-LN cross-attention + MLP blocks.
        projector_heads: attention heads in each block; default: width / 64.
        projector_hidden_size: width inside the projector; defaults to the vision width.
        projector_locality: how query (i, j) is kept to its own region of the image: "gaussian" (a
            learned per-head 2D distance bias it starts from), "cell" (it sees only the patches of
            its own grid cell) or "none". Booleans from older configs mean "gaussian" / "none".
        projector_position: where the 2D position codes join: "residual" (added to the patch
            features and to the queries, so values and visual tokens carry them) or "keys" (added
            only where attention scores are formed: they steer where a query looks, and a visual
            token carries only what it saw).
        projector_kv_norm: LayerNorm the patch features before keys and values (pre-LN); off keeps a
            patch's feature norm, which a tower may use to say "something is here".
        projector_init: "default" (PyTorch's initialisation) or "pool": each block starts as uniform
            attention over the query's region (queries zero) through unit-gain (orthogonal) value
            and output maps, with its MLP branch zero, so the projector starts as an average pool of
            each region and learns from there.
        projector_output_scale: the projector's output starts at this multiple of the LLM's
            token-embedding std (1: the embeddings' own scale).
        max_tiles: N, the most tiles a large image is cut into (crossvlm.model.tiling): the grid of
            at most N tower-sized tiles that fits the image best, plus a thumbnail (the single view).
            1 (the default): one view per image, no tiles. More than 1 needs the "cross_attn" projector.
        tile_queries: the visual tokens (queries) of one tile, a square number; default: num_queries.
            Fewer than num_queries keeps an image's token cost down (M + tiles x tile_queries).
        vision_feature_layer: which hidden state of the vision tower feeds the projector
            (-2 = penultimate); CLIP's CLS token is always dropped (SigLIP has none).
        freeze_vision: keep the vision tower frozen and in eval mode.
        image_token_id / vision_start_token_id / vision_end_token_id: ids read from the tokenizer
            when the model is built; stored so a saved model needs only its directory.
        llm_name_or_path / vision_name_or_path: where the base models came from (for the record).
    """

    model_type = "crossvlm"

    def __init__(
        self,
        text_config: dict | Qwen3Config | None = None,
        vision_config: dict | PretrainedConfig | None = None,
        projector_type: str = "cross_attn",
        num_queries: int = 64,
        projector_layers: int = 2,
        projector_heads: int | None = None,
        projector_hidden_size: int | None = None,
        projector_locality: str | bool = "gaussian",
        projector_position: str = "residual",
        projector_kv_norm: bool = True,
        projector_init: str = "default",
        projector_output_scale: float = 1.0,
        max_tiles: int = 1,
        tile_queries: int | None = None,
        vision_feature_layer: int = -2,
        freeze_vision: bool = True,
        image_token_id: int | None = None,
        vision_start_token_id: int | None = None,
        vision_end_token_id: int | None = None,
        llm_name_or_path: str | None = None,
        vision_name_or_path: str | None = None,
        **kwargs,
    ):
        given = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")}
        problems = field_type_problems(given)
        if problems:  # a wrong type would fail below as a TypeError deep in a comparison
            raise ConfigError(listed("invalid CrossVLM config", problems))
        text_config = _sub_config("text_config", text_config, lambda: Qwen3Config)
        vision_config = _sub_config("vision_config", vision_config,
                                    lambda: tower_kind(vision_config.get("model_type")).classes()[1])
        self.text_config = text_config if text_config is not None else Qwen3Config()
        self.vision_config = vision_config if vision_config is not None else CLIPVisionConfig()
        self.projector_type = projector_type
        self.num_queries = num_queries
        self.projector_layers = projector_layers
        self.projector_hidden_size = projector_hidden_size
        self.projector_heads = projector_heads or max(1, self.projector_width // 64)
        if isinstance(projector_locality, bool):  # configs saved before locality had kinds
            projector_locality = "gaussian" if projector_locality else "none"
        self.projector_locality = projector_locality
        self.projector_position = projector_position
        self.projector_kv_norm = projector_kv_norm
        self.projector_init = projector_init
        self.projector_output_scale = projector_output_scale
        self.max_tiles = max_tiles
        self.tile_queries = tile_queries
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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers loads it; a config problem names the file."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except ConfigError as err:
            raise ConfigError(f"{pretrained_model_name_or_path}/config.json: {err}") from None

    # -- derived shapes -------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        """Patch features per image the projector reads, a square grid (CLIP's CLS token excluded)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def projector_width(self) -> int:
        return self.projector_hidden_size or self.vision_config.hidden_size

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: M for the cross-attention projector, one per patch for the MLP."""
        return self.num_queries if self.projector_type == "cross_attn" else self.num_patches

    @property
    def tile_tokens(self) -> int:
        """Visual tokens per tile (`tile_queries`, else M)."""
        return self.tile_queries or self.num_image_tokens

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
            if self.projector_locality not in LOCALITIES:
                problems.append(f"projector_locality={self.projector_locality!r} is not one of {LOCALITIES}")
            elif self.projector_locality == "cell" and self.num_queries > self.num_patches:
                problems.append(f"projector_locality='cell' needs num_queries ({self.num_queries}) <= "
                                f"patches per image ({self.num_patches})")
            if self.projector_position not in POSITIONS:
                problems.append(f"projector_position={self.projector_position!r} is not one of {POSITIONS}")
            if self.projector_init not in PROJECTOR_INITS:
                problems.append(f"projector_init={self.projector_init!r} is not one of {PROJECTOR_INITS}")
            if not self.projector_output_scale > 0:
                problems.append(f"projector_output_scale={self.projector_output_scale} must be > 0")
            if self.projector_layers < 1:
                problems.append(f"projector_layers={self.projector_layers} must be at least 1")
        if not isinstance(self.max_tiles, int) or self.max_tiles < 1:
            problems.append(f"max_tiles={self.max_tiles} must be a whole number >= 1 (1: no tiles)")
        elif self.max_tiles > 1 and self.projector_type != "cross_attn":
            problems.append(f"max_tiles={self.max_tiles} needs projector_type='cross_attn' (its queries carry a tile's place)")
        if self.tile_queries is not None:
            if self.max_tiles == 1:
                problems.append(f"tile_queries={self.tile_queries} needs max_tiles > 1 (a model of single views has no tiles)")
            if not isinstance(self.tile_queries, int) or self.tile_queries < 1 or math.isqrt(self.tile_queries) ** 2 != self.tile_queries:
                problems.append(f"tile_queries={self.tile_queries} must be a square number (queries sit on a grid)")
            elif self.projector_locality == "cell" and self.tile_queries > self.num_patches:
                problems.append(f"projector_locality='cell' needs tile_queries ({self.tile_queries}) <= "
                                f"patches per image ({self.num_patches})")
        n_layers = self.vision_config.num_hidden_layers
        if not -n_layers <= self.vision_feature_layer <= n_layers or self.vision_feature_layer == 0:
            problems.append(
                f"vision_feature_layer={self.vision_feature_layer} is outside the vision tower's "
                f"{n_layers} layers (use 1..{n_layers} or -1..-{n_layers})"
            )
        if problems:
            raise ConfigError(listed("invalid CrossVLM config", problems))

    def to_dict(self):
        out = super().to_dict()
        for key in ("text_config", "vision_config"):
            value = getattr(self, key)
            out[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return out
