"""`CrossVLMProcessor`: the LLM's tokenizer and chat template plus the vision model's image processor.

Prompts are rendered with the tokenizer's own chat template (Qwen3 ChatML; thinking off by default),
then every `<image>` mark becomes `<|vision_start|><|image_pad|>×M<|vision_end|>`. With tiles
(`max_tiles` > 1 in the model's config, crossvlm.model.tiling) an image's span holds its thumbnail's
and its tiles' tokens, and its pixel values are all its views.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from crossvlm.errors import ModelLoadError
from crossvlm.model.tiling import Tiling
from crossvlm.model.tokens import IMAGE_MARK, IMAGE_PAD, VISION_END, VISION_START, VisionTokenIds, expand_image_marks


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert palette, grey and alpha images to RGB (alpha over white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA", "LA", "RGBA", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _pil_backend() -> bool:
    """Whether image processors must run on their PIL backend: this transformers has backends (5.x: a
    torchvision one, the default, and a PIL one) and torchvision is not installed."""
    import importlib.util

    from transformers.utils import is_torchvision_available

    return importlib.util.find_spec("transformers.image_processing_backends") is not None and not is_torchvision_available()


def image_processor_class(name: str):
    """The transformers image-processor class `name` (e.g. "CLIPImageProcessor") that works here.

    Without torchvision that is its PIL variant (`CLIPImageProcessorPil`): building the
    torchvision-backed class then falls back to it anyway, with a warning on every command. Both save
    the same `preprocessor_config.json`.
    """
    import transformers

    if _pil_backend() and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil")
    return getattr(transformers, name)


def load_image_processor(path: str | Path):
    """The image processor saved with a vision model (or a crossvlm model directory).

    The backend is chosen, not left to a fallback: PIL when torchvision is missing (transformers
    would otherwise warn about it), transformers' default when it is installed. A transformers
    release without backends that asks for torchvision anyway gets the PIL one explicitly.
    """
    from transformers import AutoImageProcessor

    if _pil_backend():
        return AutoImageProcessor.from_pretrained(str(path), backend="pil")
    try:
        return AutoImageProcessor.from_pretrained(str(path))
    except ImportError:
        return AutoImageProcessor.from_pretrained(str(path), use_fast=False)


class CrossVLMProcessor:
    """Turns conversations and images into model inputs.

    Args:
        tokenizer: the LLM's tokenizer (with its chat template).
        image_processor: the vision model's image processor.
        num_image_tokens: M, the visual tokens one image (or thumbnail) takes in the sequence.
        tiling: the model's tiling settings (`Tiling.from_config`); None: one view per image.
    """

    def __init__(self, tokenizer, image_processor, num_image_tokens: int, tiling: Tiling | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.tiling = tiling if tiling is not None and tiling.enabled else None
        self.vision_ids = VisionTokenIds.from_tokenizer(tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "CrossVLMProcessor":
        """Load from a saved CrossVLM directory (tokenizer, image processor and config.json)."""
        from transformers import AutoTokenizer

        from crossvlm.model.configuration import CrossVLMConfig

        config = CrossVLMConfig.from_pretrained(str(path))
        processor = cls.from_parts(path, path, config.num_image_tokens, Tiling.from_config(config))
        ids = processor.vision_ids
        wrong = [f"{key} {getattr(config, key)} is not the tokenizer's {token} ({want})"
                 for key, token, want in (("image_token_id", IMAGE_PAD, ids.pad),
                                          ("vision_start_token_id", VISION_START, ids.start),
                                          ("vision_end_token_id", VISION_END, ids.end))
                 if getattr(config, key) is not None and getattr(config, key) != want]
        if wrong:
            raise ModelLoadError(f"{Path(path) / 'config.json'}: " + "; ".join(wrong)
                                 + " (was the tokenizer replaced after the model was saved?)")
        return processor

    @classmethod
    def from_parts(cls, llm: str | Path, vision: str | Path, num_image_tokens: int,
                   tiling: Tiling | None = None) -> "CrossVLMProcessor":
        """The tokenizer saved in `llm` and the image processor saved in `vision`; a file that does not
        load is named in a ModelLoadError, not left to a library's traceback."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(llm))
        except (OSError, ValueError, ImportError, TypeError) as err:
            raise ModelLoadError(f"cannot load the tokenizer saved in {llm}: {type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:300]}") from err
        try:
            image_processor = load_image_processor(vision)
        except (OSError, ValueError, ImportError, TypeError) as err:
            raise ModelLoadError(f"cannot load the image processor saved in {vision} (preprocessor_config.json): "
                                 f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from err
        try:
            return cls(tokenizer, image_processor, num_image_tokens, tiling)
        except ValueError as err:  # the tokenizer lacks the vision tokens
            raise ModelLoadError(str(err)) from err

    @classmethod
    def from_base_models(cls, llm: str | Path, vision: str | Path, num_image_tokens: int,
                         tiling: Tiling | None = None) -> "CrossVLMProcessor":
        """The tokenizer of a base LLM and the image processor of a base vision tower."""
        return cls.from_parts(llm, vision, num_image_tokens, tiling)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))
        self.image_processor.save_pretrained(str(path))

    # -- text -------------------------------------------------------------------------------------
    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               enable_thinking: bool = False) -> str:
        """Render a conversation with the chat template and expand its `<image>` marks."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        if self.tiling is not None:
            raise ValueError("a tiled model's image spans depend on each image: render with "
                             "crossvlm.data.render.encode_prompt and `image_token_counts`")
        return expand_image_marks(text, self.num_image_tokens)

    @staticmethod
    def count_image_marks(messages: list[dict]) -> int:
        return sum(str(m.get("content", "")).count(IMAGE_MARK) for m in messages)

    # -- images -----------------------------------------------------------------------------------
    def image_grids(self, images: list[Image.Image]) -> list[tuple[int, int]] | None:
        """Each image's (rows, columns) of tiles, or None for a model without tiles."""
        return None if self.tiling is None else [self.tiling.grid(im) for im in images]

    def image_token_counts(self, grids: list[tuple[int, int]] | None) -> int | list[int]:
        """The visual tokens of each image with these grids (M for all without tiles)."""
        return self.num_image_tokens if grids is None else [self.tiling.tokens(g) for g in grids]

    def image_views(self, images: list[Image.Image], grids: list[tuple[int, int]] | None = None) -> list[Image.Image]:
        """The RGB images the image processor gets: each image, then (tiled) its tiles."""
        images = [to_rgb(im) for im in images]
        if grids is None:
            return images
        return [view for im, grid in zip(images, grids, strict=True) for view in self.tiling.views(im, grid)]

    def preprocess_images(self, images: list[Image.Image], grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Images to the vision tower's input: (N, 3, H, W) float32; tiled (`grids` from `image_grids`),
        every image's views, (V, 3, H, W)."""
        out = self.image_processor(images=self.image_views(images, grids), return_tensors="pt")
        return out["pixel_values"].float()

    def __call__(self, texts: list[str], images: list[Image.Image] | None = None,
                 padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Tokenize rendered prompts (left-padded for generation) and preprocess their images.

        `images` lists the images of all prompts in order of appearance. Tiled, the texts' spans must
        hold `image_token_counts` tokens; `image_grids` (N, 2) joins the batch.
        """
        self.tokenizer.padding_side = padding_side
        batch = dict(self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        if images:
            grids = self.image_grids(images)
            batch["pixel_values"] = self.preprocess_images(images, grids)
            if grids is not None:
                batch["image_grids"] = torch.tensor(grids, dtype=torch.long)
        return batch
