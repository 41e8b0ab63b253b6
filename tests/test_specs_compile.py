"""Every real spec compiles for every combination of present optional inputs and for a range of params.

The settings are derived from each spec's own params (every bool flipped, every choice taken), so
a param added to a spec is covered without changing this file. The compiled graph must be a
well-formed attention: one softmax, an output [b, h, i, <feature>], a stage for every node, a
schedule; causal masks must give key-block bounds (block skipping).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from kernelsearch import normalisers

from kernelsearch.compiler import check_spec, compile_graph
from kernelsearch.ir import STAGES
from kernelsearch.passes.schedule import SCHEDULES
from kernelsearch.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATHS = sorted((ROOT / "specs").glob("*.yaml"))
SEEDS = ("softmax", "cosine_sim", "memory_efficient", "local", "talking_heads")


def _spec(path):
    return load_spec(path)


def _presences(spec):
    optional = spec.optional_inputs
    return [frozenset(c) for r in range(len(optional) + 1) for c in itertools.combinations(optional, r)]


def _param_settings(spec) -> list[dict]:
    """Defaults; every bool flipped on its own; all bools on; all off; every choice of a str param."""
    bools = [name for name, p in spec.params.items() if p.type == "bool"]
    settings = [{}]
    settings += [{name: not spec.params[name].default} for name in bools]
    if bools:
        settings += [{name: True for name in bools}, {name: False for name in bools}]
    for name, param in spec.params.items():
        settings += [{name: choice} for choice in param.choices or ()]
    return settings


def _check_graph(spec, graph):
    assert normalisers.find(graph), "no row normaliser"
    output = graph.node(graph.output)
    assert output.dims[:3] == ("b", "h", "i") and len(output.dims) == 4 and "j" not in output.dims, output.dims
    assert output.dtype == "float"
    assert graph.schedule in SCHEDULES
    assert graph.key_bounds is not None
    for node_id, node in graph.nodes():
        assert node.stage in STAGES, (node_id, node.stage)
        assert node.op not in ("param", "select", "alias", "absent"), f"{node_id} left unfolded: {node.describe()}"
    for name in spec.optional_inputs:
        used = name in graph.ids()
        assert used <= (name in graph.present), f"absent input '{name}' is still in the graph"


def test_the_five_seed_specs_exist():
    assert {p.stem for p in SPEC_PATHS} >= set(SEEDS)


@pytest.mark.parametrize("path", SPEC_PATHS, ids=lambda p: p.stem)
def test_check_spec_passes(path):
    spec = check_spec(path)
    assert spec.name == path.stem
    assert {"q", "k", "v"} <= set(spec.inputs)


@pytest.mark.parametrize("path", SPEC_PATHS, ids=lambda p: p.stem)
def test_compiles_for_every_presence_of_optional_inputs_and_every_param_setting(path):
    spec = _spec(path)
    everything, nothing = frozenset(spec.optional_inputs), frozenset()
    for params in _param_settings(spec):
        # every combination of inputs with the defaults; with other params, all inputs and none
        for present in _presences(spec) if not params else (everything, nothing):
            try:
                graph = compile_graph(spec, params, present)
            except Exception as e:  # say which combination failed
                raise AssertionError(f"{path.name} with params {params} and inputs {sorted(present)}: {e}") from e
            assert graph.present == present
            _check_graph(spec, graph)


@pytest.mark.parametrize("name", [n for n in SEEDS if n != "local"])
@pytest.mark.parametrize("causal", [False, True])
def test_causal_gives_an_upper_key_bound(name, causal):
    spec = _spec(ROOT / "specs" / f"{name}.yaml")
    graph = compile_graph(spec, {"causal": causal}, frozenset())
    assert (graph.key_bounds.upper is not None) == causal
    assert graph.key_bounds.lower is None


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_memory_efficient_causal_alignments_differ(alignment):
    spec = _spec(ROOT / "specs" / "memory_efficient.yaml")
    graph = compile_graph(spec, {"causal": True, "causal_alignment": alignment}, frozenset())
    assert graph.key_bounds.upper is not None
    other = "top_left" if alignment == "bottom_right" else "bottom_right"
    assert graph.dump() != compile_graph(spec, {"causal": True, "causal_alignment": other}, frozenset()).dump()


@pytest.mark.parametrize("causal, look_forward", [(True, 0), (False, 1), (False, 0)])
@pytest.mark.parametrize("exact", [False, True])
def test_local_windows_bound_keys_on_both_sides(causal, look_forward, exact):
    spec = _spec(ROOT / "specs" / "local.yaml")
    graph = compile_graph(spec, {"causal": causal, "look_forward": look_forward, "exact_windowsize": exact,
                                 "window_size": 32, "look_backward": 2}, frozenset())
    assert graph.key_bounds.lower is not None and graph.key_bounds.upper is not None


@pytest.mark.parametrize("rotary, xpos", [(True, False), (False, True), (False, False), (True, True)])
def test_local_position_transforms(rotary, xpos):
    spec = _spec(ROOT / "specs" / "local.yaml")
    graph = compile_graph(spec, {"rotary": rotary, "xpos": xpos}, None)
    ops = {node.op for _, node in graph.nodes()}
    assert ("rotary" in ops) == rotary
    assert ("xpos" in ops) == xpos
    assert "gather" in ops   # the position-bias table is present


@pytest.mark.parametrize("pre, post, schedule", [
    (True, True, "two_pass"), (True, False, "heads_in_tile"), (False, True, "two_pass"), (False, False, "one_pass"),
])
def test_talking_heads_schedules(pre, post, schedule):
    spec = _spec(ROOT / "specs" / "talking_heads.yaml")
    graph = compile_graph(spec, {"pre_talking_heads": pre, "post_talking_heads": post}, None)
    assert graph.schedule == schedule
    assert len(graph.find("mix_heads")) == pre + post
    # without the mixing weights, mix_heads is the identity: a plain one-pass attention
    bare = compile_graph(spec, {"pre_talking_heads": pre, "post_talking_heads": post}, frozenset())
    assert bare.schedule == "one_pass"


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_cosine_sim_groups(groups):
    spec = _spec(ROOT / "specs" / "cosine_sim.yaml")
    graph = compile_graph(spec, {"groups": groups, "scale": 10.0}, frozenset())
    (norm, *_) = graph.find("l2norm")
    assert graph.node(norm).attrs["groups"] == groups


def test_scale_defaults_to_a_size_expression_and_can_be_overridden():
    spec = _spec(ROOT / "specs" / "softmax.yaml")
    default = compile_graph(spec, None, frozenset())
    assert any(node.op == "size" for _, node in default.nodes())          # D ** -0.5, evaluated at run time
    overridden = compile_graph(spec, {"scale": 1.0}, frozenset())
    assert not any(node.op == "size" and node.attrs.get("dim") == "d" for _, node in overridden.nodes())
