"""Refusals of what the spec language spells otherwise name the construct and the nearest
supported one (kernelsearch/nearest.py): what a PyTorch, FlexAttention or FlashAttention user
writes first."""
from __future__ import annotations

import pytest

import kernelsearch
from kernelsearch.errors import SpecError

SPEC = """name: t
params: {{scale: 1.0}}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
graph:
  s: dot(q, k) * scale
  p: {p}
  o: dot(p, v)
outputs: [o]
"""

CASES = [
    # (p's expression, what the message says, what the hint suggests)
    ("softmax(s, dim=-1)", "softmax() has no keyword 'dim'", "over the key dim j"),
    ("softmax(s, attn_mask=[j <= i])", "no keyword 'attn_mask'", "keep=[...]"),
    ("softmax(s, is_causal=True)", "no keyword 'is_causal'", "keep=[j <= i + J - I]"),
    ("softmax(s, scale=2.0)", "no keyword 'scale'", "softmax(s * scale)"),
    ("torch.softmax(s, -1)", "not torch.softmax(...)", "bare name: softmax(...)"),
    ("s.softmax(-1)", "not s.softmax(...)", "bare name: softmax(...)"),
    ("softmax(s.masked_fill(j > i, 0.0))", "not s.masked_fill(...)", "softmax(s, keep=[predicate])"),
    ("softmax(F.relu(s))", "not F.relu(...)", "bare name: relu(...)"),
    ("softmax(F.softplus(s))", "not F.softplus(...)", "log(1 + exp(x))"),
    ("softmax(s + math.log(2))", "not math.log(...)", "bare name: log(...)"),
    ("softmax(s * math.pi)", "attribute access is not allowed", "3.141592653589793"),
    ("softmax(s / q.shape)", "attribute access is not allowed", "sizes are written I, J, D"),
    ("softmax(where(j <= i, s, -inf))", "undefined name 'inf'", "softmax(s, keep=[predicate])"),
    ("softmax(clamp(s, -5, 5))", "unknown op 'clamp'", "minimum(maximum(x, low), high)"),
    ("softmax(silu(s))", "unknown op 'silu'", "x * sigmoid(x)"),
    ("log_softmax(s)", "unknown op 'log_softmax'", "softmax(s, keep=[...])"),
    ("softmax(einsum(s, s))", "unknown op 'einsum'", "dot(a, b)"),
    ("softmax(s, keep=[tril(s)])", "unknown op 'tril'", "j <= i + J - I"),
    ("softmax(s / temperature)", "undefined name 'temperature'", "declare it under params"),
    ("softmax(s, keep=[q_doc[b, i] == 1])", "only inputs can be indexed", "'q_doc' is not declared"),
    ("softmax(s[b, h, i, j])", "only inputs can be indexed", "'s' needs no index"),
    ("softmax(exp2(s))", "unknown op 'exp2'", "2 ** x"),
]


@pytest.mark.parametrize("expression, message, hint", CASES, ids=[c[0] for c in CASES])
def test_refusals_suggest_the_nearest_construct(expression, message, hint):
    with pytest.raises(SpecError) as info:
        kernelsearch.load(SPEC.format(p=expression), backend="reference")
    error = info.value
    assert message in error.message, error.message
    assert hint in (error.hint or ""), error.hint
    assert error.location is not None and error.location.line == 9       # file:line:column of the entry


def test_the_cli_prints_them_as_one_line_and_a_hint(tmp_path, capsys):
    from kernelsearch.cli import main
    path = tmp_path / "t.yaml"
    path.write_text(SPEC.format(p="torch.softmax(s, -1)"))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:9:6: error: only ops can be called, by their bare name, not torch.softmax(...)" in err
    assert "hint: call the op by its bare name: softmax(...)" in err
    assert "Traceback" not in err
