"""The op registry: every op of the spec language, declared once.

An `Op` says everything the compiler and the backends need to know about one op:

    signature     positional parameters, keyword parameters with defaults, a one-line doc
                  (exprs.py parses calls with it; `syntax` ops come from Python operators instead)
    rule          the dims/dtype rule passes/infer.py applies (elementwise ops broadcast by name)
    meaning       `tensor` on torch tensors and `scalar` on Python numbers: the reference backend
                  and constant folding call these; for structural ops `reference(args, ctx)`
    renderings    source templates over argument texts ({0}, {1}, ...): `torch` (aligned tensors in
                  generated torch code), `python` (host scalars: sizes, params, bounds), `triton`
                  (tiles, float32 unless the op is on integers: then `triton_int` if it differs)
    derivative    `grad`: one template per argument for the backward kernels, in terms of the
                  upstream gradient {g}, the op's output {out}, its arguments in float32 {x0},
                  {x1}, ... or as they are {v0}, ...; None for an argument that gets no gradient
    lowering      "elementwise" (everything above is generic) or "structural" (dot, softmax,
                  gather, row transforms, mix_heads: backends lower these with code of their own,
                  named by the op, in the one place that lowers them)
    facts         what the passes reason with, so that none of them matches op names:
                  `linear` (passes/plan.py: may the softmax stay online), `monotone`, `inverse`,
                  `order`, `converse`, `conjunction` (passes/bounds.py: keep-predicates into key
                  bounds), `commutative`

Adding an elementwise op is one entry in `_ELEMENTWISE` (see the README's "Adding an op").
Nothing here imports the backends' code generators: they import this.
"""
from __future__ import annotations

import ast
import math
import operator
import string
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .backends import torch_ops

# folded integer constants are kept below this size (`10 ** 10 ** 10` would take forever)
MAX_INT_BITS = 1024
# to_int(x) saturates here on every backend (Triton's integers are int32)
_INT_LIMIT = torch_ops.INT_LIMIT
_INT_BITS = _INT_LIMIT.bit_length() - 1


@dataclass(frozen=True)
class Op:
    name: str
    positional: tuple[str, ...]          # required positional parameters
    doc: str
    keywords: dict = field(default_factory=dict)   # static keyword parameters -> default
    syntax: str | None = None            # the Python operator it is written with (not callable by name)
    rule: str = "float"                  # dims/dtype rule (passes/infer.py)
    lowering: str = "elementwise"        # elementwise | structural
    tensor: Callable | None = None       # reference meaning on torch tensors (Python numbers mixed in)
    scalar: Callable | None = None       # meaning on Python numbers (constant folding)
    reference: Callable | None = None    # structural: reference(args, ReferenceContext)
    torch: str | None = None             # generated torch, aligned tensors
    python: str | None = None            # generated Python, host scalars
    triton: str | Callable | None = None  # generated Triton; a callable gets (args, constants, shape)
    triton_int: str | None = None        # generated Triton when the op is on integers, if different
    triton_operands: str | tuple = "auto"  # per argument: float (cast loads to fp32) | as_is | auto
    helpers: tuple[str, ...] = ()        # Triton helper functions its renderings call (TRITON_HELPERS)
    grad: tuple | None = None            # derivative templates, one per argument; None: no rule
    integer_identity: bool = False       # on an integer argument the op is the identity
    absent: str = "absent"               # fold: absent | identity | drop | first | error (see passes/fold.py)
    nonzero: tuple[int, ...] = ()        # arguments that must not fold to 0 (divisors)
    strings: bool = False                # compares strings too (== and != in conditions)
    # -- facts (None / False: the op promises nothing of the kind)
    linear: str | tuple | None = None    # how it keeps a value linear (homogeneous of degree 1) in some x:
                                         # "every" argument linear in x (add) | "one" argument linear and the
                                         # others independent of x (mul) | per argument "linear" or "fixed" (div)
    monotone: tuple | None = None        # on integers, per argument: +1 non-decreasing in it, -1 non-increasing,
                                         # "positive": must be a positive integer constant (a divisor, a factor)
    inverse: dict | None = None          # argument position -> (upper, lower): solving op(x, c) <= u (>= u) for x,
                                         # as bound trees (passes/bounds.py) over "u", "c" (the other argument)
                                         # and integers; the side flips where `monotone` is -1
    commutative: bool = False            # op(a, b) == op(b, a)
    order: tuple | None = None           # a comparison `a OP b` as a bound on a: (upper | lower, offset added to b)
    converse: str | None = None          # the comparison with its arguments swapped: a < b  <=>  b > a
    conjunction: bool = False            # holds when every argument does (keep-predicates split at it)
    unit: float | None = None            # commutative ops: u with op(x, u) == x (x + 0, x * 1): what a learned
                                         # input that meets the graph only here starts at to change nothing
    normaliser: str | None = None        # a row normaliser (kernelsearch/normalisers.py): the op between the scores
                                         # and dot(p, v) that takes keep-predicates; "softmax": with row statistics
                                         # (max, sum: online or exact); "masked": none (p is x where kept, else 0)
    dataflow: tuple[str, ...] = ()       # keyword parameters that are graph values, not constants (keep=[...],
                                         # sinks=x); their order is the order of the node's arguments after x

    @property
    def callable(self) -> bool:
        """Called by name in a spec (`exp(x)`), rather than written with an operator (`a + b`)."""
        return self.syntax is None and self.name != "gather"

    def arity(self) -> int:
        return len(self.positional)

    def describe(self) -> str:
        """How a user calls it: `rotary(x, pos, theta=10000.0)`."""
        if self.syntax:
            return " ".join([self.positional[0], self.syntax, self.positional[1]]) if len(self.positional) == 2 \
                else f"{self.syntax}{self.positional[0]}"
        return f"{self.name}({', '.join(self.positional)}" \
            + "".join(f", {k}={v!r}" for k, v in self.keywords.items()) + ")"


# ----------------------------------------------------------------------------- meanings, shared

def _on_tensors(function):
    """A torch function that needs tensors for all its arguments: Python numbers become 0-d tensors
    on the device of the tensor arguments."""
    def call(*args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        return function(*(a if isinstance(a, torch.Tensor) else torch.as_tensor(a, device=device) for a in args))
    return call


def _keep_int(function):
    """A rounding function on Python numbers that keeps the type: ints stay, floats stay floats."""
    return lambda x: x if isinstance(x, int) else float(function(x))


class ConstantTooLarge(OverflowError):
    """An integer constant over MAX_INT_BITS bits (refused before it is computed)."""


def _checked_pow(a, b):
    if type(a) is int and type(b) is int and abs(a) > 1 and b * a.bit_length() > 2 * MAX_INT_BITS:
        raise ConstantTooLarge(f"this constant is too large (more than {MAX_INT_BITS} bits)")
    return a ** b


def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _int_of(x):
    """to_int(x) on Python numbers, as torch_ops.to_int on tensors: toward zero, within +-INT_LIMIT, NaN gives 0."""
    return 0 if x != x else int(max(-_INT_LIMIT, min(_INT_LIMIT, x)))


def _triton_pow(args, constants, shape):
    """Small integer exponents as products (exact, and no log of a negative base)."""
    n = constants[1]
    if n is not None and float(n).is_integer() and abs(n) <= 4:
        n = int(n)
        if n == 0:
            return f"tl.full({shape}, 1.0, tl.float32)" if shape else "1.0"
        product = " * ".join([args[0]] * abs(n))
        return f"1.0 / ({product})" if n < 0 else product
    return f"_pow({args[0]}, {args[1]})"


# ----------------------------------------------------------------------------- the ops

def _binary(name, symbol, rule, tensor, scalar, grad=None, **more) -> Op:
    """An op written with a Python operator: `a <symbol> b`."""
    defaults = dict(torch=f"({{0}} {symbol} {{1}})", python=f"({{0}} {symbol} {{1}})",
                    triton=f"{{0}} {symbol} {{1}}", absent="identity")
    return Op(name, ("a", "b"), f"a {symbol} b", syntax=symbol, rule=rule, tensor=tensor, scalar=scalar,
              grad=grad, **{**defaults, **more})


def _compare(name, symbol, scalar, **more) -> Op:
    return _binary(name, symbol, "compare", scalar, scalar, triton_operands="float", **more)


def _same_both_sides(template) -> tuple:
    return (template, template)


_SYNTAX = (
    _binary("add", "+", "arithmetic", operator.add, operator.add, grad=("{g}", "{g}"), linear="every",
            monotone=(1, 1), commutative=True, unit=0, inverse={0: _same_both_sides(("-", "u", "c"))}),
    _binary("sub", "-", "arithmetic", operator.sub, operator.sub, grad=("{g}", "-{g}"), linear="every",
            monotone=(1, -1), inverse={0: _same_both_sides(("+", "u", "c")),     # x - c <= u  <=>  x <= u + c
                                       1: _same_both_sides(("-", "c", "u"))}),   # c - x <= u  <=>  x >= c - u
    _binary("mul", "*", "arithmetic", operator.mul, operator.mul, grad=("{g} * {x1}", "{g} * {x0}"), linear="one",
            monotone=(1, "positive"), commutative=True, unit=1,
            # x * c <= u  <=>  x <= u // c;  x * c >= u  <=>  x >= ceil(u / c) = -((-u) // c)
            inverse={0: (("//", "u", "c"), ("-", 0, ("//", ("-", 0, "u"), "c")))}),
    _binary("div", "/", "float_arithmetic", operator.truediv, operator.truediv,
            grad=("{g} / {x1}", "-{g} * {x0} / ({x1} * {x1})"), nonzero=(1,), linear=("linear", "fixed")),
    _binary("floordiv", "//", "arithmetic", torch_ops.floordiv, operator.floordiv, grad=(None, None),
            torch="ops.floordiv({0}, {1})", triton="tl.floor({0} / {1})", triton_int="_floordiv({0}, {1})",
            helpers=("_floordiv",), nonzero=(1,), monotone=(1, "positive"),
            # x // c <= u  <=>  x <= u * c + c - 1;  x // c >= u  <=>  x >= u * c
            inverse={0: (("+", ("*", "u", "c"), ("-", "c", 1)), ("*", "u", "c"))}),
    _binary("mod", "%", "arithmetic", operator.mod, operator.mod, grad=("{g}", "-{g} * tl.floor({x0} / {x1})"),
            triton="{0} - tl.floor({0} / {1}) * {1}", triton_int="_floormod({0}, {1})",
            helpers=("_floormod",), nonzero=(1,)),
    _binary("pow", "**", "float_arithmetic", operator.pow, _checked_pow,
            grad=("{g} * {x1} * _pow({x0}, {x1} - 1.0)", "{g} * {out} * tl.log({x0})"),
            triton=_triton_pow, triton_operands="float", helpers=("_pow",)),
    _compare("lt", "<", operator.lt, order=("upper", -1), converse="gt"),    # a < b  <=>  a <= b - 1
    _compare("le", "<=", operator.le, order=("upper", 0), converse="ge"),
    _compare("gt", ">", operator.gt, order=("lower", 1), converse="lt"),     # a > b  <=>  a >= b + 1
    _compare("ge", ">=", operator.ge, order=("lower", 0), converse="le"),
    _compare("eq", "==", operator.eq, strings=True, commutative=True),
    _compare("ne", "!=", operator.ne, strings=True, commutative=True),
    _binary("and", "&", "logic", operator.and_, lambda a, b: a and b, python="({0} and {1})",
            triton_operands="as_is", commutative=True, conjunction=True),
    _binary("or", "|", "logic", operator.or_, lambda a, b: a or b, python="({0} or {1})", triton_operands="as_is",
            commutative=True),
    Op("neg", ("x",), "-x", syntax="-", rule="same", tensor=operator.neg, scalar=operator.neg,
       torch="(-{0})", python="(-{0})", triton="-{0}", grad=("-{g}",), linear="every", monotone=(-1,),
       inverse={0: _same_both_sides(("-", 0, "u"))}),                          # -x <= u  <=>  x >= -u
    Op("not", ("x",), "not x", syntax="~", rule="not", tensor=torch.logical_not, scalar=operator.not_,
       torch="(~{0})", python="(not {0})", triton="~{0}", triton_operands="as_is"),
)


def elementwise(name, doc, tensor, scalar, *, torch, python, triton, grad, positional=("x",), **more) -> Op:
    """An elementwise op called by name: `name(x)` (or `name(a, b)` ... with `positional`)."""
    return Op(name, tuple(positional), doc, tensor=tensor, scalar=scalar, torch=torch, python=python,
              triton=triton, grad=grad, **more)


_ELEMENTWISE = (
    elementwise("exp", "elementwise exp", torch.exp, math.exp,
                torch="torch.exp({0})", python="math.exp({0})", triton="tl.exp({0})", grad=("{g} * {out}",)),
    elementwise("log", "elementwise log", torch.log, math.log,
                torch="torch.log({0})", python="math.log({0})", triton="tl.log({0})", grad=("{g} / {x0}",)),
    elementwise("sqrt", "elementwise sqrt", torch.sqrt, math.sqrt,
                torch="torch.sqrt({0})", python="math.sqrt({0})", triton="tl.sqrt({0})",
                grad=("{g} * 0.5 / {out}",)),
    elementwise("rsqrt", "elementwise 1 / sqrt(x)", torch.rsqrt, lambda x: 1 / math.sqrt(x),
                torch="torch.rsqrt({0})", python="(1 / math.sqrt({0}))", triton="tl.rsqrt({0})",
                grad=("{g} * -0.5 * {out} * {out} * {out}",)),
    elementwise("abs", "elementwise |x|", torch.abs, abs, rule="same",
                torch="torch.abs({0})", python="abs({0})", triton="tl.abs({0})",
                grad=("tl.where({x0} >= 0.0, {g}, -{g})",)),
    elementwise("sigmoid", "elementwise 1 / (1 + exp(-x))", torch.sigmoid, _sigmoid,
                torch="torch.sigmoid({0})", python="(1 / (1 + math.exp(-{0})))", triton="tl.sigmoid({0})",
                grad=("{g} * {out} * (1.0 - {out})",)),
    elementwise("relu", "elementwise max(x, 0) (ReLU attention: masked(relu(s), keep=[...]))", torch.relu,
                lambda x: max(x, 0.0) if isinstance(x, float) else max(x, 0),
                torch="torch.relu({0})", python="max({0}, 0.0)", triton="tl.maximum({0}, 0.0)",
                grad=("tl.where({x0} > 0.0, {g}, 0.0)",)),
    elementwise("tanh", "elementwise tanh", torch.tanh, math.tanh,
                torch="torch.tanh({0})", python="math.tanh({0})", triton="_tanh({0})", helpers=("_tanh",),
                grad=("{g} * (1.0 - {out} * {out})",)),
    elementwise("gelu", "elementwise exact (erf) GELU, x * Phi(x), as nn.GELU()", F.gelu, _gelu,
                torch="torch.nn.functional.gelu({0})", python="(0.5 * {0} * (1 + math.erf({0} / math.sqrt(2))))",
                triton="_gelu({0})", helpers=("_gelu",),
                # d/dx x Phi(x) = Phi(x) + x phi(x)
                grad=("{g} * (0.5 * (1.0 + tl.erf({x0} * 0.7071067811865476)) + "
                      "{x0} * 0.3989422804014327 * tl.exp(-0.5 * {x0} * {x0}))",)),
    elementwise("minimum", "elementwise minimum", torch_ops.minimum, min, positional=("a", "b"),
                rule="minmax", absent="identity", torch="ops.minimum({0}, {1})", python="min({0}, {1})",
                triton="tl.minimum({0}, {1})", monotone=(1, 1), commutative=True,
                grad=("tl.where({x0} <= {x1}, {g}, 0.0)", "tl.where({x0} <= {x1}, 0.0, {g})")),
    elementwise("maximum", "elementwise maximum", torch_ops.maximum, max, positional=("a", "b"),
                rule="minmax", absent="identity", torch="ops.maximum({0}, {1})", python="max({0}, {1})",
                triton="tl.maximum({0}, {1})", monotone=(1, 1), commutative=True,
                grad=("tl.where({x0} >= {x1}, {g}, 0.0)", "tl.where({x0} >= {x1}, 0.0, {g})")),
    elementwise("where", "a where condition else b", _on_tensors(torch.where), lambda c, a, b: a if c else b,
                positional=("condition", "a", "b"), rule="where", triton_operands=("as_is", "auto", "auto"),
                linear=("fixed", "linear", "linear"),
                torch="torch.where({0}, {1}, {2})", python="({1} if {0} else {2})", triton="tl.where({0}, {1}, {2})",
                grad=(None, "tl.where({v0}, {g}, 0.0)", "tl.where({v0}, 0.0, {g})")),
    # rounding: piecewise constant (derivative 0), the identity on integers
    elementwise("floor", "elementwise floor: the largest integer <= x", torch.floor, _keep_int(math.floor),
                rule="same", integer_identity=True, grad=(None,),
                torch="torch.floor({0})", python="float(math.floor({0}))", triton="tl.floor({0})"),
    elementwise("ceil", "elementwise ceil: the smallest integer >= x", torch.ceil, _keep_int(math.ceil),
                rule="same", integer_identity=True, grad=(None,),
                torch="torch.ceil({0})", python="float(math.ceil({0}))", triton="tl.ceil({0})"),
    elementwise("round", "elementwise round, half to even (as torch.round)", torch.round, _keep_int(round),
                rule="same", integer_identity=True, grad=(None,),
                torch="torch.round({0})", python="float(round({0}))", triton="_round({0})", helpers=("_round",)),
    elementwise("trunc", "elementwise trunc: round towards zero", torch.trunc, _keep_int(math.trunc),
                rule="same", integer_identity=True, grad=(None,),
                torch="torch.trunc({0})", python="float(math.trunc({0}))", triton="_trunc({0})", helpers=("_trunc",)),
    # conversions (not called int/float: those name dtypes): to_int as Python's int() and torch's .long()
    elementwise("to_int", f"x as an integer: toward zero (as Python's int()), within +-2**{_INT_BITS}, NaN gives 0",
                torch_ops.to_int, _int_of, rule="int", grad=(None,), triton_operands="as_is",
                torch="ops.to_int({0})", triton="_to_int({0})", helpers=("_to_int",),
                python=f"(int(max(-{_INT_LIMIT}, min({_INT_LIMIT}, {{0}}))) if {{0}} == {{0}} else 0)"),
    elementwise("to_float", "x as a float (integers converted; floats unchanged)", torch_ops.to_float, float,
                rule="float", grad=("{g}",), linear="every", triton_operands="float",
                torch="ops.to_float({0})", python="float({0})", triton="{0}"),
)


# ----------------------------------------------------------------------------- structural ops

@dataclass(frozen=True)
class ReferenceContext:
    """What a structural op's reference meaning needs besides its arguments (aligned tensors)."""
    attrs: dict
    axis: dict                 # dim -> axis of the aligned layout
    feature: str | None        # the op's own last dim (row transforms: the feature dim)
    contracted: str | None     # the last dim of the first argument (what dot contracts)
    table: str | None          # the first argument's node id (gather: the table, named in its bounds check)
    device: Any
    dtype: Any


def _combined_keep(args, roles):
    keep = None
    for predicate, role in zip(args, roles):
        if role == "keep":
            keep = predicate if keep is None else keep & predicate
    return keep


def _ref_softmax(args, ctx):
    roles = ctx.attrs["roles"]
    sink = next((a for a, role in zip(args, roles) if role == "sinks"), None)
    return torch_ops.masked_softmax(args[0], _combined_keep(args, roles), ctx.axis["j"], sink)


def _ref_masked(args, ctx):
    return torch_ops.masked(args[0], _combined_keep(args, ctx.attrs["roles"]))


def _structural(name, positional, doc, rule, reference, absent="absent", linear=None, normaliser=None,
                dataflow=(), **keywords) -> Op:
    return Op(name, tuple(positional), doc, keywords, rule=rule, lowering="structural", reference=reference,
              absent=absent, linear=linear, normaliser=normaliser, dataflow=tuple(dataflow))


_STRUCTURAL = (
    _structural("dot", ["a", "b"], "contract the last dim of a with the same dim of b", "dot",
                lambda args, ctx: torch_ops.dot(args[0], args[1], ctx.axis[ctx.contracted]), absent="error"),
    _structural("softmax", ["x"], "softmax over j; keep: predicate(s), False entries get probability 0; sinks: an "
                "extra logit per row in the denominator only (a value without i or j; sinks=0 is softmax plus one)",
                "normaliser", _ref_softmax, absent="drop", normaliser="softmax", dataflow=("keep", "sinks"),
                keep=None, sinks=None, over="j"),
    _structural("masked", ["x"], "x where every keep-predicate holds, 0 elsewhere: a normaliser without row "
                "statistics (sigmoid attention: masked(sigmoid(s), keep=[...]))", "normaliser", _ref_masked,
                absent="drop", normaliser="masked", dataflow=("keep",), keep=None),
    _structural("gather", ["table", "index"], "table[index, ...]: a table gathered at integer index expressions",
                "gather", lambda args, ctx: torch_ops.gather(args[0].to(ctx.dtype), args[1:], ctx.table)),
    _structural("l2norm", ["x"], "x / max(||x||, eps) along the feature dim, in `groups` contiguous chunks",
                "row_transform", lambda args, ctx: torch_ops.l2norm(
                    args[0], ctx.axis[ctx.feature], ctx.attrs["groups"], ctx.attrs["eps"]),
                groups=1, eps=1e-12),
    _structural("rmsnorm", ["x"], "x * rsqrt(mean(x^2) + eps) along the feature dim", "row_transform",
                lambda args, ctx: torch_ops.rmsnorm(args[0], ctx.axis[ctx.feature], ctx.attrs["eps"]), eps=1e-6),
    _structural("rotary", ["x", "pos"], "rotary position embedding (rotate_half convention) at positions pos",
                "row_transform", lambda args, ctx: torch_ops.rotary(
                    args[0], torch.as_tensor(args[1], device=ctx.device), ctx.axis[ctx.feature], ctx.attrs["theta"]),
                theta=10000.0),
    _structural("xpos", ["x", "pos"], "xpos length scaling: x * sv**(pos/scale_base), divided when inverse",
                "row_transform", lambda args, ctx: torch_ops.xpos(
                    args[0], torch.as_tensor(args[1], device=ctx.device), ctx.axis[ctx.feature],
                    ctx.attrs["scale_base"], ctx.attrs["inverse"]),
                scale_base=512.0, inverse=False),
    _structural("mix_heads", ["x", "weight"], "mix the (streams*h) heads of a sample: weight[out_head, in_head]",
                "mix_heads", lambda args, ctx: torch_ops.mix_heads(
                    args[0], args[1], ctx.attrs["streams"], ctx.axis["b"], ctx.axis["h"]),
                absent="first", linear=("linear", "fixed"), streams=1),
)

OPS: dict[str, Op] = {op.name: op for op in _SYNTAX + _ELEMENTWISE + _STRUCTURAL}
"""Every op, by name."""
CALLABLE: dict[str, Op] = {name: op for name, op in OPS.items() if op.callable}
"""The ops a spec calls by name (`exp(x)`, `dot(q, k)`); the others are written with operators."""
SYNTAX: dict[str, Op] = {op.syntax: op for op in _SYNTAX if len(op.positional) == 2}
"""Binary operators by their Python symbol."""
UNARY_SYNTAX: dict[str, Op] = {op.syntax: op for op in _SYNTAX if len(op.positional) == 1}
"""Unary operators by their Python symbol (`-x`, `~x`)."""

# Python's spelling of each operator of the expression language; `a and b`, `a or b` and `not a` are
# `&`, `|` and `~` (predicates are tensors: they combine elementwise)
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**", ast.BitAnd: "&", ast.BitOr: "|", ast.And: "&", ast.Or: "|",
           ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
           ast.USub: "-", ast.Not: "~", ast.Invert: "~"}


def operator_op(operator: ast.AST) -> str:
    """The op a Python operator node (ast.Add, ast.Lt, ast.And, ast.USub, ...) of a spec expression is."""
    table = UNARY_SYNTAX if isinstance(operator, ast.unaryop) else SYNTAX
    return table[_SYMBOL[type(operator)]].name


def op(name: str) -> Op:
    """The op called `name`; KeyError names the graph op nobody declared (a compiler bug)."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"op '{name}' is not in the op registry (kernelsearch/ops.py)") from None


def unit_of(name: str):
    """The op's unit (see Op.unit), None when it has none or is no registered op."""
    return OPS[name].unit if name in OPS else None


def is_elementwise(name: str) -> bool:
    return name in OPS and OPS[name].lowering == "elementwise"


# ----------------------------------------------------------------------------- using an entry

def evaluate(name: str, args: list, dtype: str):
    """The reference meaning of elementwise op `name` on tensors and/or Python numbers; `dtype` is
    the node's inferred dtype (float | int | bool)."""
    entry = OPS[name]
    if entry.integer_identity and dtype == "int":
        return args[0]
    if any(isinstance(a, torch.Tensor) for a in args):
        return entry.tensor(*args)
    return entry.scalar(*args)


def render(name: str, form: str, args: list[str], dtype: str, constants=None, shape=None,
           nested: bool = False) -> str:
    """Source text of elementwise op `name` over argument texts, in `form` torch | python | triton.

    dtype: the node's dtype (integer forms differ for some ops); constants: each argument's
    folded value or None; shape: the result's Triton block shape (None for a scalar); nested:
    the text goes inside another expression (operator forms get parentheses)."""
    entry = OPS[name]
    if entry.integer_identity and dtype == "int":
        return args[0]
    template = getattr(entry, form)
    if form == "triton" and dtype == "int" and entry.triton_int:
        template = entry.triton_int
    if template is None:
        raise KeyError(f"op '{name}' has no {form} rendering")
    if callable(template):
        text = template(args, constants or [None] * len(args), shape)
    else:
        text = template.format(*args)
    return f"({text})" if nested and not _is_closed(text) else text


def _is_closed(text: str) -> bool:
    """`f(...)` or `(...)` as a whole: safe inside any expression without parentheses."""
    head = text.split("(", 1)[0]
    if not text.endswith(")") or not all(part.isidentifier() for part in head.split(".") if head):
        return False
    depth = 0
    for position, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and "(" in text[: position + 1]:
            return position == len(text) - 1
    return False


def triton_operand_mode(name: str, position: int) -> str:
    """How a Triton rendering wants argument `position`: float (loads cast to fp32) | as_is | auto
    (fp32 when the op's result is a float and the argument is not a predicate)."""
    modes = OPS[name].triton_operands
    return modes if isinstance(modes, str) else modes[position]


def gradient_terms(name: str) -> tuple:
    """The derivative templates of op `name`, one per argument (None: no gradient to it)."""
    entry = OPS[name]
    if entry.grad is None:
        raise KeyError(f"op '{name}' has no derivative rule")
    return entry.grad


def template_fields(template: str) -> tuple[str, ...]:
    """The placeholders a derivative template uses ({g}, {out}, {x0}, {v1}, ...), in order of appearance."""
    return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))


def differentiable() -> list[str]:
    return [name for name, entry in OPS.items() if entry.grad is not None]


# ----------------------------------------------------------------------------- Triton helpers

TRITON_HELPERS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (source, helpers it calls)
    "_floordiv": ('''
@triton.jit
def _floordiv(a, b):
    """Floor division for integers, whatever the hardware's // rounds to."""
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)
''', ()),
    "_floormod": ('''
@triton.jit
def _floormod(a, b):
    return a - _floordiv(a, b) * b
''', ("_floordiv",)),
    "_tanh": ('''
@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
''', ()),
    "_gelu": ('''
@triton.jit
def _gelu(x):
    """Exact GELU, x * Phi(x) (nn.GELU's default)."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
''', ()),
    "_pow": ('''
@triton.jit
def _pow(a, b):
    return tl.exp2(b * tl.log2(a))
''', ()),
    "_round": ('''
@triton.jit
def _round(x):
    """Round half to even (torch.round); x - floor(x) is exact in fp32, so ties are found exactly."""
    f = tl.floor(x)
    d = x - f
    odd = f - 2.0 * tl.floor(f * 0.5) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
''', ()),
    "_trunc": ('''
@triton.jit
def _trunc(x):
    return tl.where(x < 0.0, tl.ceil(x), tl.floor(x))
''', ()),
    "_to_int": (f'''
@triton.jit
def _to_int(x):
    """to_int(x): toward zero, within +-{_INT_LIMIT} (as torch_ops.to_int), NaN gives 0."""
    if x.dtype.is_floating():
        x = tl.where(x == x, tl.minimum(tl.maximum(x, -{float(_INT_LIMIT)!r}), {float(_INT_LIMIT)!r}), 0.0)
    else:
        x = tl.minimum(tl.maximum(x, -{_INT_LIMIT}), {_INT_LIMIT})
    return x.to(tl.int32)
''', ()),
}


def helper_closure(names) -> set[str]:
    """The Triton helpers `names` and the helpers they call."""
    wanted = set(names)
    pending = list(wanted)
    while pending:
        for needed in TRITON_HELPERS[pending.pop()][1]:
            if needed not in wanted:
                wanted.add(needed)
                pending.append(needed)
    return wanted


def triton_helpers(names=None) -> str:
    """Source of the Triton helpers `names` need (with what they call), in declaration order; all by default."""
    wanted = helper_closure(TRITON_HELPERS if names is None else names)
    return "\n\n".join(source.strip("\n") + "\n" for name, (source, _) in TRITON_HELPERS.items() if name in wanted)


def helpers_of(op_names) -> set[str]:
    """The Triton helpers the renderings of these ops may call (all their forms and derivatives)."""
    return {h for name in op_names if name in OPS for h in OPS[name].helpers}


def node_helpers(name: str, dtype: str, constants=None, derivative: bool = False) -> set[str]:
    """The Triton helpers that one node of elementwise op `name` calls: its rendering for this dtype
    and these constant arguments (x ** 2 is a product, a // b on floats needs no helper) and, with
    `derivative`, its derivative templates."""
    entry = OPS[name]
    arguments = [f"x{k}" for k in range(len(entry.positional))]
    texts = [render(name, "triton", arguments, dtype, constants, shape="[1]")]
    if derivative:
        texts += [t for t in entry.grad or () if t]
    return {h for h in entry.helpers if any(f"{h}(" in text for text in texts)}


def python_modules(op_names) -> set[str]:
    """The modules the Python renderings (host scalars) of these ops call: generated files import them."""
    return {"math" for name in op_names
            if name in OPS and isinstance(OPS[name].python, str) and "math." in OPS[name].python}
