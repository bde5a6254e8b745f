"""Samples into batches: dynamic right padding, or packing several samples into one row.

A batch is a dict:
- input_ids (B, T) long, right padded with the tokenizer's pad id;
- labels (B, T) long, IGNORE_INDEX on padding and on untrained tokens;
- attention_mask (B, T) long when padded; None when packed, with
- position_ids (B, T) long restarting at 0 at every sample (packed only). With `attention_mask=None`
  and such positions, transformers' masking utilities build a block-diagonal causal mask, so no
  token attends across samples (the forward must also run without a KV cache: `use_cache=False`);
- pixel_values (N, 3, H, W) float32: the batch's images in the order their spans appear in the
  row-major flattened input_ids (absent when the batch has no image);
- num_tokens: labelled tokens; num_samples: good samples; num_truncated; bad_records: list[BadRecord].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crossvlm.data.records import BadRecord
from crossvlm.data.render import IGNORE_INDEX


@dataclass
class Sample:
    """One rendered sample as returned by a DataLoader worker."""

    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W) float32
    location: str = ""
    truncated: bool = False

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
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        positions = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        images = []
        for r, row in enumerate(rows):
            t = 0
            for s in row:
                n = len(s)
                input_ids[r, t : t + n] = s.input_ids
                labels[r, t : t + n] = s.labels
                positions[r, t : t + n] = torch.arange(n)
                mask[r, t : t + n] = 1
                if s.pixel_values is not None and len(s.pixel_values):
                    images.append(s.pixel_values)
                t += n
            # Padding gets positions 0, 1, ... of its own, so it forms a separate "sample" when packed.
            positions[r, t:] = torch.arange(width - t)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "num_tokens": int((labels != IGNORE_INDEX).sum()),
            "num_samples": len(samples),
            "num_truncated": sum(s.truncated for s in samples),
            "bad_records": bad,
        }
        if self.packing:
            batch["attention_mask"] = None
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = mask
        if images:
            batch["pixel_values"] = torch.cat(images)  # (N, 3, H, W)
        return batch


def pack(samples: list[Sample], capacity: int) -> list[list[Sample]]:
    """First-fit packing in sample order: each sample goes to the first row with room for it."""
    rows: list[list[Sample]] = []
    room: list[int] = []
    for s in samples:
        for r, free in enumerate(room):
            if len(s) <= free:
                rows[r].append(s)
                room[r] -= len(s)
                break
        else:
            rows.append([s])
            room.append(capacity - len(s))
    return rows
