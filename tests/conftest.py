"""Shared fixtures: tiny random base models written to disk once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossvlm.make_model import write_random_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A directory holding `llm/` (Qwen3ForCausalLM + tokenizer) and `vision/` (CLIPVisionModel)."""
    out = tmp_path_factory.mktemp("tiny_models")
    write_random_models(out, "tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_vlm_dir(tiny_models, tmp_path_factory) -> Path:
    """A saved CrossVLM (untrained projector, 16 queries) built from the tiny base models."""
    from crossvlm.model import CrossVLM
    from crossvlm.model.processor import CrossVLMProcessor

    torch.manual_seed(0)
    model = CrossVLM.from_base_models(tiny_models / "llm", tiny_models / "vision", num_queries=16,
                                      projector_heads=4)
    out = tmp_path_factory.mktemp("tiny_vlm")
    model.save_pretrained(out)
    CrossVLMProcessor.from_base_models(tiny_models / "llm", tiny_models / "vision",
                                       model.num_image_tokens).save_pretrained(out)
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
