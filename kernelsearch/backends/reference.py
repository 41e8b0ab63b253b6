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
    """The values of `targets` (node ids), each with its node's dims in canonical order; only what
    they need is computed (the training path of the triton backend evaluates the prologue so)."""
    sizes = bind(graph, tensors)
    needed = set().union(*(graph.upstream(t) for t in targets)) if targets else set()
    layout = layout_of(graph)
    raw = raw_inputs(graph)
    q = tensors["q"]
    dtype, device = q.dtype, q.device
    axis = {dim: n for n, dim in enumerate(layout)}
    values = {}
    for node_id, node in graph.nodes():
        if node_id not in needed:
            continue
        args = [values[a] for a in node.args]
        op = node.op
        if op == "input":
            tensor = tensors[node_id]
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            values[node_id] = tensor if node_id in raw else ops.align(tensor, input_dims(graph, node_id, tensor), layout)
        elif op == "const":
            values[node_id] = node.attrs["value"]
        elif op == "size":
            values[node_id] = sizes[node.attrs["dim"]]
        elif op == "index":
            dim = node.attrs["dim"]
            values[node_id] = ops.index(sizes[dim], axis[dim], len(layout), device)
        elif op in _TORCH_BINARY:
            values[node_id] = _TORCH_BINARY[op](*args)
        elif op in ops.UNARY:
            x = args[0]
            values[node_id] = ops.UNARY[op](x) if isinstance(x, torch.Tensor) else ops.SCALAR_UNARY[op](x)
        elif op in ("minimum", "maximum"):
            a, b = (torch.as_tensor(x, device=device) for x in args)
            values[node_id] = getattr(torch, op)(a, b)
        elif op == "where":
            values[node_id] = torch.where(*(torch.as_tensor(x, device=device) for x in args))
        elif op == "gather":
            table, *indices = args
            values[node_id] = ops.gather(table.to(dtype), indices, node.args[0])
        elif op == "dot":
            contracted = graph.node(node.args[0]).dims[-1]
            values[node_id] = ops.dot(args[0], args[1], axis[contracted])
        elif op == "softmax":
            scores, *keeps = args
            keep = None
            for predicate in keeps:
                keep = predicate if keep is None else keep & predicate
            values[node_id] = ops.masked_softmax(scores, keep, axis["j"])
        elif op in ("l2norm", "rmsnorm", "rotary", "xpos"):
            feature = axis[node.dims[-1]]
            if op == "l2norm":
                values[node_id] = ops.l2norm(args[0], feature, node.attrs["groups"], node.attrs["eps"])
            elif op == "rmsnorm":
                values[node_id] = ops.rmsnorm(args[0], feature, node.attrs["eps"])
            elif op == "rotary":
                values[node_id] = ops.rotary(args[0], torch.as_tensor(args[1], device=device), feature,
                                             node.attrs["theta"])
            else:
                values[node_id] = ops.xpos(args[0], torch.as_tensor(args[1], device=device), feature,
                                           node.attrs["scale_base"], node.attrs["inverse"])
        elif op == "mix_heads":
            values[node_id] = ops.mix_heads(args[0], args[1], node.attrs["streams"], axis["b"], axis["h"])
        else:
            raise NotImplementedError(f"reference backend: no rule for op '{op}'")
    return {t: _in_own_dims(values[t], graph.node(t).dims, layout, sizes) for t in targets}


def _in_own_dims(value, dims, layout, sizes) -> torch.Tensor:
    """A value of the aligned layout (size-1 axes where it does not vary) with exactly its dims."""
    value = torch.as_tensor(value).expand(*[sizes[d] if d in dims else 1 for d in layout])
    squeeze = tuple(n for n, d in enumerate(layout) if d not in dims)
    return value.squeeze(squeeze) if squeeze else value
