"""Pass: validate what a well-formed attention graph must be, beyond dims.

At least one row normaliser (kernelsearch/normalisers.py: softmax(...), masked(...)) on the path
to the output, none of them normalising what another one made; the output is a per-query-row
tensor [b, h, i, <feature>] (no key dim left: every key dim was reduced by a dot).
"""
from __future__ import annotations

from .. import normalisers
from ..errors import SpecError
from ..ir import Graph


def validate(graph: Graph) -> Graph:
    spec = graph.spec
    found = normalisers.find(graph)
    output = graph.node(graph.output)
    where = spec.output_locations.get(spec.outputs[0])
    if not found:
        raise SpecError("the graph has no row normaliser (softmax(...) or masked(...))", where,
                        "normalise the scores before dot(p, v): softmax(s, keep=[...]) for softmax attention, "
                        "masked(sigmoid(s), keep=[...]) for sigmoid (or ReLU) attention without row statistics")
    for node_id in found:
        earlier = [n for n in found if n != node_id and n in graph.upstream(node_id)]
        if earlier:
            node = graph.node(node_id)
            raise SpecError(f"{node.op}(...) normalises what {graph.node(earlier[0]).op}(...) made; a normaliser "
                            "of probabilities is not supported", node.location,
                            "normalise the scores once, e.g. softmax(s, keep=[...]); combine several normalised "
                            "rows after them (p1 - lam * p2)")
    if "j" in output.dims or "i" not in output.dims:
        raise SpecError(f"the output '{spec.outputs[0]}' has dims [{', '.join(output.dims)}]; an attention output "
                        "is [b, h, i, d]", where, "reduce the key dim with dot(p, v)")
    if output.dtype != "float":
        raise SpecError(f"the output must be a float tensor, not {output.dtype}", where)
    return graph
