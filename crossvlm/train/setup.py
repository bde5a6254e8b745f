"""Build the model for a stage and decide what trains.

Frozen parts get `requires_grad=False`, stay in eval mode and stay out of the optimizer; the
vision tower, when frozen, is also run without autograd (see `CrossVLM.vision_features`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from crossvlm.errors import ConfigError
from crossvlm.model.modeling import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor
from crossvlm.model.tiling import Tiling
from crossvlm.train.config import ModelSection, TrainableSection


def build_model(cfg: ModelSection, dtype: torch.dtype = torch.float32) -> tuple[CrossVLM, CrossVLMProcessor]:
    """A saved VLM (`init_from`) or a new one from base models, with its processor."""
    if cfg.init_from:
        model = CrossVLM.from_pretrained(cfg.init_from, dtype=dtype)
        processor = CrossVLMProcessor.from_pretrained(cfg.init_from)
        return model, processor
    model = CrossVLM.from_base_models(cfg.llm, cfg.vision, dtype=dtype, **model_options(cfg))
    processor = CrossVLMProcessor.from_base_models(cfg.llm, cfg.vision, model.num_image_tokens,
                                                   Tiling.from_config(model.config))
    return model, processor


def model_options(cfg: ModelSection) -> dict:
    """The `CrossVLMConfig` fields a model section sets: the projector's, the vision feature layer and tiling."""
    projector = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name.startswith("projector_")}
    return {"num_queries": cfg.num_queries, "vision_feature_layer": cfg.vision_feature_layer,
            "max_tiles": cfg.max_tiles, "tile_queries": cfg.tile_queries, **projector}


def apply_trainable(model: CrossVLM, cfg: TrainableSection) -> None:
    """Set requires_grad on exactly the parts the stage trains (LoRA adapters are added here)."""
    model.requires_grad_(False)
    model.config.freeze_vision = not cfg.vision
    if cfg.projector:
        model.projector.requires_grad_(True)
    if cfg.vision:
        model.vision.requires_grad_(True)
    if cfg.llm == "full":
        model.llm.requires_grad_(True)
    elif cfg.llm == "last_n":
        layers = model.llm.model.layers
        if cfg.llm_last_n > len(layers):
            raise ConfigError(f"trainable.llm_last_n={cfg.llm_last_n} but the LLM has {len(layers)} layers")
        for layer in layers[-cfg.llm_last_n:]:
            layer.requires_grad_(True)
        model.llm.model.norm.requires_grad_(True)
    elif cfg.llm == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), bias="none")
        # In place: the LLM keeps its class and module paths; only the target Linears gain adapters.
        inject_adapter_in_model(lora, model.llm)
        for name, p in model.llm.named_parameters():
            p.requires_grad_("lora_" in name)


def set_train_mode(model: CrossVLM) -> None:
    """Train mode for the parts that learn; eval mode for the parts that are wholly frozen."""
    model.train()
    for part in (model.vision, model.llm, model.projector):
        if not any(p.requires_grad for p in part.parameters()):
            part.eval()


def merge_adapters(model: CrossVLM) -> CrossVLM:
    """Fold LoRA adapters into the LLM's weights so the saved model is a plain CrossVLM."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.llm.get_submodule(parent), child, module.get_base_layer())
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
