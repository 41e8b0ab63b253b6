"""PyTorch's own attention kernels, as the generated "sdpa" and "flex" lowerings call them
(codegen/torch_module.py renders the calls; passes/library.py decides where they fit).

FlexAttention is fast (and linear in memory) only compiled: eager it is PyTorch's O(N^2)
reference. On the CPU it runs float32, bfloat16 and float16 and has no backward (PyTorch
2.14): `flex` says so instead of failing deep inside Inductor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128   # FlexAttention's block size: query rows and keys per block of its block mask
FLEX_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

def flex_runs(device_type: str, dtype: torch.dtype, backward: bool) -> bool:
    """Whether FlexAttention runs calls of this dtype (and, with `backward`, their gradients) on
    this kind of device: on the CPU float32, bfloat16 and float16, forward only."""
    return device_type != "cpu" or (dtype in FLEX_CPU_DTYPES and not backward)


# one compile per shape: Inductor's CPU template fails to build some size-generic (dynamic) graphs
_compiled_flex = torch.compile(flex_attention, dynamic=False)


def grouped(query, key) -> bool:
    """k and v have fewer heads than q (grouped KV heads): the kernels' enable_gqa reads KV head
    h // (H / H_kv) for query head h, without copying k and v."""
    return key.shape[-3] != query.shape[-3]


def sdpa(query, key, value, mask, scale: float, causal: bool):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, is_causal=causal,
                                          enable_gqa=grouped(query, key))


def block_mask(key_ranges: list, I: int, J: int, mask_mod) -> BlockMask:
    """FlexAttention's block mask from, for each block of BLOCK query rows, (first, end) of the keys
    its rows can keep - and, where the graph's keeps are all bounds, (first, end) of the keys all
    its rows keep: key blocks outside the first range are skipped whole, those inside the second
    are kept whole (mask_mod is not evaluated there), mask_mod decides in the others."""
    key_blocks = max(1, -(-J // BLOCK))
    partial, full = [], []
    for row in key_ranges:
        lo, hi = row[0] // BLOCK, -(-row[1] // BLOCK) if row[1] > row[0] else row[0] // BLOCK
        whole = range(0)
        if len(row) == 4 and row[3] > row[2]:   # blocks inside [first_full, min(end_full, J)) entirely
            whole = range(max(lo, -(-row[2] // BLOCK)), min(hi, min(row[3], J) // BLOCK))
        full.append(list(whole))
        partial.append([b for b in range(lo, hi) if b not in whole])
    mask = {} if mask_mod is None else {"mask_mod": mask_mod}
    if any(full):
        mask.update(zip(("full_kv_num_blocks", "full_kv_indices"), _block_tensors(full, key_blocks)))
    count, indices = _block_tensors(partial, key_blocks)
    return BlockMask.from_kv_blocks(count, indices, BLOCK_SIZE=BLOCK, seq_lengths=(I, J), **mask)


def _block_tensors(blocks: list, key_blocks: int) -> tuple:
    """kv_num_blocks [1, 1, rows] and kv_indices [1, 1, rows, key_blocks] of per-row block lists."""
    blocks = blocks or [[]]
    count = torch.tensor([len(b) for b in blocks], dtype=torch.int32)
    indices = torch.zeros(len(blocks), key_blocks, dtype=torch.int32)
    for n, row in enumerate(blocks):
        indices[n, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return count[None, None], indices[None, None]


def flex(query, key, value, score_mod, mask: BlockMask, scale: float):
    if query.device.type == "cpu":
        if query.dtype not in FLEX_CPU_DTYPES:
            raise TypeError(f"the flex lowering runs float32, bfloat16 or float16 on the CPU (FlexAttention), "
                            f"not {query.dtype}; use lowering='sdpa', 'chunked' or 'materialized'")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            raise NotImplementedError("the flex lowering has no backward on the CPU (FlexAttention); use "
                                      "lowering='sdpa', 'chunked' or 'materialized' to train")
    if torch.compiler.is_compiling():
        # inside a compiled lowering, Inductor's CPU flex template fails on a view of a fused 5-d
        # prologue ("too many values to unpack"); clone/contiguous are elided, a one-term sum is
        # not: each operand becomes a 4-d buffer of its own (O(N d), once)
        query, key, value = (torch.sum(t.unsqueeze(0), 0) for t in (query, key, value))
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=mask, scale=scale,
                              enable_gqa=grouped(query, key))
    return _compiled_flex(query, key, value, score_mod=score_mod, block_mask=mask, scale=scale,
                          enable_gqa=grouped(query, key))
