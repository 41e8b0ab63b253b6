"""Interval analysis of the keep-predicates into key-block bounds (part of the plan, passes/plan.py).

Every keep-predicate is split into conjuncts. A conjunct `A(j) op B(i)` - A strictly built from
j by +/- constants, multiplication and floor division by positive constants; B non-decreasing in
i and built from i, sizes and constants - bounds the keys row i can keep:

    j <= i + J - I          ->  upper(i) = i + J - I                  (bottom-right causal)
    j // w >= i // w - lb   ->  lower(i) = (i // w - lb) * w           (local windows)
    j >= i - w * lb         ->  lower(i) = i - w * lb                  (exact window size)

Since lower and upper are non-decreasing in i, a query block [i_start, i_end) needs only the
keys lower(i_start) .. upper(i_end - 1): every other key block is skipped whole. Conjuncts that do
not fit (key padding masks, predicates on b or h) give no bound and are only applied in-tile.

Bounds are small expression trees: ("node", id) refers to a graph node (rendered by the
backend with i set to the row in question), ("const", v), or (op, a, b) for op in + - * // max min.
"""
from __future__ import annotations

from ..ir import Graph, KeyBlockBounds

_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def _leaves(graph: Graph, node_id: str) -> set[str]:
    return {n for n in graph.upstream(node_id) if graph.node(n).op in ("index", "size", "const", "input", "param")}


def _uses(graph: Graph, node_id: str, dim: str) -> bool:
    return any(graph.node(n).op == "index" and graph.node(n).attrs["dim"] == dim for n in graph.upstream(node_id))


def _is_positive_const(graph: Graph, node_id: str):
    node = graph.node(node_id)
    if node.op == "const" and isinstance(node.attrs["value"], int) and not isinstance(node.attrs["value"], bool) \
            and node.attrs["value"] > 0:
        return node.attrs["value"]
    return None


def _polarity(graph: Graph, node_id: str, dim: str) -> int | None:
    """+1 if node is non-decreasing in `dim`, -1 if non-increasing, 0 if independent, None if unknown."""
    node = graph.node(node_id)
    if not _uses(graph, node_id, dim):
        return 0
    if node.op == "index":
        return 1
    if node.dtype != "int":
        return None
    args = node.args
    if node.op == "add":
        signs = {_polarity(graph, a, dim) for a in args} - {0}
        return signs.pop() if len(signs) == 1 and None not in signs else None
    if node.op == "sub":
        a, b = (_polarity(graph, x, dim) for x in args)
        if a is None or b is None:
            return None
        signs = {a, -b} - {0}
        return signs.pop() if len(signs) == 1 else None
    if node.op == "neg":
        p = _polarity(graph, args[0], dim)
        return None if p is None else -p
    if node.op in ("mul", "floordiv"):
        constant = _is_positive_const(graph, args[1]) or (node.op == "mul" and _is_positive_const(graph, args[0]))
        variable = args[0] if _is_positive_const(graph, args[1]) else args[1]
        return _polarity(graph, variable, dim) if constant else None
    if node.op in ("minimum", "maximum"):
        signs = {_polarity(graph, a, dim) for a in args} - {0}
        return signs.pop() if len(signs) == 1 and None not in signs else None
    return None


def _invert(graph: Graph, node_id: str, bound, side: str):
    """Solve A(j) <= bound (side='upper') or A(j) >= bound (side='lower') for j.

    Returns (side, bound on j) - the side flips where A decreases in j - or None if A is not invertible.
    """
    node = graph.node(node_id)
    if node.op == "index" and node.attrs["dim"] == "j":
        return side, bound
    if node.dtype != "int" or not node.args:
        return None
    args = node.args
    j_args = [a for a in args if _uses(graph, a, "j")]
    if len(j_args) != 1:
        return None
    (x,) = j_args
    other = next((a for a in args if a != x), None)
    if other is not None and set(graph.node(other).dims) - {"i"}:
        return None  # what is moved to the bound side may depend on i only
    if node.op == "add":
        return _invert(graph, x, ("-", bound, ("node", other)), side)
    if node.op == "sub":
        if x == args[0]:
            return _invert(graph, x, ("+", bound, ("node", other)), side)
        flipped = "lower" if side == "upper" else "upper"  # c - X <= u  <=>  X >= c - u
        return _invert(graph, x, ("-", ("node", other), bound), flipped)
    if node.op == "neg":
        return _invert(graph, x, ("-", ("const", 0), bound), "lower" if side == "upper" else "upper")
    if node.op == "floordiv" and x == args[0]:
        w = _is_positive_const(graph, args[1])
        if not w:
            return None
        if side == "upper":   # X // w <= u  <=>  X <= u * w + w - 1
            return _invert(graph, x, ("+", ("*", bound, ("const", w)), ("const", w - 1)), side)
        return _invert(graph, x, ("*", bound, ("const", w)), side)   # X // w >= l  <=>  X >= l * w
    if node.op == "mul":
        c = _is_positive_const(graph, other)
        if not c:
            return None
        if side == "upper":   # X * c <= u  <=>  X <= u // c
            return _invert(graph, x, ("//", bound, ("const", c)), side)
        return _invert(graph, x, ("-", ("const", 0), ("//", ("-", ("const", 0), bound), ("const", c))), side)
    return None


def _conjuncts(graph: Graph, node_id: str) -> list[str]:
    node = graph.node(node_id)
    if node.op == "and":
        return [c for a in node.args for c in _conjuncts(graph, a)]
    return [node_id]


def _bound_of(graph: Graph, conjunct: str):
    """(side, bound) for one conjunct, or None."""
    node = graph.node(conjunct)
    if node.op not in _FLIP:
        return None
    a, b = node.args
    op = node.op
    if _uses(graph, b, "j") and not _uses(graph, a, "j"):
        a, b, op = b, a, _FLIP[op]
    if not _uses(graph, a, "j") or _uses(graph, b, "j") or graph.node(b).dtype != "int":
        return None
    if any(graph.node(leaf).op in ("input", "param") for leaf in _leaves(graph, b)):
        return None
    if set(graph.node(b).dims) - {"i"} or _polarity(graph, b, "i") not in (0, 1):
        return None
    bound = ("node", b)
    if op == "lt":
        bound, op = ("-", bound, ("const", 1)), "le"
    elif op == "gt":
        bound, op = ("+", bound, ("const", 1)), "ge"
    side = "upper" if op == "le" else "lower"
    solved = _invert(graph, a, bound, side)
    if solved is None or _tree_polarity(graph, solved[1]) not in (0, 1):
        return None  # only bounds non-decreasing in i give a block range from the block's first/last row
    return solved


def _tree_polarity(graph: Graph, tree) -> int | None:
    kind = tree[0]
    if kind == "node":
        return _polarity(graph, tree[1], "i")
    if kind == "const":
        return 0
    a, b = (_tree_polarity(graph, t) for t in tree[1:])
    if a is None or b is None:
        return None
    if kind == "-":
        b = -b
    elif kind in ("*", "//") and tree[2][0] != "const":
        return None
    signs = {a, b} - {0}
    return signs.pop() if len(signs) == 1 else (0 if not signs else None)


def key_block_bounds(graph: Graph) -> KeyBlockBounds:
    """The key-block bounds of a classified graph's keep-predicates (passes/plan.py puts them in the plan)."""
    (softmax,) = graph.find("softmax")
    keeps = graph.node(softmax).args[1:]
    lower = upper = None
    used = []
    for keep in keeps:
        for conjunct in _conjuncts(graph, keep):
            found = _bound_of(graph, conjunct)
            if found is None:
                continue
            side, bound = found
            used.append(conjunct)
            if side == "upper":
                upper = bound if upper is None else ("min", upper, bound)
            else:
                lower = bound if lower is None else ("max", lower, bound)
    return KeyBlockBounds(lower, upper, tuple(used))


def render_bound(bound, render_node, calls: dict | None = None) -> str:
    """A bound tree as an expression: the one way bounds are rendered, for every target.

    render_node(node_id) gives the code of a graph node; `calls` how the target spells min, max
    and floor division (default Python's: `min(a, b)`, `max(a, b)`, `a // b`), e.g. Triton's
    `{"min": "tl.minimum", "max": "tl.maximum", "//": "_floordiv"}`."""
    calls = calls or {}
    kind = bound[0]
    if kind == "node":
        return render_node(bound[1])
    if kind == "const":
        return repr(bound[1])
    a, b = (render_bound(x, render_node, calls) for x in bound[1:])
    if kind in ("min", "max", "//") and kind in calls:
        return f"{calls[kind]}({a}, {b})"
    if kind in ("min", "max"):
        return f"{kind}({a}, {b})"
    return f"({a} {kind} {b})"
