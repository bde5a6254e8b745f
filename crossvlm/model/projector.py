"""Projectors from vision patch features into the LLM's embedding space.

`CrossAttentionProjector` is crossvlm's design: M learned queries, each with a fixed 2D position on
the same grid as the image patches, read the patches through L pre-LN cross-attention blocks. A
learned per-head distance bias makes query (i, j) start out looking at its own region, so "where is
the X?" stays answerable (plain resamplers lose it). `MLPProjector` is the LLaVA / MiniMind-V
baseline: one visual token per patch.

Both work on every image of a batch at once: input (N_images, P, D_vision), output (N_images, M, D_llm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(grid: int, dim: int, extent: float) -> torch.Tensor:
    """Fixed 2D sine-cosine codes for the centres of a `grid` x `grid` lattice spanning `extent`.

    Coordinates are in patch units of the image, so a coarse query grid and the fine patch grid
    share one coordinate system: a query and the patches under it get similar codes.
    Returns (grid * grid, dim), rows in row-major (y, x) order.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position width {dim} must be divisible by 4")
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * (extent / grid)  # (g,)
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # (g, g) each
    freqs = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4)))  # (dim/4,)
    parts = []
    for coord in (y.reshape(-1), x.reshape(-1)):
        angles = coord[:, None] * freqs[None, :]  # (g*g, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # (g*g, dim)


def grid_sq_distances(q_grid: int, k_grid: int) -> torch.Tensor:
    """Squared distances between query-cell centres and patch centres, in query-cell units.

    Returns (q_grid**2, k_grid**2). Measuring in query cells makes the locality bias mean the same
    thing whatever the image resolution.
    """
    cell = k_grid / q_grid  # patches per query cell
    q = (torch.arange(q_grid, dtype=torch.float64) + 0.5) * cell
    k = torch.arange(k_grid, dtype=torch.float64) + 0.5
    qy, qx = (t.reshape(-1) for t in torch.meshgrid(q, q, indexing="ij"))  # (M,)
    ky, kx = (t.reshape(-1) for t in torch.meshgrid(k, k, indexing="ij"))  # (P,)
    d2 = (qy[:, None] - ky[None, :]) ** 2 + (qx[:, None] - kx[None, :]) ** 2  # (M, P)
    return (d2 / cell**2).float()


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention (queries over patches) then an MLP, both residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, m, d = x.shape  # (N, M, D)
        p = kv.shape[1]
        h = self.num_heads
        q = self.q_proj(self.norm_q(x)).view(n, m, h, d // h).transpose(1, 2)  # (N, H, M, hd)
        k, v = self.kv_proj(self.norm_kv(kv)).view(n, p, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (N, H, P, hd) each
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (N, H, M, hd)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(n, m, d))
        return x + self.mlp(self.norm_mlp(x))


class CrossAttentionProjector(nn.Module):
    """M positioned queries attend over all patch features of each image."""

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        num_patches: int,
        num_queries: int = 64,
        num_layers: int = 2,
        num_heads: int = 12,
        hidden_dim: int | None = None,
        locality: bool = True,
    ):
        super().__init__()
        dim = hidden_dim or vision_dim
        k_grid, q_grid = math.isqrt(num_patches), math.isqrt(num_queries)
        if k_grid**2 != num_patches or q_grid**2 != num_queries:
            raise ValueError(f"patches ({num_patches}) and queries ({num_queries}) must both be square numbers")
        self.num_queries = num_queries
        self.num_heads = num_heads
        self.kv_in = nn.Linear(vision_dim, dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        # Fixed codes, a function of the shapes only: not parameters, not saved. Queries and patches
        # share one coordinate system, so query (i, j) and the patches under it have similar codes.
        # Kept out of the module's buffers so that loading (which leaves unsaved buffers empty) and
        # device moves cannot touch them; `_fixed()` caches one copy per device.
        self._grids = (q_grid, k_grid, dim)
        self._fixed_cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        if locality:
            # Per-head strength of the distance penalty, log-spaced from "own cell" (4) to nearly
            # global (1/64): some heads look locally, some at the whole image. softplus keeps it >= 0.
            strengths = torch.logspace(2, -6, num_heads, base=2.0)
            self.locality = nn.Parameter(torch.log(torch.expm1(strengths)))
        else:
            self.register_parameter("locality", None)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, llm_dim)

    @property
    def num_tokens(self) -> int:
        return self.num_queries

    def compile(self, *args, **kwargs) -> None:
        # Make the cached fixed tensors eagerly first: under CUDA graphs (mode="reduce-overhead") a
        # tensor made inside the compiled forward is a graph output, overwritten by the next replay.
        for device in {p.device for p in self.parameters()}:
            self._fixed(device)
        super().compile(*args, **kwargs)

    def _fixed(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pos_q (M, D), pos_k (P, D), dist2 (M, P)) on `device`, float32."""
        if device not in self._fixed_cache:
            q_grid, k_grid, dim = self._grids
            self._fixed_cache[device] = tuple(t.to(device) for t in (
                sincos_2d(q_grid, dim, extent=k_grid),
                sincos_2d(k_grid, dim, extent=k_grid),
                grid_sq_distances(q_grid, k_grid),
            ))
        return self._fixed_cache[device]

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive attention bias (H, M, P): minus a learned per-head multiple of squared distance."""
        if self.locality is None:
            return None
        dist2 = self._fixed(self.locality.device)[2]
        return (-F.softplus(self.locality)[:, None, None] * dist2[None]).to(dtype)

    def _start(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positioned keys/values (N, P, D) and the starting queries (N, M, D)."""
        pos_q, pos_k, _ = self._fixed(features.device)
        kv = self.kv_in(features) + pos_k.to(features.dtype)  # (N, P, D)
        x = (self.queries + pos_q.to(self.queries.dtype)).to(kv.dtype)  # (M, D)
        return kv, x.unsqueeze(0).expand(features.shape[0], -1, -1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kv, x = self._start(features)  # features: (N, P, Dv)
        bias = self.attention_bias(kv.dtype)
        for block in self.blocks:
            x = block(x, kv, bias)
        return self.out(self.norm_out(x))  # (N, M, D_llm)

    def query_attention(self, features: torch.Tensor) -> torch.Tensor:
        """Attention of each query over the patches in the first block, averaged over heads.

        For pictures of where the queries look. Returns (N, M, P), rows summing to 1.
        """
        block = self.blocks[0]
        kv, x = self._start(features)
        (n, p, d), h = kv.shape, self.num_heads
        q = block.q_proj(block.norm_q(x)).view(n, -1, h, d // h).transpose(1, 2)  # (N, H, M, hd)
        k = block.kv_proj(block.norm_kv(kv))[..., :d].view(n, p, h, d // h).transpose(1, 2)  # (N, H, P, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (N, H, M, P)
        bias = self.attention_bias(scores.dtype)
        if bias is not None:
            scores = scores + bias
        return scores.softmax(-1).mean(1)

    @torch.no_grad()
    def match_output_scale(self, target_std: float) -> None:
        """Initialise the output layer so visual tokens have the LLM's token-embedding scale.

        LayerNorm output has unit variance per element, so weights of std target/sqrt(D) give
        outputs of std ~ target.
        """
        nn.init.normal_(self.out.weight, std=target_std / math.sqrt(self.out.in_features))
        nn.init.zeros_(self.out.bias)


class MLPProjector(nn.Module):
    """Baseline: Linear-GELU-Linear on every patch, one visual token per patch."""

    def __init__(self, vision_dim: int, llm_dim: int, num_patches: int):
        super().__init__()
        self.num_patches = num_patches
        self.fc1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    @property
    def num_tokens(self) -> int:
        return self.num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))  # (N, P, D_llm)

    @torch.no_grad()
    def match_output_scale(self, target_std: float) -> None:
        """Scale fc2's initial weights for outputs of about the LLM's token-embedding std.

        GELU of a roughly unit-variance input has std ~0.6, hence the correction.
        """
        nn.init.normal_(self.fc2.weight, std=target_std / (0.6 * math.sqrt(self.fc2.in_features)))
        nn.init.zeros_(self.fc2.bias)
