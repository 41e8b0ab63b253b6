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
    for name in ("q", "k", "v"):
        used.update(graph.spec.inputs[name].shape)
    return tuple(d for d in graph.dim_order if d in used)


def bind(graph: Graph, tensors: dict) -> dict[str, int]:
    """Check the call's tensors against the spec; return the size of every dim.

    Raises ValueError naming the input, the dim and both sizes on a mismatch.
    """
    spec = graph.spec
    sizes: dict[str, int] = {}
    origin: dict[str, str] = {}
    for name, decl in spec.inputs.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"input '{name}' must be a torch.Tensor, got {type(tensor).__name__}")
        shape = decl.shape
        if tensor.ndim == len(shape) - 1 and shape[0] in decl.optional_dims:
            shape = shape[1:]
        if tensor.ndim != len(shape):
            raise ValueError(f"input '{name}' must have dims [{', '.join(decl.shape)}] "
                             f"({len(decl.shape)} axes), got shape {list(tensor.shape)}")
        if decl.dtype == "bool" and tensor.dtype != torch.bool:
            raise TypeError(f"input '{name}' must be a bool tensor (True = keep), got {tensor.dtype}")
        if decl.dtype == "float" and not tensor.is_floating_point():
            raise TypeError(f"input '{name}' must be a floating-point tensor, got {tensor.dtype}")
        for dim, size in zip(shape, tensor.shape):
            if dim in sizes and sizes[dim] != size and not (size == 1 and dim in ("b", "h") and name not in ("q", "k", "v")):
                raise ValueError(f"dim '{dim}' of input '{name}' has size {size}, but '{origin[dim]}' gave "
                                 f"it size {sizes[dim]}")
            if dim not in sizes and not (size == 1 and name not in ("q", "k", "v")):
                sizes[dim], origin[dim] = size, name
    if tensors["q"].dtype != tensors["k"].dtype or tensors["q"].dtype != tensors["v"].dtype:
        raise TypeError(f"q, k and v must have one dtype, got {tensors['q'].dtype}, {tensors['k'].dtype}, "
                        f"{tensors['v'].dtype}")
    return sizes


def input_dims(graph: Graph, name: str, tensor: torch.Tensor) -> tuple[str, ...]:
    decl = graph.spec.inputs[name]
    return decl.shape[1:] if tensor.ndim == len(decl.shape) - 1 else decl.shape
