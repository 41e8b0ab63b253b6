"""generated/<variant>.py's triton_attention against the reference, in Triton's interpreter, and
the Triton files the backend imports are the ones `kernelsearch show --backend triton` prints.

Shapes are tiny (numpy runs every program). The triton backend reads TRITON_INTERPRET when it
builds, so the fixture sets it before the first call of triton_attention.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import kernelsearch
from kernelsearch.codegen.show_cli import files_for
from kernelsearch.inputs import random_inputs

from .conftest import SPECS, spec_path

TOL = 2e-4  # fp32 kernel against the float64 reference: rounding only (outputs are O(1))


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from kernelsearch.backends import triton_backend
    monkeypatch.setattr(triton_backend, "POISON_OUTPUTS", True)   # unwritten outputs cannot pass


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("optional", [False, True], ids=["plain", "all_inputs"])
def test_generated_triton_attention_matches_reference(interpreter, name, optional):
    module = importlib.import_module(f"generated.{name}")
    module._triton_attention = None          # built afresh, with the interpreter on
    reference = kernelsearch.load(spec_path(name), backend="reference")
    streams = reference.spec.params["num_streams"].default if name == "talking_heads" else 1
    sizes = {"B": 1 * streams, "H": 2, "I": 17, "J": 33, "D": 16}
    inputs = random_inputs(reference.spec, sizes, dtype=torch.float32, optional=optional)
    expected = reference(**{n: t.double() if t.is_floating_point() else t for n, t in inputs.items()})
    out = module.triton_attention(**inputs)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=TOL, rtol=0)


def test_triton_backend_imports_what_show_prints(interpreter):
    from pathlib import Path
    spec = kernelsearch.load_spec(spec_path("local"))
    attention = kernelsearch.load(spec, backend="triton")
    present = frozenset({"mask", "pos_bias_table"})
    run = attention._implementations[present]
    shown = {f.filename: f.source for f in files_for(spec, {}, present, "triton")}
    used = [run.forward.file] + ([run.training.file] if run.training is not None else [])
    assert {f.filename: f.source for f in used} == shown
    imported = Path(run.forward.module.__file__)   # the cache file the module was imported from
    assert imported.name == run.forward.file.filename and imported.read_text() == run.forward.file.source
