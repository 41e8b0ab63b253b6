"""The dataflow IR: a networkx DiGraph of op nodes, each knowing its named dims and dtype.

Every value has a set of *named* dims - b, h, i, j (batch, head, query, key) and feature or table
dims such as d or n - kept in one canonical order (`Graph.dim_order`). Elementwise ops broadcast
by name, so `s + mask` with s: [b, h, i, j] and mask: [b, j] needs no reshaping in the spec.

Passes (kernelsearch/passes/) are pure functions Graph -> Graph; they copy before changing.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import networkx as nx

from .errors import SourceLocation

# the graph's own nodes (leaves and plumbing); every op is declared in ops.py (the op registry)
LEAF_OPS = ("input", "param", "const", "index", "size", "absent")
STAGES = ("constant", "q_prologue", "k_prologue", "score", "keep", "softmax", "post_softmax", "epilogue")


@dataclass(frozen=True)
class Node:
    op: str
    args: tuple[str, ...] = ()
    attrs: dict = field(default_factory=dict)
    location: SourceLocation | None = None
    name: str | None = None          # the spec's name for it (graph entry or input), if any
    dims: tuple[str, ...] = ()
    dtype: str = "float"             # float | int | bool
    stage: str | None = None
    order: int = 0                   # creation order, for deterministic output

    def with_(self, **changes) -> "Node":
        return replace(self, **changes)

    def describe(self) -> str:
        label = self.name or self.op
        attrs = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items() if not k.startswith("_"))
        return f"{label} = {self.op}({', '.join(self.args)}{', ' if attrs and self.args else ''}{attrs})"


@dataclass(frozen=True)
class KeyBlockBounds:
    """Which keys a block of query rows [i_start, i_end) can keep, from the keep-predicates.

    `lower`/`upper` are expressions (ast, over sizes, params and the placeholder `i`) giving the
    smallest / largest kept key of row i; both are non-decreasing in i, so a query block needs keys
    lower(i_start) .. upper(i_end - 1). None means unbounded on that side.
    """
    lower: Any = None
    upper: Any = None
    conjuncts_used: tuple[str, ...] = ()

    @property
    def skips_blocks(self) -> bool:
        return self.lower is not None or self.upper is not None


@dataclass(frozen=True)
class BlockMaskPlan:
    """Which (query block, key block) tiles keep anything, from keep conjuncts the interval bounds
    do not capture (passes/block_mask.py). Computed at run time per block size (and shape): once
    and cached when the conjuncts read only indices, sizes and params; per call when they read
    inputs (document ids). The kernels then visit only the listed tiles, and tiles every row of
    which the conjuncts keep whole run without their masks.

    `conjuncts` make the mask: every conjunct over both i and j, and the ones the bounds came
    from; `unbounded` are the conjuncts over i and j the bounds do not capture (why there is a
    mask). Each conjunct gives per tile "keeps something" / "keeps everything" by one rule, and
    the mask is their conjunction: `bounded` from the key-block bounds (no evaluation), `ranges`
    ((conjunct, query side, key side): `a[i] == b[j]`) from the min and max of each side per
    block, `evaluated` over [rows, keys] chunks reduced per tile. `dims` the batch/head dims it
    varies over (b, h); `inputs` the inputs it reads (empty: cached per shape and block size)."""
    conjuncts: tuple[str, ...]
    unbounded: tuple[str, ...]
    dims: tuple[str, ...]
    inputs: tuple[str, ...]
    bounded: tuple[str, ...] = ()
    ranges: tuple[tuple[str, str, str], ...] = ()
    evaluated: tuple[str, ...] = ()
    streams: int | None = None       # heads in tile: a program holds a sample's streams x heads; the
                                     # kernels' lists are per sample (any / all over its channels)

    @property
    def per_call(self) -> bool:
        return bool(self.inputs)


@dataclass(frozen=True)
class Plan:
    """How a graph runs: every schedule decision, made once by passes/plan.py. Code generators
    render it; none of them decides any of this again. Node ids refer to the graph's nodes.
    `passes.plan.describe_plan` prints it (`kernelsearch check`)."""
    schedule: str                    # one_pass | heads_in_tile | two_pass (passes/schedule.py)
    sweeps: int                      # 1: online softmax; 2: exact row statistics first, then p exactly
    sweeps_reason: str               # why, in words
    heads_in_tile: bool              # a program holds every (stream, head) channel of a sample
    head_groups: int | None          # streams whose heads are mixed together; None: no single grouping
    accumulators: tuple[str, ...]    # the dot(p, v) nodes: what the key loop accumulates over j
    prepass: tuple[str, ...]         # key-side dot operands a prepass writes once (not recomputed per query tile)
    host: tuple[str, ...]            # scalars computed from sizes and params on the host, passed to kernels
    key_bounds: KeyBlockBounds       # which key blocks a query block needs, and from which conjuncts
    delta_sweep: bool                # backward: rowsum(p * dp) needs a sweep of its own (p transformed first)
    normalisers: tuple = ()          # the row normalisers (normalisers.Normaliser: kind, scores, sink, keeps)
    reduced_by: tuple = ()           # one sweep: per accumulator, the position in `normalisers` of the one it is
                                     # linear in (its online rescaling and final division); () with two sweeps

    @property
    def statistics(self) -> tuple:
        """The normalisers that keep row statistics (softmaxes), in order: the planes of the saved lse."""
        return tuple(n for n in self.normalisers if n.statistics)

    pack_kv_group: bool = False      # grouped KV heads: a forward program's rows are (query, head of the KV
                                     # group) pairs, so each K/V tile is loaded once for the whole group
    pack_reason: str = ""            # why (not), in words
    # tiles listed from keep conjuncts the bounds miss (None: the bounds are all); left out of the
    # repr (so plans without one keep their fingerprints) and fingerprinted on its own
    block_mask: BlockMaskPlan | None = field(default=None, repr=False)


@dataclass
class Graph:
    nx_graph: nx.DiGraph
    spec: Any                        # the Spec it came from
    output: str                      # node id of the output
    params: dict                     # param name -> value (literal) after specialisation
    present: frozenset               # optional inputs present in this specialisation
    dim_order: tuple[str, ...] = ()
    plan: Plan | None = None         # how it runs (passes/plan.py, the last pass)
    notes: dict = field(default_factory=dict)   # facts passes learned (e.g. logit bounds)

    # -- the plan's two most read decisions
    @property
    def schedule(self) -> str | None:
        return self.plan.schedule if self.plan else None

    @property
    def key_bounds(self) -> KeyBlockBounds | None:
        return self.plan.key_bounds if self.plan else None

    # -- access
    def node(self, node_id: str) -> Node:
        return self.nx_graph.nodes[node_id]["node"]

    def __contains__(self, node_id: str) -> bool:
        return node_id in self.nx_graph

    def ids(self) -> list[str]:
        """Node ids in a deterministic topological order (arguments before users)."""
        return list(nx.lexicographical_topological_sort(
            self.nx_graph, key=lambda n: (self.node(n).order, n)))

    def nodes(self) -> Iterator[tuple[str, Node]]:
        for node_id in self.ids():
            yield node_id, self.node(node_id)

    def users(self, node_id: str) -> list[str]:
        return sorted(self.nx_graph.successors(node_id), key=lambda n: self.node(n).order)

    def find(self, op: str) -> list[str]:
        return [n for n, node in self.nodes() if node.op == op]

    def upstream(self, node_id: str) -> set[str]:
        return nx.ancestors(self.nx_graph, node_id) | {node_id}

    def downstream(self, node_id: str) -> set[str]:
        return nx.descendants(self.nx_graph, node_id) | {node_id}

    # -- building (used by passes on their own copy)
    def copy(self) -> "Graph":
        clone = copy.copy(self)
        clone.nx_graph = self.nx_graph.copy()
        clone.notes = dict(self.notes)
        return clone

    def set(self, node_id: str, node: Node) -> None:
        """Add or replace a node; its incoming edges follow its args."""
        if node_id in self.nx_graph:
            for pred in list(self.nx_graph.predecessors(node_id)):
                self.nx_graph.remove_edge(pred, node_id)
        self.nx_graph.add_node(node_id, node=node)
        for arg in node.args:
            self.nx_graph.add_edge(arg, node_id)

    def add_intermediate(self, owner: str, node: Node) -> str:
        """Add a node a pass computes for the graph entry `owner` (or one of its intermediates): id
        `<entry>.<n>` as the builder names intermediates (codegen/names.py), ordered after every node."""
        entry = owner.split(".")[0]
        order = max((self.node(n).order for n in self.nx_graph), default=0) + 1
        while f"{entry}.{order}" in self.nx_graph:
            order += 1
        self.set(f"{entry}.{order}", node.with_(order=order))
        return f"{entry}.{order}"

    def replace_uses(self, old: str, new: str) -> None:
        """Point every user of `old` at `new` (and the output too)."""
        for user in self.users(old):
            node = self.node(user)
            self.set(user, node.with_(args=tuple(new if a == old else a for a in node.args)))
        if self.output == old:
            self.output = new

    def remove_dead(self) -> None:
        live = self.upstream(self.output)
        self.nx_graph.remove_nodes_from([n for n in list(self.nx_graph) if n not in live])

    def dump(self) -> str:
        lines = []
        for node_id, node in self.nodes():
            dims = f"[{', '.join(node.dims)}]" if node.dims else "[]"
            stage = f"  <{node.stage}>" if node.stage else ""
            lines.append(f"  {node_id:<14} {node.dtype:<5} {dims:<16} {node.describe()}{stage}")
        header = [f"graph {self.spec.name}: output {self.output}"]
        return "\n".join(header + lines)

    def to_dot(self) -> str:
        lines = [f'digraph "{self.spec.name}" {{', "  rankdir=TB; node [shape=box, fontname=monospace];"]
        colours = {"q_prologue": "lightblue", "k_prologue": "lightyellow", "score": "orange", "keep": "pink",
                   "softmax": "red", "post_softmax": "salmon", "epilogue": "lightgreen", "constant": "grey90"}
        for node_id, node in self.nodes():
            label = f"{node_id}\\n{node.op} [{', '.join(node.dims)}]"
            colour = colours.get(node.stage or "", "white")
            lines.append(f'  "{node_id}" [label="{label}", style=filled, fillcolor="{colour}"];')
        for a, b in self.nx_graph.edges:
            lines.append(f'  "{a}" -> "{b}";')
        lines.append("}")
        return "\n".join(lines)


def _block_mask_line(graph: Graph) -> list[str]:
    mask = getattr(graph.plan, "block_mask", None)
    return [f"block mask {mask!r}"] if mask is not None else []


def fingerprint(graph: Graph) -> str:
    """A hash of everything code generation reads from a folded, scheduled graph: specialisations
    (param values, present inputs) that fold to the same graph share it, and so share their
    generated files. Source locations are left out (they do not change the code)."""
    import hashlib
    spec = graph.spec
    lines = [f"variant {spec.name}", f"output {graph.output}", f"plan {graph.plan!r}",
             f"dims {graph.dim_order}", *_block_mask_line(graph),
             f"notes {sorted((k, repr(v)) for k, v in graph.notes.items())}"]
    for node_id, node in graph.nodes():
        attrs = sorted((k, repr(v)) for k, v in node.attrs.items())
        lines.append(f"{node_id} {node.op} {node.args} {attrs} {node.dims} {node.dtype} {node.stage}")
    for name, decl in spec.inputs.items():   # declarations shape the code (a core graph's spec has its cuts)
        if name in ("q", "k", "v") or name in graph.nx_graph:
            lines.append(f"{name} declared {decl.shape} {decl.dtype} {sorted(decl.optional_dims)} {decl.optional}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
