"""The bad-input corpus (issue 12): what a careless or hostile user types gets one clear message.

CLI cases: exit code 2, a message naming the offending argument/field on stderr, no traceback.
API cases: the exception type and a message naming the argument. Malformed spec *files* live in
tests/bad_specs/ (tests/test_spec_errors.py checks every one's file:line:column); the spec cases
here are the ones about values, names and text that `check` used to accept.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernelsearch
from kernelsearch.cli import main
from kernelsearch.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
SOFTMAX = "specs/softmax.yaml"
SOFTMAX_TEXT = (ROOT / SOFTMAX).read_text()


def _run_cli(argv, capsys, monkeypatch, env=None):
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _spec_file(tmp_path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------- CLI: exit code 2, one message

@pytest.fixture
def afile(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return str(path)


CLI_CASES = [
    # (id, argv ({file}: a regular file, {tmp}: a fresh directory), env, needle naming the mistake)
    ("home_is_a_file", ["tune", SOFTMAX, "--trials", "1"], {"KERNELSEARCH_HOME": "{file}"}, "KERNELSEARCH_HOME"),
    ("home_in_proc", ["tune", SOFTMAX, "--trials", "1"], {"KERNELSEARCH_HOME": "/proc/kernelsearch"},
     "KERNELSEARCH_HOME"),
    ("report_home_is_a_file", ["report", SOFTMAX], {"KERNELSEARCH_HOME": "{file}"}, "KERNELSEARCH_HOME"),
    ("shape_overflows_storage", ["tune", SOFTMAX, "--shape", "100000,100000,100000,100000,100000"], {},
     "shape is too large"),
    ("param_not_yaml", ["check", SOFTMAX, "--param", "scale=[1"], {}, "param 'scale'"),
    ("param_inf", ["check", SOFTMAX, "--param", "scale=1e999"], {}, "param 'scale' is inf"),
    ("param_nan", ["check", SOFTMAX, "--param", "scale=NaN"], {}, "param 'scale' is nan"),
    ("param_without_value", ["check", SOFTMAX, "--param", "scale"], {}, "--param takes NAME=VALUE"),
    ("output_dir_under_a_file", ["compile", SOFTMAX, "--output-dir", "{file}/generated"], {}, "--output-dir"),
    ("graph_output_under_a_file", ["graph", SOFTMAX, "-o", "{file}/g.dot"], {}, "-o"),
    ("check_a_device", ["check", "/dev/zero"], {}, "not a regular file"),
    ("check_a_directory", ["check", "{tmp}"], {}, "is a directory"),
    ("timeout_negative", ["tune", SOFTMAX, "--timeout", "-1"], {}, "--timeout -1"),
    ("timeout_nan", ["tune", SOFTMAX, "--timeout", "nan"], {}, "--timeout nan"),
    ("trial_timeout_zero", ["tune", SOFTMAX, "--trial-timeout", "0"], {}, "--trial-timeout 0"),
    ("trials_zero", ["tune", SOFTMAX, "--trials", "0"], {}, "--trials 0"),
    ("trials_not_a_number", ["tune", SOFTMAX, "--trials", "many"], {}, "--trials many"),
    ("workers_zero", ["tune", SOFTMAX, "--workers", "0"], {}, "--workers 0"),
    ("seed_negative", ["tune", SOFTMAX, "--seed", "-1"], {}, "--seed -1"),
    ("top_zero", ["tune", SOFTMAX, "--top", "0"], {}, "--top 0"),
    ("lm_lr_zero", ["lm", SOFTMAX, "--lr", "0"], {}, "--lr 0"),
    ("lm_seq_len_negative", ["lm", SOFTMAX, "--seq-len", "-5"], {}, "--seq-len -5"),
    ("aot_heads_zero", ["aot", SOFTMAX, "--heads", "0"], {}, "--heads 0"),
    ("aot_jobs_zero", ["aot", SOFTMAX, "--jobs", "0"], {}, "--jobs 0"),
    ("aot_config_not_a_number", ["aot", SOFTMAX, "--config", "BLOCK_M=abc"], {}, "BLOCK_M='abc'"),
    ("aot_config_zero_tile", ["aot", SOFTMAX, "--config", "BLOCK_M=0"], {}, "BLOCK_M=0"),
    ("aot_param_not_yaml", ["aot", SOFTMAX, "--param", "scale=[1"], {}, "param 'scale'"),
    ("tune_unknown_lowering_in_spec", ["check", "tests/bad_specs/tune_unknown_value.yaml"], {}, "lowering: 'bogus'"),
    ("spec_name_dunder", ["check", "tests/bad_specs/name_dunder.yaml"], {}, "'__init__' is a dunder name"),
    ("spec_name_newline", ["check", "tests/bad_specs/name_trailing_newline.yaml"], {}, "'x\\n'"),
    ("spec_param_default_inf", ["check", "tests/bad_specs/param_default_inf.yaml"], {}, "param 'scale' is inf"),
    ("spec_constant_1e999", ["check", "tests/bad_specs/constant_inf.yaml"], {}, "too large for a float"),
]


@pytest.mark.parametrize("argv, env, needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_message(argv, env, needle, afile, tmp_path, capsys, monkeypatch):
    fill = {"file": afile, "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    env = {k: v.format(**fill) for k, v in env.items()}
    code, out, err = _run_cli(argv, capsys, monkeypatch, env)
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert needle in err, err


def test_cli_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "cli.py", "check", str(fifo)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)   # an open() of the FIFO would block forever
    assert result.returncode == 2 and "not a regular file" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_check_into_a_closed_pipe_prints_no_traceback():
    command = f"{sys.executable} cli.py check {SOFTMAX} specs/cosine_sim.yaml specs/local.yaml | head -1"
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("specs/softmax.yaml: ok")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_cli_output_directories_are_created(tmp_path, capsys, monkeypatch):
    code, out, err = _run_cli(["compile", SOFTMAX, "--output-dir", str(tmp_path / "a" / "b")], capsys, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "a" / "b" / "softmax.py").is_file()
    code, out, err = _run_cli(["graph", SOFTMAX, "-o", str(tmp_path / "c" / "g.dot")], capsys, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "c" / "g.dot").read_text().startswith("digraph")


def test_cli_check_prints_spec_text_escaped(tmp_path, capsys, monkeypatch):
    summary = next(line for line in SOFTMAX_TEXT.split("\n") if line.startswith("summary:"))
    text = SOFTMAX_TEXT.replace(summary, 'summary: "\\e]0;pwned\\a\\e[2J\\rSoftmax"')
    code, out, err = _run_cli(["check", _spec_file(tmp_path, text)], capsys, monkeypatch)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\rSoftmax" in out


def test_spec_errors_quoting_spec_text_are_escaped(tmp_path, capsys, monkeypatch):
    text = SOFTMAX_TEXT.replace("outputs: [o]", 'outputs: [o]\n"\\e[31mred": 1')
    code, out, err = _run_cli(["check", _spec_file(tmp_path, text)], capsys, monkeypatch)
    assert code == 2 and "\x1b" not in err and "unknown section '\\x1b[31mred'" in err


# ---------------------------------------------------------------------------- API: the exception names the argument

def _qkv(J=4, D=8, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, D, generator=generator, dtype=dtype)
    k = torch.randn(1, 2, J, D, generator=generator, dtype=dtype)
    v = torch.randn(1, 2, J, D, generator=generator, dtype=dtype)
    return q, k, v


def _cosine(**kwargs):
    return kernelsearch.load("specs/cosine_sim.yaml", backend="torch", **kwargs)


API_CASES = [
    # (id, call, exception type, needles)
    ("q_none", lambda: _cosine()(None, *_qkv()[1:]), TypeError, ["'q'"]),
    ("v_none", lambda: _cosine()(*_qkv()[:2], None), TypeError, ["'v'"]),
    ("q_not_a_tensor", lambda: _cosine()([[1.0]], *_qkv()[1:]), TypeError, ["'q'", "torch.Tensor"]),
    ("mask_on_meta", lambda: _cosine()(*_qkv(), mask=torch.ones(1, 4, dtype=torch.bool, device="meta")),
     ValueError, ["'mask'", "meta", "cpu"]),
    ("v_other_head_dim", lambda: _cosine()(*_qkv()[:2], torch.randn(1, 2, 4, 6)), ValueError,
     ["'v'", "'q'", "dim 'd'"]),
    ("v_other_key_count", lambda: _cosine()(_qkv()[0], torch.randn(1, 2, 7, 8), torch.randn(1, 2, 1, 8)),
     ValueError, ["'v'", "'k'", "dim 'j'"]),
    ("mask_wrong_length", lambda: _cosine()(*_qkv(), mask=torch.ones(1, 5, dtype=torch.bool)), ValueError,
     ["'mask'", "dim 'j'"]),
    ("mask_not_bool", lambda: _cosine()(*_qkv(), mask=torch.ones(1, 4)), TypeError, ["'mask'", "bool"]),
    ("mixed_dtypes", lambda: _cosine()(_qkv()[0], _qkv()[1].double(), _qkv()[2]), TypeError, ["dtype"]),
    ("unknown_input", lambda: _cosine()(*_qkv(), bias=torch.zeros(1)), TypeError, ["'bias'"]),
    ("load_none", lambda: kernelsearch.load(None), TypeError, ["spec_path"]),
    ("load_not_a_file", lambda: kernelsearch.load("name: x"), SpecError, ["no such spec file"]),
    ("load_bad_yaml_text", lambda: kernelsearch.load(SOFTMAX_TEXT.replace("graph:", "grph:")), SpecError,
     ["<string>:", "unknown section 'grph'"]),
    ("config_a_string", lambda: _cosine(config="abc"), TypeError, ["config"]),
    ("param_inf", lambda: kernelsearch.load(SOFTMAX, backend="reference", scale=float("inf")), SpecError,
     ["param 'scale' is inf"]),
    ("param_nan", lambda: kernelsearch.load(SOFTMAX, backend="reference", scale=float("nan")), SpecError,
     ["param 'scale' is nan"]),
    ("default_complex_at_call", lambda: kernelsearch.load(SOFTMAX_TEXT.replace('"D ** -0.5"', '"(-D) ** 0.5"'),
                                                         backend="torch")(*_qkv()),
     SpecError, ["param 'scale'", "<string>:4:", "not a real number"]),
    ("default_divides_by_zero_at_call", lambda: kernelsearch.load(
        SOFTMAX_TEXT.replace('"D ** -0.5"', '"1 / (D - 8)"'), backend="reference")(*_qkv()),
     SpecError, ["param 'scale'", "division by zero", "D=8"]),
    ("default_overflows_at_call", lambda: kernelsearch.load(
        SOFTMAX_TEXT.replace('"D ** -0.5"', '"10.0 ** (D * 100)"'), backend="reference")(*_qkv()),
     SpecError, ["param 'scale'"]),
]


@pytest.mark.parametrize("call, error, needles", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_naming_the_argument(call, error, needles):
    with pytest.raises(error) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_calls_after_a_good_one_are_still_checked(monkeypatch):
    """The check of a call signature is remembered (a model's repeated calls pay none); any other
    signature - another shape, dtype or device, a bad argument - is checked as the first call was."""
    import kernelsearch.api as api
    attention = _cosine()
    q, k, v = _qkv()
    calls = []
    real_check = api.check_call
    monkeypatch.setattr(api, "check_call", lambda *a, **kw: calls.append(1) or real_check(*a, **kw))
    expected = attention(q, k, v)
    for _ in range(3):
        torch.testing.assert_close(attention(q, k, v), expected)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="dim 'd'"):
        attention(q, k, torch.randn(1, 2, 4, 6))
    with pytest.raises(TypeError, match="dtype"):
        attention(q, k.double(), v)
    with pytest.raises(TypeError, match="'v'"):
        attention(q, k, None)
    with pytest.raises(ValueError, match="'mask'"):
        attention(q, k, v, mask=torch.ones(1, 5, dtype=torch.bool))
    attention(q[:, :, :3], k, v)    # a new shape: checked once more
    assert len(calls) == 6


def test_load_takes_spec_text():
    q, k, v = _qkv()
    from_text = kernelsearch.load(SOFTMAX_TEXT, backend="reference")(q.double(), k.double(), v.double())
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())   # SDPA: the same softmax
    torch.testing.assert_close(from_text, expected)


# ---------------------------------------------------------------------------- no keys: zeros on every backend

ZERO_KEY_CASES = [("reference", None), ("torch", {"lowering": "materialized"}), ("torch", {"lowering": "chunked"}),
                  ("triton", {"BLOCK_M": 16, "BLOCK_N": 16})]


@pytest.mark.parametrize("spec", ["softmax", "cosine_sim"])
@pytest.mark.parametrize("backend, config", ZERO_KEY_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_no_keys_gives_zeros_on_every_backend(spec, backend, config, with_mask, monkeypatch):
    """J = 0: every query keeps no key, and fully-masked rows output 0 (as SDPA gives for J = 0)."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    attention = kernelsearch.load(f"specs/{spec}.yaml", backend=backend, config=config)
    q, k, v = _qkv(J=0)
    inputs = {"mask": torch.ones(1, 0, dtype=torch.bool)} if with_mask else {}
    out = attention(q, k, v, **inputs)
    assert out.shape == q.shape
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert not out.any()
