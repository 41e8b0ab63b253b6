"""Backends declare their knobs once (backends/knobs.py); every config is checked against them."""
from __future__ import annotations

import pytest
import torch

import kernelsearch
from kernelsearch.backends import knobs
from kernelsearch.backends.knobs import ConfigError, validate_config

BIG = {"b": 1, "h": 4, "i": 8192, "j": 8192, "d": 64}


@pytest.mark.parametrize("config, needle", [
    ({"CHUNK_NN": 64}, "unknown knob 'CHUNK_NN'; did you mean 'CHUNK_N'?"),
    ({"threads": 4}, "unknown knob 'threads'. The torch backend's knobs are lowering, CHUNK_N, CHUNK_M, compile"),
    ({"lowering": "chunked", "CHUNK_N": -5}, "CHUNK_N=-5 is not allowed; CHUNK_N (key chunk size) must be an integer >= 1"),
    ({"lowering": "chunked", "CHUNK_N": 0}, "CHUNK_N=0 is not allowed"),
    ({"CHUNK_N": "64"}, "CHUNK_N='64' is not allowed"),
    ({"CHUNK_N": True}, "CHUNK_N=True is not allowed"),
    ({"CHUNK_N": 64.0}, "CHUNK_N=64.0 is not allowed"),
    ({"CHUNK_M": -1}, "CHUNK_M=-1 is not allowed; CHUNK_M (query rows per chunk (0: all)) must be an integer >= 0"),
    ({"lowering": "bogus"}, "lowering='bogus' is not allowed; lowering (materialized scores, chunked online "
                            "softmax, or PyTorch's sdpa / flex where they fit the graph) must be one of "
                            "'materialized', 'chunked', 'sdpa', 'flex'"),
    ({"compile": 1}, "compile=1 is not allowed"),
])
def test_invalid_torch_configs_name_the_knob_the_value_and_what_is_allowed(config, needle):
    with pytest.raises(ConfigError) as e:
        validate_config("torch", config, BIG)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("config, needle", [
    ({"BLOCK_M": 24}, "BLOCK_M=24 is not allowed; BLOCK_M (query rows per program) must be a power of two >= 16"),
    ({"BLOCK_N": 8}, "BLOCK_N=8 is not allowed"),
    ({"num_warps": 3}, "num_warps=3 is not allowed"),
    ({"num_stages": 0}, "num_stages=0 is not allowed"),
    ({"BLOCK_MM": 64}, "did you mean 'BLOCK_M'?"),
])
def test_invalid_triton_configs(config, needle):
    with pytest.raises(ConfigError, match=None) as e:
        validate_config("triton", config)
    assert needle in str(e.value)


def test_a_config_that_is_not_a_dict_and_the_reference_backend():
    with pytest.raises(ConfigError, match="torch config must be a dict of knob values.*got str 'abc'"):
        validate_config("torch", "abc")
    with pytest.raises(ConfigError, match="the reference backend has no knobs"):
        validate_config("reference", {"CHUNK_N": 64})
    assert validate_config("reference", None) == {} == validate_config("reference", {})


def test_completion_defaults_by_size_and_schedule():
    small = {"b": 1, "h": 2, "i": 128, "j": 128}
    assert validate_config("torch", {}, small) == {"lowering": "materialized", "compile": False}
    assert validate_config("torch", {}, BIG) == {"lowering": "chunked", "CHUNK_N": 512, "CHUNK_M": 256,
                                                 "compile": False}
    # a partial config takes the defaults for what it leaves out; a knob whose condition does not hold is dropped
    assert validate_config("torch", {"lowering": "chunked", "CHUNK_N": 64}, small) == \
        {"lowering": "chunked", "CHUNK_N": 64, "CHUNK_M": 0, "compile": False}
    assert validate_config("torch", {"lowering": "materialized", "CHUNK_N": 64}, BIG) == \
        {"lowering": "materialized", "compile": False}
    assert validate_config("torch", {"lowering": None}, BIG)["lowering"] == "chunked"   # None: the default
    tiles = validate_config("triton", {}, {"i": 48, "j": 1000})
    assert (tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["num_warps_bwd"]) == (64, 64, 8)
    assert validate_config("triton", {}, {"i": 20, "j": 9})["BLOCK_M"] == 32
    assert validate_config("triton", {"num_warps": 2}, None, "heads_in_tile") == \
        {"lowering": "triton", **knobs.TRITON_FWD_DEFAULTS_HEADS_IN_TILE, **knobs.TRITON_BWD_DEFAULTS_HEADS_IN_TILE,
         "num_warps": 2}


def test_every_declared_default_and_choice_is_allowed():
    for backend in knobs.BACKENDS_WITH_KNOBS:
        for knob in knobs.knobs(backend):
            assert all(knob.admits(c) for c in knob.choices), knob
            for sizes in ({}, {"i": 17, "j": 129}, BIG):
                for schedule in (None, "heads_in_tile"):
                    assert knob.admits(knob.default_for(sizes, schedule)), (knob, sizes)


def test_spec_tune_choices_are_checked_against_the_declared_knobs():
    assert knobs.check_choices("BLOCK_M", (16, 32)) is None
    assert knobs.check_choices("lowering", ("chunked",)) is None
    assert "'bogus' is not allowed" in knobs.check_choices("lowering", ("bogus",))
    assert "did you mean 'BLOCK_N'" in knobs.check_choices("BLOCK_NN", (16,))


def test_load_refuses_a_bad_config_before_any_call():
    """Issue 12: CHUNK_N -5 returned zeros, 0 failed deep in range(), CHUNK_NN was ignored."""
    for config in ({"lowering": "chunked", "CHUNK_N": -5}, {"lowering": "chunked", "CHUNK_N": 0},
                   {"CHUNK_NN": 64}):
        with pytest.raises(ValueError) as e:
            kernelsearch.load("specs/softmax.yaml", backend="torch", config=config)
        assert "config" in str(e.value)
    with pytest.raises(TypeError, match="config must be a dict"):   # not a dict at all: a type error
        kernelsearch.load("specs/softmax.yaml", backend="torch", config="abc")
    with pytest.raises(ValueError, match="BLOCK_M=48"):
        kernelsearch.load("specs/softmax.yaml", backend="triton", config={"BLOCK_M": 48})


@pytest.mark.parametrize("config", [{"lowering": "chunked", "CHUNK_N": 1, "CHUNK_M": 1},
                                    {"lowering": "chunked", "CHUNK_N": 5000, "CHUNK_M": 3},
                                    {"lowering": "materialized"}])
def test_every_allowed_config_gives_the_reference_result(config):
    """The smallest and odd chunks that validation admits are correct, not only the tuner's choices."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 19, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = kernelsearch.load("specs/local.yaml", backend="reference")(q, k, v)
    attn = kernelsearch.load("specs/local.yaml", backend="torch", config=config)
    got = attn(q, k, v)
    assert attn.last_config == validate_config("torch", config, {"b": 1, "h": 2, "i": 19, "j": 19})
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
