"""Block masks at run time: which (query block, key block) tiles keep something, and which keep all.

The plan's block mask (passes/block_mask.py) names the keep conjuncts; the generated file renders
`block_mask(...)`, which evaluates them over chunks of [rows, keys] (the spec's code, so
`kernelsearch show` prints it) and hands each chunk to `Tiles.add`. What is the same for every
spec lives here, once: the reduction of a chunk to blocks (any / all), the sparse lists the
kernels iterate, the cache of masks that read no input.

A `BlockMask` holds, per (b?, h?) - size 1 where the conjuncts do not vary with b or h:

    keeps          [b?, h?, query blocks, key blocks] bool: the conjuncts keep some (i, j) there
    keeps_all      the same, every (i, j) with i < I and j < J kept (never a tile crossing J)
    kv_blocks      [b?, h?, query blocks, 1 + key blocks] int32: per query block, the count, then
                   the key blocks kept partly (kv_num_blocks, kv_indices in FlexAttention's BlockMask)
    full_kv_blocks the same for the key blocks kept whole (full_kv_num_blocks, full_kv_indices)
    q_blocks, full_q_blocks   transposed: per key block, the query blocks (the dk/dv kernel)

Indices ascend; entries past the count are not read. A tile outside the rows' key-block bounds
keeps nothing (the generated code evaluates only the keys the bounds allow).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockMask", "Tiles", "from_tiles", "lookup", "store", "CHUNK_ELEMENTS", "CACHE_ENTRIES"]

CHUNK_ELEMENTS = 1 << 22    # (i, j) pairs evaluated at once: rows per chunk = this / (keys * b? * h?)
CACHE_ENTRIES = 32          # masks kept per generated file (shapes and block sizes in use)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lists(dense: torch.Tensor) -> torch.Tensor:
    """[..., rows, cols] bool -> [..., rows, 1 + cols] int32: the count, then the kept columns ascending."""
    count = dense.sum(-1, keepdim=True)
    order = torch.argsort((~dense).to(torch.int16), dim=-1, stable=True)   # kept columns first, in order
    return torch.cat([count, order], -1).to(torch.int32).contiguous()


@dataclass(frozen=True)
class BlockMask:
    block_m: int
    block_n: int
    keeps: torch.Tensor          # [b?, h?, query blocks, key blocks] bool
    keeps_all: torch.Tensor
    kv_blocks: torch.Tensor      # [b?, h?, query blocks, 1 + key blocks] int32
    full_kv_blocks: torch.Tensor
    q_blocks: torch.Tensor       # [b?, h?, key blocks, 1 + query blocks] int32
    full_q_blocks: torch.Tensor

    # FlexAttention's names for the same lists
    @property
    def kv_num_blocks(self) -> torch.Tensor:
        return self.kv_blocks[..., 0]

    @property
    def kv_indices(self) -> torch.Tensor:
        return self.kv_blocks[..., 1:]

    @property
    def full_kv_num_blocks(self) -> torch.Tensor:
        return self.full_kv_blocks[..., 0]

    @property
    def full_kv_indices(self) -> torch.Tensor:
        return self.full_kv_blocks[..., 1:]

    def visited_tiles(self) -> list:
        """[query block][key block] -> bool: some (b, h) keeps something there (the torch chunked
        lowering holds every b and h in a chunk), as Python lists (one host sync per call)."""
        return self.keeps.any(0).any(0).tolist()

    def fraction_visited(self) -> float:
        """The tiles visited (kept partly or whole) per (b?, h?), over all tiles."""
        return self.keeps.float().mean().item() if self.keeps.numel() else 0.0


class Tiles:
    """Accumulates a block mask from chunks of the conjuncts' values."""

    def __init__(self, batch: int, heads: int, I: int, J: int, BLOCK_M: int, BLOCK_N: int, axes: tuple, device):
        self.batch, self.heads, self.I, self.J = batch, heads, I, J
        self.block_m, self.block_n = int(BLOCK_M), int(BLOCK_N)
        self.axes = tuple(axes)      # positions of b, h, i, j in the aligned layout the chunks come in
        shape = (batch, heads, _cdiv(I, self.block_m), _cdiv(J, self.block_n))
        self.keeps = torch.zeros(shape, dtype=torch.bool, device=device)
        self.keeps_all = torch.zeros(shape, dtype=torch.bool, device=device)

    def row_chunks(self):
        """(query_start, query_end) of chunks of whole query blocks, small enough to evaluate at once."""
        per_block = max(1, self.block_m * self.J * self.batch * self.heads)
        step = self.block_m * max(1, CHUNK_ELEMENTS // per_block)
        for start in range(0, self.I, step):
            yield start, min(start + step, self.I)

    def add(self, keep: torch.Tensor, query_start: int, query_end: int, key_start: int, key_end: int) -> None:
        """keep: the conjuncts' value (aligned layout, size 1 where it does not vary) at rows
        query_start..query_end - 1 (query_start a block start) and keys key_start..key_end - 1
        (key_start a block start)."""
        rows, keys = query_end - query_start, key_end - key_start
        others = [a for a in range(keep.ndim) if a not in self.axes]
        keep = keep.permute(*self.axes, *others).reshape(keep.shape[self.axes[0]], keep.shape[self.axes[1]],
                                                          keep.shape[self.axes[2]], keep.shape[self.axes[3]])
        keep = keep.expand(self.batch, self.heads, rows, keys)
        padded_rows, padded_keys = _cdiv(rows, self.block_m) * self.block_m, _cdiv(keys, self.block_n) * self.block_n
        some = torch.zeros(self.batch, self.heads, padded_rows, padded_keys, dtype=torch.bool, device=keep.device)
        some[:, :, :rows, :keys] = keep
        every = some.clone()
        every[:, :, rows:, :keys] = True      # rows past I hold nothing to keep; keys past the chunk are not kept
        shape = (self.batch, self.heads, padded_rows // self.block_m, self.block_m,
                 padded_keys // self.block_n, self.block_n)
        first_row, first_key = query_start // self.block_m, key_start // self.block_n
        row_blocks, key_blocks = slice(first_row, first_row + shape[2]), slice(first_key, first_key + shape[4])
        self.keeps[:, :, row_blocks, key_blocks] = some.view(shape).any(5).any(3)
        self.keeps_all[:, :, row_blocks, key_blocks] = every.view(shape).all(5).all(3)

    def result(self) -> BlockMask:
        return from_tiles(self.keeps, self.keeps_all, self.block_m, self.block_n)


def from_tiles(keeps: torch.Tensor, keeps_all: torch.Tensor, block_m: int, block_n: int) -> BlockMask:
    """The block mask of dense [b?, h?, query blocks, key blocks] tables (keeps_all within keeps)."""
    partial = keeps & ~keeps_all
    return BlockMask(block_m, block_n, keeps, keeps_all, _lists(partial), _lists(keeps_all),
                     _lists(partial.transpose(-1, -2)), _lists(keeps_all.transpose(-1, -2)))


def lookup(cache: dict, key) -> BlockMask | None:
    """A cached mask of conjuncts that read no input (None while torch.compile traces: no state there)."""
    if torch.compiler.is_compiling():
        return None
    return cache.get(key)


def store(cache: dict, key, mask: BlockMask) -> BlockMask:
    if not torch.compiler.is_compiling():
        while len(cache) >= CACHE_ENTRIES:
            cache.pop(next(iter(cache)))
        cache[key] = mask
    return mask
