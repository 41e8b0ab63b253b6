"""Pass (analysis): which of PyTorch's own attention kernels can run a folded graph.

The torch backend's library lowerings - "sdpa" (F.scaled_dot_product_attention) and "flex"
(FlexAttention) - are candidates like its generated ones, offered only for graphs they can
express. A graph fits when, after its per-row q/k/v prologues, it is exactly

    o = dot(softmax(dot(q', k') * scale + bias, keep=[...]), v')     (then an epilogue on o)

with q' [b, h, i, x], k' [b, h, j, x], v' [b, h, j, y]; `scale` a product (or quotient) of host
scalars (sizes, params, constants); `bias` a sum of terms over b, h, i, j only; `keep` the
predicates over b, h, i, j; no cross-head mixing, nothing between softmax and dot(p, v).

    sdpa    the biases and keeps are evaluated whole (an additive or boolean attn_mask); a lone
            keep `j <= i + offset` is SDPA's is_causal when offset is 0 at the call's sizes
    flex    the biases become a score_mod and the keeps a mask_mod, evaluated per element: every
            node they are made of must be an elementwise op, an index, a gather, an input over
            b, h, i, j or a host scalar (nothing over a feature dim)

FlexAttention also runs scores that are any elementwise function of dot(q', k') and such
per-element terms (soft-capping: cap * tanh(s / cap), a bias scaled after it is added, ...):
its score_mod then evaluates the path from the scaled dot to the scores per score, the scaled
dot being FlexAttention's score. SDPA runs only the scaled dot plus a bias.

Recognising them reads the graph's structure, never a spec's name. Code generators
(codegen/torch_module.py) render the `LibraryForm`; they decide none of this.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..ir import Graph
from ..layout import layout_of, raw_inputs
from .bounds import conjuncts

__all__ = ["LibraryForm", "library_form", "lowerings", "why_not", "sdpa_visits_skippable_keys",
           "LIBRARY_LOWERINGS", "SCORE_DIMS"]

LIBRARY_LOWERINGS = ("sdpa", "flex")
SCORE_DIMS = frozenset("bhij")
_SCALE_OPS = ("mul", "div")


@dataclass(frozen=True)
class LibraryForm:
    query: str                 # q' [b, h, i, x]
    key: str                   # k' [b, h, j, x]
    value: str                 # v' [b, h, j, y]
    scale: tuple               # ((op, node), ...): the dot times / divided by these host scalars
    biases: tuple              # additive score terms over b, h, i, j
    keeps: tuple               # keep-predicates over b, h, i, j
    score_nodes: tuple         # dot(q', k') and the scale/bias arithmetic on it: not rendered
    reduction: str             # dot(p, v'): what the library call returns
    causal_row: str | None     # a lone keep `j <= R` with R = i + offset (no bias): R's node
    flex: str | None           # why FlexAttention cannot express it (None: it can)
    full_blocks: bool          # every keep conjunct is one the key-block bounds come from: blocks inside
                               # the bounds of every row of a block are kept whole (no mask_mod there)
    sdpa: str | None = None    # why SDPA cannot express it (None: it can)
    score_function: tuple = () # () when the scores are dot * scale + biases; else the nodes from
                               # dot(q', k') * scale (its first: FlexAttention's score) to the scores
                               # in order, all elementwise: FlexAttention's score_mod (biases empty)
    score_terms: tuple = ()    # the score function's other operands (host scalars or over b, h, i, j)


def _is_host_scalar(graph: Graph, node_id: str) -> bool:
    """A value with no dims computed from sizes, params and constants only (a Python number)."""
    if graph.node(node_id).dims:
        return False
    return all(graph.node(n).op != "input" for n in graph.upstream(node_id) | {node_id})


def _split_scores(graph: Graph, node_id: str):
    """(dot, scale factors, bias terms, arithmetic nodes) of `dot * c / c' + bias + ...`, or a
    reason string."""
    node = graph.node(node_id)
    if node.op == "dot":
        return node_id, [], [], [node_id]
    if node.op in _SCALE_OPS:
        operand, factor = node.args
        if node.op == "mul" and _is_host_scalar(graph, operand):
            operand, factor = factor, operand
        if not _is_host_scalar(graph, factor):
            return f"the scores are scaled by '{factor}', which is not a host scalar"
        found = _split_scores(graph, operand)
        if isinstance(found, str):
            return found
        dot, scale, biases, arithmetic = found
        if biases:
            return "the scores' bias is scaled after it is added"
        return dot, scale + [(node.op, factor)], biases, arithmetic + [node_id]
    if node.op == "add":
        for scored, other in (node.args, node.args[::-1]):
            if "dot" in {graph.node(n).op for n in graph.upstream(scored) | {scored}}:
                found = _split_scores(graph, scored)
                if isinstance(found, str):
                    return found
                dot, scale, biases, arithmetic = found
                return dot, scale, biases + [other], arithmetic + [node_id]
    return f"the scores are made by '{node.op}', not a scaled dot(q, k) plus a bias"


def _score_function(graph: Graph, scores: str):
    """(dot, path, scale, terms) when the scores are an elementwise function of one dot(q, k)
    over [b, h, i, j] and of terms that do not depend on it (path: the dot, then every node
    between it and the scores, in order; scale: the path's leading products with host scalars,
    ((op, factor), ...); terms: the other operands), or a reason string."""
    behind = graph.upstream(scores)
    dots = [n for n in behind if graph.node(n).op == "dot" and set(graph.node(n).dims) == SCORE_DIMS]
    if len(dots) != 1:
        return "the scores are not made from one dot(q, k)"
    (dot,) = dots
    path = [n for n in graph.ids() if n in behind and dot in graph.upstream(n)]
    terms = []
    for n in path[1:]:
        node = graph.node(n)
        if not ops.is_elementwise(node.op):
            return f"the scores are made by '{node.op}', which is not elementwise"
        terms += [a for a in node.args if a not in path and a not in terms]
    for n in path[:-1]:
        if set(graph.users(n)) - set(path):
            return f"'{n}' is used besides the scores"
    scale = []   # leading products with host scalars: FlexAttention's own scale
    while len(scale) + 1 < len(path) and len(graph.users(path[len(scale)])) == 1:
        node, operand = graph.node(path[len(scale) + 1]), path[len(scale)]
        factors = [f for f in node.args if f != operand]
        if node.op not in _SCALE_OPS or len(factors) != 1 or not _is_host_scalar(graph, factors[0]) \
                or (node.op == "div" and node.args[0] != operand):
            break
        scale.append((node.op, factors[0]))
    return dot, tuple(path), tuple(scale), tuple(terms)


def _flex_reason(graph: Graph, roots) -> str | None:
    """Why the nodes behind `roots` (biases and keeps) cannot be rendered per element."""
    for root in roots:
        for n in sorted(graph.upstream(root) | {root}, key=lambda m: graph.node(m).order):
            node = graph.node(n)
            if not node.dims or node.op == "index":
                continue
            if node.op == "input" and n in raw_inputs(graph):
                continue
            if not set(node.dims) <= SCORE_DIMS:
                return f"'{n}' varies over {', '.join(sorted(set(node.dims) - SCORE_DIMS))}, not only b, h, i, j"
            if node.op not in ("input", "gather") and not ops.is_elementwise(node.op):
                return f"'{n}' ({node.op}) is not elementwise"
    return None


def _causal_row(graph: Graph, keeps: tuple, biases: list) -> str | None:
    """R when the only keep is `j <= R` and R is i plus or minus host scalars."""
    if len(keeps) != 1 or biases:
        return None
    keep = graph.node(keeps[0])
    if keep.op != "le" or graph.node(keep.args[0]).op != "index" or graph.node(keep.args[0]).attrs["dim"] != "j":
        return None
    row = keep.args[1]
    current = row
    while graph.node(current).op in ("add", "sub"):
        left, right = graph.node(current).args
        if not _is_host_scalar(graph, right):
            if graph.node(current).op == "sub" or not _is_host_scalar(graph, left):
                return None
            left, right = right, left
        current = left
    node = graph.node(current)
    return row if node.op == "index" and node.attrs["dim"] == "i" else None


def library_form(graph: Graph) -> LibraryForm | str:
    """The graph as a library attention call, or why it is not one."""
    plan = graph.plan
    if plan.heads_in_tile:
        return "heads are mixed (no library kernel mixes heads)"
    if len(plan.normalisers) != 1:
        return f"the graph has {len(plan.normalisers)} normalisers (a library kernel has one softmax)"
    (normaliser,) = plan.normalisers
    if normaliser.kind != "softmax":
        return f"its normaliser is {graph.node(normaliser.node).op}(...), not softmax (the library kernels compute a softmax)"
    if normaliser.sink is not None:
        return "its softmax has a sink (SDPA and FlexAttention have no extra logit in the denominator)"
    if plan.sweeps != 1 or len(plan.accumulators) != 1:
        return "probabilities are transformed after softmax"
    softmax = normaliser.node
    (reduction,) = plan.accumulators
    probabilities, value = graph.node(reduction).args
    if probabilities != softmax:
        return "probabilities are transformed before dot(p, v)"
    if any(node.stage == "post_softmax" and n != reduction for n, node in graph.nodes()):
        return "values are computed from the probabilities besides dot(p, v)"
    scores, keeps = normaliser.scores, list(normaliser.keeps)
    found = _split_scores(graph, scores)
    sdpa, function, terms = None, (), ()
    if isinstance(found, str):   # not a scaled dot plus a bias: FlexAttention may still run it
        general = _score_function(graph, scores)
        if isinstance(general, str):
            return f"{found} (SDPA); {general} (FlexAttention)"
        dot, path, scaled, terms = general
        sdpa, found, function = found, (dot, list(scaled), [], list(path)), path[len(scaled):]
    dot, scale, biases, arithmetic = found
    query, key = graph.node(dot).args
    feature = graph.node(query).dims[-1:]
    if graph.node(query).dims != ("b", "h", "i") + feature or graph.node(key).dims != ("b", "h", "j") + feature:
        return "dot(q, k)'s operands are not [b, h, i, x] and [b, h, j, x]"
    if len(graph.node(value).dims) != 4 or graph.node(value).dims[:3] != ("b", "h", "j"):
        return "dot(p, v)'s values are not [b, h, j, y]"
    layout = layout_of(graph)
    for n in (query, key, value):   # the library's [b, h, seq, feature] is the aligned layout's order
        if [d for d in layout if d in graph.node(n).dims] != list(graph.node(n).dims):
            return f"'{n}' is laid out in another order than [b, h, {graph.node(n).dims[2]}, feature]"
    if [d for d in layout if d in SCORE_DIMS] != ["b", "h", "i", "j"]:
        return "the layout does not order b, h, i, j"
    for n in arithmetic[:-1]:   # intermediate results of the score arithmetic feed nothing else
        if set(graph.users(n)) - set(arithmetic):
            return f"'{n}' is used besides the scores"
    if set(graph.users(scores)) != {softmax} or set(graph.users(softmax)) != {reduction}:
        return "the scores or probabilities are used besides softmax and dot(p, v)"
    for term in biases + keeps + list(terms):
        if not set(graph.node(term).dims) <= SCORE_DIMS:
            return f"'{term}' varies over more than b, h, i, j"
        if dot in graph.upstream(term):
            return f"'{term}' depends on the scores"
    return LibraryForm(query=query, key=key, value=value, scale=tuple(scale), biases=tuple(biases),
                       keeps=tuple(keeps), score_nodes=tuple(arithmetic), reduction=reduction,
                       causal_row=_causal_row(graph, tuple(keeps), biases) if sdpa is None else None,
                       flex=_flex_reason(graph, biases + keeps + list(terms)),
                       full_blocks=bool(keeps) and {c for k in keeps for c in conjuncts(graph, k)}
                       <= set(graph.key_bounds.conjuncts_used),
                       sdpa=sdpa, score_function=function, score_terms=terms)


def lowerings(graph: Graph) -> tuple[str, ...]:
    """The library lowerings that can run this graph, in LIBRARY_LOWERINGS order."""
    form = library_form(graph)
    if isinstance(form, str):
        return ()
    return (("sdpa",) if form.sdpa is None else ()) + (("flex",) if form.flex is None else ())


def sdpa_visits_skippable_keys(graph: Graph) -> bool:
    """True when the keep-predicates bound the keys (causal, windows) or make a block mask
    (document ids, prefix LM: passes/block_mask.py) - the chunked lowering skips key blocks - but
    the SDPA call gets them as a materialised mask and visits every key; False for SDPA's own
    causal mask (is_causal) and for graphs that skip no key block."""
    form = library_form(graph)
    bounds = graph.key_bounds
    if isinstance(form, str) or form.sdpa is not None:
        return False
    if graph.plan.block_mask is not None:
        return True
    if bounds.lower is None and bounds.upper is None:
        return False
    return form.causal_row is None


def why_not(graph: Graph, lowering: str) -> str | None:
    """Why a library lowering cannot run this graph (None: it can)."""
    form = library_form(graph)
    if isinstance(form, str):
        return form
    return form.flex if lowering == "flex" else form.sdpa
