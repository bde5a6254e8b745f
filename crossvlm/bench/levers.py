"""The speed levers `crossvlm bench train` measures one at a time, on top of crossvlm's training step.

A "+" lever is something crossvlm's loop does not do by default (or not at all) and the bench adds;
a "-" lever takes away something the loop does, to show what it is worth (`eager-ce` undoes the
compiled loss of `run.compile`). The loss levers full-logits and chunked-ce replace
`CrossVLM.loss_from_hidden` on the benchmarked instance only (the model class and the LLM's modules
are untouched); both compute the same loss as the stock method (tests/test_bench.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crossvlm.bench.catalog import LEVERS  # noqa: F401  (re-exported: the levers and what they do)
from crossvlm.model.modeling import IGNORE_INDEX, labelled, labelled_ce_sum

CE_CHUNK_ROWS = 1024


def _denominator(labelled_count, num_items_in_batch) -> torch.Tensor | int | float:
    return num_items_in_batch if num_items_in_batch is not None else max(labelled_count, 1)


def full_logits_loss(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                     label_positions=None) -> torch.Tensor:
    """Same loss as `CrossVLM.loss_from_hidden`, computing logits everywhere like `labels=` in HF (so
    the labelled positions are not looked up)."""
    targets = labels[:, 1:]  # (B, T-1)
    logits = self.llm.lm_head(hidden[:, :-1])  # (B, T-1, V): the tensor the design avoids
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum / _denominator(int((targets != IGNORE_INDEX).sum()), num_items_in_batch)


def chunked_ce_loss(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                    label_positions=None) -> torch.Tensor:
    """Same loss as `CrossVLM.loss_from_hidden`; at most CE_CHUNK_ROWS rows of logits live at once."""
    h, t = labelled(hidden, labels, label_positions)  # (n, D), (n,)
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], CE_CHUNK_ROWS):
        loss_sum = loss_sum + checkpoint(labelled_ce_sum, self.llm.lm_head, h[i:i + CE_CHUNK_ROWS],
                                         t[i:i + CE_CHUNK_ROWS], use_reentrant=False)
    return loss_sum / _denominator(len(t), num_items_in_batch)


LOSS_LEVERS = {"full-logits": full_logits_loss, "chunked-ce": chunked_ce_loss}


def apply_model_levers(model, levers: tuple[str, ...]) -> None:
    """Apply the levers that act on a built CrossVLM (after the loop's own setup)."""
    for name in levers:
        if name in LOSS_LEVERS:
            model.loss_from_hidden = types.MethodType(LOSS_LEVERS[name], model)
        elif name == "eager-ce":
            model.compile_loss(False)  # undo run.compile's
        elif name == "no-bf16-frozen":
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.float()
