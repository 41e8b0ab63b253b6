"""Specs that `check` accepted and generated code then got wrong (issue 12): each runs on every
backend against the reference, and its Triton kernels compile for sm_90."""
import pytest
import torch

import kernelsearch
from kernelsearch.codegen.show_cli import files_for
from kernelsearch.inputs import random_inputs
from kernelsearch.spec import parse_spec

INTEGER_POWER = """
name: integer_power
summary: a per-head slope from an integer power, as ALiBi's 2 ** (-8 (h + 1) / H)
params:
  scale: {type: float, default: 0.125}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
graph:
  slope: 2 ** (h + 1)
  s: dot(q, k) * scale + slope * 0.01 * (j - i)
  p: softmax(s)
  o: dot(p, v)
outputs: [o]
"""


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_integer_power_on_every_backend(interpreter):
    """`2 ** (h + 1)`: the Triton _pow took log2 of an i32 (interpreter and sm_90 compile failed)."""
    spec = parse_spec(INTEGER_POWER, "integer_power.yaml")
    reference = kernelsearch.load(spec, backend="reference")
    inputs = random_inputs(spec, dict(B=1, H=3, I=17, J=20, D=16), dtype=torch.float32)
    expected = reference(**{k: v.double() for k, v in inputs.items()})
    for backend in ("torch", "triton"):
        got = kernelsearch.load(spec, backend=backend)(**inputs)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5, msg=backend)


def test_integer_power_compiles_for_sm90(tmp_path):
    from kernelsearch.codegen.triton_aot import aot_check
    path = tmp_path / "integer_power.yaml"   # a path: the check may run in a clean subprocess
    path.write_text(INTEGER_POWER)
    result = aot_check(str(path), None, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}, arch=90,
                       sizes={"d": 16, "h": 4})
    assert result["ok"], result["error"]


def test_gather_bounds_of_scalar_indices_are_tiles():
    """`table[h, abs(i - j)]`: the bounds test of the scalar index h was `(off_h >= 0) & ... & tile`,
    which triton 3.9's interpreter refuses ('mask has unsupported dtype'); it is broadcast first."""
    spec = kernelsearch.load_spec("specs/local.yaml")
    (forward, training) = files_for(spec, {}, frozenset({"pos_bias_table"}), "triton")
    for file in (forward, training):
        assert "(off_h >= 0)" not in file.source
    # the backward's programs are one query head (h a scalar); the forward packs a KV group's query
    # heads into its rows (h varies along them: a row vector, broadcast by the view)
    assert "(off_h + tl.zeros([BLOCK_M, BLOCK_N], tl.int32))" in training.source
    assert "(off_h[:, None] >= 0)" in forward.source


@pytest.mark.parametrize("name", ["softmax", "cosine_sim", "local", "talking_heads"])
def test_kernel_signature_launch_and_aot_signature_are_one_list(name):
    """The kernels' parameters, the launcher's arguments and the AOT signature come from one list
    (triton_fwd.ArgGroup): compare the generated kernel's parameters with what the AOT check compiles."""
    import ast

    from kernelsearch.codegen.triton_aot import aot_signature, aot_signature_backward
    from kernelsearch.codegen.triton_bwd import backward_plan
    from kernelsearch.codegen.triton_fwd import plan
    from kernelsearch.compiler import compile_graph
    from kernelsearch.passes.split_prologue import split_prologue
    spec = kernelsearch.load_spec(f"specs/{name}.yaml")
    graph = compile_graph(spec)
    forward, training = files_for(spec, {}, frozenset(spec.optional_inputs), "triton")
    kernels = {f.name: [a.arg for a in f.args.args] for f in ast.parse(forward.source).body
               if isinstance(f, ast.FunctionDef)}
    p = plan(graph)
    config = {"BLOCK_M": 16, "BLOCK_N": 16}
    assert kernels[p.kernel] == list(aot_signature(p, config, {}, "float16")[0])
    if p.prepass_kernel:
        assert kernels[p.prepass_kernel] == list(aot_signature(p, config, {}, "float16", prepass=True)[0])
    bp = backward_plan(split_prologue(graph).core)
    kernels = {f.name: [a.arg for a in f.args.args] for f in ast.parse(training.source).body
               if isinstance(f, ast.FunctionDef)}
    expected = list(aot_signature_backward(bp, {"BLOCK_M_BWD": 16, "BLOCK_N_BWD": 16}, {}, "float16")[0])
    assert kernels[bp.dq_kernel] == kernels[bp.dkdv_kernel] == expected


def test_aot_check_reports_the_compiler_and_raises_bugs(monkeypatch):
    """What triton.compile refuses is the config's answer (ok False, the error); a bug in code
    generation propagates instead of looking like a bad config (issue 14's error policy)."""
    from kernelsearch.codegen import triton_aot, triton_fwd
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}
    result = triton_aot.aot_check("specs/softmax.yaml", None, big, arch=90, sizes={"d": 128}, resources=False)
    assert not result["ok"] and triton_aot.is_resource_error(result), result

    def broken_plan(graph):
        raise KeyError("a code generator bug")
    monkeypatch.setattr(triton_fwd, "plan", broken_plan)
    # in this process (a subprocess would not see the patch; the bug strikes before any compilation)
    monkeypatch.setattr(triton_aot, "language_patched_by_interpreter", lambda: False)
    with pytest.raises(KeyError, match="code generator bug"):
        triton_aot.aot_check("specs/softmax.yaml", None, {"BLOCK_M": 16, "BLOCK_N": 16}, arch=90, resources=False)
