"""kernelsearch.testing (assert_matches_reference) and the pytest plugin (--kernelsearch-backend)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernelsearch
from kernelsearch.testing import (GRAD_FUDGE, Comparison, assert_matches_reference, check_against_reference,
                                  compare_tensor)

from .conftest import SPECS, spec_path

ROOT = Path(__file__).resolve().parent.parent
SMALL = [{"B": 2, "H": 2, "I": 17, "J": 33, "D": 16}]
CHUNKED = {"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 16}   # chunks that divide neither I nor J


@pytest.mark.parametrize("name", SPECS)
def test_every_seed_spec_matches_on_the_torch_backend(name):
    comparisons = assert_matches_reference(spec_path(name), backend="torch", config=CHUNKED)
    whats = {c.what for c in comparisons}
    assert "output" in whats and {"gradient of 'q'", "gradient of 'k'", "gradient of 'v'"} <= whats
    assert all(isinstance(c, Comparison) and c.max_error <= c.allowed for c in comparisons)


def test_learned_inputs_get_their_gradient_compared():
    whats = {c.what for c in check_against_reference(spec_path("talking_heads"), backend="torch", shapes=[
        {"B": 4, "H": 2, "I": 9, "J": 13, "D": 8}])}
    assert {"gradient of 'pre_mix'", "gradient of 'post_mix'"} <= whats
    whats = {c.what for c in check_against_reference(spec_path("local"), backend="torch", qk_rmsnorm=True,
                                                     shapes=SMALL)}
    assert {"gradient of 'pos_bias_table'", "gradient of 'q_scale'", "gradient of 'k_scale'"} <= whats


def test_low_precision_tolerance_comes_from_the_eager_low_precision_error():
    comparisons = assert_matches_reference(spec_path("cosine_sim"), backend="torch", dtype=torch.bfloat16,
                                           shapes=SMALL, scale=10.0)
    for c in comparisons:
        assert c.yardstick is not None and c.yardstick > 1e-4     # bf16 rounding is the yardstick
        assert c.allowed <= 2 * GRAD_FUDGE * c.yardstick          # the floor is small beside it


def _broken(attn, damage):
    """attn with `damage(o)` applied to its output (for every combination of present inputs)."""
    for present, run in list(attn._implementations.items()):
        attn._implementations[present] = lambda tensors, sizes=None, run=run: damage(run(tensors, sizes))
    return attn


def test_a_wrong_output_fails_naming_the_element_and_by_how_much():
    def damage(o):
        bump = torch.zeros_like(o)
        bump[1, 0, 5, 3] = 0.01
        return o + bump
    attn = _broken(kernelsearch.load(spec_path("softmax"), backend="torch"), damage)
    with pytest.raises(AssertionError) as info:
        assert_matches_reference(attn, shapes=SMALL, grads=False)
    message = str(info.value)
    assert "softmax" in message and "output (B=2 H=2 I=17 J=33 D=16)" in message
    assert "at index (1, 0, 5, 3)" in message and "off by 0.01" in message and "1 of 1088 elements" in message


def test_a_small_error_fails_in_bf16_too():
    attn = _broken(kernelsearch.load(spec_path("softmax"), backend="torch"), lambda o: o * 1.05)
    with pytest.raises(AssertionError, match="output"):
        assert_matches_reference(attn, shapes=SMALL, dtype=torch.bfloat16, grads=False)


def test_a_wrong_gradient_fails_and_names_the_input():
    class ScaleGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, o):
            return o.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    attn = _broken(kernelsearch.load(spec_path("softmax"), backend="torch"), ScaleGradient.apply)
    with pytest.raises(AssertionError, match=r"gradient of 'q' \(B=2"):
        assert_matches_reference(attn, shapes=SMALL)


def test_a_gradient_that_does_not_flow_is_missing():
    attn = _broken(kernelsearch.load(spec_path("softmax"), backend="torch"), lambda o: o.detach())
    with pytest.raises(AssertionError, match=r"gradient of 'q'.*missing"):
        assert_matches_reference(attn, shapes=SMALL)


def test_nan_in_fully_masked_rows_fails():
    def nan_rows(o):                 # the last batch row keeps no key: its outputs are 0 by definition
        o = o.clone()
        o[-1] = float("nan")
        return o
    attn = _broken(kernelsearch.load(spec_path("softmax"), backend="torch"), nan_rows)
    with pytest.raises(AssertionError, match="NaN positions differ"):
        assert_matches_reference(attn, shapes=SMALL, grads=False)
    assert_matches_reference(spec_path("softmax"), backend="torch", shapes=SMALL, inputs=False)


def test_compare_tensor_nan_in_both_is_equal_and_inf_is_an_error():
    want = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    assert compare_tensor("output", want.clone(), want, None, dtype=torch.float32, device_type="cpu",
                          fudge=2.0).ok
    got = want.clone()
    got[2] = float("inf")
    c = compare_tensor("output", got, want, None, dtype=torch.float32, device_type="cpu", fudge=2.0)
    assert not c.ok and "at index (2,)" in c.problem
    c = compare_tensor("output", want[:2], want, None, dtype=torch.float32, device_type="cpu", fudge=2.0)
    assert not c.ok and "shape" in c.problem


def test_backend_and_params_go_to_load_not_next_to_an_attention():
    attn = kernelsearch.load(spec_path("softmax"), backend="torch")
    with pytest.raises(TypeError, match="not both"):
        assert_matches_reference(attn, backend="torch")
    with pytest.raises(kernelsearch.SpecError, match="unknown param"):
        assert_matches_reference(spec_path("softmax"), backend="torch", sacle=2.0)


def test_triton_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attn = kernelsearch.load(spec_path("cosine_sim"), backend="triton", config={"BLOCK_M": 16, "BLOCK_N": 16})
    assert_matches_reference(attn, shapes=SMALL)


# ----------------------------------------------------------------------------- the pytest plugin

USER_TEST = """
    import torch
    from kernelsearch.testing import assert_matches_reference

    def test_cosine_sim(kernelsearch_backend):
        assert_matches_reference({spec!r}, backend=kernelsearch_backend, scale=10.0,
                                 shapes=[dict(B=2, H=2, I=9, J=21, D=16)])
"""


def _pytest(tmp_path, *args):
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TEST.format(spec=str(ROOT / "specs/cosine_sim.yaml"))))
    # the plugin by name, whether or not this environment installed its entry point
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "kernelsearch.pytest_plugin",
                           "-p", "no:cacheprovider", str(tmp_path / "test_user.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_plugin_runs_a_users_test_once_per_backend(tmp_path):
    run = _pytest(tmp_path, "--kernelsearch-backend=reference,torch", "-v")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "test_cosine_sim[kernelsearch-reference] PASSED" in run.stdout
    assert "test_cosine_sim[kernelsearch-torch] PASSED" in run.stdout


def test_plugin_refuses_an_unknown_backend(tmp_path):
    run = _pytest(tmp_path, "--kernelsearch-backend=torch,cuda")
    assert run.returncode == 4, run.stdout + run.stderr            # pytest's usage error
    assert "--kernelsearch-backend: unknown backend 'cuda'; choose from auto, reference, torch, triton" in run.stderr
    assert "Traceback" not in run.stderr


def test_plugin_is_declared_as_a_pytest11_entry_point():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"kernelsearch": "kernelsearch.pytest_plugin"}
    assert any(d.startswith("transformers") for d in project["optional-dependencies"]["hf"])
