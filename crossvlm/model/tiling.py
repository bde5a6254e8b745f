"""High-resolution images as tiles: which grid an image gets, its views, and the tokens they take.

With `max_tiles` N > 1 an image is cut into a grid of tower-sized tiles (at most N), the grid whose
shape fits the image best (LLaVA-NeXT's any-res rule: the most of the image's own pixels kept, then
the least area wasted), plus a global thumbnail: the single view a model with N = 1 sees. An image
no larger than one tile keeps its single view (a 1 x 1 grid: no tiles).

An image's views are its thumbnail first, then its tiles row by row; its visual tokens follow the same
order: M (`num_queries`) for the thumbnail, then `tile_queries` per tile, all in one
`<|vision_start|> ... <|vision_end|>` span. The projector's queries of a view carry its place: (0, 0)
for the thumbnail, (row + 1, column + 1) for a tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, columns) grid of at most `max_tiles` tiles, smallest first."""
    return sorted(((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)),
                  key=lambda g: (g[0] * g[1], g))


def select_grid(width: int, height: int, max_tiles: int, side: int) -> tuple[int, int]:
    """The (rows, columns) grid for an image of `width` x `height` pixels and tiles of `side` pixels.

    Each grid is scored by the image pixels it keeps when the image is scaled, aspect kept, to fit
    inside it (never above the image's own resolution), then by the area it wastes: the best-fitting
    shape wins, and no more tiles are taken than the image has pixels for.
    """
    best, best_key = (1, 1), None
    for rows, cols in candidate_grids(max_tiles):
        scale = min(cols * side / width, rows * side / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(rows * cols * side * side - kept))
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


def tile_count(grid: tuple[int, int]) -> int:
    """The tiles of an image with this grid: rows · columns, and none for a 1 x 1 grid (its thumbnail
    is its one view)."""
    tiles = grid[0] * grid[1]
    return tiles if tiles > 1 else 0


def tile_images(image, grid: tuple[int, int], side: int) -> list:
    """The tiles of a PIL image, row by row: the image resized to the grid (rows·side x cols·side,
    bicubic) and cut into side x side crops. A 1 x 1 grid has none (the thumbnail is the view)."""
    from PIL import Image

    rows, cols = grid
    if not tile_count(grid):
        return []
    size = (cols * side, rows * side)
    big = image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
    return [big.crop((c * side, r * side, (c + 1) * side, (r + 1) * side)) for r in range(rows) for c in range(cols)]


@dataclass(frozen=True)
class Tiling:
    """An image's views and visual tokens under a model's tiling settings.

    Args:
        max_tiles: N, the most tiles an image is cut into (1: one view, no tiles).
        image_tokens: M, the visual tokens of a single view or thumbnail.
        tile_tokens: the visual tokens of one tile.
        side: the tower's input side in pixels (a tile's size).
    """

    max_tiles: int
    image_tokens: int
    tile_tokens: int
    side: int

    @classmethod
    def from_config(cls, config) -> "Tiling":
        return cls(config.max_tiles, config.num_image_tokens, config.tile_tokens, config.vision_config.image_size)

    @property
    def enabled(self) -> bool:
        return self.max_tiles > 1

    def grid(self, image) -> tuple[int, int]:
        return select_grid(*image.size, self.max_tiles, self.side) if self.enabled else (1, 1)

    def tokens(self, grid: tuple[int, int]) -> int:
        """Visual tokens of an image with this grid: the thumbnail's plus every tile's."""
        return self.image_tokens + tile_count(grid) * self.tile_tokens

    def views(self, image, grid: tuple[int, int]) -> list:
        """The PIL images the image processor turns into the image's views: the image (the thumbnail),
        then its tiles."""
        return [image, *tile_images(image, grid, self.side)]


@dataclass
class TileLayout:
    """Where every view of a batch's images goes (made on the host from the images' grids).

    places: (V, 2) long, each view's (row, column) code: (0, 0) for a thumbnail, (r + 1, c + 1) for a tile;
    is_tile: (V,) bool;
    order: (total tokens,) long: position, in [thumbnail tokens..., tile tokens...], of each visual token
        in the images' own order (image by image: thumbnail, then its tiles);
    tokens: visual tokens of each image.
    """

    places: np.ndarray
    is_tile: np.ndarray
    order: np.ndarray
    tokens: list[int]


def tile_layout(grids, image_tokens: int, tile_tokens: int) -> TileLayout:
    """The layout of the views of images with `grids` ((N, 2) rows, columns; a tensor, array or list)."""
    if hasattr(grids, "cpu"):  # a tensor; on a device only if a caller moved it there (a sync: keep it on the host)
        grids = grids.cpu()
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 2)
    places, is_tile, tokens = [], [], []
    thumbs_total = len(grids) * image_tokens
    order, thumb_at, tile_at = [], 0, thumbs_total
    for rows, cols in grids.tolist():
        places.append((0, 0))
        is_tile.append(False)
        order.append(np.arange(thumb_at, thumb_at + image_tokens))
        thumb_at += image_tokens
        n = tile_count((rows, cols))
        for k in range(n):
            places.append((k // cols + 1, k % cols + 1))
            is_tile.append(True)
        order.append(np.arange(tile_at, tile_at + n * tile_tokens))
        tile_at += n * tile_tokens
        tokens.append(image_tokens + n * tile_tokens)
    return TileLayout(np.asarray(places, dtype=np.int64).reshape(-1, 2), np.asarray(is_tile, dtype=bool),
                      np.concatenate(order) if order else np.zeros(0, dtype=np.int64), tokens)
