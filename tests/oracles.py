"""Hand-written reference implementations ("oracles") of the five seed attention variants.

Each function is a plain PyTorch transcription of what the corresponding upstream library
computes, as recorded in shared/SEMANTICS.md. They are deliberately written the naive way
(materialise the full score matrix, mask, softmax, weight the values) in the style of
attention-gym / nanoGPT, so that the compiler's output can be checked against something that
shares no code with it. This module must never import from `kernelsearch`.

Conventions
-----------
* Layout: ``q: [b, h, i, d]``, ``k: [b, h, j, d]``, ``v: [b, h, j, e]``; ``I``/``J`` are the
  query/key lengths. Shape comments use those letters.
* "keep" masks are True where attention is allowed.
* Everything is computed in the dtype the inputs come in (tests use float64).
* Masked scores are filled with ``-finfo(dtype).max`` (except mesh-tf, which adds -1e10), and
  rows in which *every* key is masked produce an output of exactly 0 (our documented semantics;
  see each function for what the upstream library does instead).

Provenance: besides the self-checks in tests/test_oracles.py, these functions were compared
once, outside CI, against the upstream packages on random float64 inputs (rows that are fully
masked excluded, as there we return 0 by design): local-attention 1.11.2 `LocalAttention`
(640 settings of n, w, causal, look_backward/forward, exact, xpos, key mask, frame bias; max
error 2e-15 once its float32 inv_freq / xpos buffers are rebuilt in float64 — with the float32
buffers the error is ~1e-7), flash-cosine-sim-attention 0.2.2 `plain_cosine_sim_attention`
(groups 1/2/4, causal, mask, I != J), memory-efficient-attention-pytorch 0.1.6 `attention`
(bottom_right), `memory_efficient_attention` (top_left; ~2e-8 from its +1e-8 normaliser eps)
and `FlashAttentionFunction` ("flash"), and quartic-transformer 0.0.18 `Attention` with random
pre/post talking-heads weights (exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "mesh_tf_attention",
    "cosine_sim_attention",
    "memory_efficient_attention",
    "local_attention",
    "local_attention_global",
    "talking_heads_attention",
    "rotate_half",
    "rotary_freqs",
    "xpos_scale",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _neg_max(t: torch.Tensor) -> float:
    return -torch.finfo(t.dtype).max


def _softmax_zero_empty_rows(sim: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis after filling ~keep with -finfo.max; rows with no kept entry
    become all-zero instead of the uniform distribution plain softmax would give."""
    sim = sim.masked_fill(~keep, _neg_max(sim))
    p = sim.softmax(dim=-1)
    row_has_key = keep.any(dim=-1, keepdim=True)
    return p * row_has_key.to(p.dtype)


def _bottom_right_causal_keep(I: int, J: int, device) -> torch.Tensor:
    """[i, j] keep j <= i + (J - I) (equivalently: not triu(J - I + 1))."""
    i = torch.arange(I, device=device)[:, None]
    j = torch.arange(J, device=device)[None, :]
    return j <= i + (J - I)


# ---------------------------------------------------------------------------------------------
# 1. mesh-tensorflow softmax attention (seed 000)
# ---------------------------------------------------------------------------------------------


def mesh_tf_attention(q, k, v, *, causal=False):
    """softmax(q·k) v with NO 1/sqrt(d) scaling; causal mask is ADDITIVE -1e10, bottom-right.

    Note: because the mask is additive, a row in which every key is masked (only possible when
    I > J: rows i < I - J) is NOT zeroed: every score is shifted by the same -1e10 and the
    softmax of that row equals the unmasked softmax. We reproduce that faithfully. (Up to
    rounding: score - 1e10 keeps only ~1e-6 absolute precision in float64, and none at all in
    float32, where the ulp of 1e10 is 1024, so in float32 such a row is ~the mean of v.)
    """
    I, J = q.shape[-2], k.shape[-2]
    sim = torch.einsum("bhid,bhjd->bhij", q, k)  # [b, h, i, j], unscaled
    if causal:
        i = torch.arange(I, device=q.device)[:, None]
        j = torch.arange(J, device=q.device)[None, :]
        future = j > i + (J - I)  # [i, j]  mtf.less(i + J - I, j)
        sim = sim + future.to(sim.dtype) * -1e10
    p = sim.softmax(dim=-1)  # [b, h, i, j]
    return torch.einsum("bhij,bhje->bhie", p, v)  # [b, h, i, e]


# ---------------------------------------------------------------------------------------------
# 2. cosine-similarity attention (seed 001, plain path)
# ---------------------------------------------------------------------------------------------


def _grouped_l2norm(t, groups):
    """l2-normalise the last axis in `groups` contiguous chunks (F.normalize, eps 1e-12).

    Upstream's CPU path uses ``t / max(||t||, eps)`` with eps 1e-12 for float32 but 1e-3 for any
    other dtype; F.normalize is the same formula with eps 1e-12. The two only differ for
    near-zero vectors (norm < 1e-3), which the tests never produce.
    """
    *lead, d = t.shape
    assert d % groups == 0, f"d={d} not divisible by groups={groups}"
    t = t.reshape(*lead, groups, d // groups)  # [..., g, d/g]
    t = F.normalize(t, p=2, dim=-1, eps=1e-12)
    return t.reshape(*lead, d)


def cosine_sim_attention(q, k, v, *, scale=8.0, groups=1, causal=False, mask=None, attn_bias=None):
    """softmax(scale * q̂·k̂ + bias) v with q̂, k̂ l2-normalised in `groups` chunks of d.

    mask: key padding mask [b, j], True = keep. attn_bias: [h, i, j] (or broadcastable to
    [b, h, i, j]). Causal is bottom-right aligned (seed: triu(j - i + 1)).

    Fully-masked rows: the seed's plain path would return the uniform mean of v (softmax of a
    constant row); the CUDA kernel returns 0. We document and return 0.
    """
    b, h, I, d = q.shape
    J = k.shape[-2]
    q, k = _grouped_l2norm(q, groups), _grouped_l2norm(k, groups)
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale  # [b, h, i, j]
    if attn_bias is not None:
        sim = sim + attn_bias  # [h, i, j] broadcasts over b
    keep = torch.ones(1, 1, I, J, dtype=torch.bool, device=q.device)  # [1, 1, i, j]
    if mask is not None:
        keep = keep & mask[:, None, None, :]  # [b, 1, 1, j]
    if causal:
        keep = keep & _bottom_right_causal_keep(I, J, q.device)
    p = _softmax_zero_empty_rows(sim, keep.expand_as(sim))  # [b, h, i, j]
    return torch.einsum("bhij,bhje->bhie", p, v)


# ---------------------------------------------------------------------------------------------
# 3. memory-efficient / flash attention (seed 002)
# ---------------------------------------------------------------------------------------------


def memory_efficient_attention(
    q, k, v, *, causal=False, mask=None, attn_bias=None, causal_alignment="bottom_right"
):
    """softmax(q·k * d**-0.5 + bias) v — what the bucketed / flash algorithms compute.

    mask: key padding mask [b, j] (True = keep), or any boolean mask broadcastable to
    [b, h, i, j] (upstream accepts both). attn_bias broadcastable to [b, h, i, j].

    causal_alignment (only matters when I != J; all agree when I == J):
      "bottom_right": keep j <= i + (J - I)     -- upstream plain `attention` (triu(j - i + 1))
      "top_left":     keep j <= i               -- upstream bucketed `memory_efficient_attention`
      "flash":        keep j <= i - max(J - I, 0) -- upstream `FlashAttentionFunction`, whose
                      q_start_index = q_tile * q_bucket - (J - I) shifts the diagonal the wrong way
    Fully masked rows -> 0 (upstream plain / bucketed give the mean of v).
    """
    b, h, I, d = q.shape
    J = k.shape[-2]
    sim = torch.einsum("bhid,bhjd->bhij", q * d**-0.5, k)  # [b, h, i, j]
    if attn_bias is not None:
        sim = sim + attn_bias
    keep = torch.ones(1, 1, I, J, dtype=torch.bool, device=q.device)
    if mask is not None:
        keep = keep & (mask[:, None, None, :] if mask.ndim == 2 else mask)
    if causal:
        i = torch.arange(I, device=q.device)[:, None]
        j = torch.arange(J, device=q.device)[None, :]
        if causal_alignment == "bottom_right":
            keep = keep & (j <= i + (J - I))
        elif causal_alignment == "top_left":
            keep = keep & (j <= i)
        elif causal_alignment == "flash":
            keep = keep & (j <= i - max(J - I, 0))
        else:
            raise ValueError(f"unknown causal_alignment {causal_alignment!r}")
    p = _softmax_zero_empty_rows(sim, keep.expand_as(sim))
    return torch.einsum("bhij,bhje->bhie", p, v)


# ---------------------------------------------------------------------------------------------
# 4. local (sliding-window) attention (seed 003, upstream `local-attention`)
# ---------------------------------------------------------------------------------------------


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the two contiguous halves of the last axis (GPT-NeoX style)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_freqs(pos, d, *, theta=10000.0):
    """Rotary angles for (float) positions `pos` [n]: [n, d] = cat(pos ⊗ inv_freq, same)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=pos.dtype, device=pos.device) / d))
    freqs = pos[:, None] * inv_freq[None, :]  # [n, d/2]
    return torch.cat((freqs, freqs), dim=-1)  # [n, d]


def xpos_scale(power, d):
    """xpos per-dimension scale: cat(sv, sv) ** power, sv = (arange(0,d,2) + 0.4d) / (1.4d).

    power [n] -> [n, d]."""
    sv = (torch.arange(0, d, 2, dtype=power.dtype, device=power.device) + 0.4 * d) / (1.4 * d)
    s = sv[None, :] ** power[:, None]  # [n, d/2]
    return torch.cat((s, s), dim=-1)  # [n, d]


def _apply_rotary(x, pos, *, xpos_power=None, xpos_inverse=False):
    """x [..., n, d] rotated by angles of `pos` [n]; optionally times (or divided by) xpos."""
    d = x.shape[-1]
    freqs = rotary_freqs(pos.to(x.dtype), d)  # [n, d]
    out = x * freqs.cos() + rotate_half(x) * freqs.sin()
    if xpos_power is not None:
        s = xpos_scale(xpos_power.to(x.dtype), d)  # [n, d]
        out = out / s if xpos_inverse else out * s
    return out


def _local_defaults(causal, look_forward, d, window_size, scale, rotary, xpos, xpos_scale_base):
    lf = (0 if causal else 1) if look_forward is None else look_forward
    if causal and lf > 0:
        raise ValueError("you cannot look forward if causal")
    if xpos and not rotary:
        raise ValueError("xpos lives inside the rotary embedding: rotary=False excludes xpos")
    if rotary and d % 2:
        raise ValueError("rotary needs an even head size")
    scale = d**-0.5 if scale is None else scale
    sb = window_size // 2 if xpos_scale_base is None else xpos_scale_base
    if xpos and sb <= 0:
        raise ValueError("xpos_scale_base must be positive (default window_size // 2)")
    return lf, scale, sb


def _look_around(x, lb, lf, pad_value, dim):
    """x [..., W, w, ...] (window axis at `dim`, in-window axis at `dim + 1`) ->
    [..., W, (lb + 1 + lf) * w, ...]: for window W the concatenation of windows W-lb .. W+lf,
    windows outside [0, W) filled with pad_value (upstream `look_around`)."""
    dim = dim % x.ndim
    pad = [0, 0] * (x.ndim - dim - 1) + [lb, lf]
    xp = F.pad(x, pad, value=pad_value)  # [..., lb + W + lf, w, ...]
    W = x.shape[dim]
    frames = [xp.narrow(dim, o, W) for o in range(lb + lf + 1)]  # each [..., W, w, ...]
    return torch.cat(frames, dim=dim + 1)  # [..., W, L, ...]


def local_attention(
    q,
    k,
    v,
    *,
    window_size,
    causal=True,
    look_backward=1,
    look_forward=None,
    exact_windowsize=False,
    scale=None,
    rotary=True,
    xpos=False,
    xpos_scale_base=None,
    mask=None,
    pos_bias_table=None,
    rotary_query_shift=None,
    mask_padding=True,
):
    """Sliding-window attention computed the way upstream `local-attention` does it: pad to a
    multiple of w, cut into windows, gather look-around key frames, rotary *inside the frame*.

    q, k, v: [b, h, n, d] (self-attention, one length n). mask: key padding mask [b, n].
    pos_bias_table: [h, T]; adds table[h, |i - j|] (global positions) to the scores.
    rotary_query_shift: where queries sit in the rotary frame relative to keys. Upstream takes
    the LAST w frame positions for queries, i.e. shift = look_forward * w (the default here),
    which for non-causal look_forward > 0 rotates queries as if they were lf*w positions later
    than they are (**quirk**). 0 gives the textbook relative rotary.
    mask_padding: mask the zero keys that auto-padding appends (brief / SEMANTICS semantics).
    Upstream only masks them when a key padding `mask` is passed (it pads that mask with
    False); with mask=None the zero keys take part in the softmax with score 0 (+ bias) and
    value 0. Pass mask_padding=(mask is not None) to reproduce upstream exactly. Only matters
    for non-causal attention with n % w != 0.

    Fully-masked rows -> 0 (upstream: softmax of a constant row).
    """
    b, h, n, d = q.shape
    assert k.shape[-2] == n and v.shape[-2] == n, "local attention is self-attention (I == J)"
    w, lb = window_size, look_backward
    lf, scale, sb = _local_defaults(causal, look_forward, d, w, scale, rotary, xpos, xpos_scale_base)
    shift = lf * w if rotary_query_shift is None else rotary_query_shift

    # -- auto-pad to a multiple of w and cut into windows --------------------------------------
    n_pad = math.ceil(n / w) * w
    W, L = n_pad // w, (lb + 1 + lf) * w  # number of windows, look-around frame length
    q, k, v = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (q, k, v))  # [b, h, n_pad, *]
    bq = q.reshape(b, h, W, w, d) * scale  # [b, h, W, w, d]   scale BEFORE rotary
    bk = _look_around(k.reshape(b, h, W, w, d), lb, lf, 0.0, dim=2)  # [b, h, W, L, d]
    bv = _look_around(v.reshape(b, h, W, w, -1), lb, lf, 0.0, dim=2)  # [b, h, W, L, e]

    # -- rotary (+ xpos) on frame positions -----------------------------------------------------
    if rotary:
        t_k = torch.arange(L, device=q.device, dtype=q.dtype)  # frame positions of keys
        t_q = lb * w + shift + torch.arange(w, device=q.device, dtype=q.dtype)  # default: last w
        pk = pq = None
        if xpos:
            pk = (t_k - L // 2) / sb  # upstream centres on the frame: power = (t - L//2) / sb
            pq = (t_q - L // 2) / sb
        bq = _apply_rotary(bq, t_q, xpos_power=pq)  # q * xpos
        bk = _apply_rotary(bk, t_k, xpos_power=pk, xpos_inverse=True)  # k / xpos

    sim = torch.einsum("bhwid,bhwjd->bhwij", bq, bk)  # [b, h, W, w, L]

    # -- global positions of every (query, frame key) pair; -1 = outside the sequence ------------
    pos = torch.arange(n_pad, device=q.device).reshape(W, w)  # [W, w]
    qi = pos[:, :, None]  # [W, w, 1]
    kj = _look_around(pos, lb, lf, -1, dim=0)[:, None, :]  # [W, 1, L]

    if pos_bias_table is not None:
        T = pos_bias_table.shape[-1]
        dist = (qi - kj).abs().clamp(max=T - 1)  # [W, w, L]  (clamp only hits masked pairs)
        sim = sim + pos_bias_table[:, dist][None]  # [1, h, W, w, L]

    keep = kj >= 0  # look-around windows beyond the sequence ends
    if mask_padding:
        keep = keep & (kj < n)  # zero keys appended by auto-padding
    if causal:
        keep = keep & (kj <= qi)
        if exact_windowsize:
            keep = keep & (kj >= qi - w * lb)
    elif exact_windowsize:
        keep = keep & (kj >= qi - w * lb) & (kj <= qi + w * lf)
    keep = keep[None, None]  # [1, 1, W, w, L]
    if mask is not None:
        m = F.pad(mask, (0, n_pad - n), value=False).reshape(b, W, w)  # [b, W, w]
        m = _look_around(m, lb, lf, False, dim=1)  # [b, W, L]
        keep = keep & m[:, None, :, None, :]  # [b, 1, W, 1, L]
    if pos_bias_table is not None:
        assert bool((((qi - kj).abs() < T) | ~keep | (qi >= n)).all()), "pos_bias_table too short"

    p = _softmax_zero_empty_rows(sim, keep.expand_as(sim))  # [b, h, W, w, L]
    out = torch.einsum("bhwij,bhwje->bhwie", p, bv)  # [b, h, W, w, e]
    return out.reshape(b, h, n_pad, -1)[:, :, :n]  # [b, h, n, e]


def local_attention_global(
    q,
    k,
    v,
    *,
    window_size,
    causal=True,
    look_backward=1,
    look_forward=None,
    exact_windowsize=False,
    scale=None,
    rotary=True,
    xpos=False,
    xpos_scale_base=None,
    mask=None,
    pos_bias_table=None,
    rotary_query_shift=None,
    mask_padding=True,
):
    """The same function as `local_attention`, written on global indices i, j (no windows).

    This is the formulation our spec copies:
      * q <- q * scale
      * rotary: q rotated at position i + s, k at position j, where
        s = rotary_query_shift, default look_forward * w (reproduces upstream's frame quirk);
        angles pos * inv_freq, inv_freq = 1 / 10000**(arange(0, d, 2) / d), cat'ed twice,
        x * cos + rotate_half(x) * sin.
      * xpos: q multiplied by cat(sv, sv) ** ((i + s) / sb), k divided by cat(sv, sv) ** (j / sb).
        Upstream centres the power on the frame ((t - L//2) / sb); the centring term and the
        window offset are common to q and k and cancel in q·k, so only (i + s - j) / sb
        survives — equal to the windowed result up to rounding.
      * scores q·k (+ table[h, |i - j|])
      * keep(i, j) = -lf <= (i//w - j//w) <= lb            (j is in a look-around window of i)
                     and j < J_real (mask_padding)          (J_real = n)
                     and j <= i                             (causal)
                     and i - w*lb <= j                      (exact)
                     and j <= i + w*lf                      (exact, non-causal)
                     and mask[b, j]
      * softmax over j with -finfo.max fill; rows with no kept key -> 0.
    With mask_padding=False the keys are zero-padded to n_pad = ceil(n/w)*w and the phantom keys
    j in [n, n_pad) stay in the softmax (score 0 + bias, value 0), exactly as upstream does.
    """
    b, h, n, d = q.shape
    assert k.shape[-2] == n and v.shape[-2] == n, "local attention is self-attention (I == J)"
    w, lb = window_size, look_backward
    lf, scale, sb = _local_defaults(causal, look_forward, d, w, scale, rotary, xpos, xpos_scale_base)
    shift = lf * w if rotary_query_shift is None else rotary_query_shift

    nk = n if mask_padding else math.ceil(n / w) * w  # number of keys taking part
    k, v = (F.pad(t, (0, 0, 0, nk - n)) for t in (k, v))  # [b, h, nk, *]
    i = torch.arange(n, device=q.device)  # query positions
    j = torch.arange(nk, device=q.device)  # key positions

    q = q * scale
    if rotary:
        pi, pj = (i + shift).to(q.dtype), j.to(q.dtype)
        q = _apply_rotary(q, pi, xpos_power=(pi / sb) if xpos else None)
        k = _apply_rotary(k, pj, xpos_power=(pj / sb) if xpos else None, xpos_inverse=True)

    sim = torch.einsum("bhid,bhjd->bhij", q, k)  # [b, h, i, j]
    ii, jj = i[:, None], j[None, :]  # [i, 1], [1, j]
    if pos_bias_table is not None:
        T = pos_bias_table.shape[-1]
        sim = sim + pos_bias_table[:, (ii - jj).abs().clamp(max=T - 1)][None]  # [1, h, i, j]

    win_diff = ii // w - jj // w  # [i, j]
    keep = (win_diff >= -lf) & (win_diff <= lb)
    if causal:
        keep = keep & (jj <= ii)
    if exact_windowsize:
        keep = keep & (jj >= ii - w * lb)
        if not causal:
            keep = keep & (jj <= ii + w * lf)
    keep = keep[None, None]  # [1, 1, i, j]
    if mask is not None:
        keep = keep & F.pad(mask, (0, nk - n), value=False)[:, None, None, :]  # [b, 1, 1, j]
    if pos_bias_table is not None:
        assert bool((((ii - jj).abs() < T) | ~keep).all()), "pos_bias_table too short"

    p = _softmax_zero_empty_rows(sim, keep.expand_as(sim))  # [b, h, i, j]
    return torch.einsum("bhij,bhje->bhie", p, v)  # [b, h, i, e]


# ---------------------------------------------------------------------------------------------
# 5. multi-stream attention with talking heads (seed 004, quartic-transformer)
# ---------------------------------------------------------------------------------------------


def _talking_heads(t, weight, s):
    """1x1-conv mixing over all heads of all streams of one sample.

    t [(b s), h, i, j] -> [b, (s h), i, j] -> out[:, o] = sum_c weight[o, c] * t[:, c] -> back.
    weight: [(s h), (s h)] (output channel first, like Conv2d) or the Conv2d's [.., .., 1, 1].
    """
    if weight is None:
        return t
    B, h, I, J = t.shape
    b = B // s
    weight = weight.reshape(s * h, s * h)
    t = t.reshape(b, s * h, I, J)  # '(b s) h i j -> b (s h) i j'
    t = torch.einsum("oc,bcij->boij", weight.to(t.dtype), t)  # [b, (s h), i, j]
    return t.reshape(B, h, I, J)  # 'b (s h) i j -> (b s) h i j'


def talking_heads_attention(
    q, k, v, *, num_streams, pre_mix=None, post_mix=None, causal=False, mask=None, scale=None
):
    """q, k, v: [(b s), h, i, d], batch laid out (b s) with s = num_streams (stream fastest).

    sim = (q * scale)·k with scale default +sqrt(d) (**quirk**: upstream multiplies by sqrt(d));
    pre-talking-heads mixes the logits across the (s h) heads of a sample; then the key padding
    mask and the causal mask (triu(j - i + 1), bottom-right) fill -finfo.max; softmax over j;
    post-talking-heads mixes the probabilities; out = p·v.

    mask: [(b s), j] as upstream requires (einx 'b j, b ... j' against the (b s) batch); a
    [b, j] mask is also accepted and shared by the s streams of each sample.
    Fully masked rows: their probabilities are set to 0 before the post mix (upstream would
    have a uniform row there). Other heads' rows still mix into them through post_mix.
    """
    s = num_streams
    B, h, I, d = q.shape
    J = k.shape[-2]
    assert B % s == 0
    scale = d**0.5 if scale is None else scale
    sim = torch.einsum("bhid,bhjd->bhij", q * scale, k)  # [(b s), h, i, j]
    sim = _talking_heads(sim, pre_mix, s)  # pre-talking-heads, before any masking

    keep = torch.ones(1, 1, I, J, dtype=torch.bool, device=q.device)
    if mask is not None:
        if mask.shape[0] != B:
            assert mask.shape[0] * s == B, "mask must be [(b s), j] or [b, j]"
            mask = mask.repeat_interleave(s, dim=0)  # [b, j] -> [(b s), j]
        keep = keep & mask[:, None, None, :]
    if causal:
        keep = keep & _bottom_right_causal_keep(I, J, q.device)
    p = _softmax_zero_empty_rows(sim, keep.expand_as(sim))  # [(b s), h, i, j]
    p = _talking_heads(p, post_mix, s)  # post-talking-heads
    return torch.einsum("bhij,bhje->bhie", p, v)  # [(b s), h, i, e]
