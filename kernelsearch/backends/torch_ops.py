"""The spec language's ops on "aligned" tensors, shared by the reference evaluator and the
generated torch modules.

An aligned tensor has one axis per dim of the graph's layout (e.g. [b, h, i, j, d]) and size 1
on the dims it does not vary along, so elementwise ops broadcast by plain PyTorch rules.
Everything here is plain torch: it runs in any dtype and traces under torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def align(tensor: torch.Tensor, dims: tuple[str, ...], layout: tuple[str, ...], group: int | None = None) -> torch.Tensor:
    """A tensor with named `dims` (in layout order) viewed with one axis per layout dim.

    group (a grouped layout: the axis after h is a query head's place in its KV group): the
    tensor's heads are split into [heads / group, group] - group = G for a per-query-head tensor
    ([KV_H, G]), 1 for a per-KV-head one ([KV_H, 1]: it broadcasts over the group, no copy)."""
    shape = [1] * len(layout)
    for dim, size in zip(dims, tensor.shape):
        shape[layout.index(dim)] = size
    if group is not None:
        axis = layout.index("h")
        if shape[axis] != 1:
            shape[axis:axis + 2] = [shape[axis] // group, group]
    return tensor.reshape(shape)


def head_index(kv_heads: int, group: int, axis: int, rank: int, device) -> torch.Tensor:
    """The query head h = kv_head * group + member over the grouped layout's axes (axis, axis + 1)."""
    shape = [1] * rank
    shape[axis:axis + 2] = [kv_heads, group]
    return torch.arange(kv_heads * group, device=device).reshape(shape)


def merge_groups(x: torch.Tensor, axis: int, kv_heads: int, group: int) -> torch.Tensor:
    """[.., KV_H, G, ..] (either possibly broadcast, size 1) -> [.., H, ..]: a view when x varies along both."""
    shape = list(x.shape)
    shape[axis:axis + 2] = [kv_heads, group]
    return x.expand(shape).flatten(axis, axis + 1)


def query_heads(tensor: torch.Tensor, axis: int, heads: int) -> torch.Tensor:
    """A per-KV-head tensor (H_kv entries along `axis`) read by each of the `heads` query heads: query
    head h takes KV head h // (heads / H_kv). The reference's definition of grouped KV heads (it
    copies; the generated lowerings broadcast instead: `align(..., group=...)`)."""
    kv_heads = tensor.shape[axis]
    if kv_heads in (1, heads):
        return tensor
    group = torch.arange(heads, device=tensor.device) // (heads // kv_heads)
    return tensor.index_select(axis, group)


def index(size: int, axis: int, rank: int, device) -> torch.Tensor:
    """Positions 0..size-1 along `axis` of an aligned int tensor."""
    shape = [1] * rank
    shape[axis] = size
    return torch.arange(size, device=device).reshape(shape)


def floordiv(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.div(a, b, rounding_mode="floor")
    return a // b


def minimum(a, b):
    """torch.minimum with a Python number on either side (a spec's `minimum(distance, 8)`)."""
    return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))


def maximum(a, b):
    return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))


# to_int(x) is limited to +-INT_LIMIT on every backend: Triton's integers are int32, torch's int64
INT_LIMIT = 2 ** 30


def to_int(x: torch.Tensor) -> torch.Tensor:
    """The spec language's to_int(x): toward zero (as Python's int() and torch's .long()), limited to
    +-INT_LIMIT (so int32 and int64 backends agree), NaN gives 0."""
    if x.is_floating_point():
        x = torch.nan_to_num(x, nan=0.0)
    return x.clamp(-INT_LIMIT, INT_LIMIT).to(torch.int64)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """The spec language's to_float(x): integers become floats of the dtype torch's own promotion gives
    (`x * 1.0`); floats are unchanged."""
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def dot(a: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """Contract `axis` of two aligned tensors; the result keeps the axis with size 1."""
    letters = "abcdefghijklmnop"[: max(a.ndim, b.ndim)]
    out = letters.replace(letters[axis], "")
    return torch.einsum(f"{letters},{letters}->{out}", a, b).unsqueeze(axis)


def l2norm(x: torch.Tensor, axis: int, groups: int, eps: float) -> torch.Tensor:
    size = x.shape[axis]
    if size % groups:
        raise ValueError(f"l2norm: the feature dim ({size}) is not divisible by groups={groups}")
    grouped = x.unflatten(axis, (groups, size // groups))
    return F.normalize(grouped, dim=axis + 1, eps=eps).flatten(axis, axis + 1)


def rmsnorm(x: torch.Tensor, axis: int, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(axis, keepdim=True) + eps)


def _half_spectrum(size: int, axis: int, rank: int, x: torch.Tensor) -> torch.Tensor:
    """arange(0, size, 2) along `axis`, as x's dtype."""
    if size % 2:
        raise ValueError(f"rotary/xpos need an even feature dim, got {size}")
    shape = [1] * rank
    shape[axis] = size // 2
    return torch.arange(0, size, 2, device=x.device, dtype=x.dtype).reshape(shape)


def rotate_half(x: torch.Tensor, axis: int) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=axis)
    return torch.cat((-x2, x1), dim=axis)


def rotary(x: torch.Tensor, pos: torch.Tensor, axis: int, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate_half convention: x cos(pos f) + rotate_half(x) sin(pos f)."""
    size = x.shape[axis]
    inv_freq = 1.0 / theta ** (_half_spectrum(size, axis, x.ndim, x) / size)
    angles = pos.to(x.dtype) * inv_freq
    angles = torch.cat((angles, angles), dim=axis)
    return x * angles.cos() + rotate_half(x, axis) * angles.sin()


def xpos(x: torch.Tensor, pos: torch.Tensor, axis: int, scale_base: float, inverse: bool) -> torch.Tensor:
    """xpos length scaling: x * sv ** (pos / scale_base), sv = (2m + 0.4 d) / (1.4 d) per dim pair."""
    size = x.shape[axis]
    per_pair = (_half_spectrum(size, axis, x.ndim, x) + 0.4 * size) / (1.4 * size)
    scale = per_pair ** (pos.to(x.dtype) / scale_base)
    scale = torch.cat((scale, scale), dim=axis)
    return x / scale if inverse else x * scale


def gather(table: torch.Tensor, indices: list, table_name: str) -> torch.Tensor:
    """table[idx0, idx1, ...] for aligned integer index tensors (broadcast together)."""
    indices = torch.broadcast_tensors(*[torch.as_tensor(i) for i in indices])
    for axis, (idx, size) in enumerate(zip(indices, table.shape)):
        if idx.numel() and (int(idx.max()) >= size or int(idx.min()) < -size):
            raise IndexError(f"'{table_name}' has {size} entries along its dim {axis}, but the spec indexes "
                             f"it at {int(idx.max())}")
    return table[tuple(indices)]


def gather_unchecked(table: torch.Tensor, indices: list) -> torch.Tensor:
    """gather without the bounds check (which forces a host sync); for generated code."""
    return table[tuple(torch.broadcast_tensors(*indices))]


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None, axis: int, sink=None) -> torch.Tensor:
    """softmax over `axis`; dropped entries get probability 0, and rows with nothing kept are all 0.

    sink: an extra logit per row (broadcast against the scores, size 1 along `axis`) that takes part
    in the denominator only, exp(sink) + sum exp(s): its probability is not returned, so a row with
    nothing kept and a sink is all 0 as well.

    Computed with `axis` moved last (a view when the dims after it have size 1, as the feature dim
    of scores does): CPU softmax and reductions along the contiguous last dim run ~7x faster."""
    scores = scores.movedim(axis, -1)
    if sink is None and (keep is None or scores.shape[-1] == 0):   # no keys (J = 0): amax would fail
        return torch.softmax(scores, dim=-1).movedim(-1, axis)
    if keep is not None:
        scores = scores.masked_fill(~keep.movedim(axis, -1), float("-inf"))
    if scores.shape[-1]:
        row_max = scores.amax(dim=-1, keepdim=True)
    else:
        row_max = torch.full(scores.shape[:-1] + (1,), float("-inf"), dtype=scores.dtype, device=scores.device)
    if sink is not None:
        sink = torch.as_tensor(sink, dtype=scores.dtype, device=scores.device)
        sink = sink.movedim(axis, -1) if sink.ndim == scores.ndim else sink
        row_max = torch.maximum(row_max, sink)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink - row_max)
    return (weights / torch.where(total > 0, total, torch.ones_like(total))).movedim(-1, axis)


def masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x where `keep` holds, 0 elsewhere (a normaliser without row statistics)."""
    return x if keep is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def mix_heads(x: torch.Tensor, weight: torch.Tensor, streams: int, batch_axis: int, head_axis: int,
              group: int | None = None) -> torch.Tensor:
    """Mix the (streams * h) heads of each sample; the batch axis is laid out (b s).

    weight[out, in] is a 1x1 convolution over heads, heads ordered stream-major (s h).
    group: x is in a grouped layout ([.., KV_H, G, ..]: the heads are merged for the mixing, then split).
    """
    assert head_axis == batch_axis + 1
    if group is not None:
        heads = weight.shape[0] // streams
        merged = merge_groups(x, head_axis, heads // group, group)
        return mix_heads(merged, weight, streams, batch_axis, head_axis).unflatten(head_axis, (-1, group))
    shape = list(x.shape)
    batch, heads = shape[batch_axis], shape[head_axis]
    channels = streams * heads
    if batch % streams:
        raise ValueError(f"mix_heads: the batch ({batch}) is not a multiple of streams={streams}")
    if tuple(weight.shape) != (channels, channels):
        raise ValueError(f"mix_heads: the weight must be [{channels}, {channels}] (streams * heads), "
                         f"got {list(weight.shape)}")
    grouped = x.reshape(shape[:batch_axis] + [batch // streams, channels] + shape[head_axis + 1:])
    mixed = torch.tensordot(weight.to(x.dtype), grouped.movedim(batch_axis + 1, 0), dims=1).movedim(0, batch_axis + 1)
    return mixed.reshape(shape)

