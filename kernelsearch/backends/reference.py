"""The reference backend: evaluate the graph op by op in eager PyTorch, scores materialised.

It is the definition of what a spec means; every other backend is tested against it in float64.
"""
from __future__ import annotations

import torch

from .. import ops as registry
from ..ir import Graph
from ..inputs import per_key_head
from ..layout import bind, input_dims, layout_of, raw_inputs
from . import torch_ops as ops


def evaluate(graph: Graph, tensors: dict) -> torch.Tensor:
    """Run `graph` on q, k, v and the present optional inputs (by name). Returns [b, h, i, <feature>]."""
    return evaluate_nodes(graph, tensors, [graph.output])[graph.output]


def evaluate_nodes(graph: Graph, tensors: dict, targets) -> dict:
    """The values of `targets` (node ids), each with its node's dims in canonical order."""
    return NodeEvaluator(graph, targets)(tensors)


class NodeEvaluator:
    """evaluate_nodes with the graph walked once, at construction: calling it runs only torch
    code (torch.compile traces it; the training path of the triton backend evaluates the
    per-row transforms so), and only the nodes the targets need."""

    def __init__(self, graph: Graph, targets):
        self.graph = graph
        self.targets = tuple(targets)
        needed = set().union(*(graph.upstream(t) for t in self.targets)) if self.targets else set()
        # each node with the last dim of its first argument (what a dot contracts)
        self.steps = [(node_id, node, _last_dim(graph, node)) for node_id, node in graph.nodes() if node_id in needed]
        self.layout = layout_of(graph)
        self.raw = raw_inputs(graph)
        self.target_dims = {t: graph.node(t).dims for t in self.targets}
        # grouped KV heads: per-KV-head inputs are read per query head (h // G) where a needed value
        # meets the query heads; values of the KV side alone (the training path's k prologue) keep H_kv heads
        from ..passes.plan import query_head_nodes
        query_heads = query_head_nodes(graph)
        kv_inputs = {n for n, node, _ in self.steps if node.op == "input" and n not in self.raw
                     and per_key_head(graph.spec.inputs[n].shape)}
        self.expand_kv = any(n in query_heads and graph.upstream(n) & kv_inputs for n, _, _ in self.steps)

    def __call__(self, tensors: dict, sizes: dict | None = None) -> dict:
        """The targets' values; `sizes`: the call's dim sizes when the caller checked it already."""
        graph, layout, raw = self.graph, self.layout, self.raw
        sizes = bind(graph, tensors) if sizes is None else sizes
        q = tensors["q"]
        dtype, device = q.dtype, q.device
        axis = {dim: n for n, dim in enumerate(layout)}
        values = {}
        for node_id, node, contracted in self.steps:
            values[node_id] = _evaluate_node(node_id, node, [values[a] for a in node.args], tensors, contracted,
                                             graph, sizes, layout, axis, raw, dtype, device, self.expand_kv)
        # values of the KV side alone keep their heads (H_kv, or 1: the kernels broadcast a size-1 dim)
        keep = () if self.expand_kv else ("h",)
        return {t: _in_own_dims(values[t], self.target_dims[t], layout, sizes, keep) for t in self.targets}


def _evaluate_node(node_id, node, args, tensors, contracted, graph, sizes, layout, axis, raw, dtype, device,
                   expand_kv=True):
    """One op, on values in the aligned layout."""
    op = node.op
    if op == "input":
        tensor = tensors[node_id]
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if node_id in raw:
            return tensor
        dims = input_dims(graph, node_id, tensor)
        if expand_kv and per_key_head(dims):   # grouped KV heads: query head h reads KV head h // (H / H_kv)
            tensor = ops.query_heads(tensor, dims.index("h"), sizes["h"])
        return ops.align(tensor, dims, layout)
    if op == "const":
        return node.attrs["value"]
    if op == "size":
        return sizes[node.attrs["dim"]]
    if op == "index":
        dim = node.attrs["dim"]
        return ops.index(sizes[dim], axis[dim], len(layout), device)
    entry = registry.op(op)
    if entry.lowering == "elementwise":
        if node.dtype == "float":   # integers meet floats at the computation's precision, not torch's default fp32
            float_dtype = torch.promote_types(dtype, torch.float32)
            args = [a.to(float_dtype) if isinstance(a, torch.Tensor) and not a.is_floating_point()
                    and a.dtype != torch.bool else a for a in args]
        return registry.evaluate(op, args, node.dtype)
    feature = node.dims[-1] if node.dims else None
    first = node.args[0] if node.args else None
    context = registry.ReferenceContext(node.attrs, axis, feature, contracted, first, device, dtype)
    return entry.reference(args, context)


def _last_dim(graph: Graph, node) -> str | None:
    dims = graph.node(node.args[0]).dims if node.args else ()
    return dims[-1] if dims else None


def _in_own_dims(value, dims, layout, sizes, keep=()) -> torch.Tensor:
    """A value of the aligned layout (size-1 axes where it does not vary) with exactly its dims
    (those in `keep` with the size the value has)."""
    value = torch.as_tensor(value)
    value = value.reshape([1] * len(layout)) if value.ndim == 0 else value
    value = value.expand(*[sizes[d] if d in dims and d not in keep else -1 for d in layout])
    squeeze = tuple(n for n, d in enumerate(layout) if d not in dims)
    return value.squeeze(squeeze) if squeeze else value
