"""Each spec reproduces its seed library, checked against the hand-written oracles in
tests/oracles.py (independent of the compiler), quirk settings included, in float64."""
import pytest
import torch

import kernelsearch

from . import oracles
from .conftest import spec_path

BACKENDS = [("reference", None), ("torch", {"lowering": "materialized"}),
            ("torch", {"lowering": "chunked", "CHUNK_N": 8, "CHUNK_M": 16})]


def _load(name, backend, **params):
    backend, config = backend
    return kernelsearch.load(spec_path(name), backend=backend, config=config, **params)


def _qkv(b, h, i, j, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (i, j, j)]


def _mask(b, j, seed):
    g = torch.Generator().manual_seed(seed + 100)
    mask = torch.rand(b, j, generator=g) < 0.7
    mask[:, 0] = True   # the seeds differ on fully masked rows; our semantics are tested elsewhere
    return mask


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0] + (b[1] or {}).get("lowering", ""))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("I,J", [(17, 17), (9, 23)])
def test_softmax_is_mesh_tensorflow_with_scale_1(backend, causal, I, J):
    q, k, v = _qkv(2, 3, I, J, 16, seed=I + J)
    attention = _load("softmax", backend, scale=1.0, causal=causal)    # the seed does not scale
    torch.testing.assert_close(attention(q, k, v), oracles.mesh_tf_attention(q, k, v, causal=causal))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0] + (b[1] or {}).get("lowering", ""))
@pytest.mark.parametrize("scale", [8.0, 10.0])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_cosine_sim(backend, scale, groups, causal):
    q, k, v = _qkv(2, 3, 13, 21, 16, seed=groups)
    mask = _mask(2, 21, groups)
    bias = torch.randn(3, 13, 21, dtype=torch.float64)
    attention = _load("cosine_sim", backend, scale=scale, groups=groups, causal=causal)
    expected = oracles.cosine_sim_attention(q, k, v, scale=scale, groups=groups, causal=causal, mask=mask,
                                            attn_bias=bias)
    torch.testing.assert_close(attention(q, k, v, mask=mask, attn_bias=bias), expected)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0] + (b[1] or {}).get("lowering", ""))
@pytest.mark.parametrize("alignment", ["bottom_right", "top_left", "flash"])
@pytest.mark.parametrize("I,J", [(16, 16), (11, 29), (29, 11)])
def test_memory_efficient_causal_alignments(backend, alignment, I, J):
    q, k, v = _qkv(2, 2, I, J, 8, seed=I * J)
    mask = _mask(2, J, I)
    bias = torch.randn(2, 2, I, J, dtype=torch.float64)
    attention = _load("memory_efficient", backend, causal=True, causal_alignment=alignment)
    expected = oracles.memory_efficient_attention(q, k, v, causal=True, mask=mask, attn_bias=bias,
                                                  causal_alignment=alignment)
    torch.testing.assert_close(attention(q, k, v, mask=mask, attn_bias=bias), expected)


LOCAL_SETTINGS = [
    dict(window_size=4, causal=True, look_backward=1),
    dict(window_size=4, causal=True, look_backward=2, exact_windowsize=True),
    dict(window_size=8, causal=True, look_backward=1, xpos=True),
    dict(window_size=4, causal=False, look_backward=1, look_forward=1),                      # the shifted-query quirk
    dict(window_size=4, causal=False, look_backward=1, look_forward=1, exact_windowsize=True, xpos=True),
    dict(window_size=8, causal=False, look_backward=0, look_forward=1, rotary=False),
]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0] + (b[1] or {}).get("lowering", ""))
@pytest.mark.parametrize("setting", LOCAL_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("n", [16, 19])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "mask+bias-table"])
def test_local_windows_rotary_xpos_and_bias_table(backend, setting, n, with_extras):
    q, k, v = _qkv(2, 2, n, n, 8, seed=n)
    extras = {}
    if with_extras:
        extras = {"mask": _mask(2, n, n), "pos_bias_table": torch.randn(2, n, dtype=torch.float64)}
    look_forward = setting.get("look_forward", 0 if setting["causal"] else 1)
    # the seed's rotary places queries look_forward windows later (its look-around frame)
    params = dict(setting, rotary_query_offset=look_forward * setting["window_size"])
    attention = _load("local", backend, **params)
    expected = oracles.local_attention(q, k, v, **setting, **extras)
    torch.testing.assert_close(attention(q, k, v, **extras), expected)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0] + (b[1] or {}).get("lowering", ""))
@pytest.mark.parametrize("pre,post", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("causal", [False, True])
def test_talking_heads_two_streams(backend, pre, post, causal):
    streams, heads, d = 2, 3, 8
    q, k, v = _qkv(2 * streams, heads, 12, 12, d, seed=7)
    mask = _mask(2 * streams, 12, 3)
    g = torch.Generator().manual_seed(11)
    pre_mix = torch.eye(streams * heads, dtype=torch.float64) + 0.5 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    post_mix = torch.eye(streams * heads, dtype=torch.float64) + 0.5 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    # the seed multiplies q by +sqrt(d)
    attention = _load("talking_heads", backend, scale=d ** 0.5, num_streams=streams, causal=causal,
                      pre_talking_heads=pre, post_talking_heads=post)
    expected = oracles.talking_heads_attention(q, k, v, num_streams=streams, pre_mix=pre_mix if pre else None,
                                               post_mix=post_mix if post else None, causal=causal, mask=mask)
    torch.testing.assert_close(attention(q, k, v, mask=mask, pre_mix=pre_mix, post_mix=post_mix), expected)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0] + (b[1] or {}).get("lowering", ""))
def test_local_qk_rmsnorm_is_fused(backend):
    """LocalMHA's qk-rmsnorm (l2norm, learned per-dim scales, scale 8) inside the attention."""
    q, k, v = _qkv(2, 2, 20, 20, 8, seed=5)
    q_scale, k_scale = torch.rand(8, dtype=torch.float64) + 0.5, torch.rand(8, dtype=torch.float64) + 0.5
    attention = _load("local", backend, window_size=4, qk_rmsnorm=True, scale=8.0)
    normalise = torch.nn.functional.normalize
    expected = oracles.local_attention(normalise(q, dim=-1) * q_scale, normalise(k, dim=-1) * k_scale, v,
                                       window_size=4, scale=8.0)
    torch.testing.assert_close(attention(q, k, v, q_scale=q_scale, k_scale=k_scale), expected)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[0] + (b[1] or {}).get("lowering", ""))
def test_lm_attention_blocks_own_the_seeds_learned_inputs(backend):
    """The seed LMs' attention blocks (kernelsearch.nn.Attention) with their learned inputs moved off
    their start: talking heads' mixers and local's qk-rmsnorm scales are the seeds' weights."""
    from kernelsearch.models import local, talking_heads
    g = torch.Generator().manual_seed(3)
    streams, heads, d = 2, 3, 8
    attention = _load("talking_heads", backend, scale=d ** 0.5, num_streams=streams, causal=True)
    block = talking_heads.Attention(dim=16, heads=heads, dim_head=d, mix_streams=streams, pre_talking_heads=True,
                                    post_talking_heads=True, attn=attention).double()
    local_block = local.LocalMHA(dim=16, heads=2, dim_head=d, qk_rmsnorm=True,
                                 attn=_load("local", backend, window_size=4, qk_rmsnorm=True, scale=8.0)).double()
    assert list(block.learned.keys()) == ["pre_mix", "post_mix"]
    assert list(local_block.learned.keys()) == ["q_scale", "k_scale"]
    with torch.no_grad():
        for weight in [*block.learned.values(), *local_block.learned.values()]:
            weight.add_(0.5 * torch.randn(weight.shape, generator=g, dtype=torch.float64))
    q, k, v = _qkv(2 * streams, heads, 12, 12, d, seed=13)
    mask = _mask(2 * streams, 12, 5)
    pre_mix, post_mix = (w.detach() for w in block.learned.values())
    expected = oracles.talking_heads_attention(q, k, v, num_streams=streams, pre_mix=pre_mix, post_mix=post_mix,
                                               causal=True, mask=mask)
    torch.testing.assert_close(block.attend(q, k, v, mask=mask), expected)
    q, k, v = _qkv(2, 2, 20, 20, d, seed=17)
    normalise = torch.nn.functional.normalize
    q_scale, k_scale = (w.detach() for w in local_block.learned.values())
    expected = oracles.local_attention(normalise(q, dim=-1) * q_scale, normalise(k, dim=-1) * k_scale, v,
                                       window_size=4, scale=8.0)
    torch.testing.assert_close(local_block.attend(q, k, v), expected)
