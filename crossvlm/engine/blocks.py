"""The KV cache's bookkeeping on the host: which blocks are free, who holds each, and which hold a
known prefix (docs/SERVING.md, "KV memory").

The cache is `blocks` blocks of `block_size` positions; a request holds a list of them (its block
table), one more each time its context crosses a block's end. Block 0 is never handed out: it is the
scratch block that idle rows of a decode step and the padding of a prefill write into.

Prefix caching: a block that a request has filled whole is registered under a hash of everything
that decided its keys and values: the hash of the block before it (so of the whole prefix), its
token ids, and the hashes of the images whose visual tokens it holds. Every image expands to the same
`<|image_pad|>` ids, so a hash of the ids alone would hand one image's keys to another. A new
request looks its full blocks' hashes up in order and takes the blocks found (their keys are not
computed again, nor their images encoded). A block whose last holder is gone stays registered, on
the free list, until it is handed out again: the free list is in the order blocks were freed, oldest
first, and a request gives its blocks back last block first, so the end of a conversation is
overwritten before its beginning.
"""

from __future__ import annotations

import hashlib

import numpy as np

SCRATCH = 0
"""The block idle rows and padding write into (never handed out)."""


def image_digest(pixels) -> bytes:
    """A hash of one image's pixel values (V, 3, H, W), its views as the processor made them."""
    array = pixels.detach().cpu().contiguous().numpy() if hasattr(pixels, "detach") else np.ascontiguousarray(pixels)
    h = hashlib.blake2b(str(array.shape).encode(), digest_size=16)
    h.update(array.tobytes())
    return h.digest()


def image_spans(ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of `<|image_pad|>` ids, in order: one per image."""
    pad = np.asarray(ids) == image_token_id
    edges = np.flatnonzero(np.diff(np.concatenate([[False], pad, [False]]).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def block_hashes(ids: list[int], spans: list[tuple[int, int]], images: list[bytes], block_size: int,
                 upto: int, after: list[bytes] | None = None) -> list[bytes]:
    """The chained hashes of the full blocks of `ids[:upto]`: block j's covers the hash of block j - 1,
    its ids and the digests of the images (`spans[i]` ↔ `images[i]`) whose tokens it holds. `after`:
    hashes already known for the first blocks (they are kept and the chain goes on from them)."""
    hashes = list(after or [])
    ids_array = np.asarray(ids, dtype=np.int64)
    for j in range(len(hashes), upto // block_size):
        start, end = j * block_size, (j + 1) * block_size
        h = hashlib.blake2b(hashes[-1] if hashes else b"", digest_size=16)
        h.update(ids_array[start:end].tobytes())
        for (s, e), digest in zip(spans, images):
            if s < end and e > start:
                h.update(digest)
        hashes.append(h.digest())
    return hashes


class BlockManager:
    def __init__(self, blocks: int, block_size: int):
        if blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is scratch), got {blocks}")
        self.blocks, self.block_size = blocks, block_size
        self.ref = [0] * blocks
        self.hash_of: list[bytes | None] = [None] * blocks
        self.cached: dict[bytes, int] = {}
        self.free: dict[int, None] = dict.fromkeys(range(1, blocks))  # an ordered set: least recently freed first

    @property
    def available(self) -> int:
        return len(self.free)

    def needed(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks registered under the leading `hashes` (stops at the first unknown one); not taken."""
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def take(self, block: int) -> None:
        """Hold a registered block (found by `lookup`)."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def allocate(self) -> int:
        """A free block (the least recently freed), now held once; it forgets what prefix it held."""
        block = next(iter(self.free))
        del self.free[block]
        if self.hash_of[block] is not None:
            del self.cached[self.hash_of[block]]
            self.hash_of[block] = None
        self.ref[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Give blocks back, the last first (see the module's docstring)."""
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None

    def register(self, blocks: list[int], hashes: list[bytes]) -> None:
        """Record that `blocks[j]` holds the prefix of hash `hashes[j]` (a hash already held elsewhere
        keeps its block)."""
        for block, h in zip(blocks, hashes):
            if self.hash_of[block] is None and h not in self.cached:
                self.cached[h] = block
                self.hash_of[block] = h

    def forget(self, blocks: list[int]) -> None:
        """Unregister blocks whose contents cannot be trusted (a failed request's)."""
        for block in blocks:
            if self.hash_of[block] is not None:
                del self.cached[self.hash_of[block]]
                self.hash_of[block] = None
