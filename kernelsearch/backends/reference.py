"""The reference backend: evaluate the graph op by op in eager PyTorch, scores materialised.

It is the definition of what a spec means; every other backend is tested against it in float64.
"""
from __future__ import annotations

import torch

from ..ir import BINARY_OPS, Graph
from ..layout import bind, input_dims, layout_of, raw_inputs
from . import torch_ops as ops

_TORCH_BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "div": lambda a, b: a / b,
    "floordiv": ops.floordiv, "mod": lambda a, b: a % b, "pow": lambda a, b: a ** b,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda a, b: a & b, "or": lambda a, b: a | b,
}
assert set(_TORCH_BINARY) == set(BINARY_OPS)


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
        self.steps = [(node_id, node, graph.node(node.args[0]).dims[-1] if node.op == "dot" else None)
                      for node_id, node in graph.nodes() if node_id in needed]
        self.layout = layout_of(graph)
        self.raw = raw_inputs(graph)
        self.target_dims = {t: graph.node(t).dims for t in self.targets}

    def __call__(self, tensors: dict) -> dict:
        graph, layout, raw = self.graph, self.layout, self.raw
        sizes = bind(graph, tensors)
        q = tensors["q"]
        dtype, device = q.dtype, q.device
        axis = {dim: n for n, dim in enumerate(layout)}
        values = {}
        for node_id, node, contracted in self.steps:
            values[node_id] = _evaluate_node(node_id, node, [values[a] for a in node.args], tensors, contracted,
                                             graph, sizes, layout, axis, raw, dtype, device)
        return {t: _in_own_dims(values[t], self.target_dims[t], layout, sizes) for t in self.targets}


def _evaluate_node(node_id, node, args, tensors, contracted, graph, sizes, layout, axis, raw, dtype, device):
    """One op, on values in the aligned layout."""
    op = node.op
    if op == "input":
        tensor = tensors[node_id]
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor if node_id in raw else ops.align(tensor, input_dims(graph, node_id, tensor), layout)
    if op == "const":
        return node.attrs["value"]
    if op == "size":
        return sizes[node.attrs["dim"]]
    if op == "index":
        dim = node.attrs["dim"]
        return ops.index(sizes[dim], axis[dim], len(layout), device)
    if op in _TORCH_BINARY:
        return _TORCH_BINARY[op](*args)
    if op in ops.UNARY:
        x = args[0]
        return ops.UNARY[op](x) if isinstance(x, torch.Tensor) else ops.SCALAR_UNARY[op](x)
    if op in ("minimum", "maximum"):
        a, b = (torch.as_tensor(x, device=device) for x in args)
        return getattr(torch, op)(a, b)
    if op == "where":
        return torch.where(*(torch.as_tensor(x, device=device) for x in args))
    if op == "gather":
        table, *indices = args
        return ops.gather(table.to(dtype), indices, node.args[0])
    if op == "dot":
        return ops.dot(args[0], args[1], axis[contracted])
    if op == "softmax":
        scores, *keeps = args
        keep = None
        for predicate in keeps:
            keep = predicate if keep is None else keep & predicate
        return ops.masked_softmax(scores, keep, axis["j"])
    if op in ("l2norm", "rmsnorm", "rotary", "xpos"):
        feature = axis[node.dims[-1]]
        if op == "l2norm":
            return ops.l2norm(args[0], feature, node.attrs["groups"], node.attrs["eps"])
        elif op == "rmsnorm":
            return ops.rmsnorm(args[0], feature, node.attrs["eps"])
        elif op == "rotary":
            return ops.rotary(args[0], torch.as_tensor(args[1], device=device), feature, node.attrs["theta"])
        else:
            return ops.xpos(args[0], torch.as_tensor(args[1], device=device), feature,
                            node.attrs["scale_base"], node.attrs["inverse"])
    if op == "mix_heads":
        return ops.mix_heads(args[0], args[1], node.attrs["streams"], axis["b"], axis["h"])
    raise NotImplementedError(f"reference backend: no rule for op '{op}'")



def _in_own_dims(value, dims, layout, sizes) -> torch.Tensor:
    """A value of the aligned layout (size-1 axes where it does not vary) with exactly its dims."""
    value = torch.as_tensor(value).expand(*[sizes[d] if d in dims else 1 for d in layout])
    squeeze = tuple(n for n, d in enumerate(layout) if d not in dims)
    return value.squeeze(squeeze) if squeeze else value
