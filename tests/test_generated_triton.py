"""The Triton launchers in generated/<variant>.py against the reference, in Triton's interpreter.

Run in the same pytest process group as tests/test_triton_fwd.py (CI keeps the interpreter tests
apart from torch.compile/inductor; tests/conftest.py explains why and works around it). The generated file is imported afresh
(under its own module name) with the interpreter on, so its @triton.jit kernels are interpreted
whatever the rest of the session imported; shapes are tiny (numpy runs every program).
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import kernelsearch
from kernelsearch.inputs import random_inputs

from .conftest import ROOT, SPECS, spec_path

TOL = 2e-4  # fp32 kernel against the float64 reference: rounding only (outputs are O(1))


def load_interpreted(name: str):
    import triton
    module_name = f"_generated_{name}_interpreted"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "generated" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("optional", [False, True], ids=["plain", "all_inputs"])
def test_generated_triton_attention_matches_reference(interpreter, name, optional):
    module = load_interpreted(name)
    reference = kernelsearch.load(spec_path(name), backend="reference")
    streams = reference.spec.params["num_streams"].default if name == "talking_heads" else 1
    sizes = {"B": 1 * streams, "H": 2, "I": 17, "J": 33, "D": 16}
    inputs = random_inputs(reference.spec, sizes, dtype=torch.float32, optional=optional)
    expected = reference(**{n: t.double() if t.is_floating_point() else t for n, t in inputs.items()})
    out = module.triton_attention(**inputs, BLOCK_M=16, BLOCK_N=16)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=TOL, rtol=0)


def test_generated_triton_launcher_default_knobs(interpreter):
    """A launcher called directly, with the knobs the generated file gives it by default."""
    module = load_interpreted("softmax")
    reference = kernelsearch.load(spec_path("softmax"), backend="reference")
    inputs = random_inputs(reference.spec, {"B": 1, "H": 2, "I": 17, "J": 33, "D": 16}, optional=True)
    out = module.triton_forward__mask(inputs["q"], inputs["k"], inputs["v"], inputs["mask"], poison=True)
    expected = reference(**{n: t.double() if t.is_floating_point() else t for n, t in inputs.items()})
    torch.testing.assert_close(out.double(), expected, atol=TOL, rtol=0)
