"""The vision tower, cut at the layer the projector reads.

The projector reads one hidden state of the tower (`vision_feature_layer`, -2 = penultimate). The
layers after it, and the final LayerNorm that only the pooled output uses, would be computed for
nothing and, when the tower trains, hold parameters that never get a gradient: the optimizer then
has no state for them and DDP waits for their gradients forever. So the tower is cut where the
projector reads it: those modules are removed, not merely skipped.
"""

from __future__ import annotations

from torch import nn


def layers_needed(num_layers: int, feature_layer: int) -> int:
    """Transformer layers whose output the projector reads (hidden state k is layer k's output)."""
    return num_layers + 1 + feature_layer if feature_layer < 0 else feature_layer


def vision_transformer(tower: nn.Module) -> nn.Module:
    """The module holding `embeddings`, `encoder` and `post_layernorm` (HF wraps it in `vision_model`)."""
    return getattr(tower, "vision_model", tower)


def vision_layers(tower: nn.Module) -> list[nn.Module]:
    """The tower's transformer layers (after a cut: only those that run)."""
    return list(vision_transformer(tower).encoder.layers)


def dropped_prefixes(tower: nn.Module, feature_layer: int, prefix: str = "vision.") -> tuple[str, ...]:
    """State-dict key prefixes of the modules a cut removes (so loading an uncut checkpoint may skip them)."""
    num_layers = tower.config.num_hidden_layers
    keep = layers_needed(num_layers, feature_layer)
    inner = f"{prefix}vision_model." if hasattr(tower, "vision_model") else prefix
    return (*(f"{inner}encoder.layers.{i}." for i in range(keep, num_layers)), f"{inner}post_layernorm.")


def cut_tower(tower: nn.Module, feature_layer: int) -> nn.Module:
    """Remove the layers past `feature_layer` and the final LayerNorm, in place; the tower's
    `last_hidden_state` is then the hidden state the projector reads.

    Idempotent: a tower already cut is left as it is.
    """
    inner = vision_transformer(tower)
    keep = layers_needed(tower.config.num_hidden_layers, feature_layer)
    if len(inner.encoder.layers) > keep:
        inner.encoder.layers = inner.encoder.layers[:keep]
    if not isinstance(inner.post_layernorm, nn.Identity):
        inner.post_layernorm = nn.Identity()
    return tower
