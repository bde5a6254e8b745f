"""Projectors from vision patch features into the LLM's embedding space.

`CrossAttentionProjector` is crossvlm's design: M learned queries, each with a fixed 2D position on
the same grid as the image patches, read the patches through L pre-LN cross-attention blocks. A
locality prior makes query (i, j) look at its own region, so "where is the X?" stays answerable
(plain resamplers lose it): a learned per-head distance bias ("gaussian", the default: some heads
local, some global) or a fixed mask that lets each query see only the patches of its own grid cell
("cell"). `MLPProjector` is the LLaVA / MiniMind-V baseline: one visual token per patch.

Both work on every image of a batch at once: input (N_images, P, D_vision), output (N_images, M, D_llm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from crossvlm.model.configuration import LOCALITIES, POSITIONS, PROJECTOR_INITS


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


def grid_cells(q_grid: int, k_grid: int) -> torch.Tensor:
    """Which query cell each patch's centre lies in: (k_grid**2,) indices into the q_grid**2 cells."""
    cell = ((torch.arange(k_grid, dtype=torch.float64) + 0.5) * q_grid / k_grid).long()  # (k_grid,)
    return (cell[:, None] * q_grid + cell[None, :]).reshape(-1)


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

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, kv_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if kv_norm else nn.Identity()
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    @torch.no_grad()
    def init_as_pool(self) -> None:
        """Start as a plain pooling step: attention weights uniform over what the locality allows
        (queries zero), values and output at unit gain (orthogonal), the MLP branch off (zero)."""
        d = self.o_proj.in_features
        nn.init.orthogonal_(self.kv_proj.weight[d:])
        nn.init.orthogonal_(self.o_proj.weight)
        for t in (self.q_proj.weight, self.q_proj.bias, self.kv_proj.bias, self.o_proj.bias,
                  self.mlp[-1].weight, self.mlp[-1].bias):
            nn.init.zeros_(t)

    def heads(self, x: torch.Tensor, kv: torch.Tensor, codes: tuple[torch.Tensor, torch.Tensor] | None):
        """Queries (N, H, M, hd), keys and values (N, H, P, hd) each.

        `codes` (queries' (M, D), patches' (P, D)) join only where attention scores are formed:
        added to the normalised queries and keys, not to the values (position "keys").
        """
        (n, m, d), p, h = x.shape, kv.shape[1], self.num_heads
        xq, kvn = self.norm_q(x), self.norm_kv(kv)
        if codes is None:
            q = self.q_proj(xq)
            k, v = self.kv_proj(kvn).split(d, dim=-1)
        else:
            q = self.q_proj(xq + codes[0])
            w, b = self.kv_proj.weight, self.kv_proj.bias
            k, v = F.linear(kvn + codes[1], w[:d], b[:d]), F.linear(kvn, w[d:], b[d:])
        return (q.view(n, m, h, d // h).transpose(1, 2), k.view(n, p, h, d // h).transpose(1, 2),
                v.view(n, p, h, d // h).transpose(1, 2))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None,
                codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        n, m, d = x.shape  # (N, M, D)
        attn = F.scaled_dot_product_attention(*self.heads(x, kv, codes), attn_mask=bias)  # (N, H, M, hd)
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
        locality: str = "gaussian",
        position: str = "residual",
        kv_norm: bool = True,
        init: str = "default",
        max_tiles: int = 1,
        tile_queries: int | None = None,
    ):
        super().__init__()
        dim = hidden_dim or vision_dim
        k_grid, q_grid = math.isqrt(num_patches), math.isqrt(num_queries)
        if k_grid**2 != num_patches or q_grid**2 != num_queries:
            raise ValueError(f"patches ({num_patches}) and queries ({num_queries}) must both be square numbers")
        if locality not in LOCALITIES:
            raise ValueError(f"locality {locality!r} is not one of {LOCALITIES}")
        if init not in PROJECTOR_INITS:
            raise ValueError(f"init {init!r} is not one of {PROJECTOR_INITS}")
        if position not in POSITIONS:
            raise ValueError(f"position {position!r} is not one of {POSITIONS}")
        if locality == "cell" and q_grid > k_grid:
            raise ValueError(f"cell locality needs at most one query per patch ({num_queries} > {num_patches})")
        t_grid = math.isqrt(tile_queries or num_queries)
        if t_grid**2 != (tile_queries or num_queries) or (locality == "cell" and t_grid > k_grid):
            raise ValueError(f"tile queries ({tile_queries}) must be a square number, at most one per patch with cell locality")
        self.num_queries = num_queries
        self.num_heads = num_heads
        self.kv_in = nn.Linear(vision_dim, dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        # Tiles (crossvlm.model.tiling): a tile's own, smaller query set when `tile_queries` differs
        # from M, and a learned 2D code of a view's place, row and column (0: the thumbnail; r + 1,
        # c + 1: the tile at row r, column c), added to every query of the view beside the in-tile
        # sin-cos position. Only with tiles, so single-view checkpoints keep their keys.
        self.max_tiles = max_tiles
        self.tile_queries = (nn.Parameter(torch.randn(t_grid**2, dim) * 0.02)
                             if max_tiles > 1 and tile_queries and tile_queries != num_queries else None)
        if max_tiles > 1:
            self.place_rows = nn.Parameter(torch.randn(max_tiles + 1, dim) * 0.02)
            self.place_cols = nn.Parameter(torch.randn(max_tiles + 1, dim) * 0.02)
        else:
            self.register_parameter("place_rows", None)
            self.register_parameter("place_cols", None)
        # Fixed codes, a function of the shapes only: not parameters, not saved. Queries and patches
        # share one coordinate system, so query (i, j) and the patches under it have similar codes.
        # Kept out of the module's buffers so that loading (which leaves unsaved buffers empty) and
        # device moves cannot touch them; `_fixed()` caches one copy per device.
        self._grids = (q_grid, k_grid, dim)
        self._tile_grid = t_grid
        self._fixed_cache: dict[tuple[torch.device, int], tuple[torch.Tensor, ...]] = {}
        self.locality_kind = locality
        self.position = position
        if locality == "gaussian":
            # Per-head strength of the distance penalty, log-spaced from "own cell" (4) to nearly
            # global (1/64): some heads look locally, some at the whole image. softplus keeps it >= 0.
            strengths = torch.logspace(2, -6, num_heads, base=2.0)
            self.locality = nn.Parameter(torch.log(torch.expm1(strengths)))
        else:
            self.register_parameter("locality", None)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads, kv_norm=kv_norm) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, llm_dim)
        if init == "pool":
            with torch.no_grad():
                nn.init.orthogonal_(self.kv_in.weight)
                nn.init.zeros_(self.kv_in.bias)
            for block in self.blocks:
                block.init_as_pool()

    @property
    def num_tokens(self) -> int:
        return self.num_queries

    def compile(self, *args, **kwargs) -> None:
        # Make the cached fixed tensors eagerly first: under CUDA graphs (mode="reduce-overhead") a
        # tensor made inside the compiled forward is a graph output, overwritten by the next replay.
        for device in {p.device for p in self.parameters()}:
            for q_grid in {self._grids[0], self._tile_grid}:
                self._fixed(device, q_grid)
        super().compile(*args, **kwargs)

    def _fixed(self, device: torch.device, q_grid: int | None = None) -> tuple[torch.Tensor, ...]:
        """(pos_q (M, D), pos_k (P, D), dist2 (M, P), outside_cell (1, M, P)) on `device`, float32, for
        a q_grid x q_grid query grid (default: the M queries'; tiles may have their own).

        `outside_cell` is the "cell" locality's additive mask: 0 where the patch's centre lies in the
        query's grid cell, -inf elsewhere (every cell holds at least one patch centre).
        """
        _, k_grid, dim = self._grids
        q_grid = q_grid or self._grids[0]
        if (device, q_grid) not in self._fixed_cache:
            own = grid_cells(q_grid, k_grid)[None, :] == torch.arange(q_grid**2)[:, None]  # (M, P)
            self._fixed_cache[device, q_grid] = tuple(t.to(device) for t in (
                sincos_2d(q_grid, dim, extent=k_grid),
                sincos_2d(k_grid, dim, extent=k_grid),
                grid_sq_distances(q_grid, k_grid),
                torch.zeros(own.shape).masked_fill(~own, float("-inf"))[None],
            ))
        return self._fixed_cache[device, q_grid]

    def attention_bias(self, dtype: torch.dtype, q_grid: int | None = None) -> torch.Tensor | None:
        """Additive attention bias, or None without locality.

        gaussian: (H, M, P), minus a learned per-head multiple of the squared distance; cell: (1, M, P),
        -inf outside the query's own cell.
        """
        if self.locality_kind == "none":
            return None
        if self.locality_kind == "cell":
            return self._fixed(self.queries.device, q_grid)[3].to(dtype)
        dist2 = self._fixed(self.locality.device, q_grid)[2]
        return (-F.softplus(self.locality)[:, None, None] * dist2[None]).to(dtype)

    def _start(self, features: torch.Tensor, places: torch.Tensor | None = None, tiles: bool = False):
        """Keys/values (N, P, D), the starting queries (N, M, D) and the position codes the blocks add.

        position "residual": the codes are added here, to the patch features and to the queries, so
        they travel in the values and in the queries' residual stream. "keys": they are left to the
        blocks, which add them where attention scores are formed (codes returned, cast to the dtype).
        `places` (N, 2) long, each view's (row, column) code (crossvlm.model.tiling), joins the queries'
        residual stream either way, so the visual tokens say which tile they came from. `tiles`: the
        views are tiles, read by the tiles' own queries (when `tile_queries` differs from M).
        """
        queries = self.tile_queries if tiles and self.tile_queries is not None else self.queries
        pos_q, pos_k = self._fixed(features.device, math.isqrt(queries.shape[0]))[:2]
        kv = self.kv_in(features)  # (N, P, D)
        if self.position == "residual":
            kv = kv + pos_k.to(features.dtype)
            x = (queries + pos_q.to(queries.dtype)).to(kv.dtype)  # (M, D)
            codes = None
        else:
            x = queries.to(kv.dtype)
            codes = (pos_q.to(kv.dtype), pos_k.to(kv.dtype))
        x = x.unsqueeze(0).expand(features.shape[0], -1, -1)  # (N, M, D)
        if places is not None:
            if self.place_rows is None:
                raise ValueError("this projector was built for single views (max_tiles 1): it has no tile places")
            place = self.place_rows[places[:, 0]] + self.place_cols[places[:, 1]]  # (N, D)
            x = x + place.to(kv.dtype)[:, None, :]
        return kv, x, codes

    def forward(self, features: torch.Tensor, places: torch.Tensor | None = None, tiles: bool = False) -> torch.Tensor:
        """Visual tokens (N, M, D_llm) of views' patch features (N, P, Dv); `places` and `tiles` as in `_start`."""
        kv, x, codes = self._start(features, places, tiles)  # features: (N, P, Dv)
        bias = self.attention_bias(kv.dtype, math.isqrt(x.shape[1]))
        for block in self.blocks:
            x = block(x, kv, bias, codes)
        return self.out(self.norm_out(x))  # (N, M, D_llm)

    def query_attention(self, features: torch.Tensor) -> torch.Tensor:
        """Attention of each query over the patches in the first block, averaged over heads.

        For pictures of where the queries look. Returns (N, M, P), rows summing to 1.
        """
        kv, x, codes = self._start(features)
        q, k, _ = self.blocks[0].heads(x, kv, codes)  # (N, H, M, hd), (N, H, P, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (N, H, M, P)
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
