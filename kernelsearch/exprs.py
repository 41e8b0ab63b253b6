"""The expression language of `graph:` entries: a whitelisted subset of Python expressions.

    s:    dot(l2norm(q, groups=groups), l2norm(k, groups=groups)) * scale
    keep: (j <= i + J - I) if causal else None
    p:    softmax(s + table[h, abs(i - j)], keep=[keep, mask])

Names are graph entries, inputs, params, index variables (b, h, i, j: integer positions along
that dim) and sizes (B, H, I, J, D, and the upper-case name of any declared dim). Calls are
only to the ops in `OPS`; `x if cond else y` needs a condition made of params (it is decided
at compile time); `None` stands for "absent" (see passes/fold.py). Subscripts gather from an
input with integer index expressions. Everything else - attributes, lambdas, comprehensions,
strings, slices - is refused with the location of the offending text.
"""
from __future__ import annotations

import ast
import math

from . import nearest
from .errors import SourceLocation, SpecError
from .ops import CALLABLE

INDEX_VARIABLES = ("b", "h", "i", "j")
SIZES = ("B", "H", "I", "J", "D")
MAX_EXPRESSION_CHARS = 2000
MAX_EXPRESSION_NODES = 400
MAX_EXPRESSION_DEPTH = 40


# the ops a spec calls by name, with their signatures (positional, keywords, doc): ops.py declares them
OPS = CALLABLE

# op names are not reserved: `rotary` may be both a param (a flag) and an op (a call)
RESERVED_NAMES = frozenset(INDEX_VARIABLES) | frozenset(SIZES) | {"True", "False", "None"}

_ALLOWED_NODES = (
    ast.Expression, ast.Name, ast.Constant, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp,
    ast.Call, ast.keyword, ast.Subscript, ast.Tuple, ast.List, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
    ast.USub, ast.UAdd, ast.Not, ast.Invert, ast.And, ast.Or, ast.BitAnd, ast.BitOr,
    ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq,
)

_FORBIDDEN_DESCRIPTIONS = {
    ast.Attribute: ("attribute access", "call an op by its bare name, e.g. `exp(x)`"),
    ast.Lambda: ("a lambda", "define a named graph entry instead"),
    ast.ListComp: ("a comprehension", "write the expression out"),
    ast.SetComp: ("a comprehension", "write the expression out"),
    ast.DictComp: ("a comprehension", "write the expression out"),
    ast.GeneratorExp: ("a generator expression", "write the expression out"),
    ast.Dict: ("a dict literal", None),
    ast.Set: ("a set literal", None),
    ast.Starred: ("star-unpacking", None),
    ast.Slice: ("a slice", "index with expressions, e.g. `table[h, abs(i - j)]`"),
    ast.NamedExpr: ("an assignment expression", "define a named graph entry instead"),
    ast.JoinedStr: ("an f-string", None),
    ast.Await: ("await", None),
    ast.Yield: ("yield", None),
    ast.YieldFrom: ("yield", None),
    ast.MatMult: ("the @ operator", "write `dot(a, b)`"),
    ast.BitXor: ("the ^ operator", "use `!=` on booleans or `**` for powers"),
    ast.LShift: ("a shift", None),
    ast.RShift: ("a shift", None),
    ast.Is: ("`is`", "use `==`"),
    ast.IsNot: ("`is not`", "use `!=`"),
    ast.In: ("`in`", "use comparisons"),
    ast.NotIn: ("`not in`", "use comparisons"),
}


def node_location(node: ast.AST, base: SourceLocation, quoted: bool) -> SourceLocation:
    """Location of an ast node inside an expression that starts at `base` in the file."""
    line = getattr(node, "lineno", 1)
    column = getattr(node, "col_offset", 0)
    if line == 1:
        return SourceLocation(base.file, base.line, base.column + column + (1 if quoted else 0))
    return SourceLocation(base.file, base.line + line - 1, column + 1)


def parse(source: str, path: str, where: SourceLocation, quoted: bool = False) -> ast.expr:
    """Parse one expression; every node gets `.location` (a SourceLocation in the spec file)."""
    if len(source) > MAX_EXPRESSION_CHARS:
        raise SpecError(f"expression is {len(source)} characters long; at most {MAX_EXPRESSION_CHARS} are allowed",
                        where, "split it into several named graph entries")
    if not source.strip():
        raise SpecError("empty expression", where, "write an expression, e.g. `dot(q, k) * scale`")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as e:
        column = (e.offset or 1) - 1
        location = SourceLocation(where.file, where.line, where.column + column + (1 if quoted else 0))
        raise SpecError(f"invalid expression syntax: {e.msg}: {source.strip()!r}", location,
                        "an expression is Python-like: names, numbers, + - * / // ** , comparisons, op calls")
    except (RecursionError, MemoryError, ValueError):
        raise SpecError("expression is nested too deeply", where, "split it into several named graph entries")
    leading = len(source) - len(source.lstrip())
    if leading:
        where = SourceLocation(where.file, where.line, where.column + leading)
    count = 0
    stack = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        node.location = node_location(node, where, quoted)
        if depth > MAX_EXPRESSION_DEPTH or count > MAX_EXPRESSION_NODES:
            raise SpecError("expression is too large or nested too deeply", where,
                            "split it into several named graph entries")
        _check_node(node, path)
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + 1))
    return tree.body


def _dotted(node: ast.expr) -> list[str]:
    """`torch.nn.functional.relu` -> ["torch", "nn", "functional", "relu"] (what the parts are named)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1] or ["?"]


def _check_node(node: ast.AST, path: str) -> None:
    where = node.location
    if isinstance(node, ast.Attribute):     # math.pi, torch.inf, x.shape: what it would be here
        name = node.attr
        if name in nearest.NAMES:
            hint = nearest.NAMES[name]
        elif name in ("shape", "size"):
            hint = "sizes are written I, J, D (and the upper-case name of any declared dim)"
        else:
            hint = nearest.dotted_call(_dotted(node), OPS)
        raise SpecError(f"attribute access is not allowed in a spec expression ('.{name}')", where, hint)
    for forbidden, (what, hint) in _FORBIDDEN_DESCRIPTIONS.items():
        if isinstance(node, forbidden):
            raise SpecError(f"{what} is not allowed in a spec expression", where, hint)
    if not isinstance(node, _ALLOWED_NODES):
        raise SpecError(f"{type(node).__name__} syntax is not allowed in a spec expression", where,
                        "use names, numbers, arithmetic, comparisons and op calls")
    if isinstance(node, ast.Constant) and not (node.value is None or type(node.value) in (bool, int, float, str)):
        raise SpecError(f"constant {node.value!r} is not allowed; only numbers, strings, True, False and None", where)
    if isinstance(node, ast.Constant) and type(node.value) is float and not math.isfinite(node.value):
        # 1e999 parses as inf: infinite scores make fully-masked rows NaN on one backend and 0 on another
        raise SpecError("this number is too large for a float (it would be inf)", where,
                        "write a finite number; to drop keys, give softmax a keep-predicate: softmax(s, keep=[...])")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            dotted = _dotted(node.func)
            raise SpecError(f"only ops can be called, by their bare name, not {'.'.join(dotted)}(...)", where,
                            nearest.dotted_call(dotted, OPS))
        if node.func.id not in OPS:
            raise SpecError(f"unknown op '{node.func.id}'", where, nearest.unknown_op(node.func.id, OPS))
        signature = OPS[node.func.id]
        if len(node.args) != len(signature.positional):
            raise SpecError(f"{signature.name}() takes {len(signature.positional)} positional argument(s) "
                            f"({', '.join(signature.positional)}), got {len(node.args)}", where,
                            f"{signature.name}({', '.join(signature.positional)}"
                            + "".join(f", {k}={v!r}" for k, v in signature.keywords.items()) + ")")
        for keyword in node.keywords:
            if keyword.arg is None:
                raise SpecError("**-unpacking is not allowed", where)
            if keyword.arg not in signature.keywords:
                raise SpecError(f"{signature.name}() has no keyword '{keyword.arg}'", where,
                                nearest.unknown_keyword(signature.name, keyword.arg, signature.keywords))
    if isinstance(node, (ast.List, ast.Tuple)) and not getattr(node, "_allowed_list", False):
        pass  # where lists may appear is checked when the graph is built (only as softmax keep=)


def check_size_expression(expr: ast.expr, path: str, where: SourceLocation) -> None:
    """A param default like `D ** -0.5` or `0 if causal else 1`: sizes, other params, arithmetic.

    Index variables and inputs are not allowed (a param is one number per call); names are
    resolved when the graph is folded.
    """
    for node in ast.walk(expr):
        if isinstance(node, ast.Name) and node.id in INDEX_VARIABLES:
            raise SpecError(f"a param default cannot use the index variable '{node.id}' (a param is one number)",
                            node.location, "use sizes and other params, e.g. `D ** -0.5`")
        if isinstance(node, ast.Call) and OPS[node.func.id].lowering == "elementwise" \
                and OPS[node.func.id].scalar is not None and OPS[node.func.id].python is not None and not node.keywords:
            continue    # an elementwise op of sizes and params (`-log(J)`): the registry's meaning on numbers
        if isinstance(node, (ast.Call, ast.Subscript, ast.List, ast.Tuple)):
            raise SpecError("a param default expression is arithmetic over sizes and params, and elementwise "
                            "ops of them", node.location, "e.g. `D ** -0.5`, `-log(J)` or `0 if causal else 1`")
