"""The gallery (issue 13 item 7): specs/gqa, alibi, softcap, sliding_window, document, prefix_lm and
t5_bias, each against an independent float64 PyTorch definition written here (nothing from
kernelsearch) on every backend: reference, torch materialized and chunked, Triton forward and
backward in the interpreter - outputs and the gradients of every float input (bias_table
included), with sizes that do not divide the tiles (I=17, J=33 against 16 x 16 blocks), key
padding masks, I != J (bottom-right aligned) and I == J.

T5's bucket is transcribed from the T5 reference implementation (Hugging Face's
`T5Attention._relative_position_bucket`, itself Mesh TensorFlow's), in float32 as there, and the
spec's bucket is compared with it at every relative position up to well past max_distance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

import kernelsearch
from kernelsearch.backends import reference
from tests.test_ops import interpreter  # noqa: F401 (a fixture)

from .conftest import GALLERY, spec_path

FP32 = dict(rtol=2e-4, atol=2e-4)          # fp32 backends against float64
FP32_GRAD = dict(rtol=1e-3, atol=1e-3)
FP64 = dict(rtol=1e-10, atol=1e-10)        # the reference backend in float64


# ------------------------------------------------------------------------- the definitions (float64)

def _positions(I, J):
    """i as a column, j as a row, and the query's position among the keys (bottom-right aligned)."""
    i = torch.arange(I)[:, None]
    j = torch.arange(J)[None, :]
    return i, j, i + J - I


def _attend(s, keep, v, mask):
    """softmax over keys where keep (and the key padding mask) hold; a row that keeps nothing gives 0."""
    keep = keep.expand(s.shape)
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    empty = ~keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(empty, 0.0, s.masked_fill(~keep, float("-inf"))), dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p.masked_fill(empty, 0.0), v)


def _scores(q, k, scale):
    return torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)


def _causal(I, J, causal):
    i, j, position = _positions(I, J)
    return j <= position if causal else torch.ones(I, J, dtype=torch.bool)


def gqa(q, k, v, mask=None, scale=None, causal=True):
    """k, v: [b, h_kv, j, d]; query head h reads KV head h // (H / H_kv) (copied here: the definition)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _attend(_scores(q, k, scale), _causal(q.shape[2], k.shape[2], causal), v, mask)


def alibi(q, k, v, mask=None, scale=None, causal=True):
    H, I, J = q.shape[1], q.shape[2], k.shape[2]
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float64) / H)     # Press et al., H a power of 2
    i, j, _ = _positions(I, J)
    s = _scores(q, k, scale) + slopes[:, None, None] * (j - i)
    return _attend(s, _causal(I, J, causal), v, mask)


def softcap(q, k, v, mask=None, scale=None, cap=30.0, causal=True):
    s = cap * torch.tanh(_scores(q, k, scale) / cap)
    return _attend(s, _causal(q.shape[2], k.shape[2], causal), v, mask)


def sliding_window(q, k, v, mask=None, scale=None, window=1024, causal=True):
    i, j, position = _positions(q.shape[2], k.shape[2])
    distance = position - j
    keep = (distance >= 0) & (distance < window) if causal else distance.abs() < window
    return _attend(_scores(q, k, scale), keep, v, mask)


def document(q, k, v, q_doc, k_doc, mask=None, scale=None, causal=True):
    keep = (q_doc[:, None, :, None] == k_doc[:, None, None, :]) & _causal(q.shape[2], k.shape[2], causal)
    return _attend(_scores(q, k, scale), keep, v, mask)


def prefix_lm(q, k, v, prefix_len, mask=None, scale=None, causal=True):
    i, j, position = _positions(q.shape[2], k.shape[2])
    keep = (j <= position) | (j < prefix_len[:, None, None, None]) if causal else torch.ones((), dtype=torch.bool)
    return _attend(_scores(q, k, scale), keep, v, mask)


def t5_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """Hugging Face's T5Attention._relative_position_bucket (transformers/models/t5/modeling_t5.py),
    line for line: relative_position = memory_position - query_position, computed in float32."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    # now relative_position is in the range [0, inf)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def t5_bias(q, k, v, bias_table, mask=None, scale=None, num_buckets=32, max_distance=128, bidirectional=True,
            causal=False):
    i, j, last_kept = _positions(q.shape[2], k.shape[2])
    bucket = t5_relative_position_bucket(j - i, bidirectional, num_buckets, max_distance)
    s = _scores(q, k, scale) + bias_table[:, bucket]        # [h, i, j]
    keep = (j <= last_kept) if causal else torch.ones((), dtype=torch.bool)
    return _attend(s, keep, v, mask)


DEFINITIONS = {f.__name__: f for f in (gqa, alibi, softcap, sliding_window, document, prefix_lm, t5_bias)}


# ------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    spec: str
    params: dict = field(default_factory=dict)
    sizes: tuple = (2, 2, 17, 33, 16)          # B, H, I, J, D
    mask: bool = False
    kv_heads: int | None = None                # k, v heads (None: H)

    @property
    def id(self) -> str:
        B, H, I, J, D = self.sizes
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        heads = f"-{H}q{self.kv_heads}kv" if self.kv_heads else ""
        return f"{self.spec}[{params}]-{I}x{J}{heads}" + ("-mask" if self.mask else "")


CASES = [
    Case("gqa", mask=True, sizes=(2, 4, 17, 33, 16), kv_heads=2),
    Case("gqa", {"causal": False, "scale": 0.5}, (1, 4, 20, 20, 16), kv_heads=1),     # multi-query
    Case("gqa", {}, (2, 2, 17, 33, 16)),                                              # plain: H_kv = H
    Case("alibi", mask=True),
    Case("alibi", {"causal": False, "scale": 0.5}, (1, 4, 20, 20, 16)),
    Case("softcap", {"cap": 2.0}, mask=True),
    Case("softcap", {"causal": False}, (1, 2, 20, 20, 16)),
    Case("sliding_window", {"window": 5}, mask=True),
    Case("sliding_window", {"window": 4, "causal": False}, (1, 2, 20, 20, 16)),
    Case("document", mask=True),
    Case("document", {"causal": False}, (1, 2, 20, 20, 16)),
    Case("prefix_lm", mask=True),
    Case("prefix_lm", {}, (2, 2, 20, 20, 16)),
    Case("prefix_lm", {"causal": False}, (1, 2, 20, 20, 16)),
    Case("t5_bias", mask=True),
    Case("t5_bias", {"num_buckets": 8, "max_distance": 16}),                          # the last bucket is reached
    Case("t5_bias", {"num_buckets": 8, "max_distance": 16, "bidirectional": False}, (1, 2, 20, 20, 16)),
    Case("t5_bias", {"num_buckets": 8, "max_distance": 16, "bidirectional": False, "causal": True}, mask=True),
]


def make_inputs(case: Case, seed: int = 0) -> dict:
    """float64 inputs of a case: q, k, v, the spec's own inputs and (if the case has one) a mask."""
    g = torch.Generator().manual_seed(seed)
    B, H, I, J, D = case.sizes
    heads = {"q": H, "k": case.kv_heads or H, "v": case.kv_heads or H}
    given = {name: torch.randn(B, heads[name], n, D, generator=g, dtype=torch.float64)
             for name, n in (("q", I), ("k", J), ("v", J))}
    if case.mask:
        given["mask"] = torch.rand(B, J, generator=g) < 0.75
    if case.spec == "document":        # sorted document ids of the keys; the queries are the last I of them
        k_doc = torch.cumsum(torch.rand(B, J, generator=g) < 0.2, dim=1)
        given.update(k_doc=k_doc, q_doc=k_doc[:, J - I:].clone())
    if case.spec == "prefix_lm":
        given["prefix_len"] = torch.tensor([J - 5, 3] + [0] * (B - 2))[:B]   # past some queries' positions
    if case.spec == "t5_bias":
        buckets = case.params.get("num_buckets", 32)
        given["bias_table"] = torch.randn(H, buckets, generator=g, dtype=torch.float64)
    return given


def _expected(case: Case, given: dict):
    """The definition's output and the gradients of every float input, in float64."""
    leaves = {n: t.clone().requires_grad_() if t.is_floating_point() else t for n, t in given.items()}
    out = DEFINITIONS[case.spec](**leaves, **case.params)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(dout)
    return out.detach(), {n: t.grad for n, t in leaves.items() if t.is_floating_point()}, dout


def _run(attention, given: dict, dout, dtype):
    leaves = {n: t.to(dtype).requires_grad_() if t.is_floating_point() else t for n, t in given.items()}
    out = attention(**leaves)
    out.backward(dout.to(dtype))
    return out.detach().double(), {n: t.grad.double() for n, t in leaves.items() if t.is_floating_point()}


def _check(case, out, grads, expected, expected_grads, out_tol, grad_tol):
    torch.testing.assert_close(out, expected, **out_tol, msg=lambda m: f"{case.id} output: {m}")
    assert set(grads) == set(expected_grads), case.id
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **grad_tol, msg=lambda m: f"{case.id} d{name}: {m}")


def _case_param(case):
    return pytest.param(case, id=case.id)


# ------------------------------------------------------------------------------------- the tests

def test_the_gallery_is_the_issue_s_contract():
    """Names, params (with their defaults) and inputs exactly as issue 13 gives them."""
    expected_params = {
        "gqa": {"scale": "D ** (-0.5)", "causal": True},
        "alibi": {"scale": "D ** (-0.5)", "causal": True},
        "softcap": {"scale": "D ** (-0.5)", "cap": 30.0, "causal": True},
        "sliding_window": {"scale": "D ** (-0.5)", "window": 1024, "causal": True},
        "document": {"scale": "D ** (-0.5)", "causal": True},
        "prefix_lm": {"scale": "D ** (-0.5)", "causal": True},
        "t5_bias": {"scale": "D ** (-0.5)", "num_buckets": 32, "max_distance": 128, "bidirectional": True,
                    "causal": False},
        "sinks": {"scale": "D ** (-0.5)", "causal": True, "window": 0},
        "sigmoid": {"scale": "D ** (-0.5)", "causal": True, "bias": "-log(J)"},
        "diff_attn": {"scale": "D ** (-0.5)", "causal": True},
    }
    expected_inputs = {
        "document": {"q_doc": ("int", ("b", "i")), "k_doc": ("int", ("b", "j"))},
        "prefix_lm": {"prefix_len": ("int", ("b",))},
        "t5_bias": {"bias_table": ("float", ("h", "num_buckets"))},
        "sinks": {"sinks": ("float", ("h",))},
        "diff_attn": {"q2": ("float", ("b", "h", "i", "d")), "k2": ("float", ("b", "h", "j", "d")),
                      "lam": ("float", ("h",))},
    }
    import ast
    for name in GALLERY:
        spec = kernelsearch.load(spec_path(name), backend="reference").spec
        assert spec.name == name
        defaults = {p.name: ast.unparse(p.default) if isinstance(p.default, ast.expr) else p.default
                    for p in spec.params.values()}
        assert defaults == expected_params[name], name
        required = {n: (d.dtype, tuple(d.shape)) for n, d in spec.inputs.items()
                    if not d.optional and n not in ("q", "k", "v")}
        assert required == expected_inputs.get(name, {}), name
        assert spec.inputs["mask"].optional and spec.inputs["mask"].dtype == "bool"


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
@pytest.mark.parametrize("backend, config", [
    ("reference", None),
    ("torch", {"lowering": "materialized"}),
    ("torch", {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 8}),
], ids=["reference", "torch-materialized", "torch-chunked"])
def test_gallery_on_eager_backends(case, backend, config):
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given)
    attention = kernelsearch.load(spec_path(case.spec), backend=backend, **case.params,
                                  **({"config": config} if config else {}))
    dtype = torch.float64 if backend == "reference" else torch.float32
    out, grads = _run(attention, given, dout, dtype)
    if dtype == torch.float64:
        _check(case, out, grads, expected, expected_grads, FP64, FP64)
    else:
        _check(case, out, grads, expected, expected_grads, FP32, FP32_GRAD)


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_gallery_on_triton_forward_and_backward(case, interpreter):  # noqa: F811
    """Inference (the fused forward kernel) and training (forward, then the dq and dkdv kernels)."""
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given)
    attention = kernelsearch.load(spec_path(case.spec), backend="triton", **case.params,
                                  config={"BLOCK_M": 16, "BLOCK_N": 16})
    with torch.no_grad():
        inference = attention(**{n: t.float() if t.is_floating_point() else t for n, t in given.items()})
    torch.testing.assert_close(inference.double(), expected, **FP32, msg=lambda m: f"{case.id} inference: {m}")
    out, grads = _run(attention, given, dout, torch.float32)
    _check(case, out, grads, expected, expected_grads, FP32, FP32_GRAD)


@pytest.mark.parametrize("params", [
    {},
    {"bidirectional": False},
    {"num_buckets": 8, "max_distance": 16},
    {"num_buckets": 64, "max_distance": 256, "bidirectional": False},
    {"num_buckets": 10, "max_distance": 100},
], ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "defaults")
def test_t5_bucket_is_the_reference_implementation_s(params):
    """The spec's `bucket` entry equals T5's _relative_position_bucket at every relative position
    -599 .. 599 (the reference backend, float64; the T5 code runs in float32 as published)."""
    n = 600
    attention = kernelsearch.load(spec_path("t5_bias"), backend="reference", **params)
    graph = attention.graph(frozenset())
    buckets = params.get("num_buckets", 32)
    tensors = {"q": torch.zeros(1, 1, n, 2, dtype=torch.float64), "k": torch.zeros(1, 1, n, 2, dtype=torch.float64),
               "v": torch.zeros(1, 1, n, 2, dtype=torch.float64), "bias_table": torch.zeros(1, buckets, dtype=torch.float64)}
    got = reference.evaluate_nodes(graph, tensors, ["bucket"])["bucket"]
    relative = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    expected = t5_relative_position_bucket(relative, params.get("bidirectional", True), buckets,
                                           params.get("max_distance", 128))
    assert got.shape == (n, n)
    assert torch.equal(got, expected)
    assert int(expected.max()) == buckets - 1       # every bucket is reached, the last ones included


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_a_bias_table_of_another_size_than_num_buckets_is_refused(backend, interpreter):  # noqa: F811
    """bias_table's dim is named after the param: a table that does not have num_buckets entries per
    head is a ValueError on every backend (Triton would otherwise read it out of bounds silently)."""
    attention = kernelsearch.load(spec_path("t5_bias"), backend=backend, num_buckets=16)
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="dim 'num_buckets' of input 'bias_table' has size 32, but the param "
                                         "'num_buckets' is 16"):
        attention(q, q, q, bias_table=torch.randn(2, 32))
    assert attention(q, q, q, bias_table=torch.randn(2, 16)).shape == q.shape


def test_random_inputs_size_a_dim_named_after_a_param():
    from kernelsearch.inputs import random_inputs
    spec = kernelsearch.load_spec(spec_path("t5_bias"))
    sizes = dict(B=1, H=3, I=4, J=5, D=8)
    assert random_inputs(spec, sizes)["bias_table"].shape == (3, 32)
    assert random_inputs(spec, sizes, params={"num_buckets": 8})["bias_table"].shape == (3, 8)


def test_the_readme_shows_the_t5_bucket_as_the_spec_has_it():
    from .conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    block = readme.split("gathered from the learned table:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    spec_lines = set((ROOT / "specs" / "t5_bias.yaml").read_text().splitlines())
    assert block.strip() and all(line in spec_lines for line in block.splitlines()), block


@pytest.mark.parametrize("name", ["alibi", "softcap", "sliding_window", "document", "prefix_lm", "t5_bias",
                                  "sinks", "sigmoid", "diff_attn", "gqa"])
def test_gallery_specs_train_a_language_model(name, capsys):
    """`kernelsearch lm` trains mesh-tensorflow's LM around them (document ids and the prefix length
    are made from the tokens: tests/test_token_inputs.py)."""
    import json
    from kernelsearch.cli import main
    assert main(["lm", spec_path(name), "--model", "mesh_tf", "--steps", "2", "--seq-len", "64",
                 "--batch-size", "2", "--sample-len", "4", "--backend", "torch", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
