"""Pass: validate what a well-formed attention graph must be, beyond dims.

Exactly one softmax, on the path to the output; the output is a per-query-row tensor
[b, h, i, <feature>] (no key dim left: every key dim was reduced by a dot).
"""
from __future__ import annotations

from ..errors import SpecError
from ..ir import Graph


def validate(graph: Graph) -> Graph:
    spec = graph.spec
    softmaxes = graph.find("softmax")
    output = graph.node(graph.output)
    where = spec.output_locations.get(spec.outputs[0])
    if not softmaxes:
        raise SpecError("the graph has no softmax", where,
                        "attention normalises scores with softmax(s, keep=[...]) before dot(p, v)")
    if len(softmaxes) > 1:
        second = graph.node(softmaxes[1])
        raise SpecError(f"the graph has {len(softmaxes)} softmaxes; exactly one is supported", second.location,
                        "a spec describes one attention: one softmax over j")
    if "j" in output.dims or "i" not in output.dims:
        raise SpecError(f"the output '{spec.outputs[0]}' has dims [{', '.join(output.dims)}]; an attention output "
                        "is [b, h, i, d]", where, "reduce the key dim with dot(p, v)")
    if output.dtype != "float":
        raise SpecError(f"the output must be a float tensor, not {output.dtype}", where)
    return graph
