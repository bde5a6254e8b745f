"""Pictures of a run: loss and learning-rate curves, and where the projector's queries look."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics: list[dict], out: Path, title: str = "") -> Path:
    """Training loss (and held-out loss, if any) and learning rate against the step."""
    plt = _pyplot()
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss")
    if evals:
        ax_loss.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="held-out loss")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.set_title(title)
    ax_lr.plot([m["step"] for m in train], [m["lr"] for m in train], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_query_attention(images, attention, out: Path, queries_to_show: int = 4) -> Path:
    """For a few images: the image, then the attention maps of a few queries over the patch grid.

    `images`: list of PIL images; `attention`: (N, M, P) tensor, rows summing to 1.
    """
    plt = _pyplot()
    n, m, p = attention.shape
    grid = math.isqrt(p)
    q_grid = math.isqrt(m)
    # Spread the shown queries over the query grid: corners and centre.
    picks = sorted({0, q_grid - 1, m - q_grid, m - 1, (q_grid // 2) * q_grid + q_grid // 2})[:queries_to_show]
    fig, axes = plt.subplots(n, 1 + len(picks), figsize=(2.2 * (1 + len(picks)), 2.2 * n), squeeze=False)
    for row in range(n):
        axes[row][0].imshow(images[row])
        axes[row][0].set_title("image", fontsize=8)
        for col, q in enumerate(picks, start=1):
            ax = axes[row][col]
            ax.imshow(images[row], alpha=0.5, extent=(0, grid, grid, 0))
            ax.imshow(attention[row, q].reshape(grid, grid).float().cpu().numpy(), cmap="magma", alpha=0.6,
                      extent=(0, grid, grid, 0))
            ax.set_title(f"query ({q // q_grid},{q % q_grid})", fontsize=8)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
