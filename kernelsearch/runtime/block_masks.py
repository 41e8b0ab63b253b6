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

    def per_sample(self, streams: int) -> "BlockMask":
        """The mask a heads-in-tile program reads: one per sample of `streams` batch entries (the
        batch is laid out (b s)) and all their heads - some channel keeps something / every
        channel keeps everything."""
        keeps, keeps_all = self.keeps.any(1, keepdim=True), self.keeps_all.all(1, keepdim=True)
        if keeps.shape[0] > 1:
            samples = (keeps.shape[0] // streams, streams) + tuple(keeps.shape[1:])
            keeps, keeps_all = keeps.view(samples).any(1), keeps_all.view(samples).all(1)
        return from_tiles(keeps, keeps_all, self.block_m, self.block_n)

    def fraction_visited(self) -> float:
        """The tiles visited (kept partly or whole) per (b?, h?), over all tiles."""
        return self.keeps.float().mean().item() if self.keeps.numel() else 0.0


def _view(value: torch.Tensor, axes) -> torch.Tensor:
    """An aligned value as [value's size on each of `axes`] (its other axes have size 1)."""
    others = [a for a in range(value.ndim) if a not in axes]
    return value.permute(*axes, *others).reshape([value.shape[a] for a in axes])


def _block_min_max(side: torch.Tensor, block: int) -> tuple:
    """[b, h, n] -> the min and max of each block of `block` along n ([b, h, blocks]); the last
    block padded with its last value (which changes neither)."""
    n = side.shape[-1]
    padded = _cdiv(n, block) * block
    if padded != n:
        side = torch.cat([side, side[..., -1:].expand(*side.shape[:-1], padded - n)], -1)
    blocks = side.reshape(*side.shape[:-1], padded // block, block)
    return blocks.amin(-1), blocks.amax(-1)


# k bools read as one k-byte integer: all True is this value, any True is non-zero
_WORDS = {8: (torch.int64, int.from_bytes(bytes([1] * 8), "little", signed=True)),
          4: (torch.int32, int.from_bytes(bytes([1] * 4), "little", signed=True)),
          2: (torch.int16, int.from_bytes(bytes([1] * 2), "little", signed=True))}


def _per_row_and_key_block(keep: torch.Tensor, key_blocks: int, block_n: int) -> tuple:
    """[b, h, rows, key_blocks * block_n] bool (contiguous) -> (any, all) over each key block,
    [b, h, rows, key_blocks]: groups of k consecutive bools are read as one k-byte integer (one
    compare instead of a reduction over a short inner dim), repeatedly, while k divides the block."""
    b, h, rows, _ = keep.shape
    some, every, width = keep, keep, block_n
    while width > 1:
        k = next((k for k in (8, 4, 2) if width % k == 0), None)
        if k is None:
            break
        dtype, ones = _WORDS[k]
        some = some.view(torch.uint8).view(dtype) != 0
        every = every.view(torch.uint8).view(dtype) == ones
        width //= k
    some = some.view(b, h, rows, key_blocks, width)
    every = every.view(b, h, rows, key_blocks, width)
    return some.any(-1), every.all(-1)


class Tiles:
    """A block mask built rule by rule (passes/block_mask.py): each conjunct's "keeps something"
    and "keeps everything" per tile are and-ed in."""

    def __init__(self, batch: int, heads: int, I: int, J: int, BLOCK_M: int, BLOCK_N: int, axes: tuple, device):
        self.batch, self.heads, self.I, self.J = batch, heads, I, J
        self.block_m, self.block_n = int(BLOCK_M), int(BLOCK_N)
        self.axes = tuple(axes)      # positions of b, h, i, j in the aligned layout values come in
        self.device = device
        self.rows, self.cols = _cdiv(I, self.block_m), _cdiv(J, self.block_n)
        shape = (batch, heads, self.rows, self.cols)
        key_ends = (torch.arange(self.cols, device=device) + 1) * self.block_n
        self.keeps = torch.ones(shape, dtype=torch.bool, device=device)
        self.keeps_all = (key_ends <= J).expand(shape).clone()     # a tile crossing J is never whole

    def bounds(self, key_ranges: list) -> None:
        """The bounded conjuncts: per query block (first, end) of the keys its rows can keep and
        (first, end) of those all its rows keep (the key-block bounds at its first and last rows)."""
        if not key_ranges:
            return
        ranges = torch.tensor(key_ranges, dtype=torch.int64, device=self.device)     # [query blocks, 4]
        starts = torch.arange(self.cols, device=self.device)[None] * self.block_n
        ends = starts + self.block_n
        self.keeps &= (starts < ranges[:, 1:2]) & (ends > ranges[:, 0:1])
        self.keeps_all &= (starts >= ranges[:, 2:3]) & (ends <= ranges[:, 3:4])

    def equal_ranges(self, query_side: torch.Tensor, key_side: torch.Tensor) -> None:
        """`a == b`, a over (b?, h?, i), b over (b?, h?, j) (aligned): something kept where a
        block's ranges of a and b meet, everything where both are one and the same value."""
        if not self.I or not self.J:
            return
        b, h, i, j = self.axes
        a_min, a_max = _block_min_max(_view(query_side, (b, h, i)), self.block_m)
        k_min, k_max = _block_min_max(_view(key_side, (b, h, j)), self.block_n)
        a_min, a_max = a_min[..., :, None], a_max[..., :, None]        # [b?, h?, query blocks, 1]
        k_min, k_max = k_min[..., None, :], k_max[..., None, :]        # [b?, h?, 1, key blocks]
        self.keeps &= (a_min <= k_max) & (k_min <= a_max)
        self.keeps_all &= (a_min == a_max) & (k_min == k_max) & (a_min == k_min)

    def row_chunks(self):
        """(query_start, query_end) of chunks of whole query blocks, small enough to evaluate at once."""
        per_block = max(1, self.block_m * self.J * self.batch * self.heads)
        step = self.block_m * max(1, CHUNK_ELEMENTS // per_block)
        for start in range(0, self.I, step):
            yield start, min(start + step, self.I)

    def add(self, keep: torch.Tensor, query_start: int, query_end: int, key_start: int, key_end: int) -> None:
        """The evaluated conjuncts: their value (aligned, size 1 where it does not vary) at rows
        query_start..query_end - 1 (a block start) and keys key_start..key_end - 1 (a block
        start; the keys outside keep nothing), counted per tile."""
        rows, keys = query_end - query_start, key_end - key_start
        first_row, first_key = query_start // self.block_m, key_start // self.block_n
        row_blocks, key_blocks = _cdiv(rows, self.block_m), _cdiv(keys, self.block_n)
        keep = _view(keep, self.axes).expand(self.batch, self.heads, rows, keys)
        pad_keys, pad_rows = key_blocks * self.block_n - keys, row_blocks * self.block_m - rows
        if pad_keys:     # the last key block: padded keys keep nothing
            keep = torch.nn.functional.pad(keep.to(torch.uint8), (0, pad_keys)).bool()
        some_rows, every_rows = _per_row_and_key_block(keep.contiguous(), key_blocks, self.block_n)
        if pad_rows:     # the last query block: rows past I keep nothing, and need nothing kept
            some_rows = torch.nn.functional.pad(some_rows, (0, 0, 0, pad_rows), value=False)
            every_rows = torch.nn.functional.pad(every_rows, (0, 0, 0, pad_rows), value=True)
        shape = (self.batch, self.heads, row_blocks, self.block_m, key_blocks)
        some = torch.zeros(self.batch, self.heads, row_blocks, self.cols, dtype=torch.bool, device=keep.device)
        every = torch.zeros_like(some)
        some[..., first_key:first_key + key_blocks] = some_rows.view(shape).any(3)
        every[..., first_key:first_key + key_blocks] = every_rows.view(shape).all(3)
        self.keeps[:, :, first_row:first_row + row_blocks] &= some
        self.keeps_all[:, :, first_row:first_row + row_blocks] &= every

    def skip_rows(self, query_start: int, query_end: int) -> None:
        """Rows whose bounds allow no key: nothing kept."""
        blocks = slice(query_start // self.block_m, _cdiv(query_end, self.block_m))
        self.keeps[:, :, blocks] = False
        self.keeps_all[:, :, blocks] = False

    def result(self) -> BlockMask:
        return from_tiles(self.keeps, self.keeps_all & self.keeps, self.block_m, self.block_n)


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
