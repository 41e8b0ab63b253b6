"""Binding call arguments to a graph: sizes, checks, and the aligned layout every backend uses.

The layout is the graph's dims that values are computed over - b, h, i, j and the feature dims
of q, k, v - in canonical order. Inputs used only as tables (gathered by index expressions) or
as head-mixing weights are passed as they are ("raw"), since their dims are not layout dims.
"""
from __future__ import annotations

import torch

from .ir import Graph


def raw_inputs(graph: Graph) -> set[str]:
    """Inputs consumed only as a gather table or a mixing weight."""
    raw = set()
    for node_id, node in graph.nodes():
        if node.op != "input":
            continue
        uses = [(graph.node(u).op, graph.node(u).args.index(node_id)) for u in graph.users(node_id)]
        if uses and all(use in (("gather", 0), ("mix_heads", 1)) for use in uses):
            raw.add(node_id)
    return raw


def layout_of(graph: Graph) -> tuple[str, ...]:
    raw = raw_inputs(graph)
    used = set()
    for node_id, node in graph.nodes():
        if node_id not in raw:
            used.update(node.dims)
    for name in ("q", "k", "v"):   # (a core graph's q may be a cut value, an input of another name)
        if name in graph.spec.inputs:
            used.update(graph.spec.inputs[name].shape)
    return tuple(d for d in graph.dim_order if d in used)


def bind(graph: Graph, tensors: dict) -> dict[str, int]:
    """Check the call's tensors against the spec (`inputs.check_call`); return the size of every dim."""
    from .inputs import check_call
    return check_call(graph.spec, tensors)


def input_dims(graph: Graph, name: str, tensor: torch.Tensor) -> tuple[str, ...]:
    decl = graph.spec.inputs[name]
    return decl.shape[1:] if tensor.ndim == len(decl.shape) - 1 else decl.shape
