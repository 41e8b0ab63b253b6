"""The CUDA target compares the generated Triton kernels with PyTorch's own (issue 15).

The triton backend's `lowering` knob: "triton" (the generated kernels; the default), "sdpa" or
"flex" (PyTorch's kernels, run by the torch backend's generated library lowerings) where
passes/library.py says they fit the graph. The tuner's CUDA space holds all of them, so a tuned
kernelsearch on a GPU is never slower than PyTorch's kernels on what they express. No GPU here:
the space, the knob's validation, the record round trip and the tuner's rehearsal in Triton's
interpreter (TRITON_INTERPRET=1), every sdpa/flex trial checked against the float64 reference.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernelsearch
from kernelsearch.backends import knobs
from kernelsearch.backends.knobs import ConfigError, validate_config
from kernelsearch.inputs import random_inputs
from kernelsearch.runtime import config_store as records
from kernelsearch.tune.space import triton_space

from .conftest import spec_path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"B": 2, "H": 2, "I": 33, "J": 17, "D": 16}


@pytest.fixture
def ks_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERNELSEARCH_RECORDS", raising=False)
    records.clear_cache()
    yield tmp_path / "home"
    records.clear_cache()


def _spec(name):
    return kernelsearch.load(spec_path(name), backend="reference").spec


@pytest.mark.parametrize("name, params, present, direction, device, expected", [
    ("softmax", {}, (), "fwd", "cuda", ("triton", "sdpa", "flex")),
    ("softmax", {"causal": True}, None, "fwd+bwd", "cuda", ("triton", "sdpa", "flex")),   # flex trains on a GPU
    ("softmax", {}, (), "fwd+bwd", "cpu", ("triton", "sdpa")),                          # not in the interpreter
    ("softcap", {}, (), "fwd", "cuda", ("triton", "flex")),                             # a score function: no SDPA
    ("talking_heads", {}, None, "fwd", "cuda", ("triton",)),                            # heads mixed
    ("talking_heads", {}, (), "fwd", "cuda", ("triton", "sdpa", "flex")),               # no mixing inputs: plain
])
def test_cuda_space_holds_the_library_kernels_where_they_fit(name, params, present, direction, device, expected):
    sizes = {"B": 4, "H": 16, "I": 2048, "J": 2048, "D": 64}
    space = triton_space(_spec(name), sizes, direction, "float16", params=params, present=present, device=device)
    assert space.names[0] == "lowering" and space.knob("lowering").choices == expected
    valid = space.enumerate()
    library = [c for c in valid if c["lowering"] != "triton"]
    assert library == [{"lowering": lowering} for lowering in expected[1:]]   # no tiles to tune for them
    assert all(not space.violations(c) for c in library)
    # the default row is the one load(backend="triton") runs without a record: the Triton kernels
    graph = kernelsearch.load(spec_path(name), backend="reference", **params).graph(present)
    default = knobs.default_config("triton", sizes, graph.schedule)
    assert space.default() == {k: v for k, v in default.items() if k in space.names}   # fwd: no backward knobs
    assert space.default()["lowering"] == "triton" and valid[0] == space.default()
    assert space.lowering_defaults() == [space.default()] + library


def test_the_lowering_knob_is_validated_like_any_knob():
    assert validate_config("triton", {"lowering": "sdpa"}) == {"lowering": "sdpa"}
    assert validate_config("triton", {"lowering": "flex", "BLOCK_M": 32}) == {"lowering": "flex"}  # tiles: no kernel
    assert validate_config("triton", {})["lowering"] == "triton"
    with pytest.raises(ConfigError, match=r"lowering='chunked' is not allowed.*one of 'triton', 'sdpa', 'flex'"):
        validate_config("triton", {"lowering": "chunked"})


def _float32(tensors):
    return {n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}


@pytest.mark.parametrize("lowering", ["sdpa", "flex"])
def test_triton_backend_runs_library_lowerings_against_float64(lowering, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = {"causal": True}
    reference = kernelsearch.load(spec_path("memory_efficient"), backend="reference", **params)
    attention = kernelsearch.load(spec_path("memory_efficient"), backend="triton", config={"lowering": lowering},
                                  **params)
    tensors = random_inputs(reference.spec, SIZES, dtype=torch.float64, seed=7)
    tensors["mask"][1] = False   # a sample that keeps no key
    with torch.no_grad():
        got = attention(**_float32(tensors))
    assert attention.last_config == {"lowering": lowering}
    torch.testing.assert_close(got.double(), reference(**tensors), rtol=2e-5, atol=2e-5)
    if lowering == "sdpa":   # gradients of every float input (flex has no backward on the CPU)
        leaves = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in tensors.items()}
        expected = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in tensors.items()}
        attention(**leaves).sum().backward()
        reference(**expected).sum().backward()
        for n, t in leaves.items():
            if t.is_floating_point():
                torch.testing.assert_close(t.grad, expected[n].grad, rtol=1e-9, atol=1e-9, msg=n)


def test_triton_backend_refuses_a_library_lowering_the_graph_does_not_fit(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    attention = kernelsearch.load(spec_path("talking_heads"), backend="triton", config={"lowering": "sdpa"})
    tensors = random_inputs(attention.spec, SIZES, seed=1)
    with pytest.raises(ConfigError, match="lowering='sdpa' cannot run talking_heads .*heads are mixed.*its "
                                          "lowerings are triton$"):
        attention(**tensors)
    bare = {n: tensors[n] for n in ("q", "k", "v")}   # without the mixing inputs it is plain attention
    torch.testing.assert_close(attention(**bare), kernelsearch.load(spec_path("talking_heads"), backend="torch",
                                                                     config={"lowering": "sdpa"})(**bare))


def test_a_library_record_is_what_load_triton_runs(ks_home, monkeypatch):
    """A records-file entry {"lowering": "sdpa"} (as the CUDA tuner writes it) is what
    load(backend="triton") runs without a config; a call whose graph SDPA cannot run (talking heads
    with its mixing inputs) gives way to the defaults (the Triton kernels)."""
    from kernelsearch.compiler import compile_graph

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    graph = compile_graph(_spec("talking_heads"), {}, frozenset())
    path = records.record(graph.spec.sha256, "triton", records.device_name("cpu"), records.shape_bucket(SIZES),
                          "float32", "fwd", {"lowering": "sdpa"}, params_tag=records.params_tag(graph.params))
    assert json.loads(Path(path).read_text())   # written
    records.clear_cache()
    attention = kernelsearch.load(spec_path("talking_heads"), backend="triton")
    reference = kernelsearch.load(spec_path("talking_heads"), backend="reference")
    for optional in (False, True):
        tensors = random_inputs(attention.spec, SIZES, dtype=torch.float64, seed=3, optional=optional)
        with torch.no_grad():
            got = attention(**_float32(tensors))
        assert attention.last_config["lowering"] == ("triton" if optional else "sdpa")
        torch.testing.assert_close(got.double(), reference(**tensors), rtol=3e-5, atol=3e-5)


def _tune_interpreted(monkeypatch, spec, sizes, only, direction="fwd", dtype="float32"):
    from kernelsearch.tune.study import TuneOptions, tune

    monkeypatch.setenv("TRITON_INTERPRET", "1")   # the trial processes inherit it
    out = io.StringIO()
    res = tune(TuneOptions(spec=spec, target="cuda", shape=sizes, dtype=dtype, direction=direction, sampler="grid",
                           progress=False, seed=0, only=only, retime_repeats=1, out=out))
    return res, out.getvalue()


def _trials(res):
    import optuna

    from kernelsearch.tune.storage import open_storage, parse_storage

    study = optuna.load_study(study_name=res.study_name, storage=open_storage(parse_storage(res.storage)))
    return [t.user_attrs["ks"] for t in study.get_trials(deepcopy=False) if (t.user_attrs.get("ks") or {}).get("counted")]


def test_cuda_target_rehearsal_compares_triton_sdpa_and_flex_in_one_study(ks_home, monkeypatch):
    """Every lowering is a trial of the same study: the Triton kernel AOT-checked for sm_90, the
    library ones not (no kernel of ours), all checked against the float64 reference and timed."""
    only = {"BLOCK_M": [16], "BLOCK_N": [16], "num_warps": [4], "num_stages": [1]}
    res, out = _tune_interpreted(monkeypatch, spec_path("softmax"), {"B": 1, "H": 2, "I": 33, "J": 17, "D": 16},
                                 only, dtype="float32")
    trials = {t["config"]["lowering"]: t for t in _trials(res)}
    assert set(trials) == {"triton", "sdpa", "flex"}, out
    for lowering, t in trials.items():
        assert t["status"] == "ok" and t["check"]["ok"] and t["time_ms"] > 0, t
        assert ("aot" in t) == (lowering == "triton"), t
    assert trials["triton"]["aot"]["arch"] == "sm_90"
    assert res.counts.get("internal_error", 0) == 0 and res.winner in [t["config"] for t in trials.values()]


def test_cuda_target_rehearsal_trains_through_sdpa(ks_home, monkeypatch):
    only = {"lowering": ["triton", "sdpa"], "BLOCK_M": [16], "BLOCK_N": [16], "num_warps": [4], "num_stages": [1],
            "BLOCK_M_BWD": [16], "BLOCK_N_BWD": [16], "num_warps_bwd": [4], "num_stages_bwd": [1]}
    res, out = _tune_interpreted(monkeypatch, spec_path("cosine_sim"), {"B": 1, "H": 2, "I": 17, "J": 33, "D": 16},
                                 only, direction="fwd+bwd")
    trials = {t["config"]["lowering"]: t for t in _trials(res)}
    assert set(trials) == {"triton", "sdpa"} and all(t["status"] == "ok" for t in trials.values()), out
    assert trials["sdpa"]["check"]["ok"]   # outputs and gradients against the reference


def test_cuda_target_rehearsal_from_the_command_line(ks_home, tmp_path):
    """`TRITON_INTERPRET=1 kernelsearch tune SPEC --target cuda --shape ...`: the table lists the
    sdpa and flex trials next to the Triton kernel's."""
    env = dict(os.environ, TRITON_INTERPRET="1", KERNELSEARCH_HOME=str(ks_home))
    cmd = [sys.executable, "cli.py", "tune", "specs/softcap.yaml", "--target", "cuda", "--shape", "1,2,33,17,16",
           "--dtype", "float32", "--sampler", "grid", "--no-progress", "--no-record", "--only", "BLOCK_M=16",
           "--only", "BLOCK_N=16", "--only", "num_warps=4", "--only", "num_stages=1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lowering" in done.stdout and "['triton', 'flex']" in done.stdout, done.stdout
    assert "'flex'" in done.stdout.split("(* = the default config")[0].split("lowering")[-1], done.stdout
    assert "2 evaluated (2 ok)" in done.stdout, done.stdout
