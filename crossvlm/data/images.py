"""Decoding images safely and turning them into the vision model's pixel tensors.

Runs in DataLoader workers. Every failure becomes a `RecordError` of a known kind, so a broken image
is a counted bad record, never a crash.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from crossvlm.data.records import RecordError


def load_image(source: bytes | Path, max_pixels: int, draft_size: int | None = None):
    """Decode encoded bytes or a file into an RGB `PIL.Image`, upright per its EXIF orientation.

    `max_pixels` is checked from the header, before any pixel is decoded. `draft_size` lets JPEG decode
    at a reduced scale (1/2, 1/4, 1/8) that still leaves both sides at least that large, which makes a
    12-megapixel photo several times cheaper to decode and resize.
    """
    from PIL import Image, UnidentifiedImageError

    from crossvlm.model.processor import to_rgb

    if isinstance(source, Path):
        if not source.is_file():
            raise RecordError("missing_image", str(source))
        opener = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        opener = io.BytesIO(source)
    else:
        raise RecordError("bad_image", f"image is {type(source).__name__}, not bytes or a path")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's warning; PIL's hard limit still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(opener)
            width, height = img.size
            if width * height > max_pixels:
                raise RecordError("image_too_large", f"{width}x{height} > max_image_pixels={max_pixels}")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return to_rgb(img)  # EXIF orientation; palette, grey and alpha (over white) to RGB
    except RecordError:
        raise
    except Image.DecompressionBombError as err:
        raise RecordError("image_too_large", str(err)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise RecordError("bad_image", f"{type(err).__name__}: {err}") from None


class ImageTransform:
    """The vision model's own image processor, giving float32 (N, 3, H, W) tensors."""

    def __init__(self, image_processor):
        self.processor = image_processor
        side = target_side(image_processor)
        # JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least the
        # target side; the processor's own resampling then does the last reduction. A 640×480 photo
        # for a 224-px tower decodes at 320×240: ~1.6× faster to decode and process.
        self.draft_size = side

    def __call__(self, images: list):
        import torch

        out = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out, dtype=torch.float32)  # (N, 3, H, W)


def target_side(processor) -> int | None:
    """The side the processor resizes to, read from its `size` / `crop_size` (None if unknown)."""
    for attr in ("size", "crop_size"):
        size = getattr(processor, attr, None)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or max(size.get("height", 0), size.get("width", 0)) or None
        elif hasattr(size, "shortest_edge"):  # SizeDict in newer transformers
            size = size.shortest_edge or max(size.height or 0, size.width or 0) or None
        if isinstance(size, int) and size > 0:
            return size
    return None
