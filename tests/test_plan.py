"""The plan (passes/plan.py): every decision about how a graph runs, made once, read by the code generators.

- each seed spec's plan: sweeps, prepass, heads in tile, key bounds and the conjuncts they use;
- the decisions are sound: key bounds contain every key a row keeps (brute force over (i, j));
  the op-registry facts the passes reason with (inverse, monotone, order, linear) hold on numbers;
- a spec whose post-softmax ops are linear in p runs in one sweep, a non-linear one in two, and
  both match the float64 reference on the torch backend (the chunked lowering reads the plan);
- the code generators decide nothing of this themselves (no decision function left in codegen/);
- `kernelsearch check` prints the plan.
"""
from __future__ import annotations

import ast
import itertools
import operator
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernelsearch
from kernelsearch import ops
from kernelsearch.codegen import triton_fwd
from kernelsearch.codegen.torch_module import scalar_expression
from kernelsearch.compiler import compile_graph
from kernelsearch.inputs import random_inputs
from kernelsearch.passes.bounds import render_bound
from kernelsearch.passes.plan import describe_plan
from kernelsearch.passes.split_prologue import split_prologue
from kernelsearch.spec import load_spec

from .conftest import ROOT, spec_path


def plan_of(name_or_path: str, params: dict | None = None, present=None):
    path = name_or_path if name_or_path.endswith(".yaml") else spec_path(name_or_path)
    return compile_graph(load_spec(path), params, present)


def owners(graph, node_ids) -> set[str]:
    """The graph entries these nodes belong to (`window_keep.50` -> window_keep)."""
    return {node_id.rsplit(".", 1)[0] for node_id in node_ids}


# ------------------------------------------------------------------------------------ the seeds' plans

def test_softmax_one_sweep_no_prepass():
    graph = plan_of("softmax")
    p = graph.plan
    assert (p.schedule, p.sweeps, p.heads_in_tile, p.prepass, p.delta_sweep) == ("one_pass", 1, False, (), False)
    assert [graph.node(a).name for a in p.accumulators] == ["o"]
    assert not p.key_bounds.skips_blocks
    causal = plan_of("softmax", {"causal": True}).plan.key_bounds
    assert causal.lower is None and causal.upper is not None and owners(None, causal.conjuncts_used) == {"causal_keep"}


def test_cosine_sim_prepass_of_kn():
    graph = plan_of("cosine_sim")
    assert graph.plan.prepass == ("kn",) and graph.node("kn").op == "l2norm"
    assert graph.plan.sweeps == 1
    # the training path reads the cut value instead: nothing left to prepass
    assert split_prologue(graph).core.plan.prepass == ()


def test_talking_heads_heads_in_tile_with_streams():
    both = plan_of("talking_heads").plan
    assert (both.schedule, both.heads_in_tile, both.head_groups, both.sweeps, both.delta_sweep) == \
        ("two_pass", True, 2, 2, True)
    pre_only = plan_of("talking_heads", {"post_talking_heads": False, "num_streams": 3}).plan
    assert (pre_only.schedule, pre_only.heads_in_tile, pre_only.head_groups, pre_only.sweeps, pre_only.delta_sweep) \
        == ("heads_in_tile", True, 3, 1, False)
    plain = plan_of("talking_heads", {"post_talking_heads": False, "pre_talking_heads": False}).plan
    assert (plain.schedule, plain.heads_in_tile, plain.head_groups) == ("one_pass", False, None)


def test_talking_heads_mlp_two_sweeps():
    p = plan_of("talking_heads_mlp").plan
    assert p.sweeps == 2 and p.heads_in_tile
    # only the pre-softmax MLP: the probabilities go straight into p @ v
    assert plan_of("talking_heads_mlp", {"post_talking_heads": False}).plan.sweeps == 1


def test_local_bounds_from_its_window_conjuncts():
    p = plan_of("local").plan      # causal, window 64, one window back
    assert p.key_bounds.lower is not None and p.key_bounds.upper is not None
    assert owners(None, p.key_bounds.conjuncts_used) == {"window_keep", "causal_keep"}
    assert p.prepass and owners(None, p.prepass) == {"k_rotated"}
    free = plan_of("local", {"causal": False, "look_forward": 1}).plan.key_bounds
    assert owners(None, free.conjuncts_used) == {"window_keep"} and free.lower and free.upper
    exact = plan_of("local", {"causal": False, "exact_windowsize": True}).plan.key_bounds
    assert owners(None, exact.conjuncts_used) == {"window_keep", "exact_keep"}


def test_plans_agree_with_what_codegen_renders():
    """The Triton launch plan is the pass's plan, not a second decision."""
    for name in ("softmax", "cosine_sim", "local", "talking_heads", "talking_heads_mlp", "memory_efficient"):
        graph = plan_of(name)
        kernel = triton_fwd.plan(graph)
        assert kernel.exact == (graph.plan.sweeps == 2), name
        assert kernel.channels == graph.plan.heads_in_tile, name
        assert tuple(t.name for t in kernel.materialized) == graph.plan.prepass, name
        assert tuple(node_id for _, node_id, _, _ in kernel.host) == graph.plan.host, name


# ------------------------------------------------------------------------------------ soundness

def _keeps(window: int, back: int, forward: int, causal: bool, exact: bool, i: int, j: int) -> bool:
    """local.yaml's keep-predicates, written out."""
    distance = i // window - j // window
    keep = -forward <= distance <= back
    if causal:
        keep = keep and j <= i
    if exact:
        keep = keep and i - window * back <= j <= i + window * forward
    return keep


@pytest.mark.parametrize("window,back,forward,causal,exact", [
    (4, 1, 0, True, False), (4, 2, 1, False, False), (3, 1, 1, False, True), (5, 0, 0, True, True), (8, 1, 2, False, False)])
def test_key_bounds_contain_every_kept_key(window, back, forward, causal, exact):
    graph = plan_of("local", {"window_size": window, "look_backward": back, "look_forward": forward,
                              "causal": causal, "exact_windowsize": exact})
    bounds = graph.plan.key_bounds
    for I, J in ((23, 23), (17, 29), (29, 17)):
        for i in range(I):
            def at(tree):
                text = render_bound(tree, lambda n: scalar_expression(graph, n, row=str(i)))
                return eval(text, {"I": I, "J": J})    # noqa: S307 - our own bound expression over ints
            lower = at(bounds.lower) if bounds.lower else 0
            upper = at(bounds.upper) if bounds.upper else J - 1
            kept = [j for j in range(J) if _keeps(window, back, forward, causal, exact, i, j)]
            assert all(lower <= j <= upper for j in kept), (I, J, i, lower, upper, kept)
            if kept:   # and the bounds are the window's own edges, not something looser
                assert lower == min(kept) or lower < 0 or min(kept) == 0
                assert upper == max(kept) or upper >= J - 1


def _tree_value(tree, u: int, c: int) -> int:
    if tree == "u":
        return u
    if tree == "c":
        return c
    if isinstance(tree, int):
        return tree
    kind, a, b = tree
    a, b = _tree_value(a, u, c), _tree_value(b, u, c)
    return {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv}[kind](a, b)


def _int_meaning(name: str):
    return ops.OPS[name].scalar


@pytest.mark.parametrize("name", sorted(n for n, e in ops.OPS.items() if e.inverse))
def test_inverse_facts_solve_the_op(name):
    """op(.., x, ..) <= u  <=>  x <= upper(u, c)  (>= with lower; sides swapped where the op decreases in x)."""
    entry, rng = ops.OPS[name], random.Random(0)
    for position, (upper, lower) in entry.inverse.items():
        flips = entry.monotone[position] == -1
        for _ in range(400):
            x, u = rng.randint(-40, 40), rng.randint(-40, 40)
            c = rng.randint(1, 9) if "positive" in entry.monotone else rng.randint(-9, 9)
            args = [x] if len(entry.positional) == 1 else ([x, c] if position == 0 else [c, x])
            value = _int_meaning(name)(*args)
            solved_le, solved_ge = _tree_value(upper, u, c), _tree_value(lower, u, c)
            assert (value <= u) == ((x >= solved_le) if flips else (x <= solved_le)), (name, args, u)
            assert (value >= u) == ((x <= solved_ge) if flips else (x >= solved_ge)), (name, args, u)


@pytest.mark.parametrize("name", sorted(n for n, e in ops.OPS.items() if e.monotone))
def test_monotone_facts_hold(name):
    entry, rng = ops.OPS[name], random.Random(1)
    for position, direction in enumerate(entry.monotone):
        if direction == "positive":
            continue
        for _ in range(300):
            args = [rng.randint(1, 9) if fact == "positive" else rng.randint(-30, 30) for fact in entry.monotone]
            bigger = list(args)
            bigger[position] += rng.randint(1, 5)
            before, after = _int_meaning(name)(*args), _int_meaning(name)(*bigger)
            assert (after - before) * direction >= 0, (name, args, bigger)


@pytest.mark.parametrize("name", sorted(n for n, e in ops.OPS.items() if e.order))
def test_order_and_converse_facts(name):
    entry = ops.OPS[name]
    side, offset = entry.order
    for a, b in itertools.product(range(-4, 5), repeat=2):
        bound = b + offset
        assert entry.scalar(a, b) == (a <= bound if side == "upper" else a >= bound), (name, a, b)
        assert entry.scalar(a, b) == ops.OPS[entry.converse].scalar(b, a)


@pytest.mark.parametrize("name", sorted(n for n, e in ops.OPS.items() if e.linear and e.lowering == "elementwise"))
def test_linear_facts_are_homogeneous(name):
    """f(.., c * x, ..) == c * f(.., x, ..) for the arguments the fact calls linear."""
    entry, rng = ops.OPS[name], random.Random(2)
    arity = len(entry.positional)
    patterns = {"every": [("linear",) * arity], "one": [tuple("linear" if k == p else "fixed" for k in range(arity))
                                                        for p in range(arity)]}.get(entry.linear, [entry.linear])
    for pattern in patterns:
        for _ in range(50):
            scale = rng.uniform(-3, 3)
            args = [rng.uniform(-2, 2) if kind == "linear" else rng.choice([rng.uniform(0.5, 2), True, False])
                    if name == "where" and position == 0 else rng.uniform(0.5, 2)
                    for position, kind in enumerate(pattern)]
            scaled = [a * scale if kind == "linear" else a for a, kind in zip(args, pattern)]
            assert entry.scalar(*scaled) == pytest.approx(scale * entry.scalar(*args), rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------------------------ one or two sweeps

POST_SOFTMAX = """\
name: {name}
summary: softmax attention with an op on the probabilities
params: {{scale: {{type: float, default: "D ** -0.5"}}, causal: {{type: bool, default: true}}}}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  mask: {{shape: [b, j], dtype: bool, optional: true}}
graph:
  s: dot(q, k) * scale
  causal_keep: (j <= i + J - I) if causal else None
  p: softmax(s, keep=[causal_keep, mask])
  p_out: {post}
  o: dot(p_out, v)
outputs: [o]
"""
LINEAR = "where(j % 2 == 0, p * 1.5, -p) + p * sigmoid(s) - p / (1 + i)"
NON_LINEAR = "p * p + 0.5 * p"


@pytest.fixture
def post_specs(tmp_path):
    paths = {}
    for name, post in (("linear_post", LINEAR), ("squared_post", NON_LINEAR)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(POST_SOFTMAX.format(name=name, post=post))
    return paths


def test_linear_post_softmax_ops_keep_one_sweep(post_specs):
    linear = plan_of(str(post_specs["linear_post"])).plan
    assert linear.schedule == "one_pass" and linear.sweeps == 1
    assert linear.delta_sweep   # p is transformed before p @ v: the backward's delta is not rowsum(dO * O)
    squared = plan_of(str(post_specs["squared_post"])).plan
    assert squared.sweeps == 2 and "not linear" in squared.sweeps_reason


@pytest.mark.parametrize("name", ["linear_post", "squared_post"])
@pytest.mark.parametrize("config", [{"lowering": "chunked", "CHUNK_N": 5, "CHUNK_M": 4},
                                    {"lowering": "chunked", "CHUNK_N": 16}, {"lowering": "materialized"}],
                         ids=["chunked5x4", "chunked16", "materialized"])
def test_post_softmax_ops_match_reference_on_torch(post_specs, name, config):
    path = str(post_specs[name])
    reference = kernelsearch.load(path, backend="reference")
    generated = kernelsearch.load(path, backend="torch", config=config)
    for seed, (I, J) in enumerate([(1, 1), (9, 17), (17, 9), (33, 33)]):
        tensors = random_inputs(reference.spec, dict(B=2, H=2, I=I, J=J, D=8), dtype=torch.float64, seed=seed,
                                optional=True)
        torch.testing.assert_close(generated(**tensors), reference(**tensors), rtol=1e-10, atol=1e-10,
                                   msg=f"{name} I={I} J={J}")


def test_linear_post_softmax_renders_one_sweep(post_specs):
    """The torch chunked lowering has one key loop when the plan says one sweep; with two, a loop
    per pass, and both passes in whole_rows_step where one key chunk holds the rows' keys."""
    from kernelsearch.codegen.torch_module import torch_source
    one = torch_source(plan_of(str(post_specs["linear_post"])), "chunked")
    two = torch_source(plan_of(str(post_specs["squared_post"])), "chunked")
    assert one.count("for key_start in ") == 1 and "whole_rows_step" not in one
    assert two.count("for key_start in key_chunks:") == 3
    assert "= whole_rows_step(" in two and "= statistics_step(" in two and "= chunk_step(" in two


# ------------------------------------------------------------------------------------ no decisions in codegen

# passes/plan.py's decision functions (and the codegen functions they replaced); `prepass` and
# `sweep` stay names of codegen's renderers
DECISIONS = ("_is_linear_in", "linearity", "materialized_nodes", "accumulator_dots", "accumulators", "_is_host",
             "host_scalars", "choose_schedule", "schedule_of", "head_groups", "key_block_bounds", "sweeps")


def test_codegen_decides_nothing_the_plan_decides():
    """Every decision function is defined in passes/ only; code generators neither define nor call
    them, nor compare schedule names (they read graph.plan)."""
    codegen = ROOT / "kernelsearch" / "codegen"
    for path in sorted(codegen.glob("*.py")):
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        called = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
                  for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}
        assert not (defined & set(DECISIONS)), (path.name, defined & set(DECISIONS))
        assert not (called & set(DECISIONS)), (path.name, called & set(DECISIONS))
        schedule_names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                          and n.value in ("one_pass", "heads_in_tile", "two_pass")}
        assert not schedule_names, (path.name, schedule_names)
    passes = (ROOT / "kernelsearch" / "passes" / "plan.py").read_text()
    assert "def linearity" in passes and "def prepass" in passes and "def host_scalars" in passes


def test_no_op_name_matched_in_the_passes_that_use_facts():
    """bounds.py, build.py and plan.py read op facts from the registry; no elementwise op's name is
    a string constant there."""
    elementwise = {name for name, entry in ops.OPS.items() if entry.lowering == "elementwise"}
    for module in ("bounds.py", "build.py", "plan.py", "schedule.py"):
        tree = ast.parse((ROOT / "kernelsearch" / "passes" / module).read_text())
        constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not (constants & elementwise), (module, constants & elementwise)


# ------------------------------------------------------------------------------------ printed

def test_check_prints_the_plan():
    result = subprocess.run([sys.executable, "-m", "kernelsearch.cli", "check", "specs/cosine_sim.yaml"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "schedule one_pass" in result.stdout and "sweeps   1" in result.stdout
    assert "prepass  kn" in result.stdout and "from le in causal_keep" in result.stdout


def test_describe_plan_names_the_reason_for_two_sweeps():
    lines = describe_plan(plan_of("talking_heads"))
    assert any(line.startswith("sweeps   2: heads are mixed after softmax") for line in lines)
    assert any("heads in tile, 2 stream(s)" in line for line in lines)
