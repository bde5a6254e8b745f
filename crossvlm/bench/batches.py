"""Fixed-length training samples for the benchmarks, decoded from real JPEG bytes in DataLoader workers.

Every sample is `<|vision_start|> <|image_pad|>×M <|vision_end|>` followed by random text ids, so all
variants see the same text length and no padding; the labels cover the last `labelled` positions.
Its image is camera-sized JPEG bytes decoded and processed by the vision model's own image
processor, with the same functions the real loader uses (`load_image`, `ImageTransform`), and the
samples become batches through the real loader's `Collator` (crossvlm.data.collate): the step gets
the batch format `crossvlm train` gives it, and the time it waits in `next()` is a real loader's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crossvlm.data.collate import Collator, Sample
from crossvlm.data.images import ImageTransform, load_image
from crossvlm.model.modeling import IGNORE_INDEX
from crossvlm.model.tokens import VisionTokenIds

MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class SampleShape:
    """Text tokens per sample (vision start/end included, image pads not) and how many are labelled."""

    text_tokens: int
    labelled: int


def jpeg_pool(folder: Path, size: tuple[int, int] = (640, 480), count: int = 64, seed: int = 0) -> list[bytes]:
    """`count` encoded camera-like JPEGs (smooth colour fields with noise, ~60 KB at 640×480)."""
    import pyarrow.parquet as pq

    from crossvlm.data.bench import write_photo_parquet

    path = write_photo_parquet(Path(folder) / "bench_photos.parquet", rows=count, size=size, seed=seed)
    return [bytes(b) for b in pq.read_table(path, columns=["image_bytes"]).column("image_bytes").to_pylist()]


class FixedLengthSamples(torch.utils.data.Dataset):
    """`length` samples of one shape; sample i is the same in every run (seeded by i)."""

    def __init__(self, jpegs: list[bytes], image_processor, vision_ids: VisionTokenIds, num_image_tokens: int,
                 shape: SampleShape, text_vocab: int, length: int, seed: int = 0, float_pixels: bool = False,
                 tiling=None):
        if shape.text_tokens < 3 or not 0 < shape.labelled <= shape.text_tokens - 2:
            raise ValueError(f"{shape} leaves no room for the vision start/end tokens and the labels")
        self.jpegs, self.vision_ids, self.num_image_tokens = jpegs, vision_ids, num_image_tokens
        self.transform = ImageTransform(image_processor)
        self.shape, self.text_vocab, self.length, self.seed = shape, text_vocab, length, seed
        self.float_pixels = float_pixels  # the processor's float32 pixels (the naive baseline's), not uint8 crops
        self.tiling = tiling  # a tiled model's: the image's views and their tokens (crossvlm.model.tiling)
        if tiling is not None:
            self.transform.draft_size = tiling.side * tiling.max_tiles  # as the real loader: tiles keep their pixels

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Sample:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = self.vision_ids
        text = torch.randint(0, self.text_vocab, (self.shape.text_tokens - 2,), generator=g)
        input_ids = torch.cat([torch.tensor([ids.start]), torch.full((self.num_image_tokens,), ids.pad),
                               torch.tensor([ids.end]), text])  # (M + text_tokens,)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-self.shape.labelled:] = input_ids[-self.shape.labelled:]
        image = load_image(self.jpegs[i % len(self.jpegs)], MAX_IMAGE_PIXELS, self.transform.draft_size)
        if self.tiling is not None:
            grid = self.tiling.grid(image)
            if self.tiling.tokens(grid) != self.num_image_tokens:
                raise ValueError(f"image {i} takes {self.tiling.tokens(grid)} tokens, not {self.num_image_tokens}")
            pixels = self.transform(self.tiling.views(image, grid))  # (V, 3, H, W)
            return Sample(input_ids, labels, pixels, location=f"fixed-length sample {i}",
                          image_grids=torch.tensor([grid]))
        pixels = self.transform([image])
        if self.float_pixels:
            pixels = self.transform.normalize(pixels)
        return Sample(input_ids, labels, pixels, location=f"fixed-length sample {i}")  # pixels (1, 3, H, W)


def batch_loader(dataset: FixedLengthSamples, batch_size: int, num_workers: int, pad_token_id: int,
                 prefetch_factor: int = 2):
    """A DataLoader as the training loop builds one (the loader's Collator, right padding: none is
    needed, every sample has one length; pinned memory on CUDA, no persistent workers)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=True, collate_fn=Collator(pad_token_id),
        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=False,
    )
