"""The torch backend against the reference evaluator, in float64, on fresh random inputs.

Every spec, several param settings (quirks included), sizes that do not divide the chunk,
I != J, with and without the optional inputs (masks fully mask the last batch row's keys),
both lowerings; outputs and gradients.
"""
import pytest
import torch

import kernelsearch
from kernelsearch.backends import torch_backend
from kernelsearch.inputs import random_inputs
from kernelsearch.passes.bounds import window_width

from .conftest import spec_path

PARAMS = {
    "softmax": [{}, {"causal": True}, {"scale": 1.0, "causal": True}],
    "cosine_sim": [{}, {"causal": False, "groups": 2, "scale": 10.0}],
    "memory_efficient": [{"causal": True}, {"causal": True, "causal_alignment": "top_left"}],
    "local": [{"window_size": 8},
              {"window_size": 8, "causal": False, "look_backward": 2, "exact_windowsize": True, "xpos": True},
              {"window_size": 4, "rotary": False, "look_backward": 0}],
    "talking_heads": [{}, {"causal": True, "pre_talking_heads": False}, {"post_talking_heads": False}],
}
CASES = [(name, params) for name, settings in PARAMS.items() for params in settings]
SIZES = [(1, 1), (1, 17), (17, 33), (33, 17), (127, 129)]
# chunked: all query rows at once, and in chunks of 16 / 7 rows (each visiting only the keys its rows keep)
CONFIGS = [{"lowering": "materialized"}, {"lowering": "chunked", "CHUNK_N": 16},
           {"lowering": "chunked", "CHUNK_N": 5, "CHUNK_M": 16}, {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 7}]


def _case_id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['lowering']}{c.get('CHUNK_N', '')}"
                                                         f"{'x' + str(c['CHUNK_M']) if 'CHUNK_M' in c else ''}")
@pytest.mark.parametrize("optional", [False, True], ids=["bare", "all-inputs"])
def test_matches_reference(case, config, optional):
    name, params = case
    reference = kernelsearch.load(spec_path(name), backend="reference", **params)
    generated = kernelsearch.load(spec_path(name), backend="torch", config=config, **params)
    for seed, (I, J) in enumerate(SIZES):
        tensors = random_inputs(reference.spec, dict(B=2, H=2, I=I, J=J, D=16), dtype=torch.float64,
                                seed=seed, optional=optional, params=params)
        expected = reference(**tensors)
        got = generated(**tensors)
        assert got.shape == expected.shape == (2, 2, I, 16)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=f"I={I} J={J}")


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("chunk_n", [8, 32], ids=["key-chunks", "one-key-chunk"])
def test_fully_masked_rows_give_zero(name, chunk_n):
    """Our documented choice: a query row that keeps no key outputs 0 (as FlashAttention does),
    with several key chunks and with one holding every key (two-pass graphs: whole_rows_step)."""
    attention = kernelsearch.load(spec_path(name), backend="torch", config={"lowering": "chunked", "CHUNK_N": chunk_n})
    tensors = random_inputs(attention.spec, dict(B=2, H=2, I=5, J=19, D=16), dtype=torch.float64, optional=["mask"])
    tensors["mask"][0] = False   # sample 0: every key dropped
    tensors["mask"][1] = True    # sample 1: every key kept
    out = attention(**tensors)
    if name == "talking_heads":  # batch is (b s): both streams of the one sample are fully masked
        tensors["mask"][:] = False
        out = attention(**tensors)
        assert out.abs().max() == 0
    else:
        assert out[0].abs().max() == 0
        assert out[1].abs().max() > 0


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("lowering", ["materialized", "chunked"])
def test_gradients_match_reference(case, lowering):
    name, params = case
    reference = kernelsearch.load(spec_path(name), backend="reference", **params)
    generated = kernelsearch.load(spec_path(name), backend="torch", config={"lowering": lowering, "CHUNK_N": 8},
                                  **params)
    tensors = random_inputs(reference.spec, dict(B=2, H=2, I=11, J=21, D=8), dtype=torch.float64, seed=3,
                            params=params)
    differentiable = [n for n, t in tensors.items() if t.is_floating_point()]
    grads = {}
    for backend in (reference, generated):
        leaves = {n: t.clone().requires_grad_(n in differentiable) for n, t in tensors.items()}
        out = backend(**leaves)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
        grads[backend.backend] = {n: leaves[n].grad for n in differentiable}
    for n in differentiable:
        if grads["reference"][n] is None:   # an input these params do not use (e.g. pre_mix without pre mixing)
            assert grads["torch"][n] is None, n
            continue
        torch.testing.assert_close(grads["torch"][n], grads["reference"][n], rtol=1e-9, atol=1e-9, msg=n)


def test_gradcheck_chunked():
    attention = kernelsearch.load(spec_path("local"), backend="torch", window_size=4,
                                  config={"lowering": "chunked", "CHUNK_N": 3})
    tensors = random_inputs(attention.spec, dict(B=1, H=2, I=6, J=7, D=4), dtype=torch.float64, optional=["pos_bias_table"])
    names = ["q", "k", "v", "pos_bias_table"]
    leaves = [tensors[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(lambda q, k, v, t: attention(q, k, v, pos_bias_table=t), leaves)


def test_default_lowering_switches_to_chunked_for_long_sequences():
    """Without SDPA (heads mixed before softmax: two passes): materialized for short sequences;
    beyond, chunked and compiled with every key in one chunk (whole_rows_step: one scores tile
    for both passes) while 64 query rows' scores stay under 2**20; then key chunks."""
    attention = kernelsearch.load(spec_path("talking_heads"), backend="torch")
    assert attention.graph().plan.sweeps == 2
    small = random_inputs(attention.spec, dict(B=2, H=1, I=8, J=8, D=8))
    attention(**small)
    assert attention.last_config == {"lowering": "materialized", "compile": False}
    for n in (1100, 4096):
        config = torch_backend.default_config(attention.graph(), {"b": 2, "h": 2, "i": n, "j": n, "d": 8})
        assert config == {"lowering": "chunked", "CHUNK_N": n, "CHUNK_M": 64, "compile": True}
    config = torch_backend.default_config(attention.graph(), {"b": 2, "h": 2, "i": 8192, "j": 8192, "d": 8})
    assert (config["lowering"], config["compile"], config["CHUNK_M"]) == ("chunked", True, 256)
    assert config["CHUNK_N"] < 8192


def test_default_config_is_sdpa_where_it_fits_and_chunked_for_windows():
    softmax = kernelsearch.load(spec_path("softmax"), backend="torch")
    softmax(**random_inputs(softmax.spec, dict(B=1, H=1, I=8, J=8, D=8)))
    assert softmax.last_config == {"lowering": "sdpa", "compile": False}
    masked = kernelsearch.load(spec_path("memory_efficient"), backend="torch", causal=True)
    graph = masked.graph()   # causal + padding + bias: SDPA would visit the keys causality drops
    for n, lowering in ((1024, "sdpa"), (4096, "chunked")):
        assert torch_backend.default_config(graph, {"b": 1, "h": 4, "i": n, "j": n, "d": 64})["lowering"] == lowering
    causal = kernelsearch.load(spec_path("cosine_sim"), backend="torch").graph(frozenset())   # is_causal: no mask
    assert torch_backend.default_config(causal, {"b": 1, "h": 4, "i": 4096, "j": 4096, "d": 64})["lowering"] == "sdpa"
    local = kernelsearch.load(spec_path("local"), backend="torch")   # windows of 64 keys, one window back
    for n, compiled in ((512, False), (1024, True)):
        config = torch_backend.default_config(local.graph(), {"b": 1, "h": 4, "i": n, "j": n, "d": 64})
        assert config == {"lowering": "chunked", "CHUNK_N": 64, "CHUNK_M": 64, "compile": compiled}
    # chunks follow the window's width (passes/bounds.window_width): half of it, 64 to 256
    for params, width, chunk in (({}, 1024, 256), ({"window": 200}, 200, 64), ({"window": 512, "causal": False},
                                                                             1023, 256), ({"window": 300}, 300, 128)):
        graph = kernelsearch.load(spec_path("sliding_window"), backend="torch", **params).graph(frozenset())
        sizes = {"b": 1, "h": 4, "i": 4096, "j": 4096, "d": 64}
        assert window_width(graph, sizes) == width
        assert torch_backend.default_config(graph, sizes)["CHUNK_N"] == chunk, params


def test_a_partial_config_takes_the_defaults_for_what_it_leaves_out():
    # {"lowering": "chunked", "CHUNK_N": 512} used to run all query rows as one chunk (CHUNK_M=0),
    # 24x slower than the default for the local spec at N=8192
    reference = kernelsearch.load(spec_path("local"), backend="reference")
    attention = kernelsearch.load(spec_path("local"), backend="torch", config={"lowering": "chunked", "CHUNK_N": 64})
    tensors = random_inputs(reference.spec, dict(B=1, H=2, I=300, J=300, D=8), dtype=torch.float64, seed=3)
    torch.testing.assert_close(attention(**tensors), reference(**tensors), rtol=1e-10, atol=1e-10)
    assert attention.last_config == {"lowering": "chunked", "CHUNK_N": 64, "CHUNK_M": 256, "compile": False}
    attention = kernelsearch.load(spec_path("local"), backend="torch", config={"compile": False})
    attention(**tensors)   # no lowering given: the graph's defaults (windows of 128 keys: chunked, 64 x 64)
    assert attention.last_config == {"lowering": "chunked", "CHUNK_N": 64, "CHUNK_M": 64, "compile": False}


def test_non_contiguous_and_broadcast_inputs():
    reference = kernelsearch.load(spec_path("cosine_sim"), backend="reference")
    generated = kernelsearch.load(spec_path("cosine_sim"), backend="torch", config={"lowering": "chunked", "CHUNK_N": 4})
    q = torch.randn(2, 9, 3, 8, dtype=torch.float64).transpose(1, 2)     # [b, h, i, d], strided
    k = torch.randn(2, 3, 16, 8, dtype=torch.float64)[:, :, ::2]
    v = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    bias = torch.randn(3, 9, 8, dtype=torch.float64)                     # [h, i, j]: b omitted
    torch.testing.assert_close(generated(q, k, v, attn_bias=bias), reference(q, k, v, attn_bias=bias))


def test_shape_mismatch_is_a_clear_error():
    attention = kernelsearch.load(spec_path("softmax"), backend="torch")
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="dim 'j' of input 'v' has size 6"):
        attention(q, k, v)
    with pytest.raises(TypeError, match="unexpected input"):
        attention(q, k, k, attn_bias=q)


@pytest.mark.parametrize("chunk_n, steps", [(8, {"statistics_step", "chunk_step"}), (32, {"whole_rows_step"})])
def test_two_pass_rows_whose_keys_fit_one_chunk_take_one_step(chunk_n, steps):
    """A two-pass graph (talking heads) computes each tile's scores twice, once per pass, unless one
    key chunk holds every key of the query chunk: then whole_rows_step runs both passes on one
    scores tile. Both paths agree with the reference."""
    spec = spec_path("talking_heads")
    generated = kernelsearch.load(spec, backend="torch", config={"lowering": "chunked", "CHUNK_N": chunk_n,
                                                                 "CHUNK_M": 4})
    run = generated._implementations[frozenset({"pre_mix", "post_mix"})]
    module = run.functions.module
    called = set()
    # the steps are defaults of chunked(): call it with spies that note which ran
    spied = {name: lambda *a, step=getattr(module, name), name=name: called.add(name) or step(*a)
             for name in module.STEPS}
    reference = kernelsearch.load(spec, backend="reference")
    tensors = random_inputs(reference.spec, dict(B=2, H=2, I=9, J=19, D=16), dtype=torch.float64, seed=3,
                            optional=["pre_mix", "post_mix"])
    arguments = [tensors[n] for n in run.functions.file.inputs]
    got = module.chunked(*arguments, CHUNK_N=chunk_n, CHUNK_M=4, **spied)
    torch.testing.assert_close(got, reference(**tensors), rtol=1e-10, atol=1e-10)
    assert called == steps
