"""Stage 0: read a spec file into a `Spec`, keeping a source location for every piece.

A spec is YAML with six sections:

    name: cosine_sim                     # identifier, becomes generated/<name>.py
    summary: one line                    # optional
    params:  {scale: 8.0, causal: true, k: {type: int, default: 1, doc: ...},
              s: {type: float, default: "D ** -0.5"}}     # a default may be a size expression
    inputs:  {q: [b, h, i, d], mask: {shape: [b, j], dtype: bool, optional: true}}
    graph:   {name: expression, ...}      # the dataflow, in the expression language (exprs.py)
    outputs: [o]
    tune:    {BLOCK_M: [16, 32, 64], ...}  # optional: the kernel's search space

YAML is composed into nodes (not loaded into plain dicts) so that every key and value keeps its
line and column; expressions are parsed with `ast` here and checked against a whitelist in
`exprs.py`. Nothing is evaluated.
"""
from __future__ import annotations

import ast
import hashlib
import keyword
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SourceLocation, SpecError
from . import exprs

SECTIONS = ("name", "summary", "params", "inputs", "graph", "outputs", "tune")
REQUIRED_SECTIONS = ("name", "inputs", "graph", "outputs")
PARAM_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
INPUT_DTYPES = ("float", "bool", "int")
# index dims of the attention problem; any other lower-case name in a shape is a feature/table dim
INDEX_DIMS = ("b", "h", "i", "j")
MAX_SPEC_BYTES = 256 * 1024
MAX_GRAPH_ENTRIES = 256
MAX_PARAMS = 64
MAX_INPUTS = 32
MAX_OPTIONAL_INPUTS = 8        # `check` compiles every combination of present optional inputs
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")   # used with fullmatch: `$` would accept "x\n"


def is_identifier(name) -> bool:
    """A name a spec may give to a param, input, dim, graph entry or output: ASCII, not a keyword."""
    return isinstance(name, str) and IDENTIFIER.fullmatch(name) is not None and not keyword.iskeyword(name)


def module_name_problem(name) -> str | None:
    """Why `name` cannot name generated/<name>.py (a module users import), or None."""
    if not isinstance(name, str) or IDENTIFIER.fullmatch(name) is None:
        return "is not an identifier (letters, digits and _, not starting with a digit)"
    if keyword.iskeyword(name):
        return "is a Python keyword (`import generated.<name>` would be a syntax error)"
    if name.startswith("__") and name.endswith("__"):
        return "is a dunder name (generated/__init__.py and the like belong to Python)"
    return None


@dataclass(frozen=True)
class Param:
    name: str
    type: str                       # bool | int | float | str
    default: Any                    # a literal, or an `ast.expr` over sizes (e.g. D ** -0.5)
    doc: str
    location: SourceLocation
    choices: tuple | None = None

    @property
    def default_is_expression(self) -> bool:
        return isinstance(self.default, ast.expr)


@dataclass(frozen=True)
class InputDecl:
    name: str
    shape: tuple[str, ...]          # dim names; a leading dim written `b?` may be omitted by callers
    optional_dims: frozenset[str]
    dtype: str                      # float | bool | int
    optional: bool
    differentiable: bool
    location: SourceLocation


@dataclass(frozen=True)
class GraphEntry:
    name: str
    source: str
    expr: ast.expr
    location: SourceLocation        # of the expression text


@dataclass(frozen=True)
class Spec:
    path: str
    name: str
    summary: str
    params: dict[str, Param]
    inputs: dict[str, InputDecl]
    graph: dict[str, GraphEntry]
    outputs: tuple[str, ...]
    output_locations: dict[str, SourceLocation]
    tune: dict[str, tuple]
    sha256: str
    location: SourceLocation        # of the document
    section_locations: dict[str, SourceLocation] = field(default_factory=dict)
    text: str = ""                  # the spec verbatim (generated/<variant>.py embeds it as a literal)

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        return tuple(n for n, d in self.inputs.items() if d.optional)


# ---------------------------------------------------------------------------- YAML with locations

def _loc(path: str, node: yaml.Node) -> SourceLocation:
    return SourceLocation(path, node.start_mark.line + 1, node.start_mark.column + 1)


def _scalar_value(path: str, node: yaml.ScalarNode) -> Any:
    """The Python value of a scalar node, resolved the way yaml.safe_load would."""
    try:
        return yaml.SafeLoader.construct_scalar(_CONSTRUCTOR, node) if node.tag.endswith(":str") else \
            _CONSTRUCTOR.construct_object(node, deep=True)
    except Exception:   # PyYAML's constructors fail in many ways (`!!int` with no value: IndexError)
        # an explicit tag (`!!int abc`, `!foo 1`, `!!python/...`), or a number too long for Python (> 4300 digits)
        text = node.value if len(node.value) <= 40 else node.value[:40] + "..."
        implicit = _CONSTRUCTOR.resolve(yaml.ScalarNode, node.value, (True, False)) == node.tag
        raise SpecError(f"cannot read {text!r} as a value with the YAML tag {node.tag!r}", _loc(path, node),
                        "write a shorter number" if implicit else "remove the tag (the `!...` before the value)")


def _show(value) -> str:
    """repr(value), also for integers too long to print (Python refuses more than 4300 digits)."""
    return repr(value) if not isinstance(value, int) or value.bit_length() < 1000 else \
        f"an integer of {value.bit_length()} bits"


class _Constructor(yaml.SafeLoader):
    def __init__(self):  # a constructor without a stream, used only to resolve scalars
        yaml.constructor.SafeConstructor.__init__(self)


_CONSTRUCTOR = _Constructor()
MAX_FLOW_DEPTH = 64


class _Loader(yaml.SafeLoader):
    """Refuses deeply nested [ { early: PyYAML's scanner is quadratic in their depth."""

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_FLOW_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"[ ] and {{ }} are nested more than {MAX_FLOW_DEPTH} deep",
                                            self.get_mark())
        super().fetch_flow_collection_start(TokenClass)


def _compose(path: str, text: str) -> yaml.Node:
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = SourceLocation(path, mark.line + 1, mark.column + 1) if mark else SourceLocation(path, 1, 1)
        context = e.context
        if context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            context += f" (started at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        what = " ".join(x for x in (context, e.problem) if x)
        raise SpecError(f"YAML syntax error: {what}", where,
                        "check indentation and quoting; expressions containing ':' or '#' must be quoted")
    except yaml.reader.ReaderError as e:   # a character YAML does not accept, at a character offset
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        code = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "\0")
        raise SpecError(f"YAML syntax error: the character U+{code:04X} is not allowed in a YAML file",
                        SourceLocation(path, line, column), "remove it (control characters are not allowed)")
    except yaml.YAMLError as e:
        raise SpecError(f"YAML syntax error: {e}", SourceLocation(path, 1, 1))
    except RecursionError:
        raise SpecError("the YAML document is nested too deeply", SourceLocation(path, 1, 1))
    if node is None:
        raise SpecError("the spec is empty", SourceLocation(path, 1, 1),
                        f"a spec is a mapping with the sections {', '.join(REQUIRED_SECTIONS)}")
    if not isinstance(node, yaml.MappingNode):
        raise SpecError(f"a spec must be a mapping of sections, not a {_kind(node)}", _loc(path, node),
                        f"start with `name: ...` and give the sections {', '.join(REQUIRED_SECTIONS)}")
    return node


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "scalar"


def _mapping(path: str, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """(key, key node, value node) of a mapping node, with unique string keys."""
    if not isinstance(node, yaml.MappingNode):
        raise SpecError(f"{what} must be a mapping, not a {_kind(node)}", _loc(path, node))
    seen: dict[str, yaml.Node] = {}
    items = []
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise SpecError(f"keys of {what} must be names, not a {_kind(key_node)}", _loc(path, key_node))
        key = str(key_node.value)
        if key in seen:
            first = _loc(path, seen[key])
            raise SpecError(f"duplicate key '{key}' in {what} (first defined at line {first.line})",
                            _loc(path, key_node), "each name may be defined once")
        seen[key] = key_node
        items.append((key, key_node, value_node))
    return items


def _scalar(path: str, node: yaml.Node, what: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise SpecError(f"{what} must be a single value, not a {_kind(node)}", _loc(path, node))
    return _scalar_value(path, node)


def _name_list(path: str, node: yaml.Node, what: str,
               example: str = "[b, h, i, d]") -> list[tuple[str, SourceLocation]]:
    if not isinstance(node, yaml.SequenceNode):
        raise SpecError(f"{what} must be a list like {example}, not a {_kind(node)}", _loc(path, node))
    names = []
    for item in node.value:
        value = _scalar(path, item, f"an entry of {what}")
        if not isinstance(value, str) or not is_identifier(value[:-1] if value.endswith("?") else value):
            raise SpecError(f"{what} must list names, got {_show(value)}", _loc(path, item),
                            "a name is an identifier that is not a Python keyword")
        names.append((value, _loc(path, item)))
    return names


_IDENTIFIER_HINT = "a name is letters, digits and _, not starting with a digit, and not a Python keyword"


def _not_a_name(name: str) -> str:
    return "is a Python keyword" if keyword.iskeyword(name) else "is not an identifier"


def _suggest(name: str, options) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(sorted(options))}"


# ---------------------------------------------------------------------------- sections

def _parse_params(path: str, node: yaml.Node) -> dict[str, Param]:
    params = {}
    items = _mapping(path, node, "params")
    if len(items) > MAX_PARAMS:
        raise SpecError(f"the spec has {len(items)} params; at most {MAX_PARAMS} are allowed", _loc(path, node))
    for name, key_node, value_node in items:
        where = _loc(path, key_node)
        if not is_identifier(name):
            raise SpecError(f"param name '{name}' {_not_a_name(name)}", where, _IDENTIFIER_HINT)
        if name in exprs.RESERVED_NAMES:
            raise SpecError(f"param name '{name}' is reserved (an index variable or size)", where,
                            "choose another name")
        doc, choices, declared_type = "", None, None
        if isinstance(value_node, yaml.MappingNode):
            fields = {k: (kn, vn) for k, kn, vn in _mapping(path, value_node, f"param '{name}'")}
            for k, (kn, _) in fields.items():
                if k not in ("type", "default", "doc", "choices"):
                    raise SpecError(f"unknown field '{k}' in param '{name}'", _loc(path, kn),
                                    "a param has the fields type, default, doc, choices")
            if "default" not in fields:
                raise SpecError(f"param '{name}' has no default", where, "give it `default: <value>`")
            default_node = fields["default"][1]
            default = _scalar(path, default_node, f"the default of param '{name}'")
            if "type" in fields:
                declared_type = _scalar(path, fields["type"][1], f"the type of param '{name}'")
                if declared_type not in PARAM_TYPES:
                    raise SpecError(f"unknown param type {declared_type!r}", _loc(path, fields["type"][1]),
                                    f"use one of {', '.join(PARAM_TYPES)}")
            if "doc" in fields:
                doc = str(_scalar(path, fields["doc"][1], "a doc"))
            if "choices" in fields:
                cn = fields["choices"][1]
                if not isinstance(cn, yaml.SequenceNode):
                    raise SpecError("choices must be a list", _loc(path, cn))
                choices = tuple(_scalar(path, c, "a choice") for c in cn.value)
        else:
            default_node = value_node
            default = _scalar(path, value_node, f"param '{name}'")
        default_where = _loc(path, default_node)
        if isinstance(default, str) and declared_type in ("int", "float"):
            # a default that is an expression over sizes, e.g. "D ** -0.5"
            expr = exprs.parse(default, path, default_where, quoted=_is_quoted(default_node))
            exprs.check_size_expression(expr, path, default_where)
            default = expr
        elif default is None:
            raise SpecError(f"param '{name}' has no default value", default_where)
        else:
            inferred = _infer_param_type(default)
            if inferred is None:
                raise SpecError(f"param '{name}' has a default of unsupported type {type(default).__name__}",
                                default_where, "a param is a bool, int, float or str")
            if declared_type is None:
                declared_type = inferred
            elif not _fits(declared_type, default):
                raise SpecError(f"param '{name}' is declared {declared_type} but its default is {_show(default)}",
                                default_where, f"give a {declared_type} default")
            _check_finite(name, default, default_where)
        if choices is not None and not isinstance(default, ast.expr) and default not in choices:
            raise SpecError(f"the default {_show(default)} of param '{name}' is not among its choices {list(choices)}",
                            default_where)
        params[name] = Param(name, declared_type, default, doc, where, choices)
    return params


def _is_quoted(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')


def _infer_param_type(value) -> str | None:
    for type_name in ("bool", "int", "float", "str"):
        if type(value) is PARAM_TYPES[type_name]:
            return type_name
    return None


def _fits(type_name: str, value) -> bool:
    if type_name == "float":
        return type(value) in (int, float)
    return type(value) is PARAM_TYPES[type_name]


def coerce_param(param: Param, value, where: SourceLocation | None = None):
    """A value given at load time for `param`, checked against its type."""
    if not _fits(param.type, value) or (param.type == "int" and isinstance(value, bool)):
        raise SpecError(f"param '{param.name}' is a {param.type}, got {_show(value)} ({type(value).__name__})",
                        where or param.location, f"pass a {param.type}")
    if param.choices is not None and value not in param.choices:
        raise SpecError(f"param '{param.name}' must be one of {list(param.choices)}, got {_show(value)}",
                        where or param.location)
    if param.type == "float":
        try:
            value = float(value)
        except OverflowError:
            raise SpecError(f"param '{param.name}' is a float, and {_show(value)} is too large for one",
                            where or param.location)
        _check_finite(param.name, value, where or param.location)
    return value


def _check_finite(name: str, value, where: SourceLocation) -> None:
    """A float param is a finite number: inf and nan would be different results on every backend."""
    if type(value) is float and not math.isfinite(value):
        raise SpecError(f"param '{name}' is {value!r}; a param must be a finite number", where,
                        "give a finite value (a large one, e.g. 1e9, where you mean 'no limit')")


def _check_param_defaults(params: dict[str, Param], inputs: dict[str, InputDecl]) -> None:
    """Default expressions use only sizes and other params, and do not refer to each other in a cycle."""
    sizes = set(exprs.SIZES) | {dim.upper() for decl in inputs.values() for dim in decl.shape}
    uses = {}
    for param in params.values():
        if not param.default_is_expression:
            continue
        uses[param.name] = []
        ops_called = {id(n.func) for n in ast.walk(param.default) if isinstance(n, ast.Call)}   # `log` in -log(J)
        for node in ast.walk(param.default):
            if not isinstance(node, ast.Name) or id(node) in ops_called:
                continue
            if node.id in params:
                uses[param.name].append(node.id)
            elif node.id not in sizes:
                what = "an input" if node.id in inputs else "not a size or a param"
                raise SpecError(f"the default of param '{param.name}' uses '{node.id}' ({what}); a param default "
                                "is made of sizes and other params", node.location,
                                _suggest(node.id, sizes | set(params)))
    done: set[str] = set()
    for start in uses:
        path, pending = [start], [iter(uses[start])]
        while path:
            used = next(pending[-1], None)
            if used is None:
                done.add(path.pop())
                pending.pop()
            elif used in path:
                cycle = path[path.index(used):] + [used]
                raise SpecError(f"param defaults refer to each other in a cycle: {' -> '.join(cycle)}",
                                params[used].location, "give one of them a number as its default")
            elif used not in done:
                path.append(used)
                pending.append(iter(uses.get(used, ())))


def _parse_inputs(path: str, node: yaml.Node) -> dict[str, InputDecl]:
    inputs = {}
    items = _mapping(path, node, "inputs")
    if len(items) > MAX_INPUTS:
        raise SpecError(f"the spec has {len(items)} inputs; at most {MAX_INPUTS} are allowed", _loc(path, node))
    for name, key_node, value_node in items:
        where = _loc(path, key_node)
        if not is_identifier(name) or name in exprs.RESERVED_NAMES:
            raise SpecError(f"input name '{name}' is not allowed", where,
                            "an input name is an identifier that is not an index variable, size or op")
        dtype, optional, differentiable = "float", False, None
        if isinstance(value_node, yaml.MappingNode):
            fields = {k: (kn, vn) for k, kn, vn in _mapping(path, value_node, f"input '{name}'")}
            for k, (kn, _) in fields.items():
                if k not in ("shape", "dtype", "optional", "differentiable", "doc"):
                    raise SpecError(f"unknown field '{k}' in input '{name}'", _loc(path, kn),
                                    "an input has the fields shape, dtype, optional, differentiable, doc")
            if "shape" not in fields:
                raise SpecError(f"input '{name}' has no shape", where, "give it `shape: [b, h, i, d]`")
            shape_node = fields["shape"][1]
            if "dtype" in fields:
                dtype = _scalar(path, fields["dtype"][1], "a dtype")
                if dtype not in INPUT_DTYPES:
                    raise SpecError(f"unknown input dtype {dtype!r}", _loc(path, fields["dtype"][1]),
                                    f"use one of {', '.join(INPUT_DTYPES)}")
            if "optional" in fields:
                optional = _scalar(path, fields["optional"][1], "optional")
                if not isinstance(optional, bool):
                    raise SpecError("`optional` must be true or false", _loc(path, fields["optional"][1]))
            if "differentiable" in fields:
                differentiable = _scalar(path, fields["differentiable"][1], "differentiable")
                if not isinstance(differentiable, bool):
                    raise SpecError("`differentiable` must be true or false",
                                    _loc(path, fields["differentiable"][1]))
        else:
            shape_node = value_node
        dims = _name_list(path, shape_node, f"the shape of input '{name}'")
        shape, optional_dims = [], set()
        for position, (dim, dim_where) in enumerate(dims):
            if dim.endswith("?"):
                if position != 0:
                    raise SpecError(f"only the leading dim of an input may be optional ('{dim}')", dim_where)
                optional_dims.add(dim[:-1])
                dim = dim[:-1]
            if dim in shape:
                raise SpecError(f"dim '{dim}' appears twice in the shape of input '{name}'", dim_where)
            if dim.upper() == dim:
                raise SpecError(f"dims are lower-case names ('{dim}' is upper case: upper case names are sizes)",
                                dim_where, f"write '{dim.lower()}'")
            shape.append(dim)
        if differentiable is None:
            differentiable = dtype == "float"
        if differentiable and dtype != "float":
            raise SpecError(f"input '{name}' has dtype {dtype} and cannot be differentiable", where)
        inputs[name] = InputDecl(name, tuple(shape), frozenset(optional_dims), dtype, optional,
                                 differentiable, where)
    optional = [decl for decl in inputs.values() if decl.optional]
    if len(optional) > MAX_OPTIONAL_INPUTS:
        raise SpecError(f"the spec has {len(optional)} optional inputs; at most {MAX_OPTIONAL_INPUTS} are allowed",
                        optional[MAX_OPTIONAL_INPUTS].location, "every combination of them is compiled and checked")
    for required, shape in (("q", ("b", "h", "i")), ("k", ("b", "h", "j")), ("v", ("b", "h", "j"))):
        if required not in inputs:
            raise SpecError(f"the inputs have no '{required}'", _loc(path, node),
                            "every spec takes q: [b, h, i, d], k: [b, h, j, d], v: [b, h, j, d]")
        decl = inputs[required]
        if decl.shape[:3] != shape or len(decl.shape) != 4 or decl.optional:
            raise SpecError(f"input '{required}' must be a required [{', '.join(shape)}, <feature dim>] tensor, "
                            f"got [{', '.join(decl.shape)}]", decl.location)
    return inputs


def _parse_graph(path: str, node: yaml.Node) -> dict[str, GraphEntry]:
    entries = {}
    items = _mapping(path, node, "graph")
    if len(items) > MAX_GRAPH_ENTRIES:
        raise SpecError(f"the graph has {len(items)} entries; at most {MAX_GRAPH_ENTRIES} are allowed",
                        _loc(path, node))
    if not items:
        raise SpecError("the graph is empty", _loc(path, node), "define at least `o: dot(softmax(...), v)`")
    for name, key_node, value_node in items:
        where = _loc(path, key_node)
        if not is_identifier(name):
            raise SpecError(f"graph name '{name}' {_not_a_name(name)}", where, _IDENTIFIER_HINT)
        if name in exprs.RESERVED_NAMES:
            raise SpecError(f"graph name '{name}' is reserved (an index variable or size)", where,
                            "choose another name")
        if not isinstance(value_node, yaml.ScalarNode):
            raise SpecError(f"graph entry '{name}' must be an expression, not a {_kind(value_node)}",
                            _loc(path, value_node), "write it on one line, e.g. `s: dot(q, k) * scale`")
        source = value_node.value if value_node.tag.endswith(":str") else str(_scalar_value(path, value_node))
        expr_where = _loc(path, value_node)
        expr = exprs.parse(str(source), path, expr_where, quoted=_is_quoted(value_node))
        entries[name] = GraphEntry(name, str(source), expr, expr_where)
    return entries


def _parse_tune(path: str, node: yaml.Node) -> dict[str, tuple]:
    """The spec's search space: every knob declared by a backend, every choice one it allows."""
    from .backends.knobs import check_choices   # the backends' knob declarations: the one source
    tune = {}
    for knob, key_node, value_node in _mapping(path, node, "tune"):
        if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
            raise SpecError(f"tune knob '{knob}' must be a non-empty list of choices", _loc(path, value_node),
                            f"e.g. `{knob}: [16, 32, 64]`")
        problem = check_choices(knob, ())
        if problem:
            raise SpecError(f"tune: {problem}", _loc(path, key_node))
        choices = []
        for item in value_node.value:
            value = _scalar(path, item, f"a choice of '{knob}'")
            if type(value) is int and value.bit_length() > 64:   # no knob takes it (and its repr may not print)
                raise SpecError(f"a choice of '{knob}' is too large ({_show(value)})", _loc(path, item))
            problem = check_choices(knob, (value,))
            if problem:
                raise SpecError(f"tune: {problem}", _loc(path, item))
            if value in choices:
                raise SpecError(f"choice {_show(value)} of '{knob}' is listed twice", _loc(path, item))
            choices.append(value)
        tune[knob] = tuple(choices)
    return tune


def parse_spec(text: str, path: str = "<spec>") -> Spec:
    """Parse spec text. Raises SpecError (with file:line:column) on anything malformed."""
    if len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
        raise SpecError(f"the spec is larger than {MAX_SPEC_BYTES // 1024} KiB", SourceLocation(path, 1, 1),
                        "a spec describes one attention variant in a few dozen lines")
    root = _compose(path, text)
    sections = {}
    section_locations = {}
    for key, key_node, value_node in _mapping(path, root, "the spec"):
        if key not in SECTIONS:
            raise SpecError(f"unknown section '{key}'", _loc(path, key_node), _suggest(key, SECTIONS))
        sections[key] = value_node
        section_locations[key] = _loc(path, key_node)
    for required in REQUIRED_SECTIONS:
        if required not in sections:
            raise SpecError(f"the spec has no '{required}' section", _loc(path, root),
                            f"a spec needs the sections {', '.join(REQUIRED_SECTIONS)}")
    name = _scalar(path, sections["name"], "name")
    problem = module_name_problem(name)
    if problem:
        raise SpecError(f"name must be an identifier (it names generated/<name>.py): {_show(name)} {problem}",
                        _loc(path, sections["name"]), "e.g. `name: cosine_sim`")
    summary = str(_scalar(path, sections["summary"], "summary")) if "summary" in sections else ""
    params = _parse_params(path, sections["params"]) if "params" in sections else {}
    inputs = _parse_inputs(path, sections["inputs"])
    for clash in set(params) & set(inputs):
        raise SpecError(f"'{clash}' is both a param and an input", inputs[clash].location)
    _check_param_defaults(params, inputs)
    graph = _parse_graph(path, sections["graph"])
    for clash in (set(params) | set(inputs)) & set(graph):
        raise SpecError(f"graph name '{clash}' is already a param or an input", graph[clash].location,
                        "give the graph entry another name")
    outputs_node = sections["outputs"]
    if isinstance(outputs_node, yaml.ScalarNode) and outputs_node.value and outputs_node.tag.endswith(":str"):
        if not is_identifier(outputs_node.value):
            raise SpecError(f"outputs must list names, got {_show(outputs_node.value)}", _loc(path, outputs_node),
                            _IDENTIFIER_HINT)
        outputs = [(str(outputs_node.value), _loc(path, outputs_node))]
    else:
        outputs = _name_list(path, outputs_node, "outputs", "[o]")
    if len(outputs) != 1:
        raise SpecError(f"exactly one output is supported, got {len(outputs)}", _loc(path, outputs_node),
                        "list the attention output, e.g. `outputs: [o]`")
    tune = _parse_tune(path, sections["tune"]) if "tune" in sections else {}
    return Spec(
        path=path, name=name, summary=summary, params=params, inputs=inputs, graph=graph,
        outputs=tuple(n for n, _ in outputs), output_locations={n: w for n, w in outputs}, tune=tune,
        sha256=hashlib.sha256(text.encode()).hexdigest(), location=_loc(path, root),
        section_locations=section_locations, text=text,
    )


def load_spec(path: str | Path) -> Spec:
    return parse_spec(read_spec_text(path), str(path))


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file, read without trusting it: a regular file, at most MAX_SPEC_BYTES.

    The file is stat-ed before it is opened (a FIFO would block the open, a device never ends)
    and at most one byte more than the limit is read (/proc files report size 0).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"spec_path must be a path (str or pathlib.Path), got {type(path).__name__}")
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SpecError(f"no such spec file: {path}", None, "give the path of a .yaml spec, e.g. specs/softmax.yaml")
    except (OSError, ValueError) as e:   # ValueError: a NUL byte in the path
        raise SpecError(f"cannot read the spec file {path}: {getattr(e, 'strerror', None) or e}", None)
    if stat.S_ISDIR(mode):
        raise SpecError(f"{path} is a directory, not a spec file", None)
    if not stat.S_ISREG(mode):
        raise SpecError(f"{path} is not a regular file (a device, FIFO or socket), not a spec file", None,
                        "give the path of a .yaml spec file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"cannot read the spec file {path}: {e.strerror or e}", None)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"the spec is larger than {MAX_SPEC_BYTES // 1024} KiB", SourceLocation(str(path), 1, 1),
                        "a spec describes one attention variant in a few dozen lines")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"the spec is not UTF-8 text ({e.reason} at byte {e.start})", SourceLocation(str(path), 1, 1))
    return text.replace("\r\n", "\n").replace("\r", "\n")   # universal newlines, as open() in text mode
