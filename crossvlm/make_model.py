"""Randomly initialised base models written to disk in Hugging Face format.

`write_random_models(out, preset, tower=...)` writes `out/llm` (a `Qwen3ForCausalLM` plus a
tokenizer) and `out/vision` (a vision tower plus its image processor, laid out like the checkpoint
it stands for: `clip` a `CLIPVisionModel` like openai/clip-vit-base-patch16's vision part, `siglip`
a `SiglipVisionModel` with google/siglip-*'s image processor, `siglip2` a full `SiglipModel`
image-text checkpoint as google/siglip2-base-patch16-224 ships). Tests, the CPU demo and the
benchmarks load these through exactly the code path used for the real ones; nothing is downloaded.

The tokenizer is a small byte-level BPE trained here on a built-in word list, with the Qwen3
pre-tokenizer, Qwen3's special tokens and a Qwen3-style chat template, saved as the same
`Qwen2Tokenizer` class the real Qwen3 checkpoints use. Its special-token ids differ from Qwen3's on
purpose: code must read them from the tokenizer, never hard-code them.

`write_vlm(out, llm, vision)` turns base models (these, or the real ones by hub id or folder) into a
crossvlm model directory with an untrained projector (`crossvlm init`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

# Qwen3's special tokens, in the order they are appended after the BPE vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
)
# Added (not "special") tokens: Qwen3 keeps them in decoded text.
THINK_TOKENS = ("<think>", "</think>")

# Qwen3's chat template semantics, written for crossvlm: ChatML turns; an assistant turn after the
# last user message carries a <think> block (empty when there is no reasoning) when it is the last
# message or has reasoning; earlier assistant turns drop their reasoning; `enable_thinking=False`
# ends the generation prompt with an empty think block so the model answers directly.
QWEN3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_WORDS = """
a an the is are was what which where how many of in on at to and or with there this that it its
image picture photo shows contains describe caption question answer yes no one two three four five
six seven eight nine zero shape shapes object objects colour color red green blue yellow purple
orange white black grey gray pink brown circle square triangle star diamond cross hexagon heart
small medium large big tiny top middle bottom left right centre center upper lower corner side
background foreground near far next above below between count number total only also both each
you i we they he she can could would should please tell me about see look find where's what's
hello hi thanks thank good bad nice day today help sure here answer explain why because so
""".split()


@dataclass(frozen=True)
class Preset:
    """Shapes of one preset. `full` mirrors Qwen3-0.6B and CLIP ViT-B/16."""

    llm: dict
    vision: dict
    image_size: int
    bpe_vocab: int


PRESETS = {
    "tiny": Preset(
        llm=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            # Wider than Qwen3's 0.02 so an untrained tiny model emits varied text, which tests
            # comparing generation paths need.
            initializer_range=0.1,
        ),
        vision=dict(
            # 4-pixel patches (16×16 = 256 of them): more patches than projector queries, as in the
            # full preset.
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            patch_size=4,
        ),
        image_size=64,
        bpe_vocab=700,
    ),
    "full": Preset(
        llm=dict(
            hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, vocab_size=151936,
        ),
        vision=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            patch_size=16, projection_dim=512,
        ),
        image_size=224,
        bpe_vocab=2000,
    ),
}

# The CPU demo's: the tiny models with 8-pixel patches (an 8×8 grid), 4× cheaper to run than 4-pixel
# ones and, once the demo has taught the tower the shapes, fine enough to tell them apart.
PRESETS["demo"] = replace(PRESETS["tiny"], vision={**PRESETS["tiny"].vision, "patch_size": 8})

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOWERS = ("clip", "siglip", "siglip2")
"""Vision towers `write_random_models` can write (see the module docstring)."""


def _corpus(seed: int) -> list[str]:
    """Sentences over the built-in word list, enough for BPE to learn whole words."""
    rng = random.Random(seed)
    lines = [" ".join(_WORDS[i : i + 8]) for i in range(0, len(_WORDS), 8)]
    for _ in range(3000):
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!,"))
    lines += [str(n) for n in range(200)]
    return lines


def build_tokenizer(bpe_vocab: int = 700, seed: int = 0):
    """A byte-level BPE `Qwen2Tokenizer` with Qwen3's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, model_max_length=32768,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def write_random_models(out: Path, preset: str = "tiny", seed: int = 0, tower: str = "clip") -> tuple[Path, Path]:
    """Write `out/llm` and `out/vision`, randomly initialised; returns both paths."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if tower not in TOWERS:
        raise ValueError(f"unknown vision tower {tower!r}; choose one of {TOWERS}")
    spec = PRESETS[preset]
    out = Path(out)
    llm_dir, vision_dir = out / "llm", out / "vision"
    torch.manual_seed(seed)

    tok = build_tokenizer(spec.bpe_vocab, seed)
    vocab_size = spec.llm.get("vocab_size") or _round_up(len(tok), 64)
    llm_kwargs = {k: v for k, v in spec.llm.items() if k != "vocab_size"}
    llm_cfg = Qwen3Config(
        vocab_size=vocab_size, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), **llm_kwargs,
    )
    llm = Qwen3ForCausalLM(llm_cfg)
    llm.generation_config.eos_token_id = [llm_cfg.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")]
    llm.generation_config.pad_token_id = llm_cfg.pad_token_id
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    _write_vision(vision_dir, spec, tower)
    return llm_dir, vision_dir


def _write_vision(vision_dir: Path, spec: Preset, tower: str) -> None:
    from PIL.Image import Resampling
    from transformers import (CLIPVisionConfig, CLIPVisionModel, SiglipConfig, SiglipModel, SiglipVisionConfig,
                              SiglipVisionModel)

    from crossvlm.model.processor import image_processor_class

    size = spec.image_size
    if tower == "clip":
        CLIPVisionModel(CLIPVisionConfig(image_size=size, hidden_act="quick_gelu", **spec.vision)).save_pretrained(vision_dir)
        image_processor_class("CLIPImageProcessor")(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=CLIP_MEAN, image_std=CLIP_STD,
        ).save_pretrained(vision_dir)
        return
    shapes = {k: v for k, v in spec.vision.items() if k != "projection_dim"}  # CLIP's alone
    vision_cfg = SiglipVisionConfig(image_size=size, **shapes)
    if tower == "siglip":  # a vision-only copy; google/siglip-*'s processor resizes bicubically
        SiglipVisionModel(vision_cfg).save_pretrained(vision_dir)
        resample = Resampling.BICUBIC
    else:  # google/siglip2-*-224 and friends: a SiglipModel (image + text towers), bilinear resizing
        text = dict(hidden_size=shapes["hidden_size"], intermediate_size=shapes["intermediate_size"],
                    num_hidden_layers=1, num_attention_heads=shapes["num_attention_heads"], vocab_size=256,
                    pad_token_id=0, eos_token_id=1, bos_token_id=2)  # Gemma's ids, as SigLIP 2 has
        SiglipModel(SiglipConfig(text_config=text, vision_config=vision_cfg.to_dict())).save_pretrained(vision_dir)
        resample = Resampling.BILINEAR
    image_processor_class("SiglipImageProcessor")(size={"height": size, "width": size}, resample=resample,
                         image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(vision_dir)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def write_vlm(out: Path, llm: str | Path, vision: str | Path, options: dict | None = None, seed: int = 0) -> Path:
    """A ready crossvlm model directory built from base models (hub ids or local folders): the model
    with an untrained projector, its tokenizer, image processor and generation config, as `chat`,
    `serve`, `eval` and `train --model.init_from` take it.

    `options` are `model.*` config values (`num_queries`, `projector_type`, ...), with the defaults a
    training stage has. The directory appears whole or not at all; an existing one is never touched.
    """
    import os
    import shutil
    import tempfile

    import torch

    from crossvlm.errors import ConfigError
    from crossvlm.train.config import model_from_dict
    from crossvlm.train.setup import build_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; name a new folder")
    cfg = model_from_dict({**(options or {}), "llm": str(llm), "vision": str(vision), "init_from": None})
    torch.manual_seed(seed)
    model, processor = build_model(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


__all__ = ["PRESETS", "QWEN3_CHAT_TEMPLATE", "TOWERS", "build_tokenizer", "write_random_models", "write_vlm"]
