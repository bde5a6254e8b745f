"""The vision tower: which kinds load, and the tower cut at the layer the projector reads.

Kinds are chosen by the `model_type` a config says, through transformers' own classes:

| model_type (config.json)              | class              | CLS token | final LayerNorm         |
| ------------------------------------- | ------------------ | --------- | ----------------------- |
| clip, clip_vision_model               | CLIPVisionModel    | yes       | pooled CLS output only  |
| siglip, siglip_vision_model           | SiglipVisionModel  | no        | every position          |

SigLIP 2 checkpoints at a fixed resolution (google/siglip2-base-patch16-224 and friends) say
`model_type: siglip`: the same architecture with other weights, so they load as SigLIP. SigLIP 2's
NaFlex variants (`model_type: siglip2`, variable resolution through `spatial_shapes` and a patch
mask) are refused with a message saying so.

The projector reads one hidden state of the tower (`vision_feature_layer`, -2 = penultimate). The
layers after it, and the modules only the pooled output uses (CLIP's final LayerNorm, SigLIP's
attention-pooling head), would be computed for nothing and, when the tower trains, hold parameters
that never get a gradient: the optimizer then has no state for them and DDP waits for their
gradients forever. So the tower is cut where the projector reads it: those modules are removed,
not merely skipped. SigLIP's final LayerNorm normalises every position of `last_hidden_state`, so it
stays when the projector reads the last layer (the cut tower's output is then the uncut tower's
`last_hidden_state`, what SigLIP was trained to give) and goes with the layers after an earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from crossvlm.errors import ModelLoadError


@dataclass(frozen=True)
class TowerKind:
    """What crossvlm needs to know about one family of vision towers."""

    name: str
    model_class: str
    """transformers class the tower loads as."""
    config_class: str
    """transformers class of its vision config."""
    class_token: bool
    """A CLS token leads the patch sequence (dropped before the projector)."""
    norm_on_sequence: bool
    """The final LayerNorm (`post_layernorm`) is applied to every position of `last_hidden_state`,
    not only to the pooled output."""
    other_parts: tuple[str, ...]
    """State-dict key prefixes of a full image-text checkpoint that the vision tower does not use."""

    def classes(self) -> tuple[type, type]:
        """(model class, config class) from transformers."""
        import transformers

        return getattr(transformers, self.model_class), getattr(transformers, self.config_class)


TOWER_KINDS = {
    "clip": TowerKind("clip", "CLIPVisionModel", "CLIPVisionConfig", class_token=True, norm_on_sequence=False,
                      other_parts=("text_model.", "text_projection.", "visual_projection.", "logit_scale")),
    "siglip": TowerKind("siglip", "SiglipVisionModel", "SiglipVisionConfig", class_token=False,
                        norm_on_sequence=True, other_parts=("text_model.", "logit_scale", "logit_bias")),
}
# The model_type of a full image-text checkpoint and of a vision-only one, per kind.
_MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


def tower_kind(model_type: str | None, source: str = "the vision config") -> TowerKind:
    """The kind of tower a config's `model_type` names (a config without one is CLIP, as before kinds)."""
    if model_type is None:
        return TOWER_KINDS["clip"]
    if model_type in _MODEL_TYPES:
        return TOWER_KINDS[_MODEL_TYPES[model_type]]
    if model_type.startswith("siglip2"):
        raise ModelLoadError(
            f"{source} is a SigLIP 2 NaFlex tower (model_type {model_type!r}, variable resolution), which "
            "crossvlm does not support; use a fixed-resolution SigLIP 2 checkpoint such as "
            "google/siglip2-base-patch16-224 (model_type 'siglip')"
        )
    raise ModelLoadError(f"{source} has model_type {model_type!r}; crossvlm loads CLIP and SigLIP / SigLIP 2 "
                         f"vision towers (model_type one of {sorted(_MODEL_TYPES)})")


def kind_of(tower: nn.Module) -> TowerKind:
    return tower_kind(tower.config.model_type)


def layers_needed(num_layers: int, feature_layer: int) -> int:
    """Transformer layers whose output the projector reads (hidden state k is layer k's output)."""
    return num_layers + 1 + feature_layer if feature_layer < 0 else feature_layer


def vision_transformer(tower: nn.Module) -> nn.Module:
    """The module holding `embeddings`, `encoder` and `post_layernorm` (HF wraps it in `vision_model`)."""
    return getattr(tower, "vision_model", tower)


def vision_layers(tower: nn.Module) -> list[nn.Module]:
    """The tower's transformer layers (after a cut: only those that run)."""
    return list(vision_transformer(tower).encoder.layers)


def _keeps_final_norm(tower: nn.Module, feature_layer: int) -> bool:
    num_layers = tower.config.num_hidden_layers
    return kind_of(tower).norm_on_sequence and layers_needed(num_layers, feature_layer) == num_layers


def dropped_prefixes(tower: nn.Module, feature_layer: int, prefix: str = "vision.") -> tuple[str, ...]:
    """State-dict key prefixes of the modules a cut removes (so loading an uncut checkpoint may skip them)."""
    num_layers = tower.config.num_hidden_layers
    keep = layers_needed(num_layers, feature_layer)
    inner = f"{prefix}vision_model." if hasattr(tower, "vision_model") else prefix
    dropped = [f"{inner}encoder.layers.{i}." for i in range(keep, num_layers)]
    if not _keeps_final_norm(tower, feature_layer):
        dropped.append(f"{inner}post_layernorm.")
    return (*dropped, f"{inner}head.")  # SigLIP's attention-pooling head (CLIP has none)


def cut_tower(tower: nn.Module, feature_layer: int) -> nn.Module:
    """Remove the layers past `feature_layer` and the pooled-output modules, in place; the tower's
    `last_hidden_state` is then the hidden state the projector reads.

    Idempotent: a tower already cut is left as it is.
    """
    inner = vision_transformer(tower)
    keep = layers_needed(tower.config.num_hidden_layers, feature_layer)
    if len(inner.encoder.layers) > keep:
        inner.encoder.layers = inner.encoder.layers[:keep]
    if not _keeps_final_norm(tower, feature_layer) and not isinstance(inner.post_layernorm, nn.Identity):
        inner.post_layernorm = nn.Identity()
    if getattr(inner, "head", None) is not None:  # SigLIP's forward calls it only while `use_head` is set
        inner.use_head = False
        del inner.head
    return tower
