"""Property tests: no mutation of a real spec makes the compiler raise anything but SpecError.

Each example takes one of the seed specs, applies a few random mutations (lines deleted,
duplicated, swapped, re-indented; tokens replaced by identifiers, operators, numbers or YAML
syntax; random characters inserted; the text truncated; graph expressions replaced by random
well-formed-looking ones; params overridden with random values) and parses and compiles the
result with every optional input present and with none. A SpecError must name a location
inside the file. Anything else is a compiler bug: fix it and add the case to tests/bad_specs/.
And what compiles must evaluate in the reference backend.

KERNELSEARCH_FUZZ_EXAMPLES=20000 runs a longer search (the default keeps CI fast).
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelsearch.compiler import compile_graph
from kernelsearch.errors import SpecError
from kernelsearch.exprs import OPS
from kernelsearch.spec import parse_spec

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs"
SPECS = {path.name: path.read_text() for path in sorted(SPEC_DIR.glob("*.yaml"))}
PATH = "fuzz.yaml"
SCALE = int(os.environ.get("KERNELSEARCH_FUZZ_EXAMPLES", "0"))


def _settings(examples: int):
    return settings(max_examples=max(examples, SCALE * examples // 250), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE]-?\d+)?|\*\*|//|<=|>=|==|!=|\S")

NAMES = sorted({t for text in SPECS.values() for t in TOKEN.findall(text) if t[0].isalpha() or t[0] == "_"})
KEYWORDS = ["lambda", "not", "and", "or", "if", "else", "None", "True", "False", "import", "__import__",
            "for", "in", "is", "yield", "await", "print", "eval", "exec", "open", "os", "self"]
OPERATORS = ["+", "-", "*", "/", "//", "**", "%", "<", "<=", ">", ">=", "==", "!=", "&", "|", "~", "^", "@",
             "<<", ">>", ".", ",", ":", ";", "(", ")", "[", "]", "{", "}", "=", ":=", "!", "?", "#", "'", '"',
             "`", "\\", "...", "->", "**-", "*,", ""]
YAML_BITS = ["- ", "&a ", "*a", "!!int ", "!!float ", "!!str ", "!!python/object:os.system ", "!foo ", "? ", "|",
             ">", "---", "...", "%YAML 1.1", "null", "~", "{}", "[]", "\t", "<<: *a", ": ", "\n", "\n  ", "\ufeff",
             "\x00", "\x85", "\u2028", "!!binary aGk=", "!!timestamp 2001-12-14", "!!set {a}", ".nan", ".inf"]
NUMBERS = st.one_of(
    st.integers(-(10 ** 30), 10 ** 30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "-1", "0.0", "1e999", "1e-999", "0x1F", "1_000", ".5", "5.", "1j", "2 ** 2 ** 40",
                     "10 ** 10 ** 10", "(-1) ** 0.5", "0b101", "0o17", "1e308 * 10"]),
)
IDENTIFIERS = st.one_of(st.sampled_from(NAMES + sorted(OPS) + KEYWORDS + ["b", "h", "i", "j", "B", "H", "I", "J",
                                                                          "D", "N", "d", "n"]),
                        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True))
REPLACEMENTS = st.one_of(IDENTIFIERS, st.sampled_from(OPERATORS), NUMBERS, st.sampled_from(YAML_BITS))
CHARS = st.text(st.one_of(st.sampled_from(list(" \t\n:[]{}()#'\",-*&!|>?%@`\\=<+/.0123456789abcijhdqkvspo_")),
                          st.characters()), min_size=1, max_size=4)


# ---------------------------------------------------------------------------- the property

def _assert_only_spec_errors(text: str, params: dict | None = None) -> None:
    try:
        spec = parse_spec(text, PATH)
        compile_graph(spec, params, frozenset())
        compile_graph(spec, params, None)
    except SpecError as e:
        assert e.message.strip(), repr(e)
        if e.location is not None:
            assert str(e).startswith(f"{PATH}:{e.location.line}:{e.location.column}: error: "), str(e)
            assert 1 <= e.location.line <= text.count("\n") + 2, (str(e), text)
            assert e.location.column >= 1, str(e)


# ---------------------------------------------------------------------------- mutations

def _lines(text: str) -> list[str]:
    return text.split("\n")


def _mutate(data, text: str) -> str:
    kind = data.draw(st.sampled_from(["delete", "duplicate", "swap", "token", "insert", "truncate", "indent",
                                      "value", "key", "join"]), label="mutation")
    lines = _lines(text)
    line = data.draw(st.integers(0, max(len(lines) - 1, 0)), label="line")
    if kind == "delete" and lines:
        del lines[line]
    elif kind == "duplicate" and lines:
        lines.insert(data.draw(st.integers(0, len(lines))), lines[line])
    elif kind == "swap" and lines:
        other = data.draw(st.integers(0, len(lines) - 1))
        lines[line], lines[other] = lines[other], lines[line]
    elif kind == "token":
        tokens = list(TOKEN.finditer(text))
        if tokens:
            token = data.draw(st.sampled_from(tokens), label="token")
            replacement = data.draw(REPLACEMENTS, label="replacement")
            return text[:token.start()] + replacement + text[token.end():]
    elif kind == "insert":
        at = data.draw(st.integers(0, len(text)), label="at")
        return text[:at] + data.draw(st.one_of(CHARS, st.sampled_from(YAML_BITS)), label="chars") + text[at:]
    elif kind == "truncate":
        return text[:data.draw(st.integers(0, len(text)), label="length")]
    elif kind == "indent" and lines:
        indent = data.draw(st.sampled_from(["", " ", "  ", "   ", "    ", "      ", "\t", "- ", "  - "]))
        lines[line] = indent + lines[line].lstrip()
    elif kind == "value" and lines and ":" in lines[line]:
        key, _, value = lines[line].partition(":")
        new = data.draw(st.sampled_from([
            "", " null", " ~", " []", " {}", " [{}]", " |", " >", " &a " + value.strip(), " *a", f" [{value.strip()}]",
            f" {{x: {value.strip()}}}", f" \"{value.strip()}\"", f" '{value.strip()}'", f" - {value.strip()}",
            f" !!str {value.strip()}", f" !!int {value.strip()}", f"\n    {value.strip()}", f" |\n    {value.strip()}",
            f" {value.strip()} # comment", f" {value.strip()}: x", " 1", " -1", " 1.5", " true", " [1, 2]", " [b, j]",
        ]), label="value")
        lines[line] = key + ":" + new
    elif kind == "key" and lines and ":" in lines[line]:
        key, _, value = lines[line].partition(":")
        indent = key[:len(key) - len(key.lstrip())]
        lines[line] = indent + data.draw(IDENTIFIERS, label="key") + ":" + value
    elif kind == "join" and len(lines) > 1 and line + 1 < len(lines):
        lines[line:line + 2] = [lines[line] + " " + lines[line + 1].lstrip()]
    return "\n".join(lines)


@_settings(100)
@given(data=st.data(), name=st.sampled_from(sorted(SPECS)))
def test_mutated_specs_raise_only_spec_errors(data, name):
    text = SPECS[name]
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        text = _mutate(data, text)
    _assert_only_spec_errors(text)


# ---------------------------------------------------------------------------- random expressions

LEAF_WORDS = ["None", "True", "False", "'top_left'", "i", "j", "I", "J", "D", "h", "b", "0", "1", "2", "-1", "0.5",
              "1e999", "10 ** 10 ** 10", "(-1) ** 0.5"]
BINARY = ["+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!=", "&", "|", "and", "or"]
KEYWORD_ARGS = ["keep", "over", "groups", "eps", "streams", "theta", "scale_base", "inverse", "kep"]


def _expression(rng, names, depth: int = 0) -> str:
    """A random expression over the spec's names, mostly well-formed, reaching the later passes."""
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(names + LEAF_WORDS)
    def sub():
        return _expression(rng, names, depth + 1)
    kind = rng.randrange(6)
    if kind == 0:
        return f"({sub()} {rng.choice(BINARY)} {sub()})"
    if kind == 1:
        return f"({rng.choice(['-', '+', '~', 'not '])}{sub()})"
    if kind == 2:
        return f"({sub()} if {sub()} else {sub()})"
    if kind == 3:
        return f"{rng.choice(names)}[{', '.join(sub() for _ in range(rng.randint(1, 3)))}]"
    op = rng.choice(sorted(OPS) + ["foo"])
    arity = len(OPS[op].positional) if op in OPS and rng.random() < 0.8 else rng.randint(0, 3)
    args = [sub() for _ in range(arity)]
    known = sorted(OPS[op].keywords) if op in OPS else []
    for _ in range(rng.randint(0, 2) if known or rng.random() < 0.1 else 0):
        value = sub() if rng.random() < 0.6 else "[" + ", ".join(sub() for _ in range(rng.randint(0, 3))) + "]"
        args.append(f"{rng.choice(known if known and rng.random() < 0.8 else KEYWORD_ARGS)}={value}")
    return f"{op}({', '.join(args)})"


def _rewrite(rng, source: str, names: list[str]) -> str:
    """`source` with one random subexpression replaced by a random expression (which may reuse it)."""
    tree = ast.parse(source.strip(), mode="eval")
    functions = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    target = rng.choice([node for node in ast.walk(tree) if isinstance(node, ast.expr) and id(node) not in functions])
    replacement = ast.parse(_expression(rng, names + [f"({ast.unparse(target)})"] * 3), mode="eval").body

    class Replace(ast.NodeTransformer):
        def visit(self, node):
            return replacement if node is target else super().visit(node)
    return ast.unparse(Replace().visit(tree))


@_settings(70)
@given(data=st.data(), name=st.sampled_from(sorted(SPECS)), rng=st.randoms(use_true_random=False))
def test_random_graph_expressions_raise_only_spec_errors(data, name, rng):
    text = SPECS[name]
    spec = parse_spec(text, PATH)
    names = sorted(set(spec.graph) | set(spec.inputs) | set(spec.params))
    lines = _lines(text)
    graph_lines = [n for n, line in enumerate(lines) if re.match(r"  (\w+): ", line)
                   and line.split(":")[0].strip() in spec.graph]
    for _ in range(data.draw(st.integers(1, 2), label="replaced")):
        n = data.draw(st.sampled_from(graph_lines), label="entry")
        key, _, source = lines[n].partition(":")
        expression = _rewrite(rng, source, names) if rng.random() < 0.8 else _expression(rng, names)
        lines[n] = f"{key}: {expression!r}" if rng.random() < 0.5 else f"{key}: {expression}"
    _assert_only_spec_errors("\n".join(lines))


@_settings(40)
@given(name=st.sampled_from(sorted(SPECS)), rng=st.randoms(use_true_random=False))
def test_what_compiles_evaluates_in_the_reference_backend(name, rng):
    """A spec that compiles means something: the reference backend evaluates it (fuzzing this found
    arithmetic on predicates and zero divisors, which the compiler now refuses)."""
    import torch

    from kernelsearch.backends import reference
    from kernelsearch.inputs import random_inputs
    text = SPECS[name]
    spec = parse_spec(text, PATH)
    names = sorted(set(spec.graph) | set(spec.inputs) | set(spec.params))
    lines = _lines(text)
    graph_lines = [n for n, line in enumerate(lines) if re.match(r"  (\w+): ", line)
                   and line.split(":")[0].strip() in spec.graph]
    n = rng.choice(graph_lines)
    key, _, source = lines[n].partition(":")
    lines[n] = f"{key}: {_rewrite(rng, source, names)!r}"
    try:
        mutated = parse_spec("\n".join(lines), PATH)
        graph = compile_graph(mutated, None, None)
    except SpecError:
        return
    tensors = random_inputs(mutated, {"B": 2, "H": 4, "I": 5, "J": 7, "D": 8}, dtype=torch.float64)
    try:
        reference.evaluate(graph, tensors)
    except IndexError:
        pass   # a gather index out of the table's range: the data's fault, not the spec's
    except RuntimeError as e:
        if "ZeroDivisionError" not in str(e):   # an integer division by a value that is zero at run time
            raise


# ---------------------------------------------------------------------------- random param overrides

PARAM_VALUES = st.one_of(st.booleans(), st.integers(-(10 ** 20), 10 ** 20), st.floats(allow_nan=True),
                         st.sampled_from([0, 1, -1, 0.0, "top_left", "bottom_right", "", None, [1], {"a": 1}, 10 ** 400,
                                          2 ** 63]), st.text(max_size=5))


@_settings(40)
@given(data=st.data(), name=st.sampled_from(sorted(SPECS)))
def test_random_param_overrides_raise_only_spec_errors(data, name):
    spec = parse_spec(SPECS[name], PATH)
    names = st.one_of(st.sampled_from(sorted(spec.params)), IDENTIFIERS)
    overrides = data.draw(st.dictionaries(names, PARAM_VALUES, max_size=3), label="overrides")
    try:
        compile_graph(spec, overrides, frozenset())
        compile_graph(spec, overrides, None)
    except SpecError:
        pass


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_unmutated_specs_compile(name):
    _assert_only_spec_errors(SPECS[name])
    compile_graph(parse_spec(SPECS[name], PATH))
