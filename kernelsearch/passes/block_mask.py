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
                cached; some (document ids, prefix lengths) - computed per call, in vectorised
                torch (no D factor)

Each conjunct gives per tile "keeps something" and "keeps everything" by the cheapest rule that
fits it; the mask is their conjunction (exact for "everything"; "something" may list a tile the
conjuncts together keep nothing in - visited, masked, never wrong):

    bounded     a conjunct the key-block bounds come from: the bounds at the block's first and
                last rows (as the kernels' full-block ranges), O(blocks)
    ranges      `a == b` with a over i (not j) and b over j (not i) - document ids: the min and
                max of each side per block; something where the ranges meet, everything where
                both are one and the same value, O(I + J + blocks)
    evaluated   anything else: the conjunct over chunks of whole query blocks x the keys the
                bounds allow, counted per tile, O(I * J) without a D factor

Heads-in-tile programs hold every (stream, head) channel of a sample: their kernels read the
mask reduced per sample (a tile is visited when some channel keeps something in it, and whole
when every channel keeps all of it); `streams` says so.
"""
from __future__ import annotations

from ..ir import BlockMaskPlan, Graph, KeyBlockBounds
from .bounds import conjuncts

__all__ = ["block_mask_plan", "mask_conjuncts_unbounded"]


def _over_i_and_j(graph: Graph, node_id: str) -> bool:
    return {"i", "j"} <= set(graph.node(node_id).dims)


def _keep_conjuncts(graph: Graph) -> list[str]:
    """The conjuncts of the normalisers' keep list (kernelsearch/normalisers.py); none when several
    normalisers keep different predicates (a tile one of them drops may hold keys another keeps:
    no block mask then, every tile applies every mask)."""
    from ..normalisers import normalisers
    keep_lists = {n.keeps for n in normalisers(graph)}
    if len(keep_lists) != 1:
        return []
    return [c for keep in next(iter(keep_lists)) for c in conjuncts(graph, keep)]


def mask_conjuncts_unbounded(graph: Graph, bounds: KeyBlockBounds) -> tuple[str, ...]:
    """The keep conjuncts over i and j that the key-block bounds do not capture."""
    used = set(bounds.conjuncts_used)
    return tuple(dict.fromkeys(c for c in _keep_conjuncts(graph) if _over_i_and_j(graph, c) and c not in used))


def block_mask_plan(graph: Graph, bounds: KeyBlockBounds, streams: int | None) -> BlockMaskPlan | None:
    """The block mask of a classified graph, or None where the bounds capture every conjunct over
    i and j. streams: the streams a heads-in-tile program holds (None: one head per program)."""
    unbounded = mask_conjuncts_unbounded(graph, bounds)
    if not unbounded:
        return None
    used = set(bounds.conjuncts_used)
    chosen = tuple(dict.fromkeys(c for c in _keep_conjuncts(graph) if _over_i_and_j(graph, c) or c in used))
    upstream = set().union(*(graph.upstream(c) for c in chosen))
    dims = tuple(d for d in ("b", "h") if any(d in graph.node(c).dims for c in chosen))
    inputs = tuple(n for n in graph.ids() if n in upstream and graph.node(n).op == "input")
    bounded = tuple(c for c in chosen if c in used)
    ranges = tuple(r for r in (_equal_ranges(graph, c) for c in chosen if c not in used) if r is not None)
    evaluated = tuple(c for c in chosen if c not in used and c not in {r[0] for r in ranges})
    return BlockMaskPlan(conjuncts=chosen, unbounded=unbounded, dims=dims, inputs=inputs, bounded=bounded,
                         ranges=ranges, evaluated=evaluated, streams=streams)


def _equal_ranges(graph: Graph, conjunct: str) -> tuple[str, str, str] | None:
    """(conjunct, query side, key side) of `a == b`, a varying with i and not j, b with j and not
    i, both integers (document ids); None otherwise."""
    node = graph.node(conjunct)
    if node.op != "eq":
        return None
    for a, b in (node.args, node.args[::-1]):
        da, db = set(graph.node(a).dims), set(graph.node(b).dims)
        if "i" in da and "j" not in da and "j" in db and "i" not in db \
                and graph.node(a).dtype == graph.node(b).dtype == "int":
            return conjunct, a, b
    return None
