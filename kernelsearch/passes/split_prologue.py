"""Pass (training path only): cut the per-row transforms off the graph; the kernels take their values.

The backward kernels differentiate the O(I * J) part of a spec - scores, bias, keep-predicates,
softmax, head mixing, p @ v - tile by tile. The per-row transforms before it (q/k/v prologue:
l2norm, rmsnorm, rotary, xpos, learned per-dim scales) cost O((I + J) * D); on the training path
they are evaluated by the reference ops in torch, differentiated by autograd, and their values
passed to the kernels as inputs. The forward kernel of the whole graph (transforms fused) is what
runs when no gradient is needed.

    split_prologue(graph) -> PrologueSplit(core, cuts)

`cuts` are the ids of float values computed from inputs without a query-key pair (stages
constant, q_prologue, k_prologue) that a tile op (score, keep, softmax, post-softmax, epilogue)
uses; `core` is the graph with each of them turned into an input of the same dims, declared
(first, in graph order) in a copy of the spec, and everything only they needed removed; a linear
combination of key reductions over one v becomes one reduction (passes/factor_dots.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..ir import Graph, Node
from ..spec import InputDecl
from .factor_dots import factor_dots
from .plan import plan

ROW_STAGES = ("constant", "q_prologue", "k_prologue")


@dataclass(frozen=True)
class PrologueSplit:
    core: Graph
    cuts: tuple[str, ...]


def cut_points(graph: Graph) -> list[str]:
    inputs = {n for n, node in graph.nodes() if node.op == "input"}
    cuts = []
    for node_id, node in graph.nodes():
        if node.op == "input" or node.dtype != "float" or node.stage not in ROW_STAGES:
            continue
        if not (graph.upstream(node_id) & inputs):
            continue     # sizes and params only: the kernels compute it
        if any(graph.node(u).stage not in ROW_STAGES for u in graph.users(node_id)):
            cuts.append(node_id)
    return cuts


def split_prologue(graph: Graph) -> PrologueSplit:
    cuts = cut_points(graph)
    core = graph.copy()
    decls = {}
    for node_id in cuts:
        node = graph.node(node_id)
        core.set(node_id, Node("input", (), {}, node.location, node_id, node.dims, "float", node.stage, node.order))
        decls[node_id] = InputDecl(node_id, tuple(node.dims), frozenset(), "float", False, True, node.location)
    core.remove_dead()
    for name, decl in graph.spec.inputs.items():
        if name in core and core.node(name).op == "input" and name not in decls:
            decls[name] = decl
    core.spec = replace(graph.spec, inputs=decls)
    core = factor_dots(core)   # dot(p1, v) - lam * dot(p2, v) -> dot(p1 - lam * p2, v): one output reduction
    return PrologueSplit(plan(core), tuple(cuts))   # planned again: what was computed per key is now read
