"""Samples into batches: dynamic right padding, or packing several samples into rows of one length.

A batch is a dict:
- input_ids (B, T) long, right padded with the tokenizer's pad id;
- labels (B, T) long, IGNORE_INDEX on padding and on untrained tokens;
- attention_mask (B, T) long when padded; None when packed, with
- position_ids (B, T) long restarting at 0 at every sample, and document_ids (B, T) long: the index
  of each token's sample within its row, the row's padding tail being one more (packed only). Packed
  rows are always `max_length` wide, so a compiled model sees one row length whatever the samples'.
  The model keeps every token to its own sample (crossvlm.model.packing); with `document_ids`
  dropped, transformers' masking utilities still derive a block-diagonal causal mask from the
  restarting positions (the forward must then run without a KV cache: `use_cache=False`);
- pixel_values (N, 3, H, W): the batch's images in the order their spans appear in the row-major
  flattened input_ids (absent when the batch has no image), as the image processor's uint8 crops
  (`ImageTransform.normalize` makes them its float32 pixels, on the GPU in training) or, for a
  processor that cannot hand them over so, its float32 pixels; for a tiled model every image's views
  (its thumbnail, then its tiles: crossvlm.model.tiling), with
- image_grids (N_images, 2) long: each image's (rows, columns) of tiles (tiled models only). A span's
  tokens, and so the row lengths packing fills, already count its tiles';
- lengths: every sample's token count (the FLOP count of the step reads them);
- num_tokens: labelled tokens; num_samples: good samples; num_truncated; bad_records: list[BadRecord].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crossvlm.data.records import BadRecord
from crossvlm.data.render import IGNORE_INDEX


@dataclass
class Sample:
    """One rendered sample as returned by a DataLoader worker."""

    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W) uint8 crops (see ImageTransform)
    location: str = ""
    truncated: bool = False
    image_grids: torch.Tensor | None = None  # (n_images, 2) long: tiled images' grids (their views are in pixel_values)

    def __len__(self) -> int:
        return self.input_ids.numel()


class Collator:
    """Callable given to the DataLoader; picklable, so it runs in the workers."""

    def __init__(self, pad_token_id: int, packing: bool = False, max_length: int | None = None):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
        if packing and not max_length:
            raise ValueError("packing needs max_length")
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.max_length = max_length

    def __call__(self, items: list) -> dict:
        samples = [s for s in items if isinstance(s, Sample)]
        bad = [s for s in items if isinstance(s, BadRecord)]
        rows = pack(samples, self.max_length) if self.packing else [[s] for s in samples]
        width = max((sum(len(s) for s in row) for row in rows), default=0)
        if self.packing and rows:
            width = self.max_length
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        positions = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        documents = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        images, grids = [], []
        for r, row in enumerate(rows):
            t = 0
            for d, s in enumerate(row):
                n = len(s)
                input_ids[r, t : t + n] = s.input_ids
                labels[r, t : t + n] = s.labels
                positions[r, t : t + n] = torch.arange(n)
                mask[r, t : t + n] = 1
                documents[r, t : t + n] = d
                if s.pixel_values is not None and len(s.pixel_values):
                    images.append(s.pixel_values)
                if s.image_grids is not None and len(s.image_grids):
                    grids.append(s.image_grids)
                t += n
            # Padding gets positions 0, 1, ... of its own, so it forms a separate "sample" when packed.
            positions[r, t:] = torch.arange(width - t)
            documents[r, t:] = len(row)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "lengths": [len(s) for s in samples],
            "num_tokens": int((labels != IGNORE_INDEX).sum()),
            "num_samples": len(samples),
            "num_truncated": sum(s.truncated for s in samples),
            "bad_records": bad,
        }
        if self.packing:
            batch["attention_mask"] = None
            batch["position_ids"] = positions
            batch["document_ids"] = documents
        else:
            batch["attention_mask"] = mask
        if images:
            batch["pixel_values"] = torch.cat(images)  # (N, 3, H, W)
        if grids:
            batch["image_grids"] = torch.cat(grids)  # (N_images, 2)
        return batch


def pack(samples: list[Sample], capacity: int) -> list[list[Sample]]:
    """Rows of at most `capacity` tokens, as few as the batch allows: each row starts with the longest
    sample left and is filled with the subset of the others whose lengths come closest to its room
    (an exact subset sum, `_fill`).

    First-fit decreasing, the usual packer, left 7.1% of the slots of rows of 512 empty on captions of
    100–270 tokens (three to four a row: once two long ones are in, no short one fits the gap), where
    the lower bound is 0.7%; filling each row by subset sum leaves 1.1% (docs/PERFORMANCE.md, run 7).
    Equal lengths keep their sample order.
    """
    left = sorted(samples, key=len, reverse=True)
    rows = []
    while left:
        first, rest = left[0], left[1:]
        chosen = set(_fill([len(s) for s in rest], max(0, capacity - len(first))))
        rows.append([first, *(s for j, s in enumerate(rest) if j in chosen)])
        left = [s for j, s in enumerate(rest) if j not in chosen]
    return rows


def _fill(lengths: list[int], room: int) -> list[int]:
    """Indices of the lengths whose sum comes closest to `room` without passing it (0/1 subset sum over
    the reachable sums, a numpy bitset: one vector operation per length; stops once `room` is reached)."""
    reach = np.zeros(room + 1, dtype=bool)
    reach[0] = True
    parent = np.zeros(room + 1, dtype=np.int64)  # the length that first reached each sum
    for j, n in enumerate(lengths):
        if not 0 < n <= room:
            continue
        new = np.flatnonzero(reach[:room + 1 - n] & ~reach[n:]) + n  # sums reached only with this one
        parent[new] = j
        reach[new] = True
        if reach[room]:
            break
    total, chosen = int(np.flatnonzero(reach)[-1]), []
    while total:  # back through the lengths that reached it: each earlier in the list than the last
        chosen.append(int(parent[total]))
        total -= lengths[chosen[-1]]
    return chosen
