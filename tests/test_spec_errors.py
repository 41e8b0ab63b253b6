"""Every malformed spec gets one SpecError naming file:line:column, what is wrong and what would be right.

The corpus is tests/bad_specs/*.yaml. The first line of each file says what it must give:

    # expect: <line>:<column>: <substring of the message>
    # hint: <substring of the hint>          (optional second line)

Each file is parsed and compiled with every combination of present optional inputs (as
`kernelsearch check` does); the CLI prints the same error as one message on stderr, exit code 2.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kernelsearch
from kernelsearch.compiler import check_spec, compile_graph, resolve_params
from kernelsearch.errors import SpecError
from kernelsearch.spec import MAX_SPEC_BYTES, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "bad_specs"
BAD_SPECS = sorted(CORPUS.glob("*.yaml"))
EXPECT = re.compile(r"# expect: (\d+):(\d+): (.+)$")
HINT = re.compile(r"# hint: (.+)$")


def _expectation(path: Path):
    lines = path.read_text(encoding="utf-8").split("\n")
    match = EXPECT.match(lines[0])
    assert match, f"{path}: the first line must be `# expect: <line>:<column>: <message>`"
    hint = HINT.match(lines[1]) if len(lines) > 1 else None
    return int(match.group(1)), int(match.group(2)), match.group(3), hint.group(1) if hint else None


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_corpus_is_large_enough():
    assert len(BAD_SPECS) >= 30


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda p: p.stem)
def test_bad_spec_gives_its_error(path):
    line, column, message, hint = _expectation(path)
    with pytest.raises(SpecError) as info:
        check_spec(path)
    error = info.value
    assert error.location is not None, f"no location: {error}"
    assert (error.location.line, error.location.column) == (line, column), str(error)
    assert message in error.message, str(error)
    if hint is not None:
        assert error.hint and hint in error.hint, str(error)
    assert str(error).startswith(f"{path}:{line}:{column}: error: "), str(error)


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda p: p.stem)
def test_cli_check_prints_one_error_and_exits_2(path, capsys, monkeypatch):
    from kernelsearch.cli import main
    monkeypatch.chdir(ROOT)
    line, column, message, _ = _expectation(path)
    code = main(["check", _relative(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.rstrip("\n").split("\n")
    assert lines[0].startswith(f"{_relative(path)}:{line}:{column}: error: "), err
    assert message in lines[0], err
    assert all(extra.startswith("  hint: ") for extra in lines[1:]), err   # one message: the error and its hint


@pytest.mark.parametrize("name", ["cycle"])
def test_cli_script_from_the_checkout(name):
    path = f"tests/bad_specs/{name}.yaml"
    line, column, message, _ = _expectation(ROOT / path)
    result = subprocess.run([sys.executable, "cli.py", "check", path], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{path}:{line}:{column}: error: "), result.stderr
    assert message in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------- generated, not committed

BASE = """name: bad
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
graph:
  s: dot(q, k)
  p: softmax(s)
  o: dot(p, v)
outputs: [o]
"""


def test_absurdly_large_file(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(BASE + "# padding\n" * (MAX_SPEC_BYTES // 10 + 1))
    with pytest.raises(SpecError, match="larger than 256 KiB") as info:
        check_spec(path)
    assert str(info.value).startswith(f"{path}:1:1: error: ")


def test_too_many_graph_entries():
    text = BASE.replace("outputs: [o]\n", "") + "".join(f"  x{n}: q\n" for n in range(300)) + "outputs: [o]\n"
    with pytest.raises(SpecError, match="at most 256 are allowed"):
        parse_spec(text, "many.yaml")


def test_graph_nested_too_deeply_through_entries():
    chain = "".join(f"  s{n}: exp(exp(s{n - 1}))\n" for n in range(1, 100))
    text = BASE.replace("  s: dot(q, k)\n  p: softmax(s)", "  s0: dot(q, k)\n" + chain + "  p: softmax(s99)")
    with pytest.raises(SpecError, match="nested too deeply") as info:
        compile_graph(parse_spec(text, "deep.yaml"))
    assert info.value.location.file == "deep.yaml"


def test_deeply_nested_yaml():
    with pytest.raises(SpecError, match="nested more than 64 deep"):
        parse_spec("name: " + "[" * 30000 + "]" * 30000 + "\n", "deep.yaml")
    block = "".join("  " * n + f"k{n}:\n" for n in range(400))   # valid YAML, but not a spec
    with pytest.raises(SpecError, match="unknown section 'k0'"):
        parse_spec(block, "deep.yaml")


def test_too_many_params_and_optional_inputs():
    params = "params:\n" + "".join(f"  p{n}: {n}\n" for n in range(100))
    with pytest.raises(SpecError, match="100 params; at most"):
        parse_spec(BASE + params, "params.yaml")
    optional = "".join(f"  t{n}: {{shape: [h, n{n}], optional: true}}\n" for n in range(12))
    with pytest.raises(SpecError, match="12 optional inputs; at most"):
        parse_spec(BASE.replace("  v: [b, h, j, d]\n", "  v: [b, h, j, d]\n" + optional), "optional.yaml")


def test_control_character(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_text(BASE.replace("p: softmax(s)", "p: soft\x00max(s)"))
    with pytest.raises(SpecError, match="U\\+0000 is not allowed") as info:
        check_spec(path)
    assert (info.value.location.line, info.value.location.column) == (8, 10)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.replace("bad", "b\xe4d").encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8") as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:1:1: error: ")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


# ---------------------------------------------------------------------------- params at load time

def test_unknown_param_at_compile_time():
    spec = load_spec(ROOT / "specs" / "softmax.yaml")
    with pytest.raises(SpecError, match="unknown param 'unknown_param' for spec 'softmax'"):
        compile_graph(spec, {"unknown_param": 1})
    with pytest.raises(SpecError) as info:
        resolve_params(spec, {"casual": True})
    assert "did you mean 'causal'?" in info.value.hint


@pytest.mark.parametrize("spec_name, params, message", [
    ("softmax", {"causal": 3}, "param 'causal' is a bool, got 3"),
    ("softmax", {"causal": "yes"}, "param 'causal' is a bool"),
    ("softmax", {"scale": "big"}, "param 'scale' is a float"),
    ("softmax", {"scale": True}, "param 'scale' is a float"),
    ("softmax", {"scale": None}, "param 'scale' is a float"),
    ("cosine_sim", {"groups": 1.5}, "param 'groups' is a int"),
    ("cosine_sim", {"groups": True}, "param 'groups' is a int"),
    ("memory_efficient", {"causal_alignment": "diagonal"}, "param 'causal_alignment' must be one of ["),
    ("local", {"window_size": "64"}, "param 'window_size' is a int"),
    ("softmax", {"sclae": 1.0}, "unknown param 'sclae'"),
    ("softmax", {"scale": 10 ** 400}, "is too large for one"),
    ("softmax", {"causal": 2 ** 20000}, "got an integer of 20001 bits"),
])
def test_wrong_params_at_load_time(spec_name, params, message):
    with pytest.raises(SpecError) as info:
        kernelsearch.load(str(ROOT / "specs" / f"{spec_name}.yaml"), backend="reference", **params)
    assert message in str(info.value)


@pytest.mark.parametrize("spec_name, params, message", [
    ("cosine_sim", {"groups": 0}, "l2norm groups must be a positive integer, got 0"),
    ("talking_heads", {"num_streams": 0}, "mix_heads streams must be a positive integer, got 0"),
    ("local", {"window_size": 0}, "division by zero: the divisor is 0 for these params"),
])
def test_param_values_that_only_compiling_can_refuse(spec_name, params, message):
    spec = load_spec(ROOT / "specs" / f"{spec_name}.yaml")
    with pytest.raises(SpecError, match=re.escape(message)) as info:
        compile_graph(spec, params)
    assert info.value.location is not None and info.value.location.file.endswith(f"{spec_name}.yaml")
