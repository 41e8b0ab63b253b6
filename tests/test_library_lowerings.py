"""The torch backend's library lowerings: "sdpa" (F.scaled_dot_product_attention) and "flex"
(FlexAttention) after the generated q/k/v prologues (passes/library.py decides where they fit).

Against the float64 reference: odd sizes, I != J, several query blocks, masks with fully masked
rows, biases, gradients; and each lowering offered only for graphs it can express.
"""
import pytest
import torch

import kernelsearch
from kernelsearch.backends import library_calls
from kernelsearch.backends.knobs import ConfigError
from kernelsearch.codegen.files import torch_file
from kernelsearch.inputs import random_inputs
from kernelsearch.passes import library
from kernelsearch.tune.space import torch_space

from .conftest import spec_path

CASES = [
    ("softmax", {}), ("softmax", {"causal": True}), ("softmax", {"scale": 1.0, "causal": True}),
    ("cosine_sim", {}), ("cosine_sim", {"causal": False, "groups": 2, "scale": 10.0}),
    ("memory_efficient", {"causal": True}), ("memory_efficient", {"causal": True, "causal_alignment": "top_left"}),
    ("local", {"window_size": 8}),
    ("local", {"window_size": 8, "causal": False, "look_backward": 2, "exact_windowsize": True, "xpos": True}),
    ("talking_heads", {"pre_talking_heads": False, "post_talking_heads": False}),
]
SIZES = [(1, 1), (17, 33), (33, 17), (130, 260)]   # 130 x 260: several of FlexAttention's 128-blocks


def _case_id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def _inputs(spec, I, J, seed, optional, params, D=16):
    tensors = random_inputs(spec, dict(B=2, H=2, I=I, J=J, D=D), dtype=torch.float64, seed=seed,
                            optional=optional, params=params)
    if "mask" in tensors and optional:
        tensors["mask"][0] = False   # sample 0 keeps no key: its rows give 0
    return tensors


def _cast(tensors, dtype):
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("optional", [False, True], ids=["bare", "all-inputs"])
def test_sdpa_matches_reference_in_float64(case, optional):
    name, params = case
    reference = kernelsearch.load(spec_path(name), backend="reference", **params)
    sdpa = kernelsearch.load(spec_path(name), backend="torch", config={"lowering": "sdpa"}, **params)
    for seed, (I, J) in enumerate(SIZES):
        tensors = _inputs(reference.spec, I, J, seed, optional, params)
        expected = reference(**tensors)
        got = sdpa(**tensors)
        assert sdpa.last_config["lowering"] == "sdpa"
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=f"I={I} J={J}")


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[8]], ids=_case_id)
def test_sdpa_gradients_match_reference(case):
    name, params = case
    reference = kernelsearch.load(spec_path(name), backend="reference", **params)
    sdpa = kernelsearch.load(spec_path(name), backend="torch", config={"lowering": "sdpa"}, **params)
    tensors = _inputs(reference.spec, 11, 21, 3, True, params, D=8)
    differentiable = [n for n, t in tensors.items() if t.is_floating_point()]
    grads = {}
    for backend in (reference, sdpa):
        leaves = {n: t.clone().requires_grad_(n in differentiable) for n, t in tensors.items()}
        out = backend(**leaves)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
        grads[backend.backend] = {n: leaves[n].grad for n in differentiable}
    for n in differentiable:
        if grads["reference"][n] is None:
            assert grads["torch"][n] is None, n
            continue
        torch.testing.assert_close(grads["torch"][n], grads["reference"][n], rtol=1e-9, atol=1e-9, msg=n)


FLEX_CASES = [CASES[4], CASES[8]]   # inputs indexed per element in both mods; a gathered table and windows


@pytest.mark.parametrize("case", FLEX_CASES, ids=_case_id)
def test_flex_matches_reference(case):
    """FlexAttention runs float32 on the CPU: compared with the float64 reference at fp32 tolerance."""
    name, params = case
    reference = kernelsearch.load(spec_path(name), backend="reference", **params)
    flex = kernelsearch.load(spec_path(name), backend="torch", config={"lowering": "flex"}, **params)
    for seed, (I, J) in enumerate([(17, 33), (130, 260)]):   # FlexAttention compiles per shape: slow
        tensors = _inputs(reference.spec, I, J, seed, True, params)
        expected = reference(**tensors)
        got = flex(**_cast(tensors, torch.float32))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=2e-5, msg=f"I={I} J={J}")


def test_flex_says_what_it_cannot_run_on_the_cpu():
    flex = kernelsearch.load(spec_path("softmax"), backend="torch", config={"lowering": "flex"})
    tensors = random_inputs(flex.spec, dict(B=1, H=1, I=4, J=4, D=8), dtype=torch.float64)
    with pytest.raises(TypeError, match="flex lowering runs float32"):
        flex(**tensors)
    q, k, v = (tensors[n].float().requires_grad_() for n in ("q", "k", "v"))
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        flex(q, k, v)


MIXED_AFTER_SOFTMAX = """
name: squared_post
params: {}
inputs: {q: [b, h, i, d], k: [b, h, j, d], v: [b, h, j, d]}
graph:
  s: dot(q, k)
  p: softmax(s)
  p2: p * p
  o: dot(p2, v)
outputs: [o]
"""
TWO_DOTS = """
name: two_dots
params: {}
inputs: {q: [b, h, i, d], k: [b, h, j, d], v: [b, h, j, d]}
graph:
  s: tanh(dot(q, k) / 8.0) * dot(q * 2.0, k)
  p: softmax(s)
  o: dot(p, v)
outputs: [o]
"""


def _graph(source, present=None, **params):
    attention = kernelsearch.load(source, backend="reference", **params)
    return attention.graph(present)


@pytest.mark.parametrize("source, present, params, why", [
    (spec_path("talking_heads"), None, {}, "heads are mixed"),
    (MIXED_AFTER_SOFTMAX, None, {}, "transformed"),
    (TWO_DOTS, None, {}, "one dot"),   # an elementwise function of the scores runs flex: test_flex_score_function.py
])
def test_library_lowerings_are_offered_only_for_graphs_they_express(source, present, params, why):
    graph = _graph(source, present, **params)
    assert library.lowerings(graph) == ()
    assert why in library.library_form(graph)
    assert "def sdpa(" not in torch_file(graph).source
    attention = kernelsearch.load(source, backend="torch", config={"lowering": "sdpa"}, **params)
    tensors = random_inputs(attention.spec, dict(B=2, H=2, I=4, J=4, D=8))
    with pytest.raises(ConfigError, match=f"lowering='sdpa' cannot run .*{why}.*its lowerings are materialized, chunked"):
        attention(**tensors)


def test_library_lowerings_are_in_the_tuners_space_where_they_fit():
    sizes = {"B": 1, "H": 4, "I": 512, "J": 512, "D": 64}
    for name, expected in (("softmax", ("sdpa", "flex")), ("local", ("sdpa", "flex")), ("talking_heads", ())):
        spec = kernelsearch.load(spec_path(name), backend="reference").spec
        (lowering,) = [k for k in torch_space(spec, sizes).knobs if k.name == "lowering"]
        assert lowering.choices == ("materialized", "chunked") + expected, name
    spec = kernelsearch.load(spec_path("softmax"), backend="reference").spec
    for direction, dtype in (("fwd+bwd", "float32"), ("fwd", "float64")):   # FlexAttention cannot run these on the CPU
        (lowering,) = [k for k in torch_space(spec, sizes, direction, dtype).knobs if k.name == "lowering"]
        assert lowering.choices == ("materialized", "chunked", "sdpa")


def test_generated_file_holds_the_library_lowerings_and_the_causal_fast_path():
    graph = _graph(spec_path("softmax"), frozenset(), causal=True)
    source = torch_file(graph).source
    assert "def sdpa(" in source and "def flex(" in source and "LOWERINGS = ('materialized', 'chunked', 'sdpa', 'flex')" in source
    assert "SDPA's own (top-left) causal mask" in source     # j <= i + J - I: is_causal when I == J
    assert "SDPA's own" not in torch_file(_graph(spec_path("softmax"), frozenset(["mask"]), causal=True)).source


def test_flex_skips_the_mask_in_blocks_every_row_keeps_whole():
    """local with 128-key windows, causal, no padding mask: every keep is a key bound, so key blocks
    inside the bounds of all rows of a query block are full blocks (mask_mod not evaluated)."""
    params = {"window_size": 128, "look_backward": 2}
    reference = kernelsearch.load(spec_path("local"), backend="reference", **params)
    flex = kernelsearch.load(spec_path("local"), backend="torch", config={"lowering": "flex"}, **params)
    graph = flex.graph(frozenset(["pos_bias_table"]))
    assert library.library_form(graph).full_blocks
    assert not library.library_form(flex.graph(frozenset(["mask"]))).full_blocks   # padding is no bound
    tensors = random_inputs(reference.spec, dict(B=1, H=2, I=300, J=300, D=16), dtype=torch.float64, seed=5,
                            optional=["pos_bias_table"], params=params)
    got = flex(**_cast(tensors, torch.float32))
    torch.testing.assert_close(got.double(), reference(**tensors), rtol=2e-5, atol=2e-5)
    ranges = [(0, 129, 0, 1), (0, 257, 0, 129), (0, 300, 128, 257)]   # query blocks of 128: (first, end, full first, full end)
    mask = library_calls.block_mask(ranges, 300, 300, None)
    assert mask.full_kv_num_blocks[0, 0].tolist() == [0, 1, 1]
    assert mask.kv_num_blocks[0, 0].tolist() == [2, 2, 2]


@pytest.mark.parametrize("lowering", ["sdpa", "flex"])
def test_a_tuned_library_lowering_is_recorded_and_loaded_like_any_config(lowering, tmp_path, monkeypatch):
    """A records-file entry naming a library lowering is what load() runs without a config (local:
    its default would be chunked); a flex record is skipped (the graph's defaults run) for calls
    FlexAttention cannot run on the CPU."""
    from kernelsearch.compiler import compile_graph
    from kernelsearch.runtime import config_store
    from kernelsearch.spec import load_spec

    monkeypatch.setenv("KERNELSEARCH_HOME", str(tmp_path))
    monkeypatch.delenv("KERNELSEARCH_RECORDS", raising=False)
    config_store.clear_cache()
    sizes = {"B": 1, "H": 2, "I": 128, "J": 128, "D": 32}
    graph = compile_graph(load_spec(spec_path("local")), {}, frozenset())
    config_store.record(graph.spec.sha256, "torch", config_store.device_name("cpu"), config_store.shape_bucket(sizes),
                        "float32", "fwd", {"lowering": lowering, "compile": False},
                        params_tag=config_store.params_tag(graph.params))
    try:
        attention = kernelsearch.load(spec_path("local"), backend="torch")
        reference = kernelsearch.load(spec_path("local"), backend="reference")
        tensors = random_inputs(attention.spec, sizes, dtype=torch.float64, optional=False)
        with torch.no_grad():
            got = attention(**_cast(tensors, torch.float32))
        assert attention.last_config == {"lowering": lowering, "compile": False}
        torch.testing.assert_close(got.double(), reference(**tensors), rtol=2e-5, atol=2e-5)
        q = tensors["q"].float().requires_grad_()
        attention(q, tensors["k"].float(), tensors["v"].float()).sum().backward()
        # a flex record gives way to the defaults (windows: chunked) where FlexAttention cannot run
        assert attention.last_config["lowering"] == ("sdpa" if lowering == "sdpa" else "chunked")
        assert q.grad is not None
    finally:
        config_store.clear_cache()
