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

What the analysis knows of each op - which comparisons bound a side, where an op is monotone, how
to solve it for an argument, which op splits a predicate into conjuncts - are facts of the op
registry (ops.py: `order`, `converse`, `monotone`, `inverse`, `commutative`, `conjunction`).
"""
from __future__ import annotations

import operator

from .. import ops
from ..ir import Graph, KeyBlockBounds


def _facts(graph: Graph, node_id: str):
    """The registry entry of an elementwise node (None for leaves and structural ops)."""
    op = graph.node(node_id).op
    return ops.OPS[op] if ops.is_elementwise(op) else None


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


def _oriented(graph: Graph, node_id: str, first: str | None = None):
    """(arguments, their `monotone` facts) of a monotone node, in an order (commutative ops may be
    turned, preferably with `first` first) where the arguments that must be positive constants
    are; None if there is none."""
    entry, args = _facts(graph, node_id), graph.node(node_id).args
    if entry is None or entry.monotone is None:
        return None
    orders = [args] + ([args[::-1]] if entry.commutative else [])
    for order in sorted(orders, key=lambda order: first is not None and order[0] != first):
        if all(fact != "positive" or _is_positive_const(graph, a) for a, fact in zip(order, entry.monotone)):
            return order, entry.monotone
    return None


def _polarity(graph: Graph, node_id: str, dim: str) -> int | None:
    """+1 if node is non-decreasing in `dim`, -1 if non-increasing, 0 if independent, None if unknown."""
    node = graph.node(node_id)
    if not _uses(graph, node_id, dim):
        return 0
    if node.op == "index":
        return 1
    oriented = _oriented(graph, node_id) if node.dtype == "int" else None
    if oriented is None:
        return None
    signs = set()
    for arg, fact in zip(*oriented):
        if fact != "positive":
            polarity = _polarity(graph, arg, dim)
            if polarity is None:
                return None
            signs.add(fact * polarity)
    signs -= {0}
    return signs.pop() if len(signs) == 1 else None


# the ops of bound trees on host integers (render_bound spells them; _instantiate and bound_value compute them)
_BOUND_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "min": min, "max": max}


def _instantiate(template, bound, other):
    """An op's inverse template (ops.py) as a bound tree: "u" the bound, "c" the other argument."""
    if template == "u":
        return bound
    if template == "c":
        return other
    if isinstance(template, int):
        return ("const", template)
    kind, a, b = template
    a, b = _instantiate(a, bound, other), _instantiate(b, bound, other)
    if a[0] == "const" and b[0] == "const":   # e.g. a divisor's w - 1
        return ("const", _BOUND_OPS[kind](a[1], b[1]))
    return (kind, a, b)


def _invert(graph: Graph, node_id: str, bound, side: str):
    """Solve A(j) <= bound (side='upper') or A(j) >= bound (side='lower') for j.

    Returns (side, bound on j) - the side flips where A decreases in j - or None if A is not invertible.
    """
    node = graph.node(node_id)
    if node.op == "index" and node.attrs["dim"] == "j":
        return side, bound
    if node.dtype != "int" or not node.args:
        return None
    j_args = [a for a in node.args if _uses(graph, a, "j")]
    if len(j_args) != 1:
        return None
    (x,) = j_args
    other = next((a for a in node.args if a != x), None)
    if other is not None and set(graph.node(other).dims) - {"i"}:
        return None  # what is moved to the bound side may depend on i only
    entry, oriented = _facts(graph, node_id), _oriented(graph, node_id, first=x)
    if oriented is None or not entry.inverse:
        return None
    order, monotone = oriented
    position = order.index(x)
    if position not in entry.inverse:
        return None
    other_fact = monotone[1 - position] if other is not None else None
    c = ("const", _is_positive_const(graph, other)) if other_fact == "positive" else ("node", other)
    upper, lower = entry.inverse[position]
    solved = _instantiate(upper if side == "upper" else lower, bound, c)
    if monotone[position] == -1:
        side = "lower" if side == "upper" else "upper"
    return _invert(graph, x, solved, side)


def conjuncts(graph: Graph, node_id: str) -> list[str]:
    """A keep-predicate split at its conjunctions (the kernels mask with the same split)."""
    entry = _facts(graph, node_id)
    if entry is not None and entry.conjunction:
        return [c for a in graph.node(node_id).args for c in conjuncts(graph, a)]
    return [node_id]


def _bound_of(graph: Graph, conjunct: str):
    """(side, bound) for one conjunct, or None."""
    entry = _facts(graph, conjunct)
    if entry is None or entry.order is None:
        return None
    a, b = graph.node(conjunct).args
    if _uses(graph, b, "j") and not _uses(graph, a, "j"):
        a, b, entry = b, a, ops.OPS[entry.converse]
    if not _uses(graph, a, "j") or _uses(graph, b, "j") or graph.node(b).dtype != "int":
        return None
    if any(graph.node(leaf).op in ("input", "param") for leaf in _leaves(graph, b)):
        return None
    if set(graph.node(b).dims) - {"i"} or _polarity(graph, b, "i") not in (0, 1):
        return None
    side, offset = entry.order      # a < b  <=>  a <= b - 1
    bound = ("node", b) if not offset else ("+" if offset > 0 else "-", ("node", b), ("const", abs(offset)))
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


def _bounds_of_keeps(graph: Graph, keeps) -> KeyBlockBounds:
    lower = upper = None
    used = []
    for keep in keeps:
        for conjunct in conjuncts(graph, keep):
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


def key_block_bounds(graph: Graph) -> KeyBlockBounds:
    """The key-block bounds of a classified graph's keep-predicates (passes/plan.py puts them in the plan):
    those of its normalisers' keep lists (kernelsearch/normalisers.py). With several normalisers that keep
    different predicates, a block is visited when any of them keeps keys there: the lowest lower bound and
    the highest upper one, and no conjunct is known to hold in whole blocks (every mask applies in them)."""
    from ..normalisers import normalisers
    keep_lists = {tuple(n.keeps) for n in normalisers(graph)}
    if len(keep_lists) == 1:
        return _bounds_of_keeps(graph, next(iter(keep_lists)))
    each = [_bounds_of_keeps(graph, keeps) for keeps in sorted(keep_lists)]
    lower = upper = None
    if all(b.lower is not None for b in each):
        lower = each[0].lower
        for b in each[1:]:
            lower = ("min", lower, b.lower)
    if all(b.upper is not None for b in each):
        upper = each[0].upper
        for b in each[1:]:
            upper = ("max", upper, b.upper)
    return KeyBlockBounds(lower, upper, ())


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


def _unexpected(node_id: str, node):
    raise NotImplementedError(f"bound expression with op '{node.op}'")


def scalar_walk(graph: Graph, node_id: str, index, size, const, elementwise, other=_unexpected):
    """The one walk over a node built from i, sizes and constants (a bound tree's ("node", id)
    leaves, a causal row offset): `index()` for i, `size(dim)`, `const(value)`,
    `elementwise(node, argument results)`, `other(node_id, node)` for anything else. The renderers
    (generated code, the plan's printout) and the host evaluator below differ only in these."""
    node = graph.node(node_id)
    if node.op == "index":
        return index()
    if node.op == "size":
        return size(node.attrs["dim"])
    if node.op == "const":
        return const(node.attrs["value"])
    if not ops.is_elementwise(node.op):
        return other(node_id, node)
    return elementwise(node, [scalar_walk(graph, a, index, size, const, elementwise, other) for a in node.args])


def bound_value(graph: Graph, bound, row: int, sizes) -> int:
    """A bound tree's value at query row `row` and the call's sizes (lower-case dims): the same
    tree render_bound renders, computed on the host with each op's meaning on Python numbers."""
    from .fold import apply
    kind = bound[0]
    if kind == "const":
        return bound[1]
    if kind == "node":
        return scalar_walk(graph, bound[1], lambda: row, lambda dim: sizes[dim.lower()], lambda value: value,
                           lambda node, args: apply(node.op, args))
    a, b = (bound_value(graph, x, row, sizes) for x in bound[1:])
    return _BOUND_OPS[kind](a, b)


def window_width(graph: Graph, sizes, rows: int = 256) -> int | None:
    """The most keys a query row can keep where the key-block bounds hold both ways (windows),
    over the last `rows` rows (the bounds repeat with the window's period); None without a lower
    bound. Keys past J count: a row's window is its width wherever it sits."""
    bounds = graph.key_bounds
    if bounds.lower is None:
        return None
    last_key = sizes["j"] - 1
    widths = []
    for row in range(max(0, sizes["i"] - rows), sizes["i"]):
        upper = last_key if bounds.upper is None else bound_value(graph, bounds.upper, row, sizes)
        widths.append(upper - bound_value(graph, bounds.lower, row, sizes) + 1)
    return max(widths, default=None)

