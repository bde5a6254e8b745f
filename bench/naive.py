"""The tutorial VLM, re-implemented faithfully as the speed baseline of `crossvlm bench train`.

Not crossvlm's design and not for use: it keeps every habit of the MiniMind-V-style tutorials that
crossvlm's design avoids, so the benchmark can show what each costs.

- The Hugging Face models are held in float32 and run under bf16 autocast (every matmul re-casts its
  float32 weight; frozen weights are re-cast on every forward).
- The vision tower is frozen by `requires_grad = False` but called without `torch.no_grad()`.
- One visual token per patch (196 for CLIP ViT-B/16 at 224 px), spliced into the sequence in a
  Python loop over the samples of the batch (one `nonzero` host sync and one `torch.cat` per sample).
- The projector is a `nn.MultiheadAttention` whose queries are the embeddings of the placeholder
  tokens (all equal: every visual token of an image starts from the same query) and whose keys and
  values are the linearly projected patch features.
- The loss is the Hugging Face `labels=` loss: logits over the whole vocabulary at every position of
  the sequence, upcast to float32, then cross-entropy.
- Plain `torch.optim.AdamW` (the default, not fused) over the trainable parameters; gradient clipping.

`crossvlm bench train` loads this file from the source checkout (`bench/naive.py`), so it needs no
installation; nothing in the `crossvlm` package imports it otherwise.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel, Qwen3ForCausalLM

from crossvlm.model.flops import attention_flops, linear_flops


class NaiveProjector(nn.Module):
    """Placeholder embeddings attend over the projected patch features, one sample at a time."""

    def __init__(self, vision_dim: int, llm_dim: int, num_heads: int = 8):
        super().__init__()
        self.vision_proj = nn.Linear(vision_dim, llm_dim)
        self.attn = nn.MultiheadAttention(llm_dim, num_heads, batch_first=True)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, input_ids: torch.Tensor,
                image_token_id: int) -> torch.Tensor:
        # embeds (B, T, D), features (B, P, Dv): one image per sample, as the tutorials assume.
        rows = []
        for b in range(embeds.shape[0]):
            h = embeds[b]  # (T, D)
            positions = (input_ids[b] == image_token_id).nonzero(as_tuple=True)[0]  # host sync
            if len(positions) == 0:
                rows.append(h)
                continue
            start, end = int(positions[0]), int(positions[-1]) + 1
            queries = h[start:end].unsqueeze(0)  # (1, P, D): the placeholder tokens' embeddings
            kv = self.vision_proj(features[b]).unsqueeze(0)  # (1, P, D)
            visual, _ = self.attn(queries, kv, kv)  # (1, P, D)
            rows.append(torch.cat([h[:start], visual[0], h[end:]]))  # (T, D)
        return torch.stack(rows)  # (B, T, D)


class NaiveVLM(nn.Module):
    """Vision tower + `NaiveProjector` + Qwen3ForCausalLM, trained with the HF `labels=` loss."""

    def __init__(self, llm: Qwen3ForCausalLM, vision: CLIPVisionModel, image_token_id: int,
                 vision_feature_layer: int = -2, num_heads: int = 8):
        super().__init__()
        self.llm = llm
        self.vision = vision
        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.projector = NaiveProjector(vision.config.hidden_size, llm.config.hidden_size, num_heads)
        for p in self.vision.parameters():
            p.requires_grad = False

    @classmethod
    def from_pretrained(cls, llm_path, vision_path, image_token_id: int, **kwargs) -> "NaiveVLM":
        """Both models in float32, as the tutorials load them."""
        llm = Qwen3ForCausalLM.from_pretrained(str(llm_path), dtype=torch.float32)
        vision = CLIPVisionModel.from_pretrained(str(vision_path), dtype=torch.float32)
        return cls(llm, vision, image_token_id, **kwargs)

    def set_stage(self, stage: str) -> None:
        """pretrain: the projector learns, the LLM is frozen; sft: the projector and the whole LLM learn."""
        for p in self.llm.parameters():
            p.requires_grad = stage == "sft"

    def merge(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the visual tokens spliced in: (B, T, D)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)  # no torch.no_grad()
        features = out.hidden_states[self.vision_feature_layer][:, 1:]  # (B, P, Dv)
        return self.projector(embeds, features, input_ids, self.image_token_id)

    def forward(self, input_ids, pixel_values, attention_mask=None, labels=None, **_):
        embeds = self.merge(input_ids, pixel_values)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    def projector_forward_flops(self) -> float:
        """Forward FLOPs of the projector for one image (vision_proj, the attention's four projections
        and its scores over P queries × P keys)."""
        vision_dim, dim = self.vision.config.hidden_size, self.llm.config.hidden_size
        cfg = self.vision.config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        return (linear_flops(vision_dim * dim + 4 * dim * dim, patches, "frozen")
                + attention_flops(patches, patches, dim, "frozen"))


def build_optimizer(model: nn.Module, lr: float = 1e-4) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: torch.device,
               amp_dtype: torch.dtype | None, grad_clip: float = 1.0) -> float:
    """One tutorial step: move the batch, forward under autocast, backward, clip, step. `model` may be
    DDP-wrapped."""
    inputs = {k: batch[k].to(device) for k in ("input_ids", "pixel_values", "attention_mask", "labels")}
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()
