"""Grouped-query and multi-query attention (issue 13 item 1): k, v (and any input over heads and
keys) with H_kv heads, H % H_kv == 0, query head h reading KV head h // (H / H_kv).

Every backend against an independent float64 definition written here (k and v copied with
repeat_interleave - the definition may copy; the backends may not): H_kv = 1 (MQA), 2 and H
(plain), causal or not, a key padding mask with a fully masked batch row, sizes that do not divide
the 16 x 16 tiles (I = 17, J = 33), gradients of q, k, v (dk, dv shaped [B, H_kv, J, D]).
"""
from __future__ import annotations

import pytest
import torch

import kernelsearch
from kernelsearch.compiler import compile_graph
from tests.oracles import cosine_sim_attention
from tests.test_gallery import alibi as alibi_definition
from tests.test_ops import interpreter  # noqa: F401 (a fixture)

from .conftest import spec_path

B, H, I, J, D = 2, 4, 17, 33, 16
GROUPS = [pytest.param(1, id="mqa"), pytest.param(2, id="gqa2"), pytest.param(H, id="plain")]
FP32 = dict(rtol=2e-4, atol=2e-4)
FP32_GRAD = dict(rtol=1e-3, atol=1e-3)
FP64 = dict(rtol=1e-10, atol=1e-10)
TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_M_BWD": 16, "BLOCK_N_BWD": 16}


def grouped_attention(q, k, v, mask=None, scale=None, causal=True):
    """The definition: softmax attention with k, v repeated to q's heads; bottom-right causal; a row
    that keeps no key gives 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    keep = (j <= i + k.shape[2] - q.shape[2]) if causal else torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    keep = keep.expand(s.shape)
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    empty = ~keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(empty, 0.0, s.masked_fill(~keep, float("-inf"))), dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p.masked_fill(empty, 0.0), v)


def make_inputs(kv_heads: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, J, generator=g) < 0.7
    mask[-1] = False                                   # a batch row whose queries keep no key
    return {"q": torch.randn(B, H, I, D, generator=g, dtype=torch.float64),
            "k": torch.randn(B, kv_heads, J, D, generator=g, dtype=torch.float64),
            "v": torch.randn(B, kv_heads, J, D, generator=g, dtype=torch.float64),
            "mask": mask}


def expected_and_gradients(definition, given: dict, **params):
    leaves = {n: t.clone().requires_grad_() if t.is_floating_point() else t for n, t in given.items()}
    out = definition(**leaves, **params)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(dout)
    return out.detach(), {n: t.grad for n, t in leaves.items() if t.is_floating_point()}, dout


def run(attention, given: dict, dout, dtype, grad: bool = True):
    leaves = {n: t.to(dtype).requires_grad_(grad) if t.is_floating_point() else t for n, t in given.items()}
    out = attention(**leaves)
    if not grad:
        return out.detach().double(), {}
    out.backward(dout.to(dtype))
    return out.detach().double(), {n: t.grad.double() for n, t in leaves.items() if t.is_floating_point()}


def check(label, out, grads, expected, expected_grads, out_tol, grad_tol):
    torch.testing.assert_close(out, expected, **out_tol, msg=lambda m: f"{label} output: {m}")
    for name, grad in grads.items():
        assert grad.shape == expected_grads[name].shape, (label, name, grad.shape)   # dk, dv: [B, H_kv, J, D]
        torch.testing.assert_close(grad, expected_grads[name], **grad_tol, msg=lambda m: f"{label} d{name}: {m}")


EAGER = [("reference", None), ("torch", "materialized"), ("torch", "chunked"), ("torch", "sdpa"), ("torch", "flex")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv_heads", GROUPS)
@pytest.mark.parametrize("backend, lowering", EAGER, ids=[lw or b for b, lw in EAGER])
def test_gqa_on_eager_backends(backend, lowering, kv_heads, causal):
    given = make_inputs(kv_heads)
    expected, expected_grads, dout = expected_and_gradients(grouped_attention, given, causal=causal)
    config = {"lowering": lowering, "CHUNK_N": 16, "CHUNK_M": 8} if lowering == "chunked" else \
        {"lowering": lowering} if lowering else None
    attention = kernelsearch.load(spec_path("gqa"), backend=backend, causal=causal,
                                  **({"config": config} if config else {}))
    dtype = torch.float64 if backend == "reference" else torch.float32
    # FlexAttention has no backward on the CPU (library_calls.flex says so): its forward only
    out, grads = run(attention, given, dout, dtype, grad=lowering != "flex")
    tolerance = (FP64, FP64) if dtype == torch.float64 else (FP32, FP32_GRAD)
    check(f"{lowering or backend} H_kv={kv_heads}", out, grads, expected, expected_grads, *tolerance)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv_heads", GROUPS)
def test_gqa_on_triton_forward_and_backward(kv_heads, causal, interpreter):  # noqa: F811
    """Inference (the packed forward kernel) and training (forward with lse, dq, and the dkdv kernel
    summing the group's query heads)."""
    given = make_inputs(kv_heads)
    expected, expected_grads, dout = expected_and_gradients(grouped_attention, given, causal=causal)
    attention = kernelsearch.load(spec_path("gqa"), backend="triton", causal=causal, config=TILES)
    inference, _ = run(attention, given, dout, torch.float32, grad=False)
    torch.testing.assert_close(inference, expected, **FP32)
    out, grads = run(attention, given, dout, torch.float32)
    check(f"triton H_kv={kv_heads}", out, grads, expected, expected_grads, FP32, FP32_GRAD)


def test_gqa_with_fewer_queries_than_a_packed_tile(interpreter):  # noqa: F811
    """Decoding-like: I = 3 queries of 4 heads over one KV head - a packed tile of 16 rows holds all
    12 (query, head) pairs; and I = 5 with 2 KV heads (rows spill into a second tile)."""
    for I_, kv in ((3, 1), (5, 2)):
        g = torch.Generator().manual_seed(3)
        given = {"q": torch.randn(1, H, I_, D, generator=g, dtype=torch.float64),
                 "k": torch.randn(1, kv, 40, D, generator=g, dtype=torch.float64),
                 "v": torch.randn(1, kv, 40, D, generator=g, dtype=torch.float64)}
        expected, expected_grads, dout = expected_and_gradients(grouped_attention, given)
        attention = kernelsearch.load(spec_path("gqa"), backend="triton", config=TILES)
        out, grads = run(attention, given, dout, torch.float32)
        check(f"I={I_} H_kv={kv}", out, grads, expected, expected_grads, FP32, FP32_GRAD)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_kv_heads_that_do_not_divide_or_disagree_are_refused(backend, interpreter):  # noqa: F811
    attention = kernelsearch.load(spec_path("gqa"), backend=backend)
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"input 'k' has 3 heads, which does not divide the 4 heads of q"):
        attention(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8))
    with pytest.raises(ValueError, match=r"input 'v' has 1 heads, but input 'k' has 2"):
        attention(q, torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 8))
    with pytest.raises(ValueError, match="input 'k' has 0 heads"):
        attention(q, torch.randn(1, 0, 6, 8), torch.randn(1, 0, 6, 8))


def test_the_plan_packs_the_kv_group():
    """The forward's programs hold a KV group's query heads as rows (so a K/V tile is loaded once per
    group): decided by passes/plan.py, printed by `kernelsearch check`, rendered by the Triton plan."""
    from kernelsearch.codegen import triton_fwd
    from kernelsearch.passes.plan import describe_plan
    for name in ("gqa", "alibi", "cosine_sim", "t5_bias"):
        graph = compile_graph(kernelsearch.load_spec(spec_path(name)))
        assert graph.plan.pack_kv_group, name
        kernel_plan = triton_fwd.plan(graph)
        assert kernel_plan.packed and kernel_plan.kv_source in ("k", "v"), name
        assert any(line.startswith("kv heads packed") for line in describe_plan(graph)), name
    # heads in tile: every program holds every head already; it reads KV head h // G per channel
    graph = compile_graph(kernelsearch.load_spec(spec_path("talking_heads")))
    assert not graph.plan.pack_kv_group and "heads in tile" in graph.plan.pack_reason


def test_k_and_v_are_not_copied_by_the_torch_lowerings():
    """The materialized and chunked lowerings broadcast k and v over the group (grouped layout):
    no tensor of k's size times G is ever made."""
    from torch.utils._python_dispatch import TorchDispatchMode
    q, k, v = torch.randn(1, 8, 64, 16), torch.randn(1, 1, 512, 16), torch.randn(1, 1, 512, 16)
    repeated = 8 * k.numel()

    class Largest(TorchDispatchMode):
        biggest_kv_sized = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.shape[-1:] == (16,) and 512 in t.shape:
                    self.biggest_kv_sized = max(self.biggest_kv_sized, t.numel())
            return out
    for lowering in ("materialized", "chunked"):
        attention = kernelsearch.load(spec_path("gqa"), backend="torch", config={"lowering": lowering})
        with Largest() as mode:
            attention(q, k, v)
        assert 0 < mode.biggest_kv_sized < repeated, (lowering, mode.biggest_kv_sized)


OTHER_SPECS = {
    "alibi": lambda q, k, v: alibi_definition(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)),
    "cosine_sim": lambda q, k, v: cosine_sim_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                       scale=8.0, causal=True),
}


@pytest.mark.parametrize("name", sorted(OTHER_SPECS))
@pytest.mark.parametrize("backend", ["reference", "torch-materialized", "torch-chunked", "triton"])
def test_other_specs_take_grouped_kv_heads(name, backend, interpreter):  # noqa: F811
    """Grouped KV heads are the language's, not gqa.yaml's: any spec takes them (4 query heads, 2 KV)."""
    g = torch.Generator().manual_seed(5)
    given = {"q": torch.randn(B, H, I, D, generator=g, dtype=torch.float64),
             "k": torch.randn(B, 2, J, D, generator=g, dtype=torch.float64),
             "v": torch.randn(B, 2, J, D, generator=g, dtype=torch.float64)}
    expected, expected_grads, dout = expected_and_gradients(OTHER_SPECS[name], given)
    kind, _, lowering = backend.partition("-")
    config = TILES if kind == "triton" else {"lowering": lowering, "CHUNK_N": 16, "CHUNK_M": 8} if lowering else None
    attention = kernelsearch.load(spec_path(name), backend=kind, **({"config": config} if config else {}))
    dtype = torch.float64 if kind == "reference" else torch.float32
    out, grads = run(attention, given, dout, dtype)
    tolerance = (FP64, FP64) if dtype == torch.float64 else (FP32, FP32_GRAD)
    check(f"{name} {backend}", out, grads, expected, expected_grads, *tolerance)


def test_gqa_trains_a_language_model_with_grouped_kv_heads(capsys):
    """`kernelsearch lm specs/gqa.yaml --kv-heads 2`: mesh-tensorflow's LM with 4 query heads and 2
    KV heads (its qkv projection makes 2 k and 2 v heads, passed as they are)."""
    import json
    import math

    from kernelsearch.cli import main
    from kernelsearch.models.config import build_model, resolve_model
    assert main(["lm", spec_path("gqa"), "--model", "mesh_tf", "--kv-heads", "2", "--steps", "2", "--seq-len", "64",
                 "--batch-size", "2", "--sample-len", "4", "--backend", "torch", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
    cfg = resolve_model("mesh_tf", spec_path("gqa"))
    cfg.model["kv_heads"] = 2
    attention = build_model(cfg, backend="torch").attention_layers()[0]
    assert (attention.heads, attention.kv_heads) == (4, 2)
    assert attention.to_qkv.out_features == (4 + 2 * 2) * attention.dim_head


def test_kv_heads_flag_is_refused_for_families_without_it():
    from kernelsearch.cli import main
    assert main(["lm", spec_path("cosine_sim"), "--model", "cosine_sim", "--kv-heads", "2", "--steps", "0"]) == 2


KEY_BIAS_SPEC = """\
name: key_bias
summary: softmax attention plus a learned bias per (batch, head, key) - a per-KV-head input other than k and v.
params:
  scale: {type: float, default: "D ** -0.5"}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  key_bias: [b, h, j]
graph:
  s: dot(q, k) * scale + key_bias
  p: softmax(s)
  o: dot(p, v)
outputs: [o]
"""


@pytest.mark.parametrize("backend", ["reference", "torch-materialized", "torch-chunked", "torch-sdpa", "triton"])
def test_any_input_over_heads_and_keys_is_per_kv_head(backend, tmp_path, interpreter):  # noqa: F811
    """key_bias [b, h, j] comes with k's H_kv heads and is read by query head h at h // G, its gradient
    summed over the group; one with q's H heads while k has H_kv is refused (they must agree)."""
    path = tmp_path / "key_bias.yaml"
    path.write_text(KEY_BIAS_SPEC)
    g = torch.Generator().manual_seed(7)
    given = {"q": torch.randn(B, H, I, D, generator=g, dtype=torch.float64),
             "k": torch.randn(B, 2, J, D, generator=g, dtype=torch.float64),
             "v": torch.randn(B, 2, J, D, generator=g, dtype=torch.float64),
             "key_bias": torch.randn(B, 2, J, generator=g, dtype=torch.float64)}

    def definition(q, k, v, key_bias):
        k, v, key_bias = (t.repeat_interleave(2, 1) for t in (k, v, key_bias))
        s = torch.einsum("bhid,bhjd->bhij", q, k) * D ** -0.5 + key_bias[:, :, None, :]
        return torch.softmax(s, -1) @ v
    expected, expected_grads, dout = expected_and_gradients(definition, given)
    kind, _, lowering = backend.partition("-")
    config = TILES if kind == "triton" else {"lowering": lowering, "CHUNK_N": 16} if lowering else None
    attention = kernelsearch.load(str(path), backend=kind, **({"config": config} if config else {}))
    dtype = torch.float64 if kind == "reference" else torch.float32
    out, grads = run(attention, given, dout, dtype)
    tolerance = (FP64, FP64) if dtype == torch.float64 else (FP32, FP32_GRAD)
    check(f"key_bias {backend}", out, grads, expected, expected_grads, *tolerance)
    with pytest.raises(ValueError, match="input 'key_bias' has 4 heads, but input 'k' has 2"):
        attention(given["q"].to(dtype), given["k"].to(dtype), given["v"].to(dtype),
                  key_bias=torch.zeros(B, H, J, dtype=dtype))
