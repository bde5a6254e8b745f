"""Matmul FLOPs of a training step, and the model FLOPs utilisation (MFU) built on them.

A fact about the model, so it lives with it: the training loop's MFU (crossvlm.train.throughput) and
the benchmarks (crossvlm.bench) both read it, and it reads nothing of either.

The rules (docs/PERFORMANCE.md, "MFU"), counted per sample and multiplied by the batch:
- a linear layer applied to t tokens costs 2·p·t forward, p being its weight-matrix entries (biases,
  norms, activations and the embedding lookup are not matmuls and are left out);
- backward costs 2× forward for trained layers (input and weight gradients), 1× for frozen layers
  that gradients pass through (input gradients only: the frozen LLM in pretraining), nothing for
  frozen layers no gradient reaches (the vision tower);
- attention scores (QKᵀ and AV, no weights) cost 4·q·k·width forward over q queries and k keys,
  half of that when causal (the masked half is not useful work); backward 2× forward where
  gradients pass;
- the LM head counts only at the positions whose logits are computed (the labelled ones, in the
  required count); padding counts nowhere.

`required_step_flops` is the useful work of crossvlm's design (cross-attention projector, M image
tokens, the vision tower only up to the feature layer, logits only where labels exist); MFU divides
it by the measured step time and the GPU's peak, whatever variant ran, so a variant that does more
work for the same samples shows a lower MFU. `step_flops` with a variant's own shapes gives the work
it actually executed, for the hardware-side view.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossvlm.model.vision import layers_needed

PEAK_BF16_FLOPS = 989e12
"""Dense bf16 tensor-core peak of an H100/H200 SXM (datasheet, no sparsity)."""

# Dense bf16 datasheet peaks by the name CUDA reports (first match wins; no sparsity).
GPU_PEAKS = (("H200", 989e12), ("H100 80GB HBM3", 989e12), ("H100 SXM", 989e12), ("H100 NVL", 835e12),
             ("H100 PCIe", 756e12), ("A100", 312e12))

# How much backward costs, as a multiple of forward, for a layer whose weights are ...
BACKWARD = {"trained": 2, "through": 1, "frozen": 0}


def linear_flops(params: int, tokens: int, grad: str) -> float:
    """Forward + backward FLOPs of linear layers with `params` weight entries applied to `tokens` tokens.

    `grad`: "trained" (weights learn), "through" (frozen, gradients pass to earlier layers) or
    "frozen" (no gradient reaches it).
    """
    return 2.0 * params * tokens * (1 + BACKWARD[grad])


def attention_flops(queries: int, keys: int, width: int, grad: str, causal: bool = False) -> float:
    """Forward + backward FLOPs of QKᵀ and AV for `queries` × `keys` scores over `width` = heads × head_dim.

    Causal attention counts half the score matrix. Attention has no weights, so "through" and
    "trained" cost the same backward (gradients of Q, K and V).
    """
    forward = 4.0 * queries * keys * width * (0.5 if causal else 1.0)
    return forward * (1 + (2 if BACKWARD[grad] else 0))


@dataclass(frozen=True)
class LLMShape:
    """The matmul shapes of a Qwen3-style decoder (GQA attention, gated MLP, LM head)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> "LLMShape":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   cfg.num_key_value_heads, head_dim, cfg.vocab_size)

    @property
    def layer_params(self) -> int:
        """Weight entries of one decoder layer: q and o, k and v, gate, up and down."""
        attn = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + 3 * self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden


@dataclass(frozen=True)
class VisionShape:
    """The matmul shapes of a ViT (CLIP): patch embedding, then pre-LN layers over patches + CLS."""

    hidden: int
    intermediate: int
    layers: int
    patch: int
    image_size: int
    channels: int = 3

    @classmethod
    def from_config(cls, cfg) -> "VisionShape":
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.patch_size,
                   cfg.image_size, getattr(cfg, "num_channels", 3))

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    def forward_flops(self, layers: int | None = None) -> float:
        """Forward FLOPs for one image through the first `layers` layers (default: all)."""
        layers = self.layers if layers is None else layers
        tokens = self.patches + 1  # + CLS
        patch_embed = linear_flops(self.channels * self.patch**2 * self.hidden, self.patches, "frozen")
        layer_params = 4 * self.hidden**2 + 2 * self.hidden * self.intermediate
        per_layer = (linear_flops(layer_params, tokens, "frozen")
                     + attention_flops(tokens, tokens, self.hidden, "frozen"))
        return patch_embed + layers * per_layer


def cross_attn_projector_flops(vision_dim: int, width: int, llm_dim: int, queries: int, patches: int,
                               layers: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of `CrossAttentionProjector` for one image (see crossvlm/model/projector.py)."""
    mlp_hidden = int(width * mlp_ratio)
    on_patches = vision_dim * width + layers * 2 * width * width  # kv_in; kv_proj per block
    on_queries = layers * (2 * width * width + 2 * width * mlp_hidden) + width * llm_dim  # q, o, mlp; out
    attention = layers * attention_flops(queries, patches, width, "frozen")
    return linear_flops(on_patches, patches, "frozen") + linear_flops(on_queries, queries, "frozen") + attention


def mlp_projector_flops(vision_dim: int, llm_dim: int, patches: int) -> float:
    """Forward FLOPs of `MLPProjector` for one image: fc1 and fc2 on every patch."""
    return linear_flops(vision_dim * llm_dim + llm_dim * llm_dim, patches, "frozen")


def projector_forward_flops(config) -> float:
    """Forward FLOPs of a `CrossVLMConfig`'s projector for one image."""
    vision_dim, llm_dim = config.vision_config.hidden_size, config.text_config.hidden_size
    if config.projector_type == "cross_attn":
        return cross_attn_projector_flops(vision_dim, config.projector_width, llm_dim, config.num_queries,
                                          config.num_patches, config.projector_layers)
    return mlp_projector_flops(vision_dim, llm_dim, config.num_patches)


def vision_layers_needed(config) -> int:
    """Vision layers whose output the projector reads: up to `vision_feature_layer` (-2: all but the last)."""
    return layers_needed(config.vision_config.num_hidden_layers, config.vision_feature_layer)


@dataclass(frozen=True)
class Workload:
    """What one sample costs the model: its LLM sequence and its images."""

    seq_len: int
    """Tokens through the LLM (image tokens + text), padding excluded."""
    logits: int
    """Positions whose logits are computed: the labelled ones (ours) or all (full-logits designs)."""
    images: int = 1
    vision_layers: int | None = None
    """Vision layers run per image; None: all."""


def step_flops(llm: LLMShape, vision: VisionShape, projector_forward: float, work: Workload, llm_grad: str,
               batch: int) -> dict[str, float]:
    """FLOPs of one optimizer step over `batch` samples, by part, with their "total".

    The projector always trains; the vision tower is frozen before it (no backward); `llm_grad` is
    "trained" (SFT) or "through" (pretraining: frozen, but the projector's gradients pass through it).
    """
    per_sample = {
        "vision": work.images * vision.forward_flops(work.vision_layers),
        "projector": work.images * projector_forward * (1 + BACKWARD["trained"]),
        "llm_linear": llm.layers * linear_flops(llm.layer_params, work.seq_len, llm_grad),
        "llm_attention": llm.layers * attention_flops(work.seq_len, work.seq_len, llm.heads * llm.head_dim,
                                                      llm_grad, causal=True),
        "lm_head": linear_flops(llm.head_params, work.logits, llm_grad),
    }
    parts = {k: v * batch for k, v in per_sample.items()}
    parts["total"] = sum(parts.values())
    return parts


def batch_flops(config, lengths: list[int], logits: int, images: int, llm_grad: str) -> dict[str, float]:
    """FLOPs of a batch of variable-length samples through crossvlm's design, by part, with "total".

    `config` is the model's CrossVLMConfig; `lengths` the samples' token counts (padding is not work,
    and packed samples attend within themselves, so attention sums each sample's own square);
    `logits` the positions whose logits are computed; `images` the images of the batch.
    """
    llm, vision = LLMShape.from_config(config.text_config), VisionShape.from_config(config.vision_config)
    width = llm.heads * llm.head_dim
    parts = {
        "vision": images * vision.forward_flops(vision_layers_needed(config)),
        "projector": images * projector_forward_flops(config) * (1 + BACKWARD["trained"]),
        "llm_linear": llm.layers * linear_flops(llm.layer_params, sum(lengths), llm_grad),
        "llm_attention": llm.layers * sum(attention_flops(n, n, width, llm_grad, causal=True) for n in lengths),
        "lm_head": linear_flops(llm.head_params, logits, llm_grad),
    }
    parts["total"] = sum(parts.values())
    return parts


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name, or None when it is not in GPU_PEAKS."""
    return next((peak for key, peak in GPU_PEAKS if key in device_name), None)


def required_step_flops(config, text_tokens: int, labelled: int, llm_grad: str, batch: int) -> dict[str, float]:
    """The useful work of crossvlm's design for `batch` one-image samples of `text_tokens` text tokens.

    `config` is a CrossVLMConfig; its projector is taken as the cross-attention one (the design), and
    the vision tower counts only up to the feature layer.
    """
    vision_dim, llm_dim = config.vision_config.hidden_size, config.text_config.hidden_size
    projector = cross_attn_projector_flops(vision_dim, config.projector_width, llm_dim, config.num_queries,
                                           config.num_patches, config.projector_layers)
    work = Workload(seq_len=config.num_queries + text_tokens, logits=labelled,
                    vision_layers=vision_layers_needed(config))
    return step_flops(LLMShape.from_config(config.text_config), VisionShape.from_config(config.vision_config),
                      projector, work, llm_grad, batch)


def mfu(flops: float, seconds: float, peak: float = PEAK_BF16_FLOPS) -> float:
    """Model FLOPs utilisation: `flops` done in `seconds` as a share of `peak` FLOP/s."""
    return flops / (seconds * peak)
