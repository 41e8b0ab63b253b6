"""kernelsearch.nn.Attention: learned inputs as parameters, projections, torch.compile, state_dict."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

import kernelsearch
from kernelsearch.errors import UsageError
from kernelsearch.nn import Attention, merge_heads, split_heads

from .conftest import spec_path


def _x(b=2, n=13, dim=32, seed=0, dtype=torch.float64):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_learned_inputs_start_where_the_seeds_start_them():
    heads = Attention(spec_path("talking_heads"), heads=2, dim=32, backend="reference")
    assert list(heads.learned.keys()) == ["pre_mix", "post_mix"]
    for w in heads.learned.values():
        torch.testing.assert_close(w.detach(), torch.eye(4))          # [(s h), (s h)] identity, s = 2
    local = Attention(spec_path("local"), heads=2, dim_head=16, projections=False, qk_rmsnorm=True,
                      sizes={"n": 64}, backend="reference")
    assert {k: tuple(v.shape) for k, v in local.learned.items()} == {
        "pos_bias_table": (2, 64), "q_scale": (16,), "k_scale": (16,)}
    assert torch.equal(local.learned["pos_bias_table"], torch.zeros(2, 64))    # zero bias table
    assert torch.equal(local.learned["q_scale"], torch.ones(16))               # unit scales
    # params decide what the spec reads: without talking heads before softmax there is no pre_mix
    post_only = Attention(spec_path("talking_heads"), heads=2, dim=32, pre_talking_heads=False)
    assert list(post_only.learned.keys()) == ["post_mix"]


def test_identity_start_is_the_spec_without_the_learned_inputs():
    module = Attention(spec_path("talking_heads"), heads=2, dim_head=8, projections=False, backend="reference")
    plain = kernelsearch.load(spec_path("talking_heads"), backend="reference")
    q, k, v = (torch.randn(4, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(module(q, k, v), plain(q, k, v))     # absent mixing = identity


def test_projections_are_a_standard_multi_head_attention():
    module = Attention(spec_path("softmax"), heads=4, dim=32, backend="reference", causal=True).double()
    x, context = _x(), _x(n=21, seed=1)
    plain = kernelsearch.load(spec_path("softmax"), backend="reference", causal=True)

    def heads(t):
        return rearrange(t, "b n (h d) -> b h n d", h=4)
    for source in (x, context):
        expected = module.to_out(rearrange(plain(heads(module.to_q(x)), heads(module.to_k(source)),
                                                 heads(module.to_v(source))), "b h n d -> b n (h d)"))
        got = module(x) if source is x else module(x, context)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_kv_heads_project_grouped_keys_and_values(kv_heads):
    """kv_heads < heads: to_k, to_v make kv_heads heads, passed as they are (no repeat); query head h
    reads KV head h // (heads / kv_heads) - the definition here repeats them."""
    module = Attention(spec_path("gqa"), heads=4, kv_heads=kv_heads, dim=32, backend="torch").double()
    assert module.to_k.out_features == module.to_v.out_features == kv_heads * 8
    x = _x()
    q = rearrange(module.to_q(x), "b n (h d) -> b h n d", h=4)
    k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=kv_heads).repeat_interleave(4 // kv_heads, 1)
            for p in (module.to_k, module.to_v))
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 8 ** -0.5
    s = s.masked_fill(torch.ones(13, 13, dtype=torch.bool).triu(1), float("-inf"))
    expected = module.to_out(rearrange(torch.softmax(s, -1) @ v, "b h n d -> b n (h d)"))
    torch.testing.assert_close(module(x), expected)


def test_gradients_reach_learned_inputs_and_match_the_reference():
    mask = torch.rand(4, 11, generator=torch.Generator().manual_seed(3)) < 0.8
    grads = {}
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        module = Attention(spec_path("talking_heads"), heads=2, dim=16, backend=backend,
                           init={"pre_mix": torch.eye(4) + 0.1 * torch.randn(4, 4)}).double()
        module(_x(b=4, n=11, dim=16), mask=mask).square().sum().backward()
        grads[backend] = {n: p.grad for n, p in module.named_parameters()}
    assert set(grads["torch"]) == {"learned.pre_mix", "learned.post_mix", "to_q.weight", "to_k.weight",
                                   "to_v.weight", "to_out.weight"}
    for name, g in grads["reference"].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads["torch"][name], g)


def test_torch_compile_fullgraph():
    module = Attention(spec_path("talking_heads"), heads=2, dim=32, backend="torch", causal=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x, mask = _x(b=4, n=9, dtype=torch.float32), torch.ones(4, 9, dtype=torch.bool)
    torch.testing.assert_close(compiled(x, mask=mask), module(x, mask=mask))
    compiled(x, mask=mask).sum().backward()
    assert module.learned["pre_mix"].grad is not None


def test_state_dict_round_trip():
    torch.manual_seed(1)
    a = Attention(spec_path("local"), heads=2, dim=32, sizes={"n": 32}, window_size=8, backend="torch")
    with torch.no_grad():
        a.learned["pos_bias_table"].normal_()
    state = a.state_dict()
    assert set(state) == {"learned.pos_bias_table", "to_q.weight", "to_k.weight", "to_v.weight", "to_out.weight"}
    torch.manual_seed(2)
    b = Attention(spec_path("local"), heads=2, dim=32, sizes={"n": 32}, window_size=8, backend="torch")
    b.load_state_dict(state)
    x = _x(n=17, dtype=torch.float32)
    torch.testing.assert_close(b(x), a(x))


def test_the_attention_is_kernelsearch_load_shared_between_layers():
    config = {"lowering": "chunked", "CHUNK_N": 16}
    layers = [Attention(spec_path("softmax"), heads=2, dim=32, backend="torch", config=config, causal=True)
              for _ in range(2)]
    assert layers[0].attention is layers[1].attention
    assert layers[0].attention.config == config and layers[0].attention.backend == "torch"
    layers[0](_x(dtype=torch.float32))
    assert layers[0].attention.last_config["lowering"] == "chunked"
    other = Attention(spec_path("softmax"), heads=2, dim=32, backend="torch", causal=False)
    assert other.attention is not layers[0].attention


def test_a_loaded_attention_is_used_as_it_is():
    loaded = kernelsearch.load(spec_path("talking_heads"), backend="reference", causal=True)
    module = Attention(loaded, heads=2, dim=32)
    assert module.attention is loaded and list(module.learned.keys()) == ["pre_mix", "post_mix"]
    with pytest.raises(UsageError, match="not both"):
        Attention(loaded, heads=2, dim=32, causal=False)


def test_clear_refusals():
    with pytest.raises(UsageError, match=r"kv_heads \(3\) must divide heads \(4\)"):
        Attention(spec_path("softmax"), heads=4, kv_heads=3, dim=32)
    with pytest.raises(UsageError, match=r"'pos_bias_table' \[h, n\] needs the size of its dim 'n': pass sizes="):
        Attention(spec_path("local"), heads=2, dim=32)
    with pytest.raises(UsageError, match="needs dim_head, or a dim divisible by heads"):
        Attention(spec_path("softmax"), heads=3, dim=32)
    with pytest.raises(UsageError, match=r"'mask' cannot be a learned input"):
        Attention(spec_path("softmax"), heads=2, dim=32, learned=["mask"])
    with pytest.raises(UsageError, match=r"init= names \['sinks'\]"):
        Attention(spec_path("talking_heads"), heads=2, dim=32, init={"sinks": 0.0})
    with pytest.raises(kernelsearch.SpecError, match="unknown param"):
        Attention(spec_path("softmax"), heads=2, dim=32, casual=True)
    module = Attention(spec_path("talking_heads"), heads=2, dim=32)
    with pytest.raises(TypeError, match="learned parameters of this module"):
        module(_x(b=4, dtype=torch.float32), pre_mix=torch.eye(4))


def test_learned_per_call_when_left_out():
    module = Attention(spec_path("local"), heads=2, dim=32, learned=[], window_size=8, backend="reference").double()
    table = torch.randn(2, 13, dtype=torch.float64)
    assert len(module.learned) == 0
    assert not torch.allclose(module(_x(), pos_bias_table=table), module(_x()))


def test_none_is_an_input_not_given():
    """A model passes mask=mask whether or not it has one, whatever inputs its spec declares."""
    no_mask = kernelsearch.load("name: plain\ninputs: {q: [b, h, i, d], k: [b, h, j, d], v: [b, h, j, d]}\n"
                                "graph:\n  p: softmax(dot(q, k))\n  o: dot(p, v)\noutputs: [o]\n", backend="reference")
    module = Attention(no_mask, heads=2, dim=32).double()
    x = _x()
    torch.testing.assert_close(module(x, mask=None), module(x))
    with pytest.raises(TypeError, match=r"unexpected input\(s\) \['mask'\]"):
        module(x, mask=torch.ones(2, 13, dtype=torch.bool))


def test_split_and_merge_heads_are_the_einops_layout():
    t = torch.arange(2 * 5 * 12).reshape(2, 5, 12)
    heads = split_heads(t, 3)
    assert heads.shape == (2, 3, 5, 4) and torch.equal(heads[1, 2, 4], t[1, 4, 8:12])
    assert torch.equal(merge_heads(heads), t)
