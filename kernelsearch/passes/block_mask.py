"""Pass (part of the plan, passes/plan.py): block masks from the keep conjuncts the interval bounds miss.

The interval analysis (passes/bounds.py) gives each query block a contiguous range of keys - causal
triangles, windows. A conjunct over i and j it cannot bound - document ids (`q_doc == k_doc`), a
prefix-or-causal disjunction, a 2-D neighbourhood, a head offset - would otherwise be applied in
every tile of that range. Such a conjunct makes a block mask: per (batch?, head?, query block, key
block), whether the conjuncts keep something there (else the tile is skipped) and whether they
keep everything (then it runs without their masks), listed sparsely as FlexAttention's BlockMask
is (runtime/block_masks.py holds the lists).

    conjuncts   evaluated into the mask: every conjunct over both i and j, and those the bounds
                came from (the mask is then exact for them too, and a tile it calls full needs
                none of their masks); conjuncts over i or j alone (a key padding mask) stay in-tile
                only, so that index-only masks are not made per call by an optional input
    unbounded   the conjuncts over i and j the bounds do not capture: a block mask exists iff
                there is one
    dims        b and/or h where the conjuncts vary with them (the mask's leading dims)
    inputs      the inputs the conjuncts read: none - computed once per (shape, block size) and
                cached; some (document ids, prefix lengths) - computed per call, vectorised torch
                over [rows, keys] chunks reduced per block with any / all (no D factor)

Heads-in-tile programs hold every head of a sample: a per-head list cannot drive them, so those
graphs get no block mask (the plan says so; their tiles apply every mask as before).
"""
from __future__ import annotations

from ..ir import BlockMaskPlan, Graph, KeyBlockBounds
from .bounds import conjuncts

__all__ = ["block_mask_plan", "mask_conjuncts_unbounded"]


def _over_i_and_j(graph: Graph, node_id: str) -> bool:
    return {"i", "j"} <= set(graph.node(node_id).dims)


def _keep_conjuncts(graph: Graph) -> list[str]:
    (softmax,) = graph.find("softmax")
    return [c for keep in graph.node(softmax).args[1:] for c in conjuncts(graph, keep)]


def mask_conjuncts_unbounded(graph: Graph, bounds: KeyBlockBounds) -> tuple[str, ...]:
    """The keep conjuncts over i and j that the key-block bounds do not capture."""
    used = set(bounds.conjuncts_used)
    return tuple(dict.fromkeys(c for c in _keep_conjuncts(graph) if _over_i_and_j(graph, c) and c not in used))


def block_mask_plan(graph: Graph, bounds: KeyBlockBounds, heads_in_tile: bool) -> BlockMaskPlan | None:
    """The block mask of a classified graph, or None where the bounds capture every conjunct over
    i and j (or a program holds every head: heads in tile)."""
    unbounded = mask_conjuncts_unbounded(graph, bounds)
    if not unbounded or heads_in_tile:
        return None
    used = set(bounds.conjuncts_used)
    chosen = tuple(dict.fromkeys(c for c in _keep_conjuncts(graph) if _over_i_and_j(graph, c) or c in used))
    upstream = set().union(*(graph.upstream(c) for c in chosen))
    dims = tuple(d for d in ("b", "h") if any(d in graph.node(c).dims for c in chosen))
    inputs = tuple(n for n in graph.ids() if n in upstream and graph.node(n).op == "input")
    return BlockMaskPlan(conjuncts=chosen, unbounded=unbounded, dims=dims, inputs=inputs)
