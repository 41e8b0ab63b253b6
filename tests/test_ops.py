"""The op registry (kernelsearch/ops.py): every entry complete, and the rounding ops, each added as
one entry, correct on every backend against a float64 definition written here with numpy.

The rounding spec keeps every rounded value exact in fp32 (q and k hold small integers, the
multipliers are powers of two), so the fp32 backends round the same numbers as float64 does and
ties (x.5, for round's half-to-even) really occur: in-tile (`(i - j) * 0.5`, `dot(q, k) * 0.25`),
per query row (`q * 0.75`), on integers (`i - j`: the identity) and on host scalars (`D / 3`).
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import kernelsearch
from kernelsearch import ops
from kernelsearch.exprs import OPS as CALLABLE_BY_NAME

ROUNDING = {"floor": np.floor, "ceil": np.ceil, "round": np.round, "trunc": np.trunc}   # np.round: half to even
SIZES = {"B": 1, "H": 2, "I": 20, "J": 24, "D": 16}
TOL = 2e-4          # fp32 against float64: rounding of exp/sums only (the rounded values are exact)


# ------------------------------------------------------------------------------------- the registry

@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_every_entry_is_complete(name):
    entry = ops.OPS[name]
    assert entry.rule, name
    if entry.lowering == "structural":
        assert entry.reference is not None
        return
    assert entry.lowering == "elementwise"
    for form in ("tensor", "scalar", "torch", "python", "triton"):
        assert getattr(entry, form) is not None, f"{name} has no {form}"
    assert entry.grad is None or len(entry.grad) == len(entry.positional), name
    # every Triton helper a rendering or a derivative calls is declared, and exists
    texts = [t for t in (entry.triton, entry.triton_int, *(entry.grad or ())) if isinstance(t, str)]
    called = {c for t in texts for c in re.findall(r"\b(_[a-z]\w*)\(", t)}
    assert called <= set(entry.helpers), (name, called, entry.helpers)
    assert set(entry.helpers) <= set(ops.TRITON_HELPERS)


def test_specs_call_exactly_the_callable_ops():
    assert set(CALLABLE_BY_NAME) == {n for n, e in ops.OPS.items() if e.syntax is None and n != "gather"}
    assert {"floor", "ceil", "round", "trunc"} <= set(CALLABLE_BY_NAME)


def test_helpers_come_with_what_they_call():
    assert "def _floordiv" in ops.triton_helpers(["_floormod"])
    assert "def _round" not in ops.triton_helpers(["_floormod"])


_SAMPLES = [-2.5, -1.5, -0.7, -0.5, 0.0, 0.3, 0.5, 1.5, 2.5, 3.25]


@pytest.mark.parametrize("name", sorted(n for n, e in ops.OPS.items() if e.lowering == "elementwise"))
def test_tensor_and_scalar_meanings_agree(name):
    """What the reference computes on tensors is what constant folding computes on Python numbers."""
    entry = ops.OPS[name]
    arity = len(entry.positional)
    logical = entry.rule in ("logic", "not")
    values = [True, False] if logical else [v for v in _SAMPLES if not (entry.rule == "float" and v <= 0)]
    for args in _argument_tuples(name, values, arity):
        if entry.nonzero and any(args[p] == 0 for p in entry.nonzero):
            continue
        tensors = [torch.tensor(a, dtype=torch.bool if isinstance(a, bool) else torch.float64) for a in args]
        expected = entry.scalar(*args)
        got = ops.evaluate(name, tensors, "float").item()
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), (name, args)


def _argument_tuples(name, values, arity):
    if name == "where":
        return [(c, a, b) for c in (True, False) for a in values[:3] for b in values[-3:]]
    if name == "pow":
        return [(a, b) for a in values if a > 0 for b in values]
    if arity == 1:
        return [(a,) for a in values]
    return [(a, b) for a in values for b in values]


@pytest.mark.parametrize("name, function", ROUNDING.items())
def test_rounding_folds_like_numpy_and_keeps_integers(name, function):
    scalar = ops.OPS[name].scalar
    for x in (-3.5, -2.5, -0.5, 0.5, 1.5, 2.5, 2.4999, -7.25):
        assert scalar(x) == float(function(x)) and type(scalar(x)) is float, (name, x)
    assert scalar(7) == 7 and type(scalar(7)) is int


# ------------------------------------------------------------------------------ the rounding spec

SPEC = """\
name: rounding_{op}
summary: every place a rounding op can be - in-tile, per query row, on integers, on host scalars
params:
  scale: {{type: float, default: 0.5}}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
graph:
  qr: q + {op}(q * 0.75) * 0.125
  host: {op}(D / 3) * 0.25 + {op}(-D / 3) * 0.125 + {op}(D * 0.5 + 0.5) * 0.0625
  s: dot(qr, k) * scale + {op}(dot(q, k) * 0.25) * 0.5 + {op}((i - j) * 0.5) + {op}(i - j) * 0.125 + host
  p: softmax(s)
  o: dot(p, v)
outputs: [o]
"""


def definition(op: str, q, k, v, first=lambda qk: qk * 0.5):
    """The spec above in float64, from numpy's rounding; rounded terms are constants (derivative 0).
    first: the first term of the scores, of dot(qr, k)."""
    rounded = lambda x: torch.from_numpy(ROUNDING[op](x.detach().double().numpy()))   # noqa: E731
    D = q.shape[-1]
    i = torch.arange(q.shape[2], dtype=torch.float64)[:, None]
    j = torch.arange(k.shape[2], dtype=torch.float64)[None, :]
    host = float(ROUNDING[op](D / 3)) * 0.25 + float(ROUNDING[op](-D / 3)) * 0.125 \
        + float(ROUNDING[op](D * 0.5 + 0.5)) * 0.0625
    qr = q + rounded(q * 0.75) * 0.125
    s = first(torch.einsum("bhid,bhjd->bhij", qr, k)) + rounded(torch.einsum("bhid,bhjd->bhij", q, k) * 0.25) * 0.5 \
        + rounded((i - j) * 0.5) + (i - j) * 0.125 + host
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, dim=-1), v)


def spec_file(tmp_path, op):
    path = tmp_path / f"rounding_{op}.yaml"
    path.write_text(SPEC.format(op=op))
    return str(path)


def inputs(dtype, seed=0):
    """q and k small integers (exact dots in fp32), v any float."""
    g = torch.Generator().manual_seed(seed)
    B, H, I, J, D = (SIZES[n] for n in "BHIJD")
    q = torch.randint(-2, 3, (B, H, I, D), generator=g).to(dtype)
    k = torch.randint(-2, 3, (B, H, J, D), generator=g).to(dtype)
    v = torch.randn(B, H, J, D, generator=g, dtype=torch.float64).to(dtype)
    return {"q": q, "k": k, "v": v}


def test_the_spec_has_ties_where_round_and_the_others_differ():
    """The check would be weak without them: `q * 0.75` and `(i - j) * 0.5` hit x.5 exactly."""
    x = inputs(torch.float64)["q"] * 0.75
    assert (x.abs() == 1.5).any()
    assert not torch.equal(torch.round(x), torch.floor(x + 0.5))   # half to even, not half up


def _outputs_and_gradients(attention, given, dtype):
    leaves = {n: t.detach().to(dtype).clone().requires_grad_() for n, t in given.items()}
    out = attention(**leaves)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(dout.to(dtype))
    return out.detach().double(), {n: t.grad.double() for n, t in leaves.items()}


@pytest.mark.parametrize("op", sorted(ROUNDING))
@pytest.mark.parametrize("backend, config", [
    ("reference", None),
    ("torch", {"lowering": "materialized"}),
    ("torch", {"lowering": "chunked", "CHUNK_N": 7, "CHUNK_M": 8}),
], ids=["reference", "torch-materialized", "torch-chunked"])
def test_rounding_ops_on_eager_backends(tmp_path, op, backend, config):
    dtype = torch.float64 if backend == "reference" else torch.float32
    given = inputs(torch.float64)
    expected, expected_grads = _outputs_and_gradients(lambda **t: definition(op, **t), given, torch.float64)
    attention = kernelsearch.load(spec_file(tmp_path, op), backend=backend, **({"config": config} if config else {}))
    out, grads = _outputs_and_gradients(attention, given, dtype)
    tolerance = 1e-10 if dtype == torch.float64 else TOL
    assert (out - expected).abs().max().item() <= tolerance, (op, backend, config)
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max().item() <= 10 * tolerance, (op, backend, config, name)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kernelsearch.backends import triton_backend
    monkeypatch.setattr(triton_backend, "POISON_OUTPUTS", True)
    return triton_backend


@pytest.mark.parametrize("op", sorted(ROUNDING))
def test_rounding_ops_on_triton_forward_and_backward(tmp_path, interpreter, op):
    """Forward: the fused kernel (the q-side rounding runs in its prologue). Backward: the dq and
    dkdv kernels (rounded scores contribute 0) with the per-row part through autograd."""
    given = inputs(torch.float64)
    expected, expected_grads = _outputs_and_gradients(lambda **t: definition(op, **t), given, torch.float64)
    attention = kernelsearch.load(spec_file(tmp_path, op), backend="triton", config={"BLOCK_M": 16, "BLOCK_N": 16})
    with torch.no_grad():
        inference = attention(**{n: t.float() for n, t in given.items()})
    assert (inference.double() - expected).abs().max().item() <= TOL, op
    out, grads = _outputs_and_gradients(attention, given, torch.float32)
    assert (out - expected).abs().max().item() <= TOL, op
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max().item() <= 10 * TOL, (op, name)


# ------------------------------------------------------------------------- one entry is enough

def test_a_new_elementwise_op_is_one_entry(tmp_path, monkeypatch, interpreter):
    """Register `square` (x * x) as one entry and use it: every backend follows."""
    square = ops.elementwise("square", "elementwise x * x", torch.square, lambda x: x * x,
                             torch="torch.square({0})", python="({0} * {0})", triton="{0} * {0}",
                             grad=("2.0 * {g} * {x0}",))
    monkeypatch.setitem(ops.OPS, "square", square)
    monkeypatch.setitem(ops.CALLABLE, "square", square)
    path = tmp_path / "squared.yaml"
    path.write_text(SPEC.format(op="round").replace("rounding_round", "squared")
                    .replace("s: dot(qr, k) * scale +", "s: square(dot(qr, k) * 0.125) * scale +"))
    given = inputs(torch.float64, seed=5)

    def definition_squared(q, k, v):
        return definition("round", q, k, v, first=lambda qk: (qk * 0.125) ** 2 * 0.5)
    expected, expected_grads = _outputs_and_gradients(definition_squared, given, torch.float64)
    for backend, config, dtype in [("reference", None, torch.float64),
                                   ("torch", {"lowering": "chunked", "CHUNK_N": 8}, torch.float32),
                                   ("triton", {"BLOCK_M": 16, "BLOCK_N": 16}, torch.float32)]:
        attention = kernelsearch.load(str(path), backend=backend, **({"config": config} if config else {}))
        out, grads = _outputs_and_gradients(attention, given, dtype)
        assert (out - expected).abs().max().item() <= TOL, backend
        for name, grad in expected_grads.items():
            assert (grads[name] - grad).abs().max().item() <= 10 * TOL, (backend, name)


def test_python_round_is_half_to_even():
    """The host (python) form of round relies on it."""
    assert [round(x) for x in (0.5, 1.5, 2.5, -0.5, -1.5)] == [0, 2, 2, 0, -2]
    assert math.floor(-0.5) == -1
