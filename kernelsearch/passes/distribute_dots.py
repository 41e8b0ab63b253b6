"""Pass: a key reduction of a linear combination of several normalisers' probabilities is the same
combination of their reductions,

    dot(p1 - lam * p2, v)   ->   dot(p1, v) - lam * dot(p2, v)

so that each dot(p, v) reduces what one normaliser made and the plan can keep every softmax online
in one key sweep (each accumulator rescaled by its own row statistics) instead of normalising both
exactly in two sweeps. Differential attention is written the first way (specs/diff_attn.yaml).

The rewrite follows the ops' `linear` facts (ops.py), as passes/factor_dots.py does the other way
for the training path; a coefficient may vary along b, h and i, not along j. A reduction that
cannot be split that way - or that reduces one normaliser only - is left as it is.
"""
from __future__ import annotations

from .. import normalisers, ops
from ..ir import Graph, Node
from .infer import infer


def distribute_dots(graph: Graph) -> Graph:
    norms = set(normalisers.find(graph))
    if len(norms) < 2:
        return graph
    work = graph.copy()

    def made_by(node_id: str) -> set[str]:
        return norms & graph.upstream(node_id)

    def add(node: Node, like: str) -> str:
        return work.add_intermediate(like, node.with_(name=None))

    def coefficient(node_id: str) -> bool:
        """Constant along the keys and made by no normaliser: it may move out of the reduction."""
        return set(graph.node(node_id).dims) <= {"b", "h", "i"} and not made_by(node_id)

    def splittable(node_id: str) -> bool:
        """dot(node, v) can be written with dots that each reduce one normaliser's values."""
        if len(made_by(node_id)) == 1:
            return True
        node = graph.node(node_id)
        rule = ops.OPS[node.op].linear if ops.is_elementwise(node.op) else None
        if rule == "every":                 # add, sub, neg: every argument is reduced
            return all(made_by(a) and splittable(a) for a in node.args)
        if rule == "one":                   # mul: one argument reduced, the others coefficients
            reduced = [a for a in node.args if made_by(a)]
            return len(reduced) == 1 and splittable(reduced[0]) and \
                all(coefficient(a) for a in node.args if a not in reduced)
        if isinstance(rule, tuple):         # div (x / c), where(c, x, y): per argument
            return all((made_by(a) and splittable(a)) if kind == "linear" else coefficient(a)
                       for a, kind in zip(node.args, rule))
        return False

    def split(node_id: str, value: str, dot: Node, owner: str) -> str:
        """A node computing dot(node_id, value)."""
        if len(made_by(node_id)) == 1:
            return add(dot.with_(args=(node_id, value) + dot.args[2:]), owner)
        node = graph.node(node_id)
        args = tuple(split(a, value, dot, owner) if made_by(a) else a for a in node.args)
        return add(node.with_(args=args, location=dot.location), owner)

    changed = False
    for dot_id, dot in graph.nodes():
        if dot.op != "dot" or graph.node(dot.args[0]).dims[-1:] != ("j",):
            continue
        operand, value = dot.args[:2]
        if len(made_by(operand)) < 2 or not splittable(operand):
            continue
        top = graph.node(operand)
        args = tuple(split(a, value, dot, dot_id) if made_by(a) else a for a in top.args)
        # the dot's own id (and spec name) now holds the combination: its users and the output follow
        work.set(dot_id, top.with_(args=args, location=dot.location, name=dot.name, order=dot.order))
        changed = True
    if not changed:
        return graph
    work.remove_dead()
    return infer(work)
