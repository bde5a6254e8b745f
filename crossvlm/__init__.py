"""crossvlm: train and serve a small vision-language model (CLIP ViT-B/16 + cross-attention + Qwen3)."""

__version__ = "0.1.0"


def load(model_dir, device: str = "auto", dtype=None, engine=None):
    """Load a saved CrossVLM directory; returns a `ChatModel` with `chat()`, `stream()` and batched
    `generate()`, all answered by the generation engine (`engine`: a `crossvlm.engine.EngineConfig`)."""
    from crossvlm.inference import load as _load

    return _load(model_dir, device=device, dtype=dtype, engine=engine)


__all__ = ["__version__", "load"]
