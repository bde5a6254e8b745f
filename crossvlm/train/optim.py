"""AdamW with parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from crossvlm.train.config import OptimSection

_NO_DECAY_NAMES = ("embed", "norm", "queries", "locality", "position", "place_")  # place_: tile codes


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """Groups by (projector or not) × (decay or not).

    No weight decay on norms, biases, embeddings and the projector's queries / locality strengths /
    tile place codes:
    any 0- or 1-dimensional tensor, or a name that marks an embedding.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_projector = name.startswith("projector.") or ".projector." in name
        decay = p.ndim >= 2 and not any(key in name for key in _NO_DECAY_NAMES)
        groups.setdefault((is_projector, decay), []).append(p)
    out = []
    for (is_projector, decay), params in sorted(groups.items()):
        lr = (cfg.projector_lr or cfg.lr) if is_projector else cfg.lr
        out.append({"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0,
                    "name": f"{'projector' if is_projector else 'model'}{'' if decay else '_no_decay'}"})
    return out


def build_optimizer(model: nn.Module, cfg: OptimSection, device: torch.device) -> torch.optim.AdamW:
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimSection, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, cfg.min_lr_ratio)
    )
