"""to_int(x) and to_float(x) (issue 13 item 5): registry entries, correct on every backend against a float64
definition written here.

to_int(x) rounds toward zero (Python's int(), torch's .long()), within +-2**30 (Triton's integers
are int32, torch's int64: both hold it), and NaN gives 0; to_float(x) turns integers into floats and
leaves floats as they are (its derivative passes through). The spec keeps every truncated value
exact in fp32 (q and k hold small integers, multipliers are short binary fractions), so the fp32
backends truncate the same numbers as float64 does, negative ones included (where trunc and floor
differ): in-tile (`(j - i) * 0.375`, `dot(q, k) * 0.75`), per query row (`q * 0.75`) and on host
scalars (`D / 3`).
"""
from __future__ import annotations

import math

import pytest
import torch

import kernelsearch
from kernelsearch import ops
from kernelsearch.backends import torch_ops
from kernelsearch.errors import SpecError
from tests.test_ops import TOL, _outputs_and_gradients, inputs, interpreter  # noqa: F401 (a fixture)

SPEC = """\
name: conversions
summary: to_int() and to_float() in-tile, per query row, on host scalars, and to_float() of a float (gradient)
params:
  scale: {type: float, default: 0.5}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
graph:
  qr: q + to_float(to_int(q * 0.75)) * 0.125
  host: to_int(D / 3) * 0.25 + to_int(-D / 3) * 0.125 + to_float(D) * 0.0625
  shift: to_int((j - i) * 0.375)
  s: to_float(dot(qr, k)) * scale + to_float(to_int(dot(q, k) * 0.75)) * 0.5 + to_float(shift) * 0.25 + to_float(i) / to_float(J) + host
  p: softmax(s)
  o: dot(p, v)
outputs: [o]
"""


def definition(q, k, v):
    """The spec above in float64; truncated terms are constants (derivative 0)."""
    truncated = lambda x: torch.trunc(x.detach())   # noqa: E731
    D, I, J = q.shape[-1], q.shape[2], k.shape[2]
    i = torch.arange(I, dtype=torch.float64)[:, None]
    j = torch.arange(J, dtype=torch.float64)[None, :]
    host = math.trunc(D / 3) * 0.25 + math.trunc(-D / 3) * 0.125 + D * 0.0625
    qr = q + truncated(q * 0.75) * 0.125
    qk = torch.einsum("bhid,bhjd->bhij", q, k)
    s = torch.einsum("bhid,bhjd->bhij", qr, k) * 0.5 + truncated(qk * 0.75) * 0.5 \
        + torch.trunc((j - i) * 0.375) * 0.25 + i / J + host
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, dim=-1), v)


@pytest.fixture
def spec_path(tmp_path):
    path = tmp_path / "conversions.yaml"
    path.write_text(SPEC)
    return str(path)


def test_the_spec_truncates_negative_non_integers():
    """Without them trunc and floor would agree and the check would be weak."""
    x = inputs(torch.float64)["q"] * 0.75
    assert (torch.trunc(x) != torch.floor(x)).any()
    assert (torch.trunc(torch.arange(-5.0, 0) * 0.375) != torch.floor(torch.arange(-5.0, 0) * 0.375)).any()


@pytest.mark.parametrize("backend, config", [
    ("reference", None),
    ("torch", {"lowering": "materialized"}),
    ("torch", {"lowering": "chunked", "CHUNK_N": 7, "CHUNK_M": 8}),
], ids=["reference", "torch-materialized", "torch-chunked"])
def test_conversions_on_eager_backends(spec_path, backend, config):
    dtype = torch.float64 if backend == "reference" else torch.float32
    given = inputs(torch.float64)
    expected, expected_grads = _outputs_and_gradients(definition, given, torch.float64)
    attention = kernelsearch.load(spec_path, backend=backend, **({"config": config} if config else {}))
    out, grads = _outputs_and_gradients(attention, given, dtype)
    tolerance = 1e-10 if dtype == torch.float64 else TOL
    assert (out - expected).abs().max().item() <= tolerance, backend
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max().item() <= 10 * tolerance, (backend, name)


def test_conversions_on_triton_forward_and_backward(spec_path, interpreter):  # noqa: F811
    given = inputs(torch.float64)
    expected, expected_grads = _outputs_and_gradients(definition, given, torch.float64)
    attention = kernelsearch.load(spec_path, backend="triton", config={"BLOCK_M": 16, "BLOCK_N": 16})
    with torch.no_grad():
        inference = attention(**{n: t.float() for n, t in given.items()})
    assert (inference.double() - expected).abs().max().item() <= TOL
    out, grads = _outputs_and_gradients(attention, given, torch.float32)
    assert (out - expected).abs().max().item() <= TOL
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max().item() <= 10 * TOL, name


# ------------------------------------------------------------------ the edges of to_int(x), one definition

EDGES = [-2.5, -0.5, 0.7, 3.99, -3.99, 2.0 ** 31, -1e20, float("inf"), float("-inf"), float("nan")]
EXPECTED = [-2, 0, 0, 3, -3, 2 ** 30, -2 ** 30, 2 ** 30, -2 ** 30, 0]


def test_int_limits_and_nan_on_tensors_scalars_and_host_code():
    limit = torch_ops.INT_LIMIT
    assert limit == 2 ** 30
    assert torch_ops.to_int(torch.tensor(EDGES, dtype=torch.float64)).tolist() == EXPECTED
    assert torch_ops.to_int(torch.tensor(EDGES, dtype=torch.float32)).tolist() == EXPECTED
    assert torch_ops.to_int(torch.tensor([5, -7, 2 ** 40])).tolist() == [5, -7, limit]
    entry = ops.OPS["to_int"]
    assert [entry.scalar(x) for x in EDGES] == EXPECTED
    host = ops.render("to_int", "python", ["x"], "int")
    assert [eval(host, {}, {"x": x}) for x in EDGES] == EXPECTED      # the host (launcher) form
    assert ops.OPS["to_float"].scalar(3) == 3.0 and torch_ops.to_float(torch.tensor([3])).dtype == torch.float32


KERNEL = """
@triton.jit
def kernel(x_ptr, n_ptr, y_ptr, z_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(y_ptr + offsets, _to_int(tl.load(x_ptr + offsets)))
    tl.store(z_ptr + offsets, _to_int(tl.load(n_ptr + offsets)))
"""


def test_int_limits_and_nan_in_a_triton_kernel(interpreter):  # noqa: F811
    """The Triton helper itself, on floats and on integers."""
    import triton
    import triton.language as tl
    namespace = {"triton": triton, "tl": tl}
    exec(ops.triton_helpers(["_to_int"]) + KERNEL, namespace)   # @triton.jit reads globals, not closures
    kernel = namespace["kernel"]

    n = len(EDGES)
    floats = torch.tensor(EDGES + [0.0] * (16 - n), dtype=torch.float32)
    ints = torch.tensor([5, -7, 2 ** 31 - 1, -2 ** 31] + [0] * 12, dtype=torch.int32)
    y, z = torch.empty(16, dtype=torch.int32), torch.empty(16, dtype=torch.int32)
    kernel[(1,)](floats, ints, y, z, N=16)
    assert y[:n].tolist() == EXPECTED
    assert z[:4].tolist() == [5, -7, 2 ** 30, -2 ** 30]


@pytest.mark.parametrize("expression, declared", [
    ("to_int(j > i)", ""),
    ("to_float(mask)", "  mask: {shape: [b, j], dtype: bool}\n"),
])
def test_conversions_of_predicates_are_refused_with_the_way_to_write_them(tmp_path, expression, declared):
    path = tmp_path / "pred.yaml"
    path.write_text(SPEC.replace("  p: softmax(s)", f"  t: {expression}\n  p: softmax(s + t)")
                    .replace("  v: [b, h, j, d]\n", "  v: [b, h, j, d]\n" + declared))
    with pytest.raises(SpecError, match=r"of a predicate \(bool\)") as error:
        kernelsearch.load(str(path), backend="reference")
    assert "where(predicate, a, b)" in str(error.value)
    line = SPEC.count("\n", 0, SPEC.index("  p: softmax")) + 1 + bool(declared)
    assert f"pred.yaml:{line}:" in str(error.value)


@pytest.mark.parametrize("written, meant", [("int", "to_int"), ("float", "to_float")])
def test_python_spelling_points_to_the_conversion(tmp_path, written, meant):
    """int and float name dtypes inside the compiler; a spec that writes Python's spelling is told the op's."""
    path = tmp_path / "python_spelling.yaml"
    path.write_text(SPEC.replace("to_float(shift)", f"{written}(shift)"))
    with pytest.raises(SpecError, match=rf"(?s)unknown op '{written}'.*did you mean '{meant}'") as error:
        kernelsearch.load(str(path), backend="reference")
    assert "python_spelling.yaml:13:" in str(error.value)
