"""Row normalisers beyond one softmax (issue 13 items 2-4): softmax with sinks (specs/sinks.yaml,
softmax plus one), normaliser-free attention with masked(...) (specs/sigmoid.yaml, ReLU attention)
and several softmaxes (specs/diff_attn.yaml).

Each is checked against an independent float64 PyTorch definition written here (nothing from
kernelsearch) on every backend - reference, torch materialized and chunked, Triton forward and
backward in the interpreter - outputs and the gradients of every float input (sinks and lam
included), with sizes that do not divide the tiles (I=17, J=33 against 16 x 16 blocks), I != J
and I == J, causal on and off, windows, and key padding that leaves a row with no key at all.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

import pytest
import torch

import kernelsearch
from kernelsearch.passes.library import lowerings, why_not
from kernelsearch.passes.plan import describe_plan
from tests.test_ops import interpreter  # noqa: F401 (a fixture)

from .conftest import spec_path

FP32 = dict(rtol=2e-4, atol=2e-4)          # fp32 backends against float64
FP32_GRAD = dict(rtol=1e-3, atol=1e-3)
FP64 = dict(rtol=1e-10, atol=1e-10)        # the reference backend in float64


# ------------------------------------------------------------------------- the definitions (float64)

def _keep(B, I, J, causal=True, window=0, mask=None):
    """[b, 1, i, j] keys kept: bottom-right causal, the last `window` keys up to the query, key padding."""
    i = torch.arange(I)[:, None]
    j = torch.arange(J)[None, :]
    position = i + J - I
    keep = torch.ones(I, J, dtype=torch.bool)
    if causal:
        keep &= j <= position
    if window:
        keep &= position - j < window
    keep = keep.expand(B, 1, I, J)
    return keep & mask[:, None, None, :] if mask is not None else keep


def _scores(q, k, scale):
    return torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)


def _softmax_rows(s, keep):
    """softmax over the kept keys; a row that keeps none is 0."""
    empty = ~keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(empty, 0.0, s.masked_fill(~keep, float("-inf"))), dim=-1)
    return p.masked_fill(empty, 0.0)


def sinks(q, k, v, sinks, mask=None, scale=None, causal=True, window=0):
    """gpt-oss: the sink logit of each head concatenated to the scores as an extra column, softmax,
    the column dropped (it takes probability mass and adds nothing to the output)."""
    B, H, I, J = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    s = _scores(q, k, scale).masked_fill(~_keep(B, I, J, causal, window, mask), float("-inf"))
    column = sinks.reshape(1, H, 1, 1).expand(B, H, I, 1)
    p = torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bhij,bhjd->bhid", p, v)


def sigmoid(q, k, v, mask=None, scale=None, causal=True, bias=None):
    """Ramapuram et al. 2024: p_ij = sigmoid(s_ij * scale + bias), bias = -log(n) by default, no row
    normalisation; dropped entries contribute nothing."""
    B, I, J = q.shape[0], q.shape[2], k.shape[2]
    bias = -math.log(J) if bias is None else bias
    p = torch.sigmoid(_scores(q, k, scale) + bias) * _keep(B, I, J, causal, 0, mask)
    return torch.einsum("bhij,bhjd->bhid", p, v)


def diff_attn(q, k, v, q2, k2, lam, mask=None, scale=None, causal=True):
    """Ye et al. 2024: the difference of two softmax attention maps, the second weighted by lambda."""
    B, H, I, J = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = _keep(B, I, J, causal, 0, mask)
    p = _softmax_rows(_scores(q, k, scale), keep) - lam.reshape(1, H, 1, 1) * _softmax_rows(_scores(q2, k2, scale), keep)
    return torch.einsum("bhij,bhjd->bhid", p, v)


DEFINITIONS = {"sinks": sinks, "sigmoid": sigmoid, "diff_attn": diff_attn}


# ------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    spec: str
    params: dict = field(default_factory=dict)
    sizes: tuple = (2, 2, 17, 33, 16)          # B, H, I, J, D
    mask: bool = False

    @property
    def id(self) -> str:
        B, H, I, J, D = self.sizes
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.spec}[{params}]-{I}x{J}" + ("-mask" if self.mask else "")


CASES = [
    Case("sinks", mask=True),
    Case("sinks", {"window": 5}, mask=True),
    Case("sinks", {"causal": False, "scale": 0.5}, (1, 2, 20, 20, 16)),
    Case("sinks", {"causal": False, "window": 4}, (1, 2, 20, 20, 16), mask=True),
    Case("sigmoid", mask=True),
    Case("sigmoid", {"causal": False, "bias": 0.5}, (1, 2, 20, 20, 16)),
    Case("diff_attn", mask=True),
    Case("diff_attn", {"causal": False, "scale": 0.3}, (1, 2, 20, 20, 16)),
]


def make_inputs(case: Case, seed: int = 0) -> dict:
    """float64 inputs of a case; a mask drops every key of sample 0's last keys and all of sample 1's
    first ones, so that some rows keep no key at all."""
    g = torch.Generator().manual_seed(seed)
    B, H, I, J, D = case.sizes
    given = {name: torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for name, n in (("q", I), ("k", J), ("v", J))}
    if case.mask:
        mask = torch.rand(B, J, generator=g) < 0.75
        mask[-1, : J - I + 3] = False           # the first rows of the last sample keep nothing (causal)
        given["mask"] = mask
    if case.spec == "sinks":
        given["sinks"] = torch.randn(H, generator=g, dtype=torch.float64)
    if case.spec.startswith("diff_attn"):
        given["q2"] = torch.randn(B, H, I, D, generator=g, dtype=torch.float64)
        given["k2"] = torch.randn(B, H, J, D, generator=g, dtype=torch.float64)
        given["lam"] = torch.rand(H, generator=g, dtype=torch.float64) + 0.2
    return given


def _expected(case: Case, given: dict, definition=None):
    """The definition's output and the gradients of every float input, in float64."""
    leaves = {n: t.clone().requires_grad_() if t.is_floating_point() else t for n, t in given.items()}
    out = (definition or DEFINITIONS[case.spec])(**leaves, **case.params)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(dout)
    return out.detach(), {n: t.grad for n, t in leaves.items() if t.is_floating_point()}, dout


def _run(attention, given: dict, dout, dtype):
    leaves = {n: t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for n, t in given.items()}
    out = attention(**leaves)
    out.backward(dout.to(dtype))
    return out.detach().double(), {n: t.grad.double() for n, t in leaves.items() if t.is_floating_point()}


def _check(case_id, out, grads, expected, expected_grads, out_tol, grad_tol):
    torch.testing.assert_close(out, expected, **out_tol, msg=lambda m: f"{case_id} output: {m}")
    assert set(grads) == set(expected_grads), case_id
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **grad_tol, msg=lambda m: f"{case_id} d{name}: {m}")


EAGER = pytest.mark.parametrize("backend, config", [
    ("reference", None),
    ("torch", {"lowering": "materialized"}),
    ("torch", {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 8}),
], ids=["reference", "torch-materialized", "torch-chunked"])


def _on_eager_backend(case_id, spec, params, given, expected, expected_grads, dout, backend, config):
    attention = kernelsearch.load(spec, backend=backend, **params, **({"config": config} if config else {}))
    dtype = torch.float64 if backend == "reference" else torch.float32
    out, grads = _run(attention, given, dout, dtype)
    tolerances = (FP64, FP64) if dtype == torch.float64 else (FP32, FP32_GRAD)
    _check(case_id, out, grads, expected, expected_grads, *tolerances)


def _on_triton(case_id, spec, params, given, expected, expected_grads, dout):
    """Inference (the fused forward kernel) and training (forward saving lse, then dq and dkdv)."""
    attention = kernelsearch.load(spec, backend="triton", **params, config={"BLOCK_M": 16, "BLOCK_N": 16})
    with torch.no_grad():
        inference = attention(**{n: t.float() if t.is_floating_point() else t for n, t in given.items()})
    torch.testing.assert_close(inference.double(), expected, **FP32, msg=lambda m: f"{case_id} inference: {m}")
    out, grads = _run(attention, given, dout, torch.float32)
    _check(case_id, out, grads, expected, expected_grads, FP32, FP32_GRAD)


# ------------------------------------------------------------------------------------- the tests

def test_the_specs_are_the_issue_s_contract():
    """Names, params (with their defaults) and inputs exactly as issue 13 gives them."""
    import ast
    expected_params = {
        "sinks": {"scale": "D ** (-0.5)", "causal": True, "window": 0},
        "sigmoid": {"scale": "D ** (-0.5)", "causal": True, "bias": "-log(J)"},
        "diff_attn": {"scale": "D ** (-0.5)", "causal": True},
    }
    expected_inputs = {
        "sinks": {"sinks": ("float", ("h",))},
        "diff_attn": {"q2": ("float", ("b", "h", "i", "d")), "k2": ("float", ("b", "h", "j", "d")),
                      "lam": ("float", ("h",))},
    }
    for name in expected_params:
        spec = kernelsearch.load_spec(spec_path(name))
        assert spec.name == name
        defaults = {p.name: ast.unparse(p.default) if isinstance(p.default, ast.expr) else p.default
                    for p in spec.params.values()}
        assert defaults == expected_params[name], name
        required = {n: (d.dtype, tuple(d.shape)) for n, d in spec.inputs.items()
                    if not d.optional and n not in ("q", "k", "v")}
        assert required == expected_inputs.get(name, {}), name
        assert spec.inputs["mask"].optional and spec.inputs["mask"].dtype == "bool"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
@EAGER
def test_on_eager_backends(case, backend, config):
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given)
    _on_eager_backend(case.id, spec_path(case.spec), case.params, given, expected, expected_grads, dout,
                      backend, config)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_on_triton_forward_and_backward(case, interpreter):  # noqa: F811
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given)
    _on_triton(case.id, spec_path(case.spec), case.params, given, expected, expected_grads, dout)


def test_a_row_with_no_kept_key_and_a_sink_gives_zero():
    """All of a row's mass goes to the sink: its output is 0 (and not NaN) on every backend."""
    case = Case("sinks", {}, (1, 2, 6, 6, 16), mask=True)
    given = make_inputs(case)
    given["mask"] = torch.zeros(1, 6, dtype=torch.bool)
    for backend, config in (("reference", None), ("torch", {"lowering": "chunked", "CHUNK_N": 4})):
        attention = kernelsearch.load(spec_path("sinks"), backend=backend, **({"config": config} if config else {}))
        out = attention(**given)
        assert torch.equal(out, torch.zeros_like(out)), backend


SOFTMAX_PLUS_ONE = """\
name: softmax_plus_one
summary: softmax plus one (Evan Miller's "attention is off by one") - a sink fixed at logit 0.
params:
  scale: {type: float, default: "D ** -0.5"}
  causal: {type: bool, default: true}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  mask: {shape: [b, j], dtype: bool, optional: true}
graph:
  s: dot(q, k) * scale
  causal_keep: (j <= i + J - I) if causal else None
  p: softmax(s, keep=[causal_keep, mask], sinks=0)
  o: dot(p, v)
outputs: [o]
"""


def _plus_one(q, k, v, mask=None, causal=True):
    """exp(s) / (1 + sum exp(s)): the definition written out (no sink column)."""
    B, I, J = q.shape[0], q.shape[2], k.shape[2]
    keep = _keep(B, I, J, causal, 0, mask)
    weights = torch.exp(_scores(q, k, None)) * keep
    return torch.einsum("bhij,bhjd->bhid", weights / (1 + weights.sum(-1, keepdim=True)), v)


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_plus_one_is_the_sink_zero(tmp_path, causal, interpreter):  # noqa: F811
    path = tmp_path / "softmax_plus_one.yaml"
    path.write_text(SOFTMAX_PLUS_ONE)
    case = Case("softmax_plus_one", {"causal": causal}, mask=True)
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given, _plus_one)
    for backend, config in (("reference", None), ("torch", {"lowering": "materialized"}),
                            ("torch", {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 8})):
        _on_eager_backend(case.id, str(path), case.params, given, expected, expected_grads, dout, backend, config)
    _on_triton(case.id, str(path), case.params, given, expected, expected_grads, dout)


@pytest.mark.parametrize("name, reason", [
    ("sinks", "sink"),
    ("sigmoid", "masked(...), not softmax"),
    ("diff_attn", "2 normalisers"),
])
def test_library_kernels_are_not_offered_for_what_they_cannot_express(name, reason):
    """SDPA and FlexAttention have one softmax and no sink: the torch backend does not offer them."""
    attention = kernelsearch.load(spec_path(name), backend="torch")
    graph = attention.graph(frozenset())
    assert lowerings(graph) == ()
    assert reason in why_not(graph, "sdpa") and reason in why_not(graph, "flex")
    from kernelsearch.codegen.torch_module import lowerings as torch_lowerings
    assert torch_lowerings(graph) == ("materialized", "chunked")


def _graph(spec, **params):
    return kernelsearch.load(spec, backend="reference", **params).graph(frozenset())


def test_the_plan_names_the_sink():
    graph = _graph(spec_path("sinks"))
    (normaliser,) = graph.plan.normalisers
    assert (normaliser.kind, normaliser.sink, graph.plan.sweeps) == ("softmax", "sinks", 1)
    assert any("sink sinks in the denominator" in line for line in describe_plan(graph))


def test_masked_attention_has_no_row_statistics_and_keeps_block_skipping():
    graph = _graph(spec_path("sigmoid"))
    (normaliser,) = graph.plan.normalisers
    assert (normaliser.kind, normaliser.statistics, graph.plan.sweeps, graph.plan.delta_sweep) == \
        ("masked", False, 1, False)
    assert graph.plan.key_bounds.upper is not None          # causal: key blocks past the diagonal are skipped
    assert not _graph(spec_path("sigmoid"), causal=False).plan.key_bounds.skips_blocks
    lines = describe_plan(graph)
    assert any("no row statistics" in line for line in lines) and any(line.startswith("keys     row i keeps keys")
                                                                     for line in lines)


def test_a_param_default_may_call_an_elementwise_op_of_sizes():
    """sigmoid's bias defaults to -log(J): the registry's log on a size, evaluated at the call's J."""
    spec = kernelsearch.load_spec(spec_path("sigmoid"))
    from kernelsearch.inputs import check_param_values
    values = check_param_values(spec, {n: p.default for n, p in spec.params.items()}, {"j": 40, "d": 16})
    assert values["bias"] == pytest.approx(-math.log(40))


def test_a_dot_of_a_combination_of_softmaxes_takes_two_sweeps():
    """diff_attn writes dot(p1 - lam * p2, v): not distributed; exact row statistics of both first."""
    graph = _graph(spec_path("diff_attn"))
    assert [n.kind for n in graph.plan.normalisers] == ["softmax", "softmax"]
    assert graph.plan.sweeps == 2 and "not distributed" in graph.plan.sweeps_reason
    assert graph.plan.delta_sweep and len(graph.plan.statistics) == 2


@pytest.mark.parametrize("text, message, hint", [
    ("p: softmax(s, sinks=bias)", "softmax's sinks= has dims [b, h, i, j]", "sinks: [h]"),
    ("p: softmax(s, sinks=j < 3)", "softmax's sinks= is a logit (a number), got a bool value", "sinks=0"),
])
def test_refusals_name_the_construct_and_suggest_the_nearest(tmp_path, text, message, hint):
    from kernelsearch.errors import SpecError
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: bad
        inputs:
          q: [b, h, i, d]
          k: [b, h, j, d]
          v: [b, h, j, d]
          bias: [b, h, i, j]
        graph:
          s: dot(q, k) + bias
          {text}
          o: dot(p, v)
        outputs: [o]
        """))
    with pytest.raises(SpecError) as info:
        kernelsearch.compiler.check_spec(path)
    assert message in info.value.message and hint in (info.value.hint or ""), str(info.value)
    assert info.value.location is not None and info.value.location.line == 9


def test_a_spec_without_a_normaliser_is_refused_naming_both():
    from kernelsearch.errors import SpecError
    with pytest.raises(SpecError, match=r"no row normaliser \(softmax\(...\) or masked\(...\)\)"):
        kernelsearch.compiler.check_spec("tests/bad_specs/no_softmax.yaml")


def test_sinks_trains_a_language_model(capsys):
    """`kernelsearch lm` trains mesh-tensorflow's LM around it; the sinks are learned (they start at 0)."""
    import json
    from kernelsearch.cli import main
    assert main(["lm", spec_path("sinks"), "--model", "mesh_tf", "--steps", "2", "--seq-len", "64",
                 "--batch-size", "2", "--sample-len", "4", "--backend", "torch", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])


@pytest.mark.parametrize("name", ["sigmoid"])
def test_masked_attention_trains_a_language_model(name, capsys):
    """diff_attn does not train in the LMs yet: its q2 and k2 are per-token inputs no model makes."""
    import json
    from kernelsearch.cli import main
    assert main(["lm", spec_path(name), "--model", "mesh_tf", "--steps", "2", "--seq-len", "64",
                 "--batch-size", "2", "--sample-len", "4", "--backend", "torch", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])


RELU = """\
name: relu_attention
summary: ReLU attention - relu(s) / J on the kept entries, no row statistics.
params:
  scale: {type: float, default: "D ** -0.5"}
  causal: {type: bool, default: true}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  mask: {shape: [b, j], dtype: bool, optional: true}
graph:
  s: dot(q, k) * scale
  causal_keep: (j <= i + J - I) if causal else None
  p: masked(relu(s) / J, keep=[causal_keep, mask])
  o: dot(p, v)
outputs: [o]
"""


def _relu_attention(q, k, v, mask=None, causal=True):
    B, I, J = q.shape[0], q.shape[2], k.shape[2]
    p = torch.relu(_scores(q, k, None)) / J * _keep(B, I, J, causal, 0, mask)
    return torch.einsum("bhij,bhjd->bhid", p, v)


@pytest.mark.parametrize("causal", [True, False])
def test_relu_attention_through_masked(tmp_path, causal, interpreter):  # noqa: F811
    path = tmp_path / "relu_attention.yaml"
    path.write_text(RELU)
    case = Case("relu_attention", {"causal": causal}, mask=True)
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given, _relu_attention)
    for backend, config in (("reference", None), ("torch", {"lowering": "materialized"}),
                            ("torch", {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 8})):
        _on_eager_backend(case.id, str(path), case.params, given, expected, expected_grads, dout, backend, config)
    _on_triton(case.id, str(path), case.params, given, expected, expected_grads, dout)


def test_a_combination_of_dots_shares_one_sweep(tmp_path, interpreter):  # noqa: F811
    """dot(p1, v) - lam * dot(p2, v): each accumulator is linear in one softmax - one online sweep,
    each accumulator rescaled and divided by its own softmax's statistics."""
    path = tmp_path / "diff_attn_split.yaml"
    path.write_text((spec_path_text := open(spec_path("diff_attn")).read())
                    .replace("o: dot(p1 - lam * p2, v)", "o: dot(p1, v) - lam * dot(p2, v)"))
    assert spec_path_text != path.read_text()
    graph = _graph(str(path))
    assert graph.plan.sweeps == 1 and graph.plan.reduced_by == (0, 1)
    assert any("rescaled by p1, p2" in line for line in describe_plan(graph))
    case = Case("diff_attn", mask=True)
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given)
    for backend, config in (("reference", None), ("torch", {"lowering": "materialized"}),
                            ("torch", {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 8})):
        _on_eager_backend(case.id, str(path), {}, given, expected, expected_grads, dout, backend, config)
    attention = kernelsearch.load(str(path), backend="triton", config={"BLOCK_M": 16, "BLOCK_N": 16})
    with torch.no_grad():
        inference = attention(**{n: t.float() if t.is_floating_point() else t for n, t in given.items()})
    torch.testing.assert_close(inference.double(), expected, **FP32)
    leaves = {n: t.float().requires_grad_() if t.is_floating_point() else t for n, t in given.items()}
    out = attention(**leaves)
    out.backward(dout.float())
    torch.testing.assert_close(out.detach().double(), expected, **FP32)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(leaves[name].grad.double(), grad, **FP32_GRAD, msg=lambda m: f"d{name}: {m}")


def test_the_readme_shows_the_normalisers_as_the_specs_have_them():
    from .conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Row normalisers**", 1)[1].split("SDPA and FlexAttention are offered", 1)[0]
    import re
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    known = {line.strip() for text in [SOFTMAX_PLUS_ONE, RELU] + [open(spec_path(n)).read()
                                                                  for n in ("sinks", "sigmoid", "diff_attn")]
             for line in text.splitlines()}
    for block in blocks:
        for line in filter(str.strip, block.splitlines()):
            assert line.strip() in known, line
    for construct in ("softmax(s, keep=[...], sinks=x)", "masked(x, keep=[...])", "relu"):
        assert construct in readme, construct


MIXED = """\
name: mixed
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  sinks: [b, h]
  mask: {shape: [b, j], dtype: bool, optional: true}
graph:
  s: dot(q, k) * 0.25
  p1: softmax(s, keep=[j <= i + J - I, mask], sinks=sinks * 2.0)
  p2: masked(sigmoid(s), keep=[i + J - I - j < 4])
  o: dot(p1 * p1 + p2, v)
outputs: [o]
"""


def _mixed(q, k, v, sinks, mask=None):
    """A softmax with a computed per-(b, h) sink, squared, plus a windowed sigmoid without statistics."""
    B, H, I, J = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.25
    logits = torch.cat([s.masked_fill(~_keep(B, I, J, True, 0, mask), float("-inf")),
                        (sinks * 2.0).reshape(B, H, 1, 1).expand(B, H, I, 1)], dim=-1)
    p1 = torch.softmax(logits, dim=-1)[..., :-1]
    p2 = torch.sigmoid(s) * _keep(B, I, J, False, 4)
    return torch.einsum("bhij,bhjd->bhid", p1 * p1 + p2, v)


def test_a_softmax_with_a_computed_sink_and_a_masked_normaliser_together(tmp_path, interpreter):  # noqa: F811
    """Two normalisers of different kinds and keeps (the key loop visits what either keeps: every
    block here), p transformed non-linearly (two sweeps), a [b, h] sink computed from an input (the
    training path takes it from autograd's prologue)."""
    path = tmp_path / "mixed.yaml"
    path.write_text(MIXED)
    graph = _graph(str(path))
    assert [n.kind for n in graph.plan.normalisers] == ["softmax", "masked"] and graph.plan.sweeps == 2
    assert not graph.plan.key_bounds.skips_blocks
    case = Case("mixed", mask=True)
    given = make_inputs(case)
    given["sinks"] = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected, expected_grads, dout = _expected(case, given, _mixed)
    for backend, config in (("reference", None), ("torch", {"lowering": "materialized"}),
                            ("torch", {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 8})):
        _on_eager_backend(case.id, str(path), {}, given, expected, expected_grads, dout, backend, config)
    _on_triton(case.id, str(path), {}, given, expected, expected_grads, dout)


DOCUMENT_SINKS = """\
name: document_sinks
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  q_doc: {shape: [b, i], dtype: int}
  k_doc: {shape: [b, j], dtype: int}
  sinks: [h]
graph:
  s: dot(q, k) * 0.25
  p: softmax(s, keep=[q_doc == k_doc, j <= i + J - I], sinks=sinks)
  o: dot(p, v)
outputs: [o]
"""


def _document_sinks(q, k, v, q_doc, k_doc, sinks):
    B, H, I, J = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = (q_doc[:, None, :, None] == k_doc[:, None, None, :]) & _keep(B, I, J)
    s = (torch.einsum("bhid,bhjd->bhij", q, k) * 0.25).masked_fill(~keep, float("-inf"))
    p = torch.softmax(torch.cat([s, sinks.reshape(1, H, 1, 1).expand(B, H, I, 1)], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bhij,bhjd->bhid", p, v)


def test_sinks_with_a_block_mask(tmp_path, interpreter):  # noqa: F811
    """Document ids make a block mask (tiles of other documents skipped); the sink is in every row."""
    path = tmp_path / "document_sinks.yaml"
    path.write_text(DOCUMENT_SINKS)
    assert _graph(str(path)).plan.block_mask is not None
    case = Case("sinks", {}, (2, 2, 40, 50, 16))
    given = make_inputs(case)
    g = torch.Generator().manual_seed(5)
    k_doc = torch.cumsum(torch.rand(2, 50, generator=g) < 0.1, dim=1)
    given.update(k_doc=k_doc, q_doc=k_doc[:, 10:].clone())
    expected, expected_grads, dout = _expected(case, given, _document_sinks)
    for backend, config in (("reference", None), ("torch", {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 16})):
        _on_eager_backend(case.id, str(path), {}, given, expected, expected_grads, dout, backend, config)
    _on_triton(case.id, str(path), {}, given, expected, expected_grads, dout)


@pytest.mark.parametrize("name", ["sinks", "sigmoid", "diff_attn"])
def test_grouped_kv_heads(name, interpreter):  # noqa: F811
    """gpt-oss has sinks with grouped KV heads: k, v (and k2) with 2 heads for q's 4, on every backend
    (the definition repeats them per query head; their gradients sum over the group)."""
    case = Case(name, {}, (2, 4, 17, 33, 16), mask=True)
    given = make_inputs(case)
    for n in ("k", "v", "k2"):
        if n in given:
            given[n] = given[n][:, :2].clone()
    definition = DEFINITIONS[name]

    def repeated(**t):
        t = {n: x.repeat_interleave(2, dim=1) if n in ("k", "v", "k2") else x for n, x in t.items()}
        return definition(**t)
    expected, expected_grads, dout = _expected(case, given, repeated)
    for backend, config in (("reference", None), ("torch", {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 8})):
        _on_eager_backend(case.id, spec_path(name), {}, given, expected, expected_grads, dout, backend, config)
    _on_triton(case.id, spec_path(name), {}, given, expected, expected_grads, dout)
