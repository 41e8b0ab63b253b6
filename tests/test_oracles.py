"""Checks that the hand-written oracles in tests/oracles.py are right, wherever an independent
cross-check exists (torch's scaled_dot_product_attention, brute-force loops, a complex-number
rotary, and — for local attention — the windowed vs the global-index formulation).

All in float64 on random inputs.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tests.oracles import (
    cosine_sim_attention,
    local_attention,
    local_attention_global,
    memory_efficient_attention,
    mesh_tf_attention,
    talking_heads_attention,
)

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def rnd(*shape):
    return torch.randn(*shape, dtype=DT)


def sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw)


def key_mask(b, j, p=0.35):
    m = torch.rand(b, j) > p
    m[:, 0] = True  # never a fully masked row (SDPA would give NaN there)
    return m


# ---------------------------------------------------------------------------------------------
# 1. mesh-tf
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_mesh_tf_equals_sdpa_unscaled(causal):
    torch.manual_seed(0)
    q, k, v = rnd(2, 3, 11, 8), rnd(2, 3, 11, 8), rnd(2, 3, 11, 8)
    out = mesh_tf_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=1.0, is_causal=causal), **TOL)


def test_mesh_tf_mask_is_strong_enough_for_large_scores():
    # scores of order 1e4: the -1e10 additive mask must still remove the future entirely
    torch.manual_seed(19)
    q, k, v = rnd(1, 2, 9, 16) * 1000, rnd(1, 2, 9, 16), rnd(1, 2, 9, 16)
    torch.testing.assert_close(mesh_tf_attention(q, k, v, causal=True), sdpa(q, k, v, scale=1.0, is_causal=True), **TOL)


def test_mesh_tf_causal_bottom_right_when_fewer_queries():
    torch.manual_seed(1)
    I, J = 5, 9
    q, k, v = rnd(2, 2, I, 4), rnd(2, 2, J, 4), rnd(2, 2, J, 4)
    keep = torch.ones(I, J, dtype=torch.bool).tril(J - I)  # bottom-right diagonal
    out = mesh_tf_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=1.0, attn_mask=keep), **TOL)


def test_mesh_tf_additive_mask_leaves_fully_masked_rows_unmasked():
    # I > J: rows i < I - J have every key masked; the additive -1e10 is a constant shift there,
    # so those rows equal unmasked attention (faithful to mesh-tensorflow, documented).
    torch.manual_seed(2)
    I, J = 7, 4
    q, k, v = rnd(1, 2, I, 4), rnd(1, 2, J, 4), rnd(1, 2, J, 4)
    out = mesh_tf_attention(q, k, v, causal=True)
    full = sdpa(q, k, v, scale=1.0)
    # (score - 1e10 is rounded to the float64 ulp of 1e10, ~2e-6, hence the loose tolerance)
    torch.testing.assert_close(out[:, :, : I - J], full[:, :, : I - J], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[:, :, I - J :], full[:, :, I - J :])


# ---------------------------------------------------------------------------------------------
# 2. cosine-sim
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,use_mask,use_bias", list(itertools.product([False, True], repeat=3)))
def test_cosine_sim_groups1_equals_sdpa(causal, use_mask, use_bias):
    torch.manual_seed(3)
    b, h, n, d, scale = 2, 3, 10, 16, 10.0
    q, k, v = rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d)
    mask = key_mask(b, n) if use_mask else None
    bias = rnd(h, n, n) if use_bias else None
    out = cosine_sim_attention(
        q, k, v, scale=scale, groups=1, causal=causal, mask=mask, attn_bias=bias
    )
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    float_mask = torch.zeros(b, h, n, n, dtype=DT)
    if bias is not None:
        float_mask = float_mask + bias
    if mask is not None:
        float_mask = float_mask.masked_fill(~mask[:, None, None, :], -math.inf)
    if causal:
        float_mask = float_mask.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    ref = sdpa(qn, kn, v, scale=scale, attn_mask=float_mask)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("groups", [2, 4])
def test_cosine_sim_grouped_norm(groups):
    torch.manual_seed(4)
    b, h, n, d = 1, 2, 6, 16
    q, k, v = rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d)
    out = cosine_sim_attention(q, k, v, scale=8.0, groups=groups)
    c = d // groups
    qn = torch.cat([q[..., g * c : (g + 1) * c] / q[..., g * c : (g + 1) * c].norm(dim=-1, keepdim=True) for g in range(groups)], -1)
    kn = torch.cat([k[..., g * c : (g + 1) * c] / k[..., g * c : (g + 1) * c].norm(dim=-1, keepdim=True) for g in range(groups)], -1)
    torch.testing.assert_close(out, sdpa(qn, kn, v, scale=8.0), **TOL)
    assert not torch.allclose(out, cosine_sim_attention(q, k, v, scale=8.0, groups=1))


def test_cosine_sim_causal_bottom_right_and_empty_rows():
    torch.manual_seed(5)
    I, J = 4, 7
    q, k, v = rnd(2, 2, I, 8), rnd(2, 2, J, 8), rnd(2, 2, J, 8)
    keep = torch.ones(I, J, dtype=torch.bool).tril(J - I)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    out = cosine_sim_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, sdpa(qn, kn, v, scale=8.0, attn_mask=keep), **TOL)
    mask = torch.ones(2, J, dtype=torch.bool)
    mask[1] = False  # every key of sample 1 masked -> output 0 there
    out = cosine_sim_attention(q, k, v, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0], sdpa(qn, kn, v, scale=8.0)[0], **TOL)


# ---------------------------------------------------------------------------------------------
# 3. memory-efficient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,use_mask,use_bias", list(itertools.product([False, True], repeat=3)))
def test_memory_efficient_equals_sdpa(causal, use_mask, use_bias):
    torch.manual_seed(6)
    b, h, n, d = 2, 3, 12, 8
    q, k, v = rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d)
    mask = key_mask(b, n) if use_mask else None
    bias = rnd(h, n, n) if use_bias else None
    out = memory_efficient_attention(q, k, v, causal=causal, mask=mask, attn_bias=bias)
    if bias is None and not causal:
        ref = sdpa(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    elif bias is None:
        am = None if mask is None else mask[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
        ref = sdpa(q, k, v, is_causal=mask is None, attn_mask=am)
    else:
        fm = bias.expand(b, h, n, n).clone()
        if mask is not None:
            fm = fm.masked_fill(~mask[:, None, None, :], -math.inf)
        if causal:
            fm = fm.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        ref = sdpa(q, k, v, attn_mask=fm)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("I,J", [(5, 9), (9, 5), (7, 7)])
@pytest.mark.parametrize("alignment", ["bottom_right", "top_left", "flash"])
def test_memory_efficient_causal_alignments(I, J, alignment):
    torch.manual_seed(7)
    q, k, v = rnd(2, 2, I, 8), rnd(2, 2, J, 8), rnd(2, 2, J, 8)
    diag = {"bottom_right": J - I, "top_left": 0, "flash": -max(J - I, 0)}[alignment]
    keep = torch.ones(I, J, dtype=torch.bool).tril(diag)
    out = memory_efficient_attention(q, k, v, causal=True, causal_alignment=alignment)
    rows = keep.any(-1)
    ref = sdpa(q[:, :, rows], k, v, attn_mask=keep[rows])
    torch.testing.assert_close(out[:, :, rows], ref, **TOL)
    assert torch.equal(out[:, :, ~rows], torch.zeros_like(out[:, :, ~rows]))
    if I == J:  # all alignments agree
        torch.testing.assert_close(out, sdpa(q, k, v, is_causal=True), **TOL)


def test_memory_efficient_unknown_alignment_rejected():
    q = rnd(1, 1, 3, 4)
    with pytest.raises(ValueError):
        memory_efficient_attention(q, q, q, causal=True, causal_alignment="diagonal")


# ---------------------------------------------------------------------------------------------
# 4. talking heads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("causal,use_mask", list(itertools.product([False, True], repeat=2)))
def test_talking_heads_identity_mixing_is_plain_attention_with_sqrt_d(s, causal, use_mask):
    torch.manual_seed(8)
    b, h, n, d = 2, 3, 9, 16
    q, k, v = rnd(b * s, h, n, d), rnd(b * s, h, n, d), rnd(b * s, h, n, d)
    mask = key_mask(b * s, n) if use_mask else None
    eye = torch.eye(s * h, dtype=DT)
    out = talking_heads_attention(
        q, k, v, num_streams=s, pre_mix=eye, post_mix=eye, causal=causal, mask=mask
    )
    am = None
    if mask is not None:
        am = mask[:, None, None, :]
        if causal:
            am = am & torch.ones(n, n, dtype=torch.bool).tril()
    ref = sdpa(q, k, v, scale=d**0.5, attn_mask=am, is_causal=causal and mask is None)
    torch.testing.assert_close(out, ref, **TOL)
    out_none = talking_heads_attention(q, k, v, num_streams=s, causal=causal, mask=mask)
    torch.testing.assert_close(out_none, ref, **TOL)


def _talking_heads_loops(q, k, v, s, pre, post, causal):
    """Brute force: explicit loops over samples, streams and heads."""
    B, h, I, d = q.shape
    J = k.shape[-2]
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * d**0.5
    mixed = torch.zeros_like(sim)
    for bi in range(B // s):
        for so in range(s):
            for ho in range(h):
                acc = 0
                for si in range(s):
                    for hi in range(h):
                        acc = acc + pre[so * h + ho, si * h + hi] * sim[bi * s + si, hi]
                mixed[bi * s + so, ho] = acc
    if causal:
        mixed = mixed.masked_fill(torch.ones(I, J, dtype=torch.bool).triu(J - I + 1), -math.inf)
    p = mixed.softmax(-1)
    p2 = torch.zeros_like(p)
    for bi in range(B // s):
        for so in range(s):
            for ho in range(h):
                for si in range(s):
                    for hi in range(h):
                        p2[bi * s + so, ho] += post[so * h + ho, si * h + hi] * p[bi * s + si, hi]
    return p2 @ v


@pytest.mark.parametrize("s,causal", [(2, False), (2, True), (3, True)])
def test_talking_heads_mixing_matches_loops(s, causal):
    torch.manual_seed(9)
    b, h, n, d = 2, 2, 6, 4
    q, k, v = rnd(b * s, h, n, d), rnd(b * s, h, n, d), rnd(b * s, h, n, d)
    pre, post = rnd(s * h, s * h), rnd(s * h, s * h)
    out = talking_heads_attention(q, k, v, num_streams=s, pre_mix=pre, post_mix=post, causal=causal)
    torch.testing.assert_close(out, _talking_heads_loops(q, k, v, s, pre, post, causal), **TOL)
    # conv-shaped weights [(s h), (s h), 1, 1] are accepted too
    out4 = talking_heads_attention(
        q, k, v, num_streams=s, pre_mix=pre[..., None, None], post_mix=post[..., None, None], causal=causal
    )
    torch.testing.assert_close(out4, out, **TOL)


def test_talking_heads_fully_masked_rows_zero_before_post_mix():
    torch.manual_seed(10)
    s, b, h, n, d = 2, 1, 2, 5, 4
    q, k, v = rnd(b * s, h, n, d), rnd(b * s, h, n, d), rnd(b * s, h, n, d)
    mask = torch.ones(b * s, n, dtype=torch.bool)
    mask[0] = False  # stream 0 sees no key at all
    eye = torch.eye(s * h, dtype=DT)
    out = talking_heads_attention(q, k, v, num_streams=s, pre_mix=eye, post_mix=eye, mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1], sdpa(q, k, v, scale=d**0.5)[1], **TOL)
    # a [b, j] mask is shared by the streams of a sample
    m_b = key_mask(b, n)
    torch.testing.assert_close(
        talking_heads_attention(q, k, v, num_streams=s, mask=m_b),
        talking_heads_attention(q, k, v, num_streams=s, mask=m_b.repeat_interleave(s, 0)),
        **TOL,
    )


# ---------------------------------------------------------------------------------------------
# 5. local attention
# ---------------------------------------------------------------------------------------------


def _local_grid():
    for n, w, causal, lb, lf, exact, xpos in itertools.product(
        [1, 17, 33, 64], [4, 8, 16], [True, False], [1, 2], [0, 1], [False, True], [False, True]
    ):
        if causal and lf:
            continue
        yield n, w, causal, lb, lf, exact, xpos


@pytest.mark.parametrize("n,w,causal,lb,lf,exact,xpos", list(_local_grid()))
def test_local_windowed_equals_global(n, w, causal, lb, lf, exact, xpos):
    torch.manual_seed(11)
    q, k, v = rnd(2, 2, n, 8), rnd(2, 2, n, 8), rnd(2, 2, n, 8)
    kw = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf, exact_windowsize=exact, xpos=xpos)
    out = local_attention(q, k, v, **kw)
    assert out.shape == (2, 2, n, 8)
    torch.testing.assert_close(out, local_attention_global(q, k, v, **kw), **TOL)


@pytest.mark.parametrize(
    "n,w,causal,lb,lf,exact",
    [(17, 4, True, 1, 0, False), (17, 4, False, 1, 1, True), (33, 8, False, 2, 1, False), (30, 8, True, 2, 0, True)],
)
@pytest.mark.parametrize("shift", [None, 0, 3])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_local_windowed_equals_global_with_masks_bias_shift(n, w, causal, lb, lf, exact, shift, mask_padding):
    torch.manual_seed(12)
    b, h = 2, 3
    q, k, v = rnd(b, h, n, 8), rnd(b, h, n, 8), rnd(b, h, n, 8)
    mask = torch.rand(b, n) > 0.3
    table = rnd(h, (max(lb, lf) + 1) * w)
    kw = dict(window_size=w, causal=causal, look_backward=lb, look_forward=lf, exact_windowsize=exact, xpos=True,
              xpos_scale_base=3, mask=mask, pos_bias_table=table, rotary_query_shift=shift, mask_padding=mask_padding)
    out = local_attention(q, k, v, **kw)
    torch.testing.assert_close(out, local_attention_global(q, k, v, **kw), **TOL)
    # also without rotary (then only masks / bias remain)
    kw.update(rotary=False, xpos=False)
    torch.testing.assert_close(local_attention(q, k, v, **kw), local_attention_global(q, k, v, **kw), **TOL)


def _keep_brute_force(n, w, causal, lb, lf, exact):
    keep = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        wi = i // w
        frame = range(max(0, (wi - lb) * w), min(n, (wi + lf + 1) * w))  # keys of look-around windows
        for j in frame:
            ok = True
            if causal and j > i:
                ok = False
            if exact and (i - j > w * lb or (not causal and j - i > w * lf)):
                ok = False
            keep[i, j] = ok
    return keep


@pytest.mark.parametrize(
    "n,w,causal,lb,lf,exact",
    [(19, 4, True, 1, 0, False), (19, 4, True, 2, 0, True), (19, 4, False, 1, 1, False), (19, 4, False, 2, 1, True), (8, 16, False, 1, 1, False)],
)
def test_local_attention_support_is_the_look_around_windows(n, w, causal, lb, lf, exact):
    # v = identity makes the output the attention matrix itself; its support must be exactly the
    # brute-force look-around pattern.
    torch.manual_seed(13)
    q, k = rnd(1, 1, n, 8), rnd(1, 1, n, 8)
    v = torch.eye(n, dtype=DT)[None, None]
    p = local_attention(q, k, v, window_size=w, causal=causal, look_backward=lb, look_forward=lf, exact_windowsize=exact)
    assert torch.equal(p[0, 0] > 0, _keep_brute_force(n, w, causal, lb, lf, exact))
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 1, n, dtype=DT), **TOL)


def _rope_complex(x, pos):
    """Independent rotary: halves (x1, x2) as the complex number x1 + i x2, times e^{i pos θ}."""
    d = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=DT) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(
        torch.ones(len(pos), d // 2, dtype=DT), pos[:, None].to(DT) * theta
    )
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("causal,lf", [(True, 0), (False, 1), (False, 2)])
def test_local_single_window_rotary_quirk(causal, lf):
    # One window covers the whole sequence, so local attention is plain attention with rotary;
    # upstream places queries lf * w positions after keys (the quirk).
    torch.manual_seed(14)
    n, w, d = 10, 16, 8
    q, k, v = rnd(2, 2, n, d), rnd(2, 2, n, d), rnd(2, 2, n, d)
    pos = torch.arange(n)
    out = local_attention(q, k, v, window_size=w, causal=causal, look_forward=lf)
    ref = sdpa(_rope_complex(q, pos + lf * w), _rope_complex(k, pos), v, is_causal=causal)
    torch.testing.assert_close(out, ref, **TOL)
    out0 = local_attention(q, k, v, window_size=w, causal=causal, look_forward=lf, rotary_query_shift=0)
    ref0 = sdpa(_rope_complex(q, pos), _rope_complex(k, pos), v, is_causal=causal)
    torch.testing.assert_close(out0, ref0, **TOL)
    if lf:
        assert not torch.allclose(out, out0)
    plain = local_attention(q, k, v, window_size=w, causal=causal, look_forward=lf, rotary=False)
    torch.testing.assert_close(plain, sdpa(q, k, v, is_causal=causal), **TOL)
    scaled = local_attention(q, k, v, window_size=w, causal=causal, look_forward=lf, rotary=False, scale=0.3)
    torch.testing.assert_close(scaled, sdpa(q, k, v, is_causal=causal, scale=0.3), **TOL)


def test_local_xpos_is_relative_decay():
    # xpos: score(i, j) = sum_d rot(q_i)_d rot(k_j)_d * sv_d ** ((i + s - j) / sb), built here as an
    # explicit [i, j, d] factor (no per-position factorisation, no centring).
    torch.manual_seed(15)
    n, w, d, lf, sb = 12, 16, 8, 1, 5
    q, k, v = rnd(1, 2, n, d), rnd(1, 2, n, d), rnd(1, 2, n, d)
    pos = torch.arange(n)
    s = lf * w
    rq, rk = _rope_complex(q, pos + s), _rope_complex(k, pos)
    sv = (torch.arange(0, d, 2, dtype=DT) + 0.4 * d) / (1.4 * d)
    sv = torch.cat((sv, sv))
    rel = (pos[:, None] + s - pos[None, :]).to(DT) / sb  # [i, j]
    factor = sv[None, None, :] ** rel[:, :, None]  # [i, j, d]
    scores = torch.einsum("bhid,bhjd,ijd->bhij", rq, rk, factor) * d**-0.5
    ref = scores.softmax(-1) @ v
    out = local_attention(q, k, v, window_size=w, causal=False, look_forward=lf, xpos=True, xpos_scale_base=sb)
    torch.testing.assert_close(out, ref, **TOL)
    # default scale base is w // 2
    torch.testing.assert_close(
        local_attention(q, k, v, window_size=w, causal=False, xpos=True),
        local_attention(q, k, v, window_size=w, causal=False, xpos=True, xpos_scale_base=w // 2),
        **TOL,
    )


def test_local_pos_bias_table_and_key_mask():
    torch.manual_seed(16)
    b, h, n, w, d = 2, 3, 9, 16, 8
    q, k, v = rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d)
    table = rnd(h, n)
    mask = key_mask(b, n)
    out = local_attention(q, k, v, window_size=w, causal=False, rotary=False, pos_bias_table=table, mask=mask)
    i = torch.arange(n)
    fm = table[:, (i[:, None] - i[None, :]).abs()][None].expand(b, h, n, n)
    fm = fm.masked_fill(~mask[:, None, None, :], -math.inf)
    torch.testing.assert_close(out, sdpa(q, k, v, attn_mask=fm), **TOL)


def test_local_padding_keys_upstream_quirk():
    # mask_padding=False keeps auto-padding's zero keys in the softmax (upstream with mask=None).
    # Equivalent by construction: pad q, k, v with real zero rows to a multiple of w ourselves.
    torch.manual_seed(17)
    n, w = 13, 4
    n_pad = 16
    q, k, v = rnd(1, 2, n, 8), rnd(1, 2, n, 8), rnd(1, 2, n, 8)
    kw = dict(window_size=w, causal=False, look_forward=1, xpos=True)
    quirk = local_attention(q, k, v, mask_padding=False, **kw)
    qp, kp, vp = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (q, k, v))
    torch.testing.assert_close(quirk, local_attention(qp, kp, vp, **kw)[:, :, :n], **TOL)
    masked = local_attention(q, k, v, **kw)
    assert not torch.allclose(quirk, masked)  # the last windows do see the phantom keys
    torch.testing.assert_close(quirk[:, :, : 2 * w], masked[:, :, : 2 * w], **TOL)  # far windows do not
    # causal: padded keys are in every query's future, so the flag makes no difference
    kw["causal"], kw["look_forward"] = True, 0
    torch.testing.assert_close(
        local_attention(q, k, v, mask_padding=False, **kw), local_attention(q, k, v, **kw), **TOL
    )


def test_local_fully_masked_rows_are_zero_and_bad_args_rejected():
    torch.manual_seed(18)
    n, w = 12, 4
    q, k, v = rnd(1, 1, n, 8), rnd(1, 1, n, 8), rnd(1, 1, n, 8)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, :8] = False  # queries in windows 0 and 1 see no kept key (causal, lb=1)
    for fn in (local_attention, local_attention_global):
        out = fn(q, k, v, window_size=w, causal=True, mask=mask)
        assert torch.equal(out[0, 0, :8], torch.zeros(8, 8, dtype=DT))
        assert out[0, 0, 8:].abs().sum() > 0
    with pytest.raises(ValueError):
        local_attention(q, k, v, window_size=w, causal=True, look_forward=1)
    with pytest.raises(ValueError):
        local_attention(q, k, v, window_size=w, rotary=False, xpos=True)
