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
    """The vision model's own image processor, split in two.

    In the loader's workers (`__call__`) it resizes and crops: (N, 3, H, W) uint8, a quarter of the
    float32 pixels' bytes to pass between processes, pin and copy to the GPU (in pretraining, 256
    images a step are 154 MB of float32). Where the pixels are used (`normalize`, on the GPU in
    training) a lookup table gives every (channel, value) the float the processor itself computes for
    it (rescale and normalize act on each value alone), so the result equals the processor's output
    exactly, whatever its backend's arithmetic. A processor whose crop is not whole uint8 values
    (checked once, at construction) keeps the float32 path: `__call__` then normalizes itself.
    """

    def __init__(self, image_processor):
        import numpy as np
        import torch
        from PIL import Image

        self.processor = image_processor
        side = target_side(image_processor)
        # JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least the
        # target side; the processor's own resampling then does the last reduction. A 640×480 photo
        # for a 224-px tower decodes at 320×240: ~1.6× faster to decode and process.
        self.draft_size = side
        ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3): value v at column v
        keep = {k: False for k in ("do_resize", "do_center_crop") if hasattr(image_processor, k)}
        self.lut = self._floats(Image.fromarray(ramp), **keep)[0, :, 0, :]  # (3, 256)
        probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8))
        crop = self._floats(probe, do_rescale=False, do_normalize=False)
        self.uint8 = (torch.equal(crop, crop.round().clamp(0, 255))
                      and torch.equal(self.normalize(crop.to(torch.uint8)), self._floats(probe)))

    def _floats(self, image, **options):
        import torch

        out = self.processor(images=[image], return_tensors="pt", **options)["pixel_values"]
        return torch.as_tensor(out, dtype=torch.float32)

    def __call__(self, images: list):
        """(N, 3, H, W): uint8 crops for `normalize`, or, for a processor that cannot, float32 pixels."""
        import torch

        if not self.uint8:
            return torch.as_tensor(self.processor(images=images, return_tensors="pt")["pixel_values"],
                                   dtype=torch.float32)
        out = torch.as_tensor(self.processor(images=images, do_rescale=False, do_normalize=False,
                                             return_tensors="pt")["pixel_values"])
        return out if out.dtype == torch.uint8 else out.round().to(torch.uint8)  # whole values (checked)

    def normalize(self, pixels):
        """The processor's float32 pixels of `__call__`'s output, on the device `pixels` are on."""
        import torch

        if pixels.dtype != torch.uint8:
            return pixels
        if self.lut.device != pixels.device:
            self.lut = self.lut.to(pixels.device)
        channels = torch.arange(3, device=pixels.device)[None, :, None, None]
        return self.lut[channels, pixels.long()]


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
