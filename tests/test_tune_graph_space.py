"""The tuner's space is the space of the graph its trials time (issue 15).

A study's lowerings, schedule and default config come from the folded graph of *its* params and
the optional inputs it gives, not from the spec's defaults with every input: talking heads timed
without its head-mixing inputs is plain softmax attention (SDPA and FlexAttention fit it), and
its default row is the config `kernelsearch.load` runs for those calls without a record.
"""
from __future__ import annotations

import io

import pytest
import torch

import kernelsearch
from kernelsearch.backends.torch_backend import complete_config
from kernelsearch.compiler import compile_graph
from kernelsearch.inputs import random_inputs
from kernelsearch.runtime import config_store as records
from kernelsearch.spec import load_spec
from kernelsearch.tune.study import TuneOptions, resolve, tune
from tests.conftest import spec_path

SMALL = {"B": 2, "H": 2, "I": 33, "J": 17, "D": 8}


@pytest.fixture
def ks_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERNELSEARCH_RECORDS", raising=False)
    records.clear_cache()
    yield tmp_path / "home"
    records.clear_cache()


def _resolved(name, params=None, optional_inputs=False, shape=None, target="cpu", **kw):
    return resolve(TuneOptions(spec=spec_path(name), target=target, params=dict(params or {}),
                               optional_inputs=optional_inputs, shape=shape or SMALL, record=False,
                               progress=False, **kw))


@pytest.mark.parametrize("name, params, optional_inputs, expected", [
    # without pre_mix/post_mix the mixes are identities: folded away, plain softmax attention
    ("talking_heads", {}, False, ("materialized", "chunked", "sdpa", "flex")),
    ("talking_heads", {}, True, ("materialized", "chunked")),
    ("talking_heads", {"pre_talking_heads": False, "post_talking_heads": False}, True,
     ("materialized", "chunked", "sdpa", "flex")),
    ("talking_heads", {"pre_talking_heads": False}, True, ("materialized", "chunked")),
    ("softmax", {"causal": True}, False, ("materialized", "chunked", "sdpa", "flex")),
    ("softmax", {"causal": True}, True, ("materialized", "chunked", "sdpa", "flex")),
])
def test_the_study_offers_the_lowerings_of_its_own_graph(ks_home, name, params, optional_inputs, expected):
    r = _resolved(name, params, optional_inputs)
    assert r.space.knob("lowering").choices == expected
    assert r.present == (tuple(sorted(load_spec(spec_path(name)).optional_inputs)) if optional_inputs else ())


def test_the_study_without_flex_where_flex_cannot_run_on_the_cpu(ks_home):
    assert "flex" not in _resolved("talking_heads", direction="fwd+bwd").space.knob("lowering").choices
    assert _resolved("talking_heads", dtype="float64").space.knob("lowering").choices == \
        ("materialized", "chunked", "sdpa")


@pytest.mark.parametrize("name, params, optional_inputs", [
    ("softmax", {}, False),
    ("softmax", {"causal": True}, True),
    ("local", {}, False),
    ("talking_heads", {}, False),
    ("talking_heads", {}, True),
    ("memory_efficient", {"causal": True}, True),
    ("cosine_sim", {}, False),
])
def test_the_default_row_is_what_load_runs_without_a_record(ks_home, name, params, optional_inputs):
    """One source of truth: the tuner's default config (timed, warm-started, the speedup's base)
    is the config `load` picks for these calls with no record, at small shapes (checked by a
    call) and at the bench's long ones (the same function, complete_config)."""
    r = _resolved(name, params, optional_inputs)
    attention = kernelsearch.load(spec_path(name), backend="torch", **params)
    tensors = random_inputs(attention.spec, SMALL, optional=optional_inputs, params=params)
    with torch.no_grad():
        attention(**tensors)
    assert r.space.default() == attention.last_config
    assert r.space.enumerate()[0] == r.space.default() and not r.space.violations(r.space.default())
    graph = compile_graph(attention.spec, params, r.present)
    for n in (1024, 4096, 8192):
        shape = {"B": 1, "H": 4, "I": n, "J": n, "D": 64}
        space = _resolved(name, params, optional_inputs, shape=shape).space
        assert space.default() == complete_config(None, shape, graph), (name, n)
        assert not space.violations(space.default())


def test_a_default_chunk_size_the_tuner_would_not_try_is_added_to_its_choices(ks_home):
    """talking heads with its mixing inputs at N=4096 (past whole rows in one chunk: 64 rows' scores
    over 2**20) runs chunked with 256-row query chunks by default; 256 is not among CHUNK_M's tried
    choices, so the space holds it for that row."""
    shape = {"B": 2, "H": 4, "I": 4096, "J": 4096, "D": 64}
    space = _resolved("talking_heads", {}, True, shape=shape).space
    assert space.default()["lowering"] == "chunked" and space.default()["CHUNK_M"] == 256
    assert space.knob("CHUNK_M").choices == (0, 64, 128, 256, 512)


def test_a_library_winner_timed_without_optional_inputs_is_checked_as_its_record_runs(ks_home):
    """talking heads tuned without its head-mixing inputs: the sdpa winner is recorded; the final
    check with every optional input checks what `load` then runs for such calls (the graph's
    defaults: the record's sdpa cannot run mixed heads), instead of failing as a bug."""
    out = io.StringIO()
    res = tune(TuneOptions(spec=spec_path("talking_heads"), target="cpu", shape=SMALL, trials=1,
                           only={"lowering": ["sdpa"]}, progress=False, retime_repeats=1, seed=3, out=out))
    assert res.winner == {"lowering": "sdpa", "compile": False}, out.getvalue()
    assert res.counts.get("internal_error", 0) == 0 and res.records_path, out.getvalue()
    records.clear_cache()
    attention = kernelsearch.load(spec_path("talking_heads"), backend="torch")
    reference = kernelsearch.load(spec_path("talking_heads"), backend="reference")
    for optional in (False, True):
        tensors = random_inputs(attention.spec, SMALL, dtype=torch.float64, optional=optional, seed=11)
        with torch.no_grad():
            got = attention(**{n: t.float() if t.is_floating_point() else t for n, t in tensors.items()})
        assert attention.last_config["lowering"] == ("materialized" if optional else "sdpa")
        torch.testing.assert_close(got.double(), reference(**tensors), rtol=3e-5, atol=3e-5)
