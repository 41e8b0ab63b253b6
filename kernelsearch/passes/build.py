"""Pass 1, build: the spec's named expressions become op nodes of one dataflow graph.

Resolves every name (graph entry, input, param, index variable, size), reports undefined
names and reference cycles (naming the cycle), and lowers Python syntax to ops. Keyword
arguments of ops that must be known at compile time (groups=, streams=, ...) become nodes too,
listed in `attrs["static"]`, so that constant folding can resolve them like anything else.
"""
from __future__ import annotations

import ast

import networkx as nx

from .. import nearest, ops
from ..errors import SpecError
from ..exprs import INDEX_VARIABLES, OPS, SIZES
from ..ir import Graph, Node

# keyword arguments evaluated on the graph (tensors; ops.Op.dataflow); every other keyword is static
_DATAFLOW_KEYWORDS = {(op.name, keyword) for op in ops.OPS.values() for keyword in op.dataflow}


class _Builder:
    def __init__(self, spec):
        self.spec = spec
        self.graph = Graph(nx.DiGraph(), spec, output="", params={}, present=frozenset())
        self.counter = 0
        self.building: list[str] = []       # graph entries being built, for cycle reports
        self.sizes = {name.upper() for decl in spec.inputs.values() for name in decl.shape} | set(SIZES)

    def add(self, node_id: str, node: Node) -> str:
        self.counter += 1
        self.graph.set(node_id, node.with_(order=self.counter))
        return node_id

    def temp(self, owner: str, node: Node) -> str:
        return self.add(f"{owner}.{self.counter + 1}", node)

    # -- names
    def name(self, name: str, expr: ast.expr, owner: str) -> str:
        where = expr.location
        if name in self.building:   # an entry is added to the graph only once built
            cycle = self.building[self.building.index(name):] + [name]
            raise SpecError(f"the graph has a cycle: {' -> '.join(cycle)}", self.spec.graph[name].location,
                            "a graph entry cannot depend on itself")
        if name in self.graph:
            return name
        spec = self.spec
        if name in spec.graph:
            return self.entry(name)
        if name in spec.inputs:
            decl = spec.inputs[name]
            return self.add(name, Node("input", attrs={"name": name}, location=decl.location, name=name,
                                       dims=decl.shape, dtype=decl.dtype))
        if name in spec.params:
            param = spec.params[name]
            return self.add(name, Node("param", attrs={"name": name}, location=param.location, name=name))
        if name in INDEX_VARIABLES:
            return self.add(name, Node("index", attrs={"dim": name}, location=where, dims=(name,), dtype="int"))
        if name in self.sizes:
            return self.add(name, Node("size", attrs={"dim": name.lower()}, location=where, dtype="int"))
        if name in ("True", "False", "None"):
            raise AssertionError("constants are ast.Constant")
        known = set(spec.graph) | set(spec.inputs) | set(spec.params) | set(INDEX_VARIABLES) | self.sizes
        raise SpecError(f"undefined name '{name}' (in the definition of '{owner}')", where,
                        nearest.undefined_name(name, known))

    def entry(self, name: str) -> str:
        entry = self.spec.graph[name]
        self.building.append(name)
        node_id = self.expr(entry.expr, name)
        self.building.pop()
        # the entry's own name labels the node that computes it
        if node_id != name:
            node = self.graph.node(node_id)
            if node.op in ("input", "param", "index", "size") or node_id in self.spec.graph:
                node = Node("alias", (node_id,), location=entry.location)  # `x: q` - a renaming
                self.counter += 1
                self.graph.set(name, node.with_(name=name, order=self.counter))
            else:
                self.graph.nx_graph = nx.relabel_nodes(self.graph.nx_graph, {node_id: name})
                self.graph.set(name, self.graph.node(name).with_(name=name, location=entry.location))
        return name

    # -- expressions
    def expr(self, e: ast.expr, owner: str) -> str:
        where = e.location
        if isinstance(e, ast.Name):
            return self.name(e.id, e, owner)
        if isinstance(e, ast.Constant):
            if e.value is None:
                return self.temp(owner, Node("absent", location=where))
            return self.temp(owner, Node("const", attrs={"value": e.value}, location=where))
        if isinstance(e, ast.BinOp):
            a, b = self.expr(e.left, owner), self.expr(e.right, owner)
            return self.temp(owner, Node(ops.operator_op(e.op), (a, b), location=where))
        if isinstance(e, ast.UnaryOp):
            x = self.expr(e.operand, owner)
            if isinstance(e.op, ast.UAdd):
                return x
            return self.temp(owner, Node(ops.operator_op(e.op), (x,), location=where))
        if isinstance(e, ast.BoolOp):
            op = ops.operator_op(e.op)
            result = self.expr(e.values[0], owner)
            for value in e.values[1:]:
                result = self.temp(owner, Node(op, (result, self.expr(value, owner)), location=where))
            return result
        if isinstance(e, ast.Compare):
            # a < b <= c  ==  (a < b) & (b <= c)
            result, left, conjunction = None, self.expr(e.left, owner), ops.operator_op(ast.And())
            for op, comparator in zip(e.ops, e.comparators):
                right = self.expr(comparator, owner)
                term = self.temp(owner, Node(ops.operator_op(op), (left, right), location=where))
                result = term if result is None else self.temp(owner, Node(conjunction, (result, term), location=where))
                left = right
            return result
        if isinstance(e, ast.IfExp):
            condition = self.expr(e.test, owner)
            a, b = self.expr(e.body, owner), self.expr(e.orelse, owner)
            return self.temp(owner, Node("select", (condition, a, b), location=where))
        if isinstance(e, ast.Subscript):
            if not isinstance(e.value, ast.Name) or e.value.id not in self.spec.inputs:
                raise SpecError("only inputs can be indexed (a bias table gathered by index expressions)",
                                where, self._indexing_hint(e.value))
            table = self.name(e.value.id, e.value, owner)
            indices = e.slice.elts if isinstance(e.slice, ast.Tuple) else [e.slice]
            decl = self.spec.inputs[e.value.id]
            if len(indices) != len(decl.shape):
                raise SpecError(f"'{decl.name}' has {len(decl.shape)} dims [{', '.join(decl.shape)}] "
                                f"but is indexed with {len(indices)}", where,
                                f"give one index expression per dim of {decl.name}")
            args = (table,) + tuple(self.expr(index, owner) for index in indices)
            return self.temp(owner, Node("gather", args, location=where))
        if isinstance(e, ast.Call):
            return self.call(e, owner)
        if isinstance(e, (ast.List, ast.Tuple)):
            raise SpecError("a list may only appear as a normaliser's keep=[...]", where,
                            "combine predicates with &, or pass them as softmax(s, keep=[a, b]) or masked(x, keep=[a, b])")
        raise SpecError(f"{type(e).__name__} is not allowed here", where)

    def _indexing_hint(self, value: ast.expr) -> str:
        name = value.id if isinstance(value, ast.Name) else None
        if name in self.spec.graph or name in self.spec.params:
            return (f"'{name}' needs no index: values broadcast by their dim names "
                    "(write it as it is; gather only from an input table, e.g. `pos_bias_table[h, abs(i - j)]`)")
        if name is not None:
            return (f"'{name}' is not declared: declare it under inputs with its dims (e.g. `{name}: {{shape: [b, i], "
                    f"dtype: int}}`) and use it by name - inputs broadcast by their dims (`q_doc == k_doc`); "
                    "index only tables, e.g. `pos_bias_table[h, abs(i - j)]`")
        return "e.g. `pos_bias_table[h, abs(i - j)]`"

    def call(self, e: ast.Call, owner: str) -> str:
        where = e.location
        op = e.func.id
        signature = OPS[op]
        args = tuple(self.expr(a, owner) for a in e.args)
        roles = signature.positional
        static = {}
        for keyword in e.keywords:
            if (op, keyword.arg) in _DATAFLOW_KEYWORDS:
                many = keyword.arg == "keep"    # keep=[a, b] or keep=a; every other dataflow keyword is one value
                if not many and isinstance(keyword.value, (ast.List, ast.Tuple)):
                    raise SpecError(f"{op}(..., {keyword.arg}=...) takes one value, not a list", keyword.value.location,
                                    f"e.g. {keyword.arg}=sinks (an input [h]) or {keyword.arg}=0")
                values = keyword.value.elts if isinstance(keyword.value, (ast.List, ast.Tuple)) else [keyword.value]
                args = args + tuple(self.expr(v, owner) for v in values)
                roles = roles + (keyword.arg,) * len(values)
            elif keyword.arg == "over":
                if not (isinstance(keyword.value, ast.Name) and keyword.value.id == "j"):
                    raise SpecError("softmax is taken over the key dim: over=j", keyword.value.location,
                                    "write softmax(s, over=j) or leave `over` out")
            else:
                static[keyword.arg] = self.expr(keyword.value, owner)
        for name, default in signature.keywords.items():
            if name not in static and (op, name) not in _DATAFLOW_KEYWORDS and name != "over":
                static[name] = self.temp(owner, Node("const", attrs={"value": default}, location=where))
        # static keyword nodes are arguments too (so that folding sees them); they follow the data args
        data_arity = len(args)
        attrs = {"static": tuple(static), "data_arity": data_arity}
        if signature.dataflow:      # which argument is which (normalisers.roles)
            attrs["roles"] = roles
        node = Node(op, args + tuple(static.values()), attrs=attrs, location=where)
        return self.temp(owner, node)


# how deeply expressions may nest through the entries they use (the builder and some passes recurse)
MAX_NESTING = 200


def _check_nesting(spec) -> None:
    """Cycles and over-deep nesting through graph entries, found without recursion."""
    uses = {}       # entry -> [(entry it uses, the depth of that use in its expression)]
    own = {}        # entry -> the depth of its own expression
    for name, entry in spec.graph.items():
        stack, uses[name], own[name] = [(entry.expr, 1)], [], 1
        while stack:
            node, depth = stack.pop()
            own[name] = max(own[name], depth)
            if isinstance(node, ast.Name) and node.id in spec.graph:
                uses[name].append((node.id, depth))
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    nesting: dict[str, int] = {}
    for root in spec.graph:
        path, pending = [root], [iter(uses[root])]
        while path:
            used = next(pending[-1], None)
            if used is None:
                name = path.pop()
                pending.pop()
                nesting[name] = max([own[name]] + [depth + nesting[u] for u, depth in uses[name]])
                if nesting[name] > MAX_NESTING:
                    raise SpecError(f"the graph is nested too deeply: '{name}' nests {nesting[name]} levels of "
                                    f"expressions through the entries it uses; at most {MAX_NESTING} are allowed",
                                    spec.graph[name].location, "a spec describes one attention in a few entries")
            elif used[0] in path:
                cycle = path[path.index(used[0]):] + [used[0]]
                raise SpecError(f"the graph has a cycle: {' -> '.join(cycle)}", spec.graph[used[0]].location,
                                "a graph entry cannot depend on itself")
            elif used[0] not in nesting:
                path.append(used[0])
                pending.append(iter(uses[used[0]]))


def build(spec) -> Graph:
    builder = _Builder(spec)
    (output,) = spec.outputs
    if output not in spec.graph:
        raise SpecError(f"output '{output}' is not defined in the graph", spec.output_locations[output],
                        f"define `{output}: ...` in graph, or list one of: {', '.join(spec.graph)}")
    _check_nesting(spec)
    builder.graph.output = builder.entry(output)
    for name, entry in spec.graph.items():
        if name not in builder.graph:
            raise SpecError(f"graph entry '{name}' is never used by the output '{output}'", entry.location,
                            "remove it, or use it in the expression that computes the output")
    for name, decl in spec.inputs.items():
        if name not in builder.graph:
            raise SpecError(f"input '{name}' is declared but never used", decl.location,
                            "remove it from inputs, or use it in the graph")
    return builder.graph
