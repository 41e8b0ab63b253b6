"""Hygiene: a spec may name its params, inputs, graph entries and dims with any identifier the
language accepts - including the code generators' own locals, Python's builtins and module names
- and every backend still computes what the reference does (codegen/names.py).

The property renames the names of real specs to names drawn from the generated code's own
vocabulary (every identifier in the torch and Triton files of the seed specs), from Python's
builtins and from the modules generated code imports, then compares the torch backend (both
lowerings) and the Triton forward and backward kernels (in Triton's interpreter) against the
float64 reference evaluator.
"""
from __future__ import annotations

import builtins
import keyword
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kernelsearch
from kernelsearch.codegen.files import torch_file, triton_file, triton_training_file
from kernelsearch.compiler import compile_graph
from kernelsearch.exprs import RESERVED_NAMES
from kernelsearch.inputs import random_inputs
from kernelsearch.passes.split_prologue import split_prologue
from kernelsearch.spec import parse_spec

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs"
WORD = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def _generated_vocabulary() -> list[str]:
    words = set()
    for name in ("softmax", "cosine_sim", "local"):
        spec = kernelsearch.load_spec(SPEC_DIR / f"{name}.yaml")
        graph = compile_graph(spec)
        files = [torch_file(graph), triton_file(graph), triton_training_file(split_prologue(graph).core)]
        for file in files:
            words |= set(WORD.findall(file.source))
    words |= {"torch", "tl", "triton", "math", "ops", "self", "CHUNK_N", "CHUNK_M", "BLOCK_M", "BLOCK_N",
              "row_max", "rescale", "acc_0", "offs_c", "c_ok", "in_q", "v_s", "t3_s", "size_d", "ptr_in_q",
              "stride_in_q_0", "mma_v_q", "rot_v_q", "x_v_q", "tile_v_mix", "LOG2E", "inputs", "config"}
    words |= {n for n in dir(builtins) if n.isidentifier()}
    return sorted(w for w in words if not keyword.iskeyword(w) and w not in RESERVED_NAMES
                  and not w.startswith("__"))


VOCABULARY = _generated_vocabulary()
SETTINGS = dict(deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# (spec, names that may be renamed: params, optional inputs, graph entries, feature dims)
CASES = {
    "cosine_sim": ["scale", "groups", "causal", "mask", "attn_bias", "qn", "kn", "s", "causal_keep", "p", "o", "d"],
    "local": ["window_size", "look_backward", "scale", "rotary", "mask", "pos_bias_table", "q_rotated",
              "k_rotated", "s", "window_distance", "window_keep", "causal_keep", "p", "o", "n", "d"],
}


def renamed(name: str, mapping: dict) -> str:
    """The spec's text with names replaced (whole words; a dim's size, its upper case, too)."""
    text = (SPEC_DIR / f"{name}.yaml").read_text()
    sizes = {old.upper(): new.upper() for old, new in mapping.items() if len(old) == 1}
    full = {**mapping, **sizes}
    out = []
    for line in text.split("\n"):
        if line.startswith(("name:", "summary:")):
            out.append(line)
            continue
        out.append(WORD.sub(lambda m: m.group(0) if _is_keyword_argument(line, m) else full.get(m.group(0), m.group(0)),
                            line))
    return "\n".join(out)


def _is_keyword_argument(line: str, match) -> bool:
    """`groups` in `l2norm(q, groups=groups)` and `rotary` in `rotary(q, i)`: an op's keyword or
    the op itself, not a name."""
    rest = line[match.end():].lstrip(" ")
    return rest.startswith("(") or rest.startswith("=") and not rest.startswith("==")


@st.composite
def renamings(draw, name):
    targets = CASES[name]
    chosen = draw(st.lists(st.sampled_from(targets), min_size=1, max_size=len(targets), unique=True))
    spec_words = set(WORD.findall((SPEC_DIR / f"{name}.yaml").read_text()))
    mapping = {}
    for old in chosen:
        # a feature dim's size is its upper case: the new name and its upper case must both be free
        pool = [w for w in VOCABULARY if w not in spec_words and w not in mapping.values()
                and (len(old) > 1 or (w.upper() not in RESERVED_NAMES and w.upper() not in spec_words
                                      and w.islower()))]
        mapping[old] = draw(st.sampled_from(pool))
    return mapping


def dim_sizes(mapping: dict, **sizes) -> dict:
    """Sizes by the renamed dims' names (a table dim must cover |i - j|)."""
    return {mapping.get(dim.lower(), dim.lower()).upper(): size for dim, size in sizes.items()}


def _compare(spec, backend, config, sizes, grads=False):
    reference = kernelsearch.load(spec, backend="reference")
    candidate = kernelsearch.load(spec, backend=backend, config=config)
    dtype = torch.float64 if backend == "torch" else torch.float32
    inputs = random_inputs(spec, sizes, dtype=dtype, seed=1)
    expected = reference(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    if grads:
        inputs = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    got = candidate(**inputs)
    tolerance = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got.double(), expected, **tolerance)
    if grads:
        ref_inputs = {k: v.detach().double().requires_grad_() if v.is_floating_point() else v
                      for k, v in inputs.items()}
        ref_out = reference(**ref_inputs)
        weight = torch.randn_like(ref_out)
        (got.double() * weight).sum().backward()
        (ref_out * weight).sum().backward()
        for key, value in inputs.items():
            if value.is_floating_point() and ref_inputs[key].grad is None:   # an input the params fold away
                assert value.grad is None or not value.grad.any(), key
            elif value.is_floating_point():
                torch.testing.assert_close(value.grad.double(), ref_inputs[key].grad, atol=5e-4, rtol=5e-4,
                                           msg=lambda m, key=key: f"gradient of {key}: {m}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_any_names_torch_backend(name):
    @settings(max_examples=8, **SETTINGS)
    @given(mapping=renamings(name))
    def check(mapping):
        spec = parse_spec(renamed(name, mapping), f"{name}-renamed.yaml")
        sizes = dim_sizes(mapping, B=2, H=2, I=17, J=33, D=16, N=64)
        for lowering in ("materialized", "chunked", "sdpa"):
            _compare(spec, "torch", {"lowering": lowering, "CHUNK_N": 16, "CHUNK_M": 8}, sizes)
    check()


@pytest.mark.parametrize("name", sorted(CASES))
def test_any_names_triton_forward_and_backward(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    @settings(max_examples=2, **SETTINGS)
    @given(mapping=renamings(name))
    def check(mapping):
        spec = parse_spec(renamed(name, mapping), f"{name}-renamed.yaml")
        sizes = dim_sizes(mapping, B=1, H=2, I=17, J=33, D=16, N=64)
        _compare(spec, "triton", {"BLOCK_M": 16, "BLOCK_N": 16}, sizes, grads=True)
    check()


def test_generator_vocabulary_as_names_collides_with_nothing():
    """The cases the issue names: a param `rescale`, an entry `row_max`, an input `CHUNK_N`, an
    entry `acc_0`, and module names - on every backend."""
    mapping = {"scale": "rescale", "s": "row_max", "mask": "CHUNK_N", "p": "acc_0", "qn": "torch", "kn": "tl",
               "causal_keep": "ops", "o": "math"}
    spec = parse_spec(renamed("cosine_sim", mapping), "cosine_sim-renamed.yaml")
    sizes = dict(B=2, H=2, I=17, J=33, D=16)
    for lowering in ("materialized", "chunked", "sdpa"):
        _compare(spec, "torch", {"lowering": lowering, "CHUNK_N": 16, "CHUNK_M": 8}, sizes)
