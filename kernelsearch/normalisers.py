"""Row normalisers: the ops that turn a tile's scores into what dot(p, v) reduces over j.

Which ops are normalisers, and of which kind, is a fact of the op registry (ops.Op.normaliser):

    softmax(x, keep=[...], sinks=y)   row statistics (max and sum over the kept keys, plus exp(y)
                                      when a sink is given): the kernels keep them online or
                                      compute them exactly in a sweep of their own
    masked(x, keep=[...])             none: x where every keep-predicate holds, 0 elsewhere
                                      (sigmoid attention, ReLU attention)

A spec may have several (differential attention: two softmaxes). Every pass and code generator
reads a normaliser's parts through `normaliser(graph, node_id)` - its scores, its sink and its
keep-predicates - never by position in the node's arguments, and finds them with `find(graph)`.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import ops


@dataclass(frozen=True)
class Normaliser:
    node: str                    # the normaliser's node id
    kind: str                    # softmax | masked (ops.Op.normaliser)
    scores: str                  # what it normalises: [.., i, j]
    sink: str | None             # softmax: the extra logit in the denominator (no i, no j), if any
    keeps: tuple[str, ...]       # its keep-predicates

    @property
    def statistics(self) -> bool:
        """Row statistics (max, sum) are kept for it: a softmax."""
        return self.kind == "softmax"


def is_normaliser(op: str) -> bool:
    return op in ops.OPS and ops.OPS[op].normaliser is not None


def roles(node) -> tuple[str, ...]:
    """The role of each argument of a normaliser node: "x", then its dataflow keywords (keep, sinks)."""
    return node.attrs.get("roles") or ("x",) + ("keep",) * (len(node.args) - 1)


def normaliser(graph, node_id: str) -> Normaliser:
    node = graph.node(node_id)
    parts = list(zip(node.args, roles(node)))
    sinks = [a for a, role in parts if role == "sinks"]
    return Normaliser(node_id, ops.OPS[node.op].normaliser, node.args[0], sinks[0] if sinks else None,
                      tuple(a for a, role in parts if role == "keep"))


def find(graph) -> list[str]:
    """The normaliser nodes of a graph, in graph order."""
    return [n for n, node in graph.nodes() if is_normaliser(node.op)]


def normalisers(graph) -> tuple[Normaliser, ...]:
    return tuple(normaliser(graph, n) for n in find(graph))


def statistics_index(graph_normalisers, node_id: str) -> int:
    """The position of a softmax among the normalisers that keep row statistics (its plane of the
    saved log-sum-exp)."""
    return [n.node for n in graph_normalisers if n.statistics].index(node_id)


SPELLED = "softmax(s, keep=[...], sinks=...) or masked(x, keep=[...])"
"""How a spec writes the normalisers (in messages)."""
