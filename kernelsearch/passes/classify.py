"""Pass: give every node the stage of the kernel it belongs to.

    constant      no query or key dim (params, sizes, mixing weights, bias tables before gather)
    q_prologue    per query row: computed once per query tile (q transforms)
    k_prologue    per key row: computed per key tile (k, v transforms, key padding)
    score         per (i, j), before softmax: the logits
    keep          per (i, j), boolean: which logits survive (the keep-predicates)
    softmax       a row normaliser (kernelsearch/normalisers.py: softmax, masked)
    post_softmax  per (i, j), after a normaliser: probabilities and what is done to them
    epilogue      per query row after the key reduction: the output
"""
from __future__ import annotations

from .. import normalisers
from ..ir import Graph


def stage_of(graph: Graph, node_id: str, after_softmax: set[str]) -> str:
    node = graph.node(node_id)
    if normalisers.is_normaliser(node.op):
        return "softmax"
    has_i, has_j = "i" in node.dims, "j" in node.dims
    if node_id in after_softmax:
        return "post_softmax" if has_j else "epilogue"
    if has_i and has_j:
        return "keep" if node.dtype == "bool" else "score"
    if has_j:
        return "k_prologue"
    if has_i:
        return "q_prologue"
    return "constant"


def classify(graph: Graph) -> Graph:
    graph = graph.copy()
    found = normalisers.find(graph)
    after_softmax = set().union(*(graph.downstream(n) for n in found)) - set(found)
    for node_id, node in list(graph.nodes()):
        graph.set(node_id, node.with_(stage=stage_of(graph, node_id, after_softmax)))
    return graph
