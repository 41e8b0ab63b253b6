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

from ..errors import SpecError
from ..ir import Graph, Node
from ..ops import MAX_INT_BITS as _MAX_INT_BITS
from .. import ops
from ..ops import OPS, ConstantTooLarge


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
        attrs = {"roles": node.attrs["roles"]} if "roles" in node.attrs else {}
        for name, arg in zip(node.attrs["static"], static_args):
            if not _is_const(graph, arg):
                raise SpecError(f"{op}(..., {name}=...) must be a constant or made of params", node.location,
                                f"e.g. {name}={OPS[op].keywords.get(name)!r}")
            attrs[name] = _const(graph, arg)
        node = node.with_(args=args[:data_arity], attrs=attrs)
        graph.set(node_id, node)
        args, absent = node.args, absent[:data_arity]

    # an absent argument: what the op declares (ops.Op.absent)
    absent_rule = OPS[op].absent if op in OPS else "absent"
    if absent_rule == "identity" and any(absent):     # the result is the other (present) argument
        present_args = [a for a, is_absent in zip(args, absent) if not is_absent]
        _forward(graph, node_id, present_args[0] if present_args else None)
        return
    if absent_rule == "drop":                          # normalisers drop an absent keep-predicate (or sink)
        if absent[0]:
            raise SpecError(f"{op} of an absent value", node.location)
        attrs = dict(node.attrs)
        if "roles" in attrs:
            attrs["roles"] = tuple(r for r, is_absent in zip(attrs["roles"], absent) if not is_absent)
        graph.set(node_id, node.with_(args=tuple(a for a, is_absent in zip(args, absent) if not is_absent),
                                      attrs=attrs))
        return
    if absent_rule == "first" and any(absent[1:]):     # mix_heads(x, None) is x
        _forward(graph, node_id, args[0])
        return
    if absent_rule == "error" and any(absent):
        raise SpecError(f"{op} of an absent value (an optional input that was not given?)", node.location)
    if any(absent):
        _forward(graph, node_id, None)
        return

    for position in OPS[op].nonzero if op in OPS else ():
        if _is_const(graph, args[position]) and _const(graph, args[position]) == 0:
            raise SpecError("division by zero: the divisor is 0 for these params", node.location)
    # constant folding
    if args and all(_is_const(graph, a) for a in args):
        values = [_const(graph, a) for a in args]
        if any(isinstance(v, str) for v in values) and not (op in OPS and OPS[op].strings):
            raise SpecError("a string can only be compared with == or != (in a condition)", node.location)
        if op not in OPS or OPS[op].scalar is None:
            return
        try:
            value = apply(op, values)
        except NotARealNumber as e:
            raise SpecError(str(e), node.location)
        except (ArithmeticError, ValueError, TypeError) as e:
            raise SpecError(f"cannot evaluate this constant expression: {e}", node.location)
        graph.set(node_id, node.with_(op="const", args=(), attrs={"value": value}))


class NotARealNumber(ArithmeticError):
    """A constant that is complex, infinite, NaN or too large to keep."""


def apply(op: str, values: list):
    """Python's value of `op` on constants, as folding computes it: a real, finite number.

    Raises NotARealNumber, or what Python raises (ZeroDivisionError, ValueError: math domain error, ...).
    """
    too_large = f"this constant is too large (more than {_MAX_INT_BITS} bits)"
    try:
        value = OPS[op].scalar(*values)     # the op's meaning on Python numbers (ops.py)
    except ConstantTooLarge as e:           # refused before it is computed
        raise NotARealNumber(str(e))
    if type(value) not in (bool, int, float):
        raise NotARealNumber(f"this constant expression is not a real number: {value!r}")
    if type(value) is int and value.bit_length() > _MAX_INT_BITS:
        raise NotARealNumber(too_large)
    if type(value) is float and not math.isfinite(value):   # 1e308 * 10: backends would disagree
        raise NotARealNumber(f"this constant expression is not a finite number: {value!r}")
    return value


def evaluate(expr: ast.expr, env: dict):
    """The value of a param default expression (`D ** -0.5`) with the names in `env` (sizes and
    params), computed by `apply` as folding would: for checking defaults at the sizes of a call."""
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.Name):
        if expr.id not in env:
            raise ValueError(f"'{expr.id}' is not known for this call")
        return env[expr.id]
    if isinstance(expr, ast.BinOp):
        return apply(ops.operator_op(expr.op), [evaluate(expr.left, env), evaluate(expr.right, env)])
    if isinstance(expr, ast.UnaryOp):
        value = evaluate(expr.operand, env)
        return value if isinstance(expr.op, ast.UAdd) else apply(ops.operator_op(expr.op), [value])
    if isinstance(expr, ast.BoolOp):
        values = [evaluate(value, env) for value in expr.values]
        result = values[0]
        for value in values[1:]:
            result = apply(ops.operator_op(expr.op), [result, value])
        return result
    if isinstance(expr, ast.Compare):
        left, result = evaluate(expr.left, env), True
        for op, comparator in zip(expr.ops, expr.comparators):
            right = evaluate(comparator, env)
            result = result and apply(ops.operator_op(op), [left, right])
            left = right
        return result
    if isinstance(expr, ast.IfExp):
        return evaluate(expr.body if evaluate(expr.test, env) else expr.orelse, env)
    if isinstance(expr, ast.Call):          # an elementwise op of the registry, e.g. `-log(J)`
        return apply(expr.func.id, [evaluate(a, env) for a in expr.args])
    raise TypeError(f"{type(expr).__name__} is not a param default expression")


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
