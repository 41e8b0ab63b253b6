"""Pass 3, fold: specialise the graph to one set of param values and present optional inputs.

- A param becomes a constant; a param whose default is a size expression (`D ** -0.5`) and
  that the caller did not set becomes that expression over sizes, evaluated at run time.
- `a if cond else b` is decided here; its condition must fold to a constant.
- Constant subexpressions are evaluated.
- An absent optional input (and the literal `None`) is *absent*, the identity of whatever it
  meets: `s + bias` is `s` without a bias, `keep & mask` is `keep`, softmax drops an absent
  keep-predicate, `mix_heads(x, None)` is `x`. Anything else of an absent value is absent too,
  and an absent value reaching dot, softmax's input or the output is an error.
- Static keyword arguments (groups=, streams=, ...) become plain attributes.
"""
from __future__ import annotations

import ast
import math
import operator

from ..errors import SpecError
from ..exprs import OPS
from ..ir import BINARY_OPS, Graph, Node

_PY_BINARY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
              "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow,
              "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
              "eq": operator.eq, "ne": operator.ne, "and": lambda a, b: a and b, "or": lambda a, b: a or b,
              "minimum": min, "maximum": max}
_PY_UNARY = {"neg": operator.neg, "not": operator.not_, "exp": math.exp, "log": math.log, "sqrt": math.sqrt,
             "rsqrt": lambda x: 1 / math.sqrt(x), "abs": abs, "sigmoid": lambda x: 1 / (1 + math.exp(-x)),
             "tanh": math.tanh, "gelu": lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))}
# ops for which an absent argument is the identity: the result is the other (present) argument
_ABSENT_IS_IDENTITY = set(BINARY_OPS) | {"minimum", "maximum"}
# folded integer constants are kept below this size (`10 ** 10 ** 10` would take forever)
_MAX_INT_BITS = 1024


def _const(graph: Graph, node_id: str):
    node = graph.node(node_id)
    return node.attrs["value"] if node.op == "const" else None


def _is_const(graph: Graph, node_id: str) -> bool:
    return graph.node(node_id).op == "const"


def fold(graph: Graph, params: dict, present: frozenset) -> Graph:
    graph = graph.copy()
    graph.params = dict(params)
    graph.present = frozenset(present)
    spec = graph.spec
    from .build import _Builder

    # params (a param's default may be an expression of sizes and other params: loop until none is left)
    for _ in range(len(spec.params) + 1):
        pending = [n for n in graph.ids() if graph.node(n).op == "param"]
        if not pending:
            break
        for node_id in pending:
            node = graph.node(node_id)
            value = params[node.attrs["name"]]
            if isinstance(value, ast.expr):
                builder = _Builder(spec)
                builder.graph = graph
                builder.counter = max(graph.node(n).order for n in graph.ids())
                expr_id = builder.expr(value, node_id)
                graph.replace_uses(node_id, expr_id)
                graph.nx_graph.remove_node(node_id)
            else:
                graph.set(node_id, node.with_(op="const", attrs={"value": value}))
    else:
        raise SpecError("param defaults refer to each other in a cycle", spec.location)
    for node_id in graph.ids():
        node = graph.node(node_id)
        if node.op == "input" and spec.inputs[node.attrs["name"]].optional and node.attrs["name"] not in present:
            graph.set(node_id, node.with_(op="absent", attrs={}))

    for node_id in graph.ids():
        if node_id not in graph:
            continue
        _fold_node(graph, node_id)
    if graph.node(graph.output).op == "absent":
        raise SpecError(f"the output '{spec.outputs[0]}' is absent for these params and inputs",
                        graph.node(graph.output).location)
    graph.remove_dead()
    return graph


def _fold_node(graph: Graph, node_id: str) -> None:
    node = graph.node(node_id)
    op = node.op
    args = node.args
    absent = [graph.node(a).op == "absent" for a in args]

    if op == "alias":
        graph.replace_uses(node_id, args[0])
        _rename_output(graph, node_id, args[0])
        graph.nx_graph.remove_node(node_id)
        return
    if op == "select":
        condition = _const(graph, args[0])
        if not _is_const(graph, args[0]):
            test = graph.node(args[0])
            raise SpecError("the condition of `a if condition else b` must be made of params "
                            "(it is decided at compile time)", test.location if test.op != "input" else node.location,
                            "use where(condition, a, b) for a condition on tensors")
        _forward(graph, node_id, args[1] if condition else args[2])
        return
    if "static" in node.attrs:
        data_arity = node.attrs["data_arity"]
        static_args = args[data_arity:]
        attrs = {}
        for name, arg in zip(node.attrs["static"], static_args):
            if not _is_const(graph, arg):
                raise SpecError(f"{op}(..., {name}=...) must be a constant or made of params", node.location,
                                f"e.g. {name}={OPS[op].keywords.get(name)!r}")
            attrs[name] = _const(graph, arg)
        node = node.with_(args=args[:data_arity], attrs=attrs)
        graph.set(node_id, node)
        args, absent = node.args, absent[:data_arity]

    if op in _ABSENT_IS_IDENTITY and any(absent):
        present_args = [a for a, is_absent in zip(args, absent) if not is_absent]
        _forward(graph, node_id, present_args[0] if present_args else None)
        return
    if op == "softmax":
        if absent[0]:
            raise SpecError("softmax of an absent value", node.location)
        graph.set(node_id, node.with_(args=tuple(a for a, is_absent in zip(args, absent) if not is_absent)))
        return
    if op == "mix_heads" and absent[1]:
        _forward(graph, node_id, args[0])
        return
    if op == "dot" and any(absent):
        raise SpecError("dot of an absent value (an optional input that was not given?)", node.location)
    if any(absent):
        _forward(graph, node_id, None)
        return

    if op in ("div", "floordiv", "mod") and _is_const(graph, args[1]) and _const(graph, args[1]) == 0:
        raise SpecError("division by zero: the divisor is 0 for these params", node.location)
    # constant folding
    if args and all(_is_const(graph, a) for a in args):
        values = [_const(graph, a) for a in args]
        if any(isinstance(v, str) for v in values) and op not in ("eq", "ne"):
            raise SpecError("a string can only be compared with == or != (in a condition)", node.location)
        if op == "pow" and all(type(v) is int for v in values) and abs(values[0]) > 1 \
                and values[1] * values[0].bit_length() > 2 * _MAX_INT_BITS:
            raise SpecError(f"this constant is too large (more than {_MAX_INT_BITS} bits)", node.location)
        try:
            if op in _PY_BINARY:
                value = _PY_BINARY[op](*values)
            elif op in _PY_UNARY:
                value = _PY_UNARY[op](*values)
            elif op == "where":
                value = values[1] if values[0] else values[2]
            else:
                return
        except (ArithmeticError, ValueError, TypeError) as e:
            raise SpecError(f"cannot evaluate this constant expression: {e}", node.location)
        if type(value) not in (bool, int, float):
            raise SpecError(f"this constant expression is not a real number: {value!r}", node.location)
        if type(value) is int and value.bit_length() > _MAX_INT_BITS:
            raise SpecError(f"this constant is too large (more than {_MAX_INT_BITS} bits)", node.location)
        graph.set(node_id, node.with_(op="const", args=(), attrs={"value": value}))


def _forward(graph: Graph, node_id: str, target: str | None) -> None:
    """Replace node_id by target (None: by an absent value)."""
    node = graph.node(node_id)
    if target is None:
        graph.set(node_id, Node("absent", location=node.location, name=node.name, order=node.order))
        return
    graph.replace_uses(node_id, target)
    _rename_output(graph, node_id, target)
    graph.nx_graph.remove_node(node_id)


def _rename_output(graph: Graph, old: str, new: str) -> None:
    if graph.output == old:
        graph.output = new
