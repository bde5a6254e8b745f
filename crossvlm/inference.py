"""Generation for people and programs: `crossvlm.load(DIR)` returns a `ChatModel`.

A `ChatModel` holds a CrossVLM and its processor on one device and answers conversations, one or
many at a time (left padding, KV cache). Messages are OpenAI-style `{role, content}` dicts whose
content may contain `<image>` marks; the images are given separately, in order of appearance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from crossvlm.errors import CrossVLMError
from crossvlm.model.modeling import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor
from crossvlm.model.tokens import IMAGE_MARK


@dataclass
class SamplingParams:
    """How to pick tokens. `greedy=True` ignores the sampling knobs and is deterministic."""

    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return dict(max_new_tokens=self.max_new_tokens, do_sample=False,
                        repetition_penalty=self.repetition_penalty, temperature=None, top_p=None, top_k=None)
        kwargs = asdict(self)
        del kwargs["greedy"]
        return dict(do_sample=True, **kwargs)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ChatModel:
    """A CrossVLM ready to answer conversations."""

    def __init__(self, model: CrossVLM, processor: CrossVLMProcessor):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer

    @classmethod
    def load(cls, model_dir: str | Path | None = None, *, llm: str | Path | None = None,
             vision: str | Path | None = None, device: str = "auto", dtype: torch.dtype | None = None,
             **projector_kwargs) -> "ChatModel":
        """Load a saved VLM directory, or build one from base models (projector untrained)."""
        dev = pick_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if model_dir is not None:
            model = CrossVLM.from_pretrained(str(model_dir), dtype=dtype)
            processor = CrossVLMProcessor.from_pretrained(model_dir)
        elif llm is not None and vision is not None:
            model = CrossVLM.from_base_models(llm, vision, dtype=dtype, **projector_kwargs)
            processor = CrossVLMProcessor.from_base_models(llm, vision, model.num_image_tokens)
        else:
            raise CrossVLMError("give a saved model directory, or both a base LLM and a vision tower")
        return cls(model.to(dev), processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, conversations: list[list[dict]], images: list[list[Image.Image]],
                enable_thinking: bool) -> dict[str, torch.Tensor]:
        texts, flat_images = [], []
        for i, (messages, imgs) in enumerate(zip(conversations, images)):
            marks = self.processor.count_image_marks(messages)
            if marks != len(imgs):
                raise CrossVLMError(
                    f"conversation {i} has {marks} {IMAGE_MARK} marks but {len(imgs)} images were given"
                )
            texts.append(self.processor.render(messages, enable_thinking=enable_thinking))
            flat_images += imgs
        batch = self.processor(texts, flat_images, padding_side="left")
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]] | None = None,
                 sampling: SamplingParams | None = None, enable_thinking: bool = False,
                 streamer=None) -> list[str]:
        """Answer many conversations in one batch; returns one answer per conversation."""
        sampling = sampling or SamplingParams()
        images = images if images is not None else [[] for _ in conversations]
        batch = self._inputs(conversations, images, enable_thinking)
        out = self.model.generate(
            batch["input_ids"], batch.get("pixel_values"), attention_mask=batch["attention_mask"],
            pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, **sampling.generate_kwargs(),
        )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def chat(self, messages: list[dict], images: list[Image.Image] | None = None,
             sampling: SamplingParams | None = None, enable_thinking: bool = False, streamer=None) -> str:
        """Answer one conversation."""
        return self.generate([messages], [images or []], sampling, enable_thinking, streamer)[0]


def load(model_dir: str | Path, device: str = "auto", dtype: torch.dtype | None = None) -> ChatModel:
    """Load a saved CrossVLM directory for chatting and batched generation."""
    return ChatModel.load(model_dir, device=device, dtype=dtype)
