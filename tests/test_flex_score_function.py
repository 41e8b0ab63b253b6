"""FlexAttention for scores that are any elementwise function of q.k (issue 15).

passes/library.py recognises, from the graph's structure, scores made from one dot(q, k) by
elementwise ops and per-element terms (host scalars, indices, inputs over b, h, i, j): SDPA
cannot run them (it adds a bias to scaled scores, nothing else), FlexAttention can, with the
whole path from the dot to the scores as its score_mod. Compared with an independent float64
definition written here. FlexAttention has no backward on the CPU, so forward only.
"""
import math

import pytest
import torch

import kernelsearch
from kernelsearch.backends.knobs import ConfigError
from kernelsearch.inputs import random_inputs
from kernelsearch.passes import library
from kernelsearch.tune.space import torch_space

from .conftest import spec_path

# a per-head cap (an input over h), an index term, a bias scaled after it is added
PER_HEAD_CAP = """
name: per_head_cap
params: {scale: {type: float, default: "D ** -0.5"}}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  cap: [h]
  mask: {shape: [b, j], dtype: bool, optional: true}
graph:
  s: cap * tanh((dot(q, k) + 0.5 * (j - i) / J) * scale / cap)
  p: softmax(s, keep=[mask])
  o: dot(p, v)
outputs: [o]
"""


def _attention(q, k, v, scores_of, keep):
    """float64 softmax attention of scores_of(q.k) [b, h, i, j] with keep [b, h, i, j] (a row that
    keeps nothing gives 0)."""
    s = scores_of(torch.einsum("bhid,bhjd->bhij", q, k)).masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhij,bhjd->bhid", p, v)


def _softcap(t, I, J, causal, cap=30.0):
    i, j = torch.arange(I)[:, None], torch.arange(J)[None, :]
    keep = torch.ones(I, J, dtype=torch.bool) if not causal else (j <= i + J - I)
    keep = keep[None, None] & (t["mask"][:, None, None, :] if "mask" in t else True)
    scale = t["q"].shape[-1] ** -0.5
    return _attention(t["q"], t["k"], t["v"], lambda s: cap * torch.tanh(s * scale / cap), keep)


def _per_head_cap(t, I, J):
    i, j = torch.arange(I, dtype=torch.float64)[:, None], torch.arange(J, dtype=torch.float64)[None, :]
    cap = t["cap"][None, :, None, None]
    scale = t["q"].shape[-1] ** -0.5
    keep = t["mask"][:, None, None, :].expand(-1, t["q"].shape[1], I, J)
    return _attention(t["q"], t["k"], t["v"], lambda s: cap * torch.tanh((s + 0.5 * (j - i) / J) * scale / cap), keep)


def _float32(tensors):
    return {n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}


@pytest.mark.parametrize("causal, optional, I, J", [(True, False, 17, 33), (False, True, 130, 260),
                                                    (True, True, 33, 17)])
def test_softcap_runs_flex_and_matches_float64(causal, optional, I, J):
    flex = kernelsearch.load(spec_path("softcap"), backend="torch", config={"lowering": "flex"}, causal=causal,
                             cap=5.0)
    tensors = random_inputs(flex.spec, dict(B=2, H=2, I=I, J=J, D=16), dtype=torch.float64, seed=I + J,
                            optional=optional)
    tensors["q"] = tensors["q"] * 4.0   # scores large enough that the cap bends them
    if optional:
        tensors["mask"][0] = False      # sample 0 keeps no key: its rows give 0
    expected = _softcap(tensors, I, J, causal, cap=5.0)
    assert (tensors["q"] @ tensors["k"].transpose(-1, -2)).abs().max() * 16 ** -0.5 > 10.0
    with torch.no_grad():
        got = flex(**_float32(tensors))
    torch.testing.assert_close(got.double(), expected, rtol=3e-5, atol=3e-5)
    reference = kernelsearch.load(spec_path("softcap"), backend="reference", causal=causal, cap=5.0)
    torch.testing.assert_close(reference(**tensors), expected, rtol=1e-10, atol=1e-10)   # the test's own definition


def test_a_score_function_of_per_head_inputs_and_indices_runs_flex():
    flex = kernelsearch.load(PER_HEAD_CAP, backend="torch", config={"lowering": "flex"})
    tensors = random_inputs(flex.spec, dict(B=2, H=3, I=130, J=77, D=8), dtype=torch.float64, seed=5)
    tensors["cap"] = 1.0 + torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tensors["mask"][1] = False
    with torch.no_grad():
        got = flex(**_float32(tensors))
    torch.testing.assert_close(got.double(), _per_head_cap(tensors, 130, 77), rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("source, params, why", [(spec_path("softcap"), {}, "tanh"),
                                                 (spec_path("softcap"), {"causal": False}, "tanh"),
                                                 (PER_HEAD_CAP, {}, "not a host scalar")])
def test_a_score_function_is_offered_flex_and_refused_sdpa(source, params, why):
    attention = kernelsearch.load(source, backend="torch", config={"lowering": "sdpa"}, **params)
    for present in (frozenset(), None):
        graph = attention.graph(present)
        assert library.lowerings(graph) == ("flex",)
        assert why in library.why_not(graph, "sdpa") and library.why_not(graph, "flex") is None
        # softcap's leading `* scale / cap` is FlexAttention's scale; the per-head cap's sum is not a product
        form = library.library_form(graph)
        assert [op for op, _ in form.scale] == (["mul", "div"] if why == "tanh" else [])
        assert graph.node(form.score_function[-1]).op == "mul" and len(form.score_function) == (3 if why == "tanh" else 6)
    tensors = random_inputs(attention.spec, dict(B=1, H=2, I=4, J=5, D=8))
    with pytest.raises(ConfigError, match=f"lowering='sdpa' cannot run .*{why}.*its lowerings are materialized, chunked, flex"):
        attention(**tensors)
    if source.endswith(".yaml"):
        spec = kernelsearch.load(source, backend="reference").spec
        space = torch_space(spec, {"B": 1, "H": 4, "I": 512, "J": 512, "D": 64}, params=params, present=())
        assert space.knob("lowering").choices == ("materialized", "chunked", "flex")


def test_flex_score_function_has_no_cpu_backward_and_says_so():
    flex = kernelsearch.load(spec_path("softcap"), backend="torch", config={"lowering": "flex"})
    tensors = random_inputs(flex.spec, dict(B=1, H=1, I=4, J=4, D=8), optional=False)
    q = tensors["q"].requires_grad_()
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        flex(q, tensors["k"], tensors["v"])
