"""The triton backend's backward kernels: gradients against autograd through the reference (float64).

Runs in Triton's interpreter on the CPU (the `interpreter` fixture of test_triton_fwd.py), so
shapes are tiny. Every float input gets a gradient: q, k, v, attn_bias, pos_bias_table, the
qk-rmsnorm scales, pre_mix and post_mix. Gradients the kernels store are poisoned with NaN
first (KERNELSEARCH_POISON via the fixture), so an element no program writes cannot pass.

Covered: every spec x the smallest tiles and the default backward tiles x odd shapes (I, J) in
(1, 17), (17, 33), (33, 17) x without / with optional inputs (the masks fully mask the last batch
row: those rows get zero gradients); param variants (causal alignments, groups, windows, xpos,
qk-rmsnorm, talking heads before / after softmax only, 16 mixed channels); non-contiguous and
broadcast inputs; keys the interval analysis excludes are NaN (a backward that visits them
fails); gradcheck in float64; a spec whose backward cannot be derived raises a clear error while
its forward still runs; AOT compilation of the backward kernels for sm_90; a small model
trains under torch.compile(fullgraph=True) with the same losses as the reference backend.

Tolerance: fp32 kernels against float64, 5e-4 absolute on gradients of O(1) inputs scaled by the
largest gradient (sums over up to 33 keys or queries of fp32 products); fp16 1e-2 relative.
"""
from __future__ import annotations

import pytest
import torch

import kernelsearch
from kernelsearch.inputs import random_inputs
from tests.test_triton_fwd import SMALL, SPECS, _non_contiguous, interpreter, sizes_for, spec_path  # noqa: F401

SHAPES = [(1, 17), (17, 33), (33, 17)]
TOL = {torch.float32: 5e-4, torch.float16: 1e-2}
SMALLEST = {"BLOCK_M_BWD": 16, "BLOCK_N_BWD": 16}


def gradients(attn, inputs, dtype, seed=1):
    """Output and the gradient of every float input, for a fixed random dO."""
    leaves = {n: (t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t) for n, t in inputs.items()}
    out = attn(**leaves)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    out.backward(dout)
    return out.detach(), {n: t.grad for n, t in leaves.items() if t.is_floating_point()}


def compare_gradients(name, params, sizes, config, dtype=torch.float32, optional=True, transform=None):
    path = spec_path(name)
    triton_attn = kernelsearch.load(path, backend="triton", config=config, **params)
    reference = kernelsearch.load(path, backend="reference", **params)
    inputs = random_inputs(triton_attn.spec, sizes, dtype=torch.float64, optional=optional, params=params, seed=0)
    if transform is not None:
        inputs = transform(inputs)
    out, grads = gradients(triton_attn, inputs, dtype)
    expected_out, expected = gradients(reference, inputs, torch.float64)
    assert (out.double() - expected_out).abs().max() <= TOL[dtype] * 2
    for n, g in expected.items():
        got = grads[n]
        if g is None:       # an input this specialisation does not use (e.g. q_scale without qk_rmsnorm)
            assert got is None, f"{name}: gradient for unused input {n}"
            continue
        assert got is not None, f"{name}: no gradient for {n}"
        assert got.shape == g.shape and got.dtype == dtype, (n, got.shape, g.shape, got.dtype)
        assert torch.isfinite(got).all(), f"{name}: non-finite (unwritten?) gradient of {n}"
        scale = max(1.0, g.abs().max().item())
        err = (got.double() - g).abs().max().item() / scale
        assert err <= TOL[dtype], f"{name} {params} {sizes} {config} d{n}: max error {err:.3g} (of {scale:.3g})"
    return grads, expected, inputs


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("tiles", ["smallest", "default"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"I{i}_J{j}" for i, j in SHAPES])
@pytest.mark.parametrize("optional", [False, True], ids=["plain", "masked"])
def test_gradients_match_reference(interpreter, name, tiles, shape, optional):
    I, J = shape
    params = SMALL.get(name, {})
    config = SMALLEST if tiles == "smallest" else None
    compare_gradients(name, params, sizes_for(name, I, J, D=16, params=params), config, optional=optional)


VARIANTS = [
    ("softmax", {"causal": True}, (33, 17)),                            # rows with no key kept
    ("memory_efficient", {"causal": True, "causal_alignment": "top_left"}, (33, 17)),
    ("cosine_sim", {"groups": 4, "causal": False, "scale": 10.0}, (17, 33)),
    ("local", {"window_size": 8, "causal": False, "look_forward": 1, "xpos": True, "exact_windowsize": True},
     (33, 33)),
    ("local", {"window_size": 8, "qk_rmsnorm": True, "scale": 8.0, "rotary_query_offset": 3}, (33, 17)),
    ("local", {"window_size": 16, "look_backward": 2, "causal": False, "look_forward": 1}, (80, 80)),
    ("talking_heads", {"pre_talking_heads": False}, (17, 33)),
    ("talking_heads", {"post_talking_heads": False, "causal": True}, (17, 33)),
    ("talking_heads", {"num_streams": 8}, (17, 20)),                   # 16 channels: mixing by tl.dot
]


@pytest.mark.parametrize("name,params,shape", VARIANTS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}"
                                                              for n, p, _ in VARIANTS])
def test_param_variants(interpreter, name, params, shape):
    I, J = shape
    compare_gradients(name, params, sizes_for(name, I, J, D=16, params=params), SMALLEST)


@pytest.mark.parametrize("name", ["cosine_sim", "local", "talking_heads"])
def test_non_contiguous_and_broadcast_inputs(interpreter, name):
    params = SMALL.get(name, {})
    compare_gradients(name, params, sizes_for(name, 17, 33, D=16, params=params), SMALLEST,
                      transform=_non_contiguous)


def test_fp16_and_odd_head_dim(interpreter):
    compare_gradients("memory_efficient", {"causal": True}, sizes_for("memory_efficient", 17, 33, D=24),
                      {"BLOCK_M_BWD": 16, "BLOCK_N_BWD": 32})
    compare_gradients("softmax", {}, sizes_for("softmax", 17, 33, D=16), SMALLEST, dtype=torch.float16)


def test_fully_masked_rows_get_zero_gradients(interpreter):
    grads, _, inputs = compare_gradients("memory_efficient", {}, sizes_for("memory_efficient", 17, 33, D=16),
                                         SMALLEST)
    assert not inputs["mask"][-1].any()
    for n in ("q", "k", "v"):
        assert torch.equal(grads[n][-1], torch.zeros_like(grads[n][-1])), n


def test_backward_skips_excluded_key_blocks(interpreter):
    """Top-left causal, 16 queries x 64 keys: keys 16.. are never kept. NaN there must not reach any
    gradient (the dkdv programs of those blocks visit no query block; their dk, dv are 0)."""
    params = {"causal": True, "causal_alignment": "top_left"}
    attn = kernelsearch.load(spec_path("memory_efficient"), backend="triton",
                             config={"BLOCK_M": 16, "BLOCK_N": 16, **SMALLEST}, **params)
    inputs = random_inputs(attn.spec, sizes_for("memory_efficient", 16, 64, D=16), optional=False)
    for name in ("k", "v"):
        inputs[name] = inputs[name].clone()
        inputs[name][:, :, 16:] = float("nan")
    _, grads = gradients(attn, inputs, torch.float32)
    assert torch.isfinite(grads["q"]).all()
    assert torch.equal(grads["k"][:, :, 16:], torch.zeros_like(grads["k"][:, :, 16:]))
    clean = {n: t[:, :, :16] if n in ("k", "v") else t for n, t in inputs.items()}
    reference = kernelsearch.load(spec_path("memory_efficient"), backend="reference", **params)
    _, expected = gradients(reference, clean, torch.float64)
    assert (grads["q"].double() - expected["q"]).abs().max() <= TOL[torch.float32]


@pytest.mark.parametrize("name", ["softmax", "local", "talking_heads"])
def test_gradcheck_float64(interpreter, name):
    params = dict(SMALL.get(name, {}), **({"window_size": 4} if name == "local" else {}))
    attn = kernelsearch.load(spec_path(name), backend="triton", config=SMALLEST, **params)
    inputs = random_inputs(attn.spec, sizes_for(name, 5, 7, D=4, H=1, params=params), dtype=torch.float64,
                           params=params)
    # q, k, v: the kernels keep float64 there; bias tables and mixing weights are rounded to fp32 in
    # the tile arithmetic, too coarse for a numerical Jacobian (their gradients are compared with
    # float64 autograd above)
    names = ["q", "k", "v"]
    fixed = {n: t for n, t in inputs.items() if n not in names}

    def f(*tensors):
        return attn(**fixed, **dict(zip(names, tensors)))
    assert torch.autograd.gradcheck(f, [inputs[n].requires_grad_() for n in names], atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


def test_underivable_backward_is_a_clear_error(interpreter, tmp_path):
    spec = tmp_path / "gated.yaml"
    spec.write_text("name: gated\ninputs: {q: [b, h, i, d], k: [b, h, j, d], v: [b, h, j, d]}\n"
                    "graph:\n  p: softmax(dot(q, k))\n  o: tanh(dot(p, v))\noutputs: [o]\n")
    attn = kernelsearch.load(str(spec), backend="triton", config=SMALLEST)
    inputs = random_inputs(attn.spec, sizes_for("softmax", 17, 17, D=16), optional=False)
    from kernelsearch.backends.triton_backend import BackwardNotImplemented
    with pytest.raises(BackwardNotImplemented, match="tanh"):
        gradients(attn, inputs, torch.float32)
    reference = kernelsearch.load(str(spec), backend="reference")
    with torch.no_grad():   # inference still runs the fused forward
        assert (attn(**inputs).double() - reference(**{n: t.double() for n, t in inputs.items()})).abs().max() < 2e-4


def test_model_trains_under_torch_compile(interpreter):
    """A tiny attention model: compiled (fullgraph) with the triton backend, eager with the reference;
    same losses and parameters over a few SGD steps."""
    torch._dynamo.reset()

    class Tiny(torch.nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn
            self.qkv = torch.nn.Linear(16, 48)
            self.out = torch.nn.Linear(16, 16)

        def forward(self, x):                                   # x: [b, n, 16]
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)     # [b, h, n, 8] each
            o = self.attn(q, k, v)
            return self.out(o.transpose(1, 2).reshape(b, n, 16)).square().mean()

    torch.manual_seed(0)
    triton_model = Tiny(kernelsearch.load(spec_path("cosine_sim"), backend="triton", config=SMALLEST, causal=True))
    reference_model = Tiny(kernelsearch.load(spec_path("cosine_sim"), backend="reference", causal=True))
    reference_model.load_state_dict(triton_model.state_dict())
    compiled = torch.compile(triton_model, fullgraph=True)
    losses = {"triton": [], "reference": []}
    x = torch.randn(2, 17, 16)
    for model, key in ((compiled, "triton"), (reference_model, "reference")):
        params = triton_model.parameters() if key == "triton" else reference_model.parameters()
        opt = torch.optim.SGD(params, lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            loss = model(x)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]),
                               rtol=1e-4, atol=1e-5)
    assert losses["triton"][-1] < losses["triton"][0]


# ------------------------------------------------------------------------------------------- AOT

AOT_BWD_CASES = [(name, None) for name in SPECS] + [(name, "smallest") for name in SPECS]


@pytest.fixture(scope="module")
def aot_bwd_results():
    """The training kernels of every spec, compiled for sm_90 in fresh processes (see test_triton_fwd)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from kernelsearch.codegen.aot_cli import _check_one
    smallest = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "BLOCK_M_BWD": 16,
                "BLOCK_N_BWD": 16, "num_warps_bwd": 4, "num_stages_bwd": 1}
    tasks = [(spec_path(n), {}, smallest if c else None, 90, {"d": 64, "h": 8}, "float16", "fwd+bwd")
             for n, c in AOT_BWD_CASES]
    with ProcessPoolExecutor(max(1, min(len(tasks), os.cpu_count() or 1)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_check_one, tasks))


@pytest.mark.parametrize("case", range(len(AOT_BWD_CASES)),
                         ids=[f"{n}-{c or 'default'}" for n, c in AOT_BWD_CASES])
def test_aot_backward_compiles_for_sm90(aot_bwd_results, case):
    result = aot_bwd_results[case]
    assert result["ok"], f"{AOT_BWD_CASES[case]}: {result['error']}"
    names = " ".join(result["kernels"])
    assert "_bwd_dq_" in names and "_bwd_dkdv_" in names and "training" in names
    assert all(k["shared"] is not None for k in result["kernels"].values())
