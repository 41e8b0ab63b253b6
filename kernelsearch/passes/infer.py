"""Pass 2, infer: the named dims and dtype of every node, with dim and type errors.

Dims are sets of names kept in the graph's canonical order (b, h, i, j, then feature and
table dims in the order the inputs declare them). Elementwise ops broadcast by name; `dot`
contracts the last dim of its first argument; row transforms act along the feature dim.
"""
from __future__ import annotations

from ..errors import SpecError
from ..exprs import INDEX_VARIABLES
from ..ir import Graph
from ..ops import OPS

# the types of the static keyword arguments of ops, once folded into attributes
_STATIC_TYPES = {"groups": (int,), "streams": (int,), "eps": (int, float), "theta": (int, float),
                 "scale_base": (int, float), "inverse": (bool,)}


def dim_order(spec) -> tuple[str, ...]:
    order = list(INDEX_VARIABLES)
    for decl in spec.inputs.values():
        for dim in decl.shape:
            if dim not in order:
                order.append(dim)
    return tuple(order)


def _union(order, *dim_sets) -> tuple[str, ...]:
    present = set().union(*dim_sets)
    return tuple(d for d in order if d in present)


def feature_dim(dims: tuple[str, ...]) -> str | None:
    """The dim a row transform acts along: the last non-index dim."""
    features = [d for d in dims if d not in INDEX_VARIABLES]
    return features[-1] if features else None


def _fmt(dims) -> str:
    return f"[{', '.join(dims)}]"


def infer(graph: Graph) -> Graph:
    graph = graph.copy()
    order = dim_order(graph.spec)
    graph.dim_order = order
    for node_id in graph.ids():
        node = graph.node(node_id)
        dims, dtype = _infer_node(graph, node_id, node, order)
        graph.set(node_id, node.with_(dims=dims, dtype=dtype))
    return graph


def _infer_node(graph, node_id, node, order):
    op, where = node.op, node.location
    args = [graph.node(a) for a in node.args]
    if op in ("input", "index"):
        return node.dims, node.dtype
    if op == "const":
        value = node.attrs["value"]
        if isinstance(value, str):
            return (), "str"
        return (), "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float"
    if op == "param":
        param = graph.spec.params[node.attrs["name"]]
        return (), {"bool": "bool", "int": "int", "float": "float", "str": "str"}[param.type]
    if op == "size":
        return (), "int"
    if op in ("absent", "select", "alias"):
        if op == "alias":
            return args[0].dims, args[0].dtype
        if op == "select":
            return _union(order, args[1].dims, args[2].dims), args[1].dtype if args[1].op != "absent" else args[2].dtype
        return (), "float"
    data = args[: node.attrs.get("data_arity", len(args))]
    for name, value in node.attrs.items():
        if name in _STATIC_TYPES and type(value) not in _STATIC_TYPES[name]:
            kind = " or ".join({int: "an int", float: "a float", bool: "a bool"}[t] for t in _STATIC_TYPES[name])
            raise SpecError(f"{op}(..., {name}=...) must be {kind}, got {value!r}", where)
    if any(a.dtype == "str" for a in data):
        if op in OPS and OPS[op].strings and all(a.dtype == "str" for a in data):
            return (), "bool"
        raise SpecError("a string can only be compared with == or != (in a condition)", where,
                        'e.g. `... if causal_alignment == "top_left" else ...`')
    entry = OPS.get(op)
    if entry is None:
        raise SpecError(f"internal: no dim rule for op '{op}'", where)
    if entry.lowering == "elementwise":   # broadcast by name; the dtype by the op's rule
        dtype = _DTYPE_RULES[entry.rule](entry, [a.dtype for a in data], where)
        return _union(order, *(a.dims for a in data)), dtype
    rule = entry.rule
    if rule == "gather":
        table, *indices = data
        for index in indices:
            if index.dtype != "int":
                raise SpecError(f"indices of '{table.name}' must be integer expressions (of b, h, i, j and sizes)",
                                where, "e.g. abs(i - j)")
        return _union(order, *(i.dims for i in indices)), table.dtype
    if rule == "dot":
        a, b = data
        if a.dtype != "float" or b.dtype != "float":
            raise SpecError("dot takes float tensors", where)
        if not a.dims:
            raise SpecError("dot needs tensors, not a scalar", where)
        contracted = a.dims[-1]
        if contracted not in b.dims:
            raise SpecError(f"dim mismatch in dot: it contracts '{contracted}' (the last dim of "
                            f"{_label(graph, node.args[0])} {_fmt(a.dims)}), but {_label(graph, node.args[1])} "
                            f"has dims {_fmt(b.dims)}", where,
                            "dot(q, k) contracts d giving [b, h, i, j]; dot(p, v) contracts j giving [b, h, i, d]")
        dims = _union(order, [d for d in a.dims if d != contracted], [d for d in b.dims if d != contracted])
        return dims, "float"
    if rule == "normaliser":
        from ..normalisers import roles
        x = data[0]
        if "j" not in x.dims or "i" not in x.dims:
            raise SpecError(f"{op} needs scores over i and j, got {_fmt(x.dims)}", where,
                            "apply it to dot(q, k)-shaped scores")
        if x.dtype != "float":
            raise SpecError(f"{op} takes float scores", where)
        for value, role in zip(data[1:], roles(node)[1:]):
            if value.op == "absent":
                continue
            if role == "sinks":
                if value.dtype not in ("float", "int"):
                    raise SpecError(f"softmax's sinks= is a logit (a number), got a {value.dtype} value", where,
                                    "e.g. sinks=sinks (a float input [h]) or sinks=0 (softmax plus one)")
                if {"i", "j"} & set(value.dims):
                    raise SpecError(f"softmax's sinks= has dims {_fmt(value.dims)}; a sink is one extra logit per "
                                    "row group, without i or j", where,
                                    "declare it over b and/or h (e.g. `sinks: [h]`); to add a per-key logit, "
                                    "add a bias to the scores instead")
                extra = set(value.dims) - set(x.dims)
                if extra:
                    raise SpecError(f"softmax's sinks= has dims {sorted(extra)} that the scores {_fmt(x.dims)} lack",
                                    where, "a sink varies along b and h only, e.g. `sinks: [h]`")
                continue
            if value.dtype != "bool":
                raise SpecError(f"keep= takes predicates (bool), got a {value.dtype} value", where,
                                "e.g. keep=[j <= i, mask]")
            extra = set(value.dims) - set(x.dims)
            if extra:
                raise SpecError(f"a keep-predicate has dims {sorted(extra)} that the scores {_fmt(x.dims)} lack", where)
        return x.dims, "float"
    if rule == "row_transform":
        x = data[0]
        feature = feature_dim(x.dims)
        if feature is None or x.dtype != "float":
            raise SpecError(f"{op} acts along a feature dim (like d), but its input has dims {_fmt(x.dims)}", where,
                            f"apply {op} to q, k or v")
        if len(entry.positional) > 1:   # rotary, xpos: positions
            pos = data[1]
            if pos.dtype == "bool" or feature in pos.dims:
                raise SpecError(f"{op}'s positions must be a number per row, got dims {_fmt(pos.dims)}", where,
                                "e.g. pos=i for queries, pos=j for keys")
            extra = set(pos.dims) - set(x.dims)
            if extra:
                raise SpecError(f"{op}'s positions vary along {sorted(extra)}, which its input lacks", where)
        if "groups" in entry.keywords and (not isinstance(node.attrs.get("groups", 1), int) or node.attrs.get("groups", 1) < 1):
            raise SpecError(f"l2norm groups must be a positive integer, got {node.attrs.get('groups')!r}", where)
        return x.dims, "float"
    if rule == "mix_heads":
        x, weight = data
        if "h" not in x.dims:
            raise SpecError(f"mix_heads mixes heads, but its input has dims {_fmt(x.dims)}", where)
        if len(weight.dims) != 2:
            raise SpecError(f"mix_heads weight must be a matrix [(s h), (s h)], got {_fmt(weight.dims)}", where)
        streams = node.attrs.get("streams", 1)
        if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
            raise SpecError(f"mix_heads streams must be a positive integer, got {streams!r}", where)
        return x.dims, "float"
    raise SpecError(f"internal: no dim rule for op '{op}'", where)


def _label(graph, node_id):
    node = graph.node(node_id)
    return f"'{node.name}'" if node.name else "its argument"


# -- dtype rules of the elementwise ops (ops.Op.rule): (op, argument dtypes, location) -> dtype

def _no_predicates(entry, dtypes, where) -> None:
    if "bool" not in dtypes:
        return
    if len(entry.positional) == 2 and entry.syntax:   # torch has no arithmetic on bool tensors (True + True is 2)
        raise SpecError(f"arithmetic ('{entry.syntax}') on a predicate (bool)", where,
                        "use where(predicate, a, b) to turn a predicate into numbers")
    raise SpecError(f"'{entry.syntax or entry.name}' of a predicate (bool)", where,
                    "use where(predicate, a, b) to turn it into numbers")


def _arithmetic(entry, dtypes, where) -> str:
    _no_predicates(entry, dtypes, where)
    return "float" if "float" in dtypes else "int"


def _float_arithmetic(entry, dtypes, where) -> str:
    _no_predicates(entry, dtypes, where)
    return "float"


def _logic(entry, dtypes, where) -> str:
    for dtype in dtypes:
        if dtype != "bool":
            raise SpecError(f"'&' / '|' / and / or combine predicates, but one side is {dtype}", where,
                            "compare first, e.g. (j <= i) & mask")
    return "bool"


def _not(entry, dtypes, where) -> str:
    if dtypes[0] != "bool":
        raise SpecError("`not` / `~` applies to predicates", where)
    return "bool"


def _same(entry, dtypes, where) -> str:
    _no_predicates(entry, dtypes, where)
    return dtypes[0]


def _integer(entry, dtypes, where) -> str:
    _no_predicates(entry, dtypes, where)
    return "int"


def _minmax(entry, dtypes, where) -> str:
    return "float" if "float" in dtypes else dtypes[0]


def _where(entry, dtypes, where) -> str:
    if dtypes[0] != "bool":
        raise SpecError("the condition of where(...) must be a predicate", where)
    return "float" if "float" in dtypes[1:] else dtypes[1]


_DTYPE_RULES = {
    "arithmetic": _arithmetic,              # + - * // %: int stays int
    "float_arithmetic": _float_arithmetic,  # / **: always float
    "compare": lambda entry, dtypes, where: "bool",
    "logic": _logic,
    "not": _not,
    "same": _same,                          # neg, abs, rounding: the argument's dtype
    "float": _float_arithmetic,             # exp, log, ...: float functions of numbers
    "int": _integer,                        # to_int(x): an integer of any number
    "minmax": _minmax,
    "where": _where,
}
