"""Codegen: a scheduled graph -> the source of a plain PyTorch function (no I/O, returns strings).

Two lowerings of the same graph:

    materialized   every value computed whole; scores are [b, h, i, j]. Fast for short sequences.
    chunked        query rows in chunks of CHUNK_M (0: all at once), and for each, the keys its
                   rows can keep (the key-block bounds: causal and windowed specs skip the rest)
                   in chunks of CHUNK_N, with an online softmax (one pass), or with exact row
                   statistics first when probabilities are transformed after softmax (two
                   passes): memory grows with the sequence length, not its square.

Values live in the aligned layout of torch_ops (one axis per layout dim, size 1 where a value does
not vary), so every op is one line of ordinary torch. Grouped KV heads: in the generated lowerings
the head axis is two, (KV head, member of its group) = [H_kv, G]; per-query-head values fill both,
per-KV-head ones (k, v, a [b, h, j] bias) have size 1 on the second, so they broadcast over the
group and are never copied G times (torch.einsum folds the group into the rows of its matmul). The generated code runs under
torch.compile(fullgraph=True): no data-dependent Python control flow, no host syncs.
"""
from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass

from .. import normalisers, ops
from ..ir import Graph
from ..inputs import per_key_head
from ..layout import layout_of, raw_inputs
from ..passes import library
from ..passes.bounds import render_bound, scalar_walk
from . import names

LOOP_STAGES = ("score", "keep")
LOWERINGS = ("materialized", "chunked")   # every graph has these; library.lowerings(graph) may add sdpa, flex


def lowerings(graph: Graph) -> tuple[str, ...]:
    """The torch backend's lowerings of this graph: the generated ones, then the library kernels
    that can express it (passes/library.py)."""
    return LOWERINGS + library.lowerings(graph)


LEAD = names.argument("q")     # the tensor whose dtype and device every allocation follows
GROUP = "h.group"              # the layout axis after h in the grouped layout: a query head's place in its KV group
GROUP_SIZES = {"h": "KV_H", GROUP: "G"}   # their sizes' variables in generated code (H stays q's heads)


def variable(graph: Graph, node_id: str) -> str:
    """The variable of a node in generated code (codegen/names.py: never a spec name raw)."""
    node = graph.node(node_id)
    if node.op == "size":
        return names.size(node.attrs["dim"])
    return names.value(node_id)


class _Emitter:
    """grouped: the head axis is (KV head, group member) - the materialized and chunked lowerings;
    the library kernels (and the block mask) take k and v with their KV heads as they are (enable_gqa)."""

    def __init__(self, graph: Graph, device: str = f"{LEAD}.device", grouped: bool = False, library: bool = False):
        self.graph = graph
        self.device = device          # the expression of the device index tensors are made on
        layout = layout_of(graph)
        self.grouped = grouped and "h" in layout
        self.library = library        # a library lowering: per-KV-head inputs besides k, v are read per query head
        if self.grouped:
            at = layout.index("h") + 1
            layout = layout[:at] + (GROUP,) + layout[at:]
        self.layout = layout
        self.axis = {dim: n for n, dim in enumerate(self.layout)}
        self.raw = raw_inputs(graph)

    def size(self, dim: str) -> str:
        """The variable holding the size of a layout axis."""
        return GROUP_SIZES[dim] if self.grouped and dim in GROUP_SIZES else names.size(dim)

    def with_group(self, dims) -> tuple:
        """A value's layout axes: its dims, and the group axis with h."""
        return tuple(dims) + ((GROUP,) if self.grouped and "h" in dims else ())

    def dims_comment(self, node_id: str) -> str:
        dims = self.graph.node(node_id).dims
        return f"  # [{', '.join(dims)}]" if dims else ""

    def expression(self, node_id: str, name) -> str:
        """The right-hand side computing node_id; name(arg_id) gives the variable of an argument."""
        graph, node = self.graph, self.graph.node(node_id)
        op = node.op
        args = [name(a) for a in node.args]
        if op == "const":
            return repr(node.attrs["value"])
        if op == "index":
            dim = node.attrs["dim"]
            if dim == "h" and self.grouped:   # query head = KV head * G + member
                return f"ops.head_index(KV_H, G, {self.axis[dim]}, {len(self.layout)}, {self.device})"
            return f"ops.index({names.size(dim)}, {self.axis[dim]}, {len(self.layout)}, {self.device})"
        if ops.is_elementwise(op):   # the op's torch rendering (ops.py); Python's on host scalars
            scalar = all(not graph.node(a).dims for a in node.args)
            return ops.render(op, "python" if scalar else "torch", args, node.dtype)
        if op == "gather":
            return f"ops.gather_unchecked({args[0]}, [{', '.join(args[1:])}])"
        if op == "dot":
            contracted = graph.node(node.args[0]).dims[-1]
            return f"ops.dot({args[0]}, {args[1]}, {self.axis[contracted]})"
        feature = self.axis.get(node.dims[-1]) if node.dims else None
        if op == "l2norm":
            return f"ops.l2norm({args[0]}, {feature}, groups={node.attrs['groups']}, eps={node.attrs['eps']!r})"
        if op == "rmsnorm":
            return f"ops.rmsnorm({args[0]}, {feature}, eps={node.attrs['eps']!r})"
        if op == "rotary":
            return f"ops.rotary({args[0]}, {args[1]}, {feature}, theta={node.attrs['theta']!r})"
        if op == "xpos":
            return (f"ops.xpos({args[0]}, {args[1]}, {feature}, scale_base={float(node.attrs['scale_base'])!r}, "
                    f"inverse={node.attrs['inverse']})")
        if op == "mix_heads":
            group = ", group=G" if self.grouped else ""
            return (f"ops.mix_heads({args[0]}, {args[1]}, streams={node.attrs['streams']}, "
                    f"batch_axis={self.axis['b']}, head_axis={self.axis['h']}{group})")
        raise NotImplementedError(f"torch codegen: no rule for op '{op}'")


def _size_lines(graph: Graph, emitter: _Emitter, arguments: list[str]) -> list[str]:
    """Read every size the code needs off the inputs: `B, H, I, size_d = in_q.shape`-style lines."""
    needed = set(emitter.layout)
    lines, known = [], set()
    for name in arguments:
        decl = graph.spec.inputs[name]
        if name in emitter.raw and name not in ("q", "k", "v"):
            continue
        dims = [d for d in decl.shape if d in needed and d not in known and d not in decl.optional_dims]
        if not dims:
            continue
        targets = ", ".join(names.size(d) if d in dims else "_" for d in decl.shape)
        lines.append(f"{targets} = {names.argument(name)}.shape")
        known.update(dims)
    if emitter.grouped:    # k: [b, h_kv, j, d] (spec.py: k is always that); G query heads per KV head
        lines.append(f"KV_H = {names.argument('k')}.shape[1]")
        lines.append("G = H // KV_H if KV_H else 1  # query heads per KV head (inputs.check_call: KV_H divides H)")
    return lines


def graph_inputs(graph: Graph) -> list[str]:
    """The inputs the folded graph reads, in the spec's order: what its generated functions take
    (an optional input folded away - e.g. a bias switched off by a param - is not an argument)."""
    return [n for n in graph.spec.inputs if n in ("q", "k", "v") or n in graph and graph.node(n).op == "input"]


def torch_source(graph: Graph, lowering: str) -> str:
    """Source of `def <lowering>(in_q, in_k, in_v, <inputs>, CHUNK_N=..., CHUNK_M=...)` for this graph."""
    if lowering not in lowerings(graph):
        raise ValueError(f"lowering {lowering!r} cannot run this graph; its lowerings are {lowerings(graph)}")
    in_library = lowering in library.LIBRARY_LOWERINGS
    emitter = _Emitter(graph, grouped=not in_library, library=in_library)
    arguments = graph_inputs(graph)
    extra = ", CHUNK_N: int = 128, CHUNK_M: int = 0" if lowering == "chunked" else ""
    lines = [f"def {lowering}({', '.join(names.argument(n) for n in arguments)}{extra}):"]
    lines.append(f'    """The {lowering} lowering (schedule {graph.schedule}){_WHAT.get(lowering, "")}."""')
    body = _size_lines(graph, emitter, arguments)
    layout = ", ".join(emitter.layout)
    body.append(f"# aligned layout [{layout}]: one axis per dim, size 1 where a value does not vary")
    body += _input_lines(graph, emitter, arguments)
    steps = []
    if lowering == "materialized":
        body += _materialized_body(graph, emitter)
    elif lowering in library.LIBRARY_LOWERINGS:
        body += _library_body(graph, emitter, lowering)
    else:
        steps, chunked_lines = _chunked_body(graph, emitter)
        body += chunked_lines
        lines[0] = lines[0][:-2] + "".join(f", {step.name}={step.name}" for step in steps) \
            + (", block_mask=block_mask" if graph.plan.block_mask is not None else "") + "):"
    lines += ["    " + line if line else "" for line in body]
    return "".join(step.source + "\n\n" for step in steps) + "\n".join(lines) + "\n"


def _input_lines(graph: Graph, emitter: _Emitter, arguments, cast: bool = True) -> list[str]:
    """Each input as a value of the aligned layout (tables and weights as they are); `cast`: float
    inputs in q's dtype."""
    body = []
    for input_name in arguments:
        argument, value = names.argument(input_name), variable(graph, input_name)
        if input_name in emitter.raw:
            body.append(f"{value} = {argument}  # a table or weight, used as it is")
            continue
        dims = graph.spec.inputs[input_name].shape
        optional = graph.spec.inputs[input_name].optional_dims
        if optional:
            body.append(f"if {argument}.ndim == {len(dims) - 1}:")
            body.append(f"    {argument} = {argument}.unsqueeze(0)")
        to = f".to({LEAD}.dtype)" if cast and graph.spec.inputs[input_name].dtype == "float" and input_name != "q" else ""
        group = ""
        if "h" in dims and emitter.grouped:   # per KV head: size 1 along the group axis (broadcast, no copy)
            group = ", group=1" if per_key_head(dims) else ", group=G"
        elif emitter.library and per_key_head(dims) and input_name not in ("k", "v"):
            # library kernels take grouped k and v (enable_gqa); another per-KV-head input (a [b, h, j]
            # bias) is read per query head in their masks
            argument = f"ops.query_heads({argument}, {dims.index('h') - len(dims)}, H)"   # from the end: b? may be left out
        body.append(f"{value} = ops.align({argument}{to}, {dims!r}, {tuple(emitter.layout)!r}{group})")
    return body


def _out_lines(graph: Graph, emitter: _Emitter, result: str) -> list[str]:
    out_dims = graph.node(graph.output).dims
    kept = emitter.with_group(out_dims)
    squeeze = tuple(n for n, d in enumerate(emitter.layout) if d not in kept)
    if emitter.grouped and "h" in out_dims:   # [.., KV_H, G, ..] -> [.., H, ..]
        return [f"return ops.merge_groups({result}.squeeze({squeeze}), {out_dims.index('h')}, KV_H, G)"
                f"  # [{', '.join(out_dims)}]"]
    return [f"return {result}.squeeze({squeeze})  # [{', '.join(out_dims)}]"]


def _materialized_body(graph: Graph, emitter: _Emitter) -> list[str]:
    lines = []
    name = lambda n: variable(graph, n)  # noqa: E731
    for node_id, node in graph.nodes():
        if node.op in ("input", "size"):
            continue
        if normalisers.is_normaliser(node.op):
            lines.append(f"{name(node_id)} = {_normalised(normalisers.normaliser(graph, node_id), name, emitter)}"
                         f"{emitter.dims_comment(node_id)}")
            continue
        lines.append(f"{name(node_id)} = {emitter.expression(node_id, name)}{emitter.dims_comment(node_id)}")
    return lines + _out_lines(graph, emitter, name(graph.output))


def _normalised(n, name, emitter: _Emitter) -> str:
    """A normaliser computed whole (kernelsearch/normalisers.py)."""
    keep = _combine_keeps(n.keeps, name)
    if not n.statistics:
        return f"ops.masked({name(n.scores)}, {keep})"
    sink = "" if n.sink is None else f", {name(n.sink)}"
    return f"ops.masked_softmax({name(n.scores)}, {keep}, {emitter.axis['j']}{sink})"


def _combine_keeps(keeps, name) -> str:
    if not keeps:
        return "None"
    return " & ".join(name(k) for k in keeps) if len(keeps) > 1 else name(keeps[0])


@dataclass(frozen=True)
class StepFunction:
    """A generated function holding the body of one (query chunk, key chunk) step: the loops stay
    in Python and call it, so torch.compile compiles one step (per chunk shape) instead of
    unrolling every chunk - compile time does not grow with the sequence length."""
    name: str
    source: str
    parameters: tuple   # what it reads from the enclosing lowering, in order of first use
    carried: tuple      # what it updates and returns

    def call(self) -> list[str]:
        return _wrapped(f"{', '.join(self.carried)} = {self.name}(", self.parameters, ")")


def _wrapped(opening: str, items, closing: str, width: int = 100) -> list[str]:
    """`opening item, item, ...closing`, continued on lines indented by four when long."""
    lines, current = [], opening
    for n, item in enumerate(items):
        text = item + (", " if n < len(items) - 1 else "")
        if len(current) + len(text) > width and current.strip() and current != opening:
            lines.append(current.rstrip())
            current = "    "
        current += text
    return lines + [current + closing]


# names generated code reads from the module (imports) or Python itself, never passed to a step
_GLOBAL_NAMES = frozenset(dir(builtins)) | {"torch", "ops", "math"}


def free_names(lines: list[str]) -> list[str]:
    """Names straight-line code reads before assigning them (Python's ast, not text matching),
    in order of first use: what a function holding these lines must take."""
    free: list[str] = []
    assigned: set[str] = set()
    for statement in ast.parse("\n".join(lines)).body:
        value = statement.value if isinstance(statement, (ast.Assign, ast.AugAssign, ast.Return)) else statement
        for node in ast.walk(value) if value is not None else ():
            if isinstance(node, ast.Name) and node.id not in assigned and node.id not in _GLOBAL_NAMES \
                    and node.id not in free:
                free.append(node.id)
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, ast.AugAssign) else []
        assigned.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return free


def step_function(name: str, doc: str, body: list[str], carried: tuple) -> StepFunction:
    parameters = tuple(free_names(body))
    source = "\n".join(_wrapped(f"def {name}(", parameters, "):") + [f'    """{doc}"""']
                       + ["    " + line for line in body] + [f"    return {', '.join(carried)}"]) + "\n"
    return StepFunction(name, source, parameters, carried)


def step_names(graph: Graph) -> tuple[str, ...]:
    """The step functions of the chunked lowering (the plan's sweeps: statistics first when two,
    and both sweeps in one step for query chunks whose keys fit one key chunk)."""
    return ("statistics_step", "chunk_step", "whole_rows_step") if graph.plan.sweeps == 2 else ("chunk_step",)


def _chunked_body(graph: Graph, emitter: _Emitter) -> tuple[list[StepFunction], list[str]]:
    """Query rows in chunks, keys in chunks: prologues once, scores per tile, online softmax (one
    sweep) or exact row statistics first (two), as the plan says - each softmax its own row
    statistics (row_max, row_sum, suffixed by its position), masked normalisers none. Returns
    the step functions (the work of one tile) and the lowering's body (prologues, the loops, the
    epilogue)."""
    plan = graph.plan
    norms = plan.normalisers
    norm_nodes = {n.node for n in norms}
    axis_i, axis_j = emitter.axis["i"], emitter.axis["j"]
    after = set().union(*(graph.downstream(n) for n in norm_nodes)) - norm_nodes
    accs = plan.accumulators   # the key reductions: dot(p, v)
    loop_nodes = [n for n, node in graph.nodes()
                  if node.stage in LOOP_STAGES and node.op not in ("input",)]
    post_nodes = [n for n, node in graph.nodes() if node.stage == "post_softmax" and n not in accs]
    loop_set = set(loop_nodes) | set(post_nodes) | norm_nodes
    epilogue = [n for n, node in graph.nodes() if n in after and n not in accs and n not in post_nodes]
    before = [n for n, node in graph.nodes()
              if n not in loop_set and n not in epilogue and n not in accs and node.op not in ("input", "size")]

    def key_sliced(n: str) -> str:
        return names.derived("chunk", variable(graph, n))

    def row_sliced(n: str) -> str:
        return names.derived("rows", variable(graph, n))

    def name(n: str) -> str:
        # inside the loops, values computed before them are read by query chunk (i) and key chunk (j)
        if n not in loop_set and "j" in graph.node(n).dims:
            return key_sliced(n)
        if n not in loop_set and "i" in graph.node(n).dims:
            return row_sliced(n)
        return variable(graph, n)

    lines = [variable(graph, n) + " = " + emitter.expression(n, lambda a: variable(graph, a))
             + emitter.dims_comment(n) for n in before]
    used = {a for n in loop_set | set(accs) for a in graph.node(n).args if a not in loop_set}
    chunk_inputs = sorted({a for a in used if "j" in graph.node(a).dims}, key=lambda n: graph.node(n).order)
    row_inputs = sorted({a for a in used if "i" in graph.node(a).dims and "j" not in graph.node(a).dims},
                        key=lambda n: graph.node(n).order)
    first_key, last_key = key_range(graph, "CHUNK_N")
    # the generator's own names of each normaliser's statistics and each accumulator
    suffix = {n.node: "" if k == 0 else f"_{k}" for k, n in enumerate(norms)}
    statistics = [n for n in norms if n.statistics]
    acc_name = {a: "accumulator" + ("" if k == 0 else f"_{k}") for k, a in enumerate(accs)}
    out_list = {a: "outputs" + ("" if k == 0 else f"_{k}") for k, a in enumerate(accs)}
    row_state = tuple(f"row_{what}{suffix[n.node]}" for n in statistics for what in ("max", "sum"))

    def key_loop(step: StepFunction, keys: str = f"range({first_key}, {last_key}, CHUNK_N)") -> list[str]:
        out = [f"for key_start in {keys}:  # the keys these rows can keep",
               "    key_end = min(key_start + CHUNK_N, J)"]
        if graph.plan.block_mask is not None:
            out += ["    if visits is not None and not visits[query_start // row_step][key_start // CHUNK_N]:",
                    "        continue  # the block mask: these rows keep no key of this chunk"]
        for n in chunk_inputs:   # a value over i and j (a bias) is cut to the query rows too
            if key_sliced(n) not in step.parameters:
                continue
            index = [":"] * axis_j + ["key_start:key_end"]
            if "i" in graph.node(n).dims:
                index[axis_i] = "query_start:query_end"
            out.append(f"    {key_sliced(n)} = {variable(graph, n)}[{', '.join(index)}]")
        return out + ["    " + line for line in step.call()]

    logits = [f"{name(n)} = {emitter.expression(n, name)}{emitter.dims_comment(n)}" for n in loop_nodes]

    def logits_line(n) -> str:
        keep = _combine_keeps(n.keeps, name)
        masked = name(n.scores) if keep == "None" else f"{name(n.scores)}.masked_fill(~({keep}), float('-inf'))"
        return f"logits{suffix[n.node]} = {masked}  # dropped keys: -inf"

    def masked_logits(n) -> list[str]:
        x = suffix[n.node]
        return [logits_line(n),
                f"chunk_max{x} = torch.maximum(row_max{x}, logits{x}.amax({axis_j}, keepdim=True))",
                f"safe_max{x} = torch.where(torch.isfinite(chunk_max{x}), chunk_max{x}, torch.zeros_like(chunk_max{x}))"]

    def nothing_kept_lines() -> list[str]:
        """Pass 2 divides by the exact row sums: 1 where a row kept nothing (its weights are all 0)."""
        return [f"row_sum{suffix[n.node]} = torch.where(row_sum{suffix[n.node]} > 0, row_sum{suffix[n.node]}, "
                f"torch.ones_like(row_sum{suffix[n.node]}))" for n in statistics]

    post = [f"{name(n)} = {emitter.expression(n, name)}{emitter.dims_comment(n)}" for n in post_nodes]
    if plan.sweeps == 1:
        body = list(logits)
        for n in norms:
            x, p = suffix[n.node], variable(graph, n.node)
            if not n.statistics:
                body.append(f"{p} = {_normalised(n, name, emitter)}{emitter.dims_comment(n.node)}")
                continue
            body += masked_logits(n) + [
                f"{p} = torch.exp(logits{x} - safe_max{x})  # unnormalised: divided by row_sum{x} at the end",
                f"rescale{x} = torch.exp(row_max{x} - safe_max{x})  # 0 while a row has kept nothing",
                f"row_sum{x} = row_sum{x} * rescale{x} + {p}.sum({axis_j}, keepdim=True)",
            ]
        body += post   # linear in the normaliser's p (the plan says so): applied to the unnormalised weights
        for a, k in zip(accs, plan.reduced_by):
            probabilities, values = graph.node(a).args
            rescale = f" * rescale{suffix[norms[k].node]}" if norms[k].statistics else ""
            body.append(f"{acc_name[a]} = {acc_name[a]}{rescale} + ops.dot({name(probabilities)}, {name(values)}, "
                        f"{axis_j})")
        body += [f"row_max{suffix[n.node]} = chunk_max{suffix[n.node]}" for n in statistics]
        steps = [step_function("chunk_step", "One tile of the online softmax: row statistics and accumulator "
                               "updated by one key chunk.", body, row_state + tuple(acc_name[a] for a in accs))]
    else:
        statistics_lines = []
        for n in statistics:
            x = suffix[n.node]
            statistics_lines += masked_logits(n) + [
                f"row_sum{x} = row_sum{x} * torch.exp(row_max{x} - safe_max{x}) + torch.exp(logits{x} - safe_max{x})"
                f".sum({axis_j}, keepdim=True)",
                f"row_max{x} = chunk_max{x}",
            ]
        def normalised(masked_logits_known: bool) -> list[str]:
            lines = []
            for n in norms:
                x, p = suffix[n.node], variable(graph, n.node)
                if not n.statistics:
                    lines.append(f"{p} = {_normalised(n, name, emitter)}{emitter.dims_comment(n.node)}")
                    continue
                lines += ([] if masked_logits_known else [logits_line(n)]) + [
                    f"{p} = torch.exp(logits{x} - safe_max{x}) / row_sum{x}{emitter.dims_comment(n.node)}"]
            lines += post
            for a in accs:
                probabilities, values = graph.node(a).args
                lines.append(f"{acc_name[a]} = {acc_name[a]} + ops.dot({name(probabilities)}, {name(values)}, "
                             f"{axis_j})")
            return lines

        accumulated = tuple(acc_name[a] for a in accs)
        steps = [step_function("statistics_step", "Pass 1, one tile: the exact row max and sum updated by one key "
                               "chunk.", logits + statistics_lines, row_state),
                 step_function("chunk_step", "Pass 2, one tile: normalised probabilities, what follows softmax, "
                               "and the key reduction.", logits + normalised(False), accumulated),
                 step_function("whole_rows_step", "Both passes over one key chunk holding every key the rows keep: "
                               "the scores computed once.", logits + statistics_lines + nothing_kept_lines()
                               + normalised(True), accumulated)]
    assert tuple(s.name for s in steps) == step_names(graph)

    def shape_of(dims):
        dims = emitter.with_group(dims)
        return "[" + ", ".join("query_rows" if d == "i" and d in dims else emitter.size(d) if d in dims else "1"
                               for d in emitter.layout) + "]"

    lines.append("# query rows in chunks of CHUNK_M (0: all), each over the key chunks its rows can keep")
    lines.append("row_step = CHUNK_M if 0 < CHUNK_M < I else max(I, 1)")
    if graph.plan.block_mask is not None:
        call = block_mask_call(graph, "row_step", "CHUNK_N", f"{LEAD}.device")
        lines += ["# the plan's block mask, the chunks as its blocks: (query chunk, key chunk) pairs that keep nothing",
                  "# are skipped (not while torch.compile traces a caller: no host sync there; the masks still apply)",
                  "visits = None if block_mask is None or torch.compiler.is_compiling() else \\",
                  f"    {call}.visited_tiles()"]
    lines += [f"{out_list[a]} = []" for a in accs]
    lines.append("for query_start in range(0, I, row_step):")
    body = ["query_end = min(query_start + row_step, I)", "query_rows = query_end - query_start"]
    for n in row_inputs:
        index = ", ".join([":"] * axis_i + ["query_start:query_end"])
        body.append(f"{row_sliced(n)} = {variable(graph, n)}[{index}]")
    allocate = f"dtype={LEAD}.dtype, device={LEAD}.device"
    for n in statistics:
        x = suffix[n.node]
        score_dims = [d for d in graph.node(n.scores).dims if d != "j"]
        shape = shape_of(score_dims)
        if n.sink is None:
            body.append(f"row_max{x} = torch.full({shape}, float('-inf'), {allocate})  # per row: [{', '.join(score_dims)}]")
            body.append(f"row_sum{x} = torch.zeros({shape}, {allocate})")
        else:   # the sink is a logit every row starts with: exp(sink - row_max) = 1 in the sum
            body.append(f"row_max{x} = torch.zeros({shape}, {allocate}) + {name(n.sink)}  # per row: "
                        f"[{', '.join(score_dims)}], from the sink")
            body.append(f"row_sum{x} = torch.ones({shape}, {allocate})")
    for a in accs:
        body.append(f"{acc_name[a]} = torch.zeros({shape_of(graph.node(a).dims)}, {allocate})")
    if plan.sweeps == 1:
        body += key_loop(steps[0])
        body.append("# rows that kept no key give 0")
        for a, k in zip(accs, plan.reduced_by):
            if norms[k].statistics:
                total = f"row_sum{suffix[norms[k].node]}"
                body.append(f"{out_list[a]}.append({acc_name[a]} / torch.where({total} > 0, {total}, "
                            f"torch.ones_like({total})))")
            else:
                body.append(f"{out_list[a]}.append({acc_name[a]})")
    else:
        # pass 1: exact row statistics; pass 2: normalised probabilities, transformed, times v
        body.append(f"key_chunks = range({first_key}, {last_key}, CHUNK_N)")
        body.append("if len(key_chunks) == 1:  # one key chunk holds the rows' keys: both passes in one step")
        body += ["    " + line for line in key_loop(steps[2], "key_chunks")]
        body.append("else:")
        passes = ["# pass 1: row max and sum of every head"] + key_loop(steps[0], "key_chunks")
        for n in statistics:
            x = suffix[n.node]
            passes.append(f"safe_max{x} = torch.where(torch.isfinite(row_max{x}), row_max{x}, "
                          f"torch.zeros_like(row_max{x}))")
        passes += nothing_kept_lines()
        passes.append("# pass 2: probabilities, what follows softmax, and the key reduction")
        passes += key_loop(steps[1], "key_chunks")
        body += ["    " + line for line in passes]
        body += [f"{out_list[a]}.append({acc_name[a]})" for a in accs]
    lines += ["    " + line for line in body]
    for a in accs:
        empty = shape_of(graph.node(a).dims).replace("query_rows", "0")
        lines.append(f"{variable(graph, a)} = torch.cat({out_list[a]}, {axis_i}) if {out_list[a]} else "
                     f"torch.zeros({empty}, {allocate})")
    for n in epilogue:
        lines.append(f"{variable(graph, n)} = {emitter.expression(n, lambda a: variable(graph, a))}"
                     f"{emitter.dims_comment(n)}")
    return steps, lines + _out_lines(graph, emitter, variable(graph, graph.output))


def key_range(graph: Graph, chunk: str | None, full: bool = False) -> tuple[str, str]:
    """(first, end) keys the query rows query_start .. query_end - 1 can keep (the plan's key-block
    bounds), the first aligned to a multiple of `chunk`: the keys before the bound are dropped by
    the keep-predicates anyway, and every key chunk but the one ending at J is then whole, so a
    compiled step sees few shapes. `full`: the keys all of those rows keep (the bounds are
    non-decreasing in i: the lower one at the last row, the upper one at the first)."""
    bounds = graph.key_bounds
    first_key, last_key = "0", "J"
    first_row, last_row = ("query_end - 1", "query_start") if full else ("query_start", "query_end - 1")
    if bounds.lower is not None:
        render = lambda n: scalar_expression(graph, n, row=first_row)  # noqa: E731
        first_key = f"max(0, {render_bound(bounds.lower, render)})"
        first_key += f" // {chunk} * {chunk}" if chunk else ""
    if bounds.upper is not None:
        render_last = lambda n: scalar_expression(graph, n, row=last_row)  # noqa: E731
        last_key = f"min(J, {render_bound(bounds.upper, render_last)} + 1)"
    return first_key, last_key


# -- library lowerings: PyTorch's own kernels after the prologues (passes/library.py) ---------------

_WHAT = {"sdpa": ": F.scaled_dot_product_attention after the prologues",
         "flex": ": FlexAttention after the prologues, biases as score_mod, keeps as mask_mod"}
# the per-element index arguments of FlexAttention's score_mod / mask_mod, by dim
_MOD_INDEX = {"b": "batch", "h": "head", "i": "query_index", "j": "key_index"}


def _library_body(graph: Graph, emitter: _Emitter, lowering: str) -> list[str]:
    form = library.library_form(graph)
    assert not isinstance(form, str), form
    assert lowering == "flex" or form.sdpa is None, form.sdpa
    mask_roots = list(form.biases) + list(form.keeps) + list(form.score_terms)
    structural = set(form.score_nodes) | {n.node for n in graph.plan.normalisers} | {form.reduction}
    epilogue = [n for n in graph.ids() if n != form.reduction and form.reduction in graph.upstream(n)]
    rest = [form.query, form.key, form.value] + [f for _, f in form.scale] + epilogue
    needed_elsewhere = set(rest).union(*(graph.upstream(n) for n in rest))
    closure = set(mask_roots).union(*(graph.upstream(n) for n in mask_roots))
    mask_nodes = closure - needed_elsewhere
    # flex: what has dims is rendered per element inside the mods (tables are read as they are);
    # host scalars are computed outside, once
    per_element = {n for n in closure if graph.node(n).dims and n not in emitter.raw}
    outside_mask = {n for n in mask_nodes if not graph.node(n).dims} if lowering == "flex" else set()
    name = lambda n: variable(graph, n)  # noqa: E731

    def computed(nodes) -> list[str]:
        return [f"{name(n)} = {emitter.expression(n, name)}{emitter.dims_comment(n)}"
                for n, node in graph.nodes() if n in nodes and node.op not in ("input", "size")]

    before = {n for n in graph.ids() if n not in structural and n not in epilogue and n not in mask_nodes}
    lines = computed(before | outside_mask)
    factors = " * ".join(f"{name(f)}" if op == "mul" else f"(1 / {name(f)})" for op, f in form.scale)
    lines.append(f"library_scale = float({factors or 1.0})")
    for role, n in (("query", form.query), ("key", form.key), ("value", form.value)):
        lines.append(f"library_{role} = {_unaligned(graph, emitter, n)}  # [{', '.join(graph.node(n).dims)}]")
    if lowering == "sdpa":
        lines += _sdpa_call(graph, emitter, form, computed(mask_nodes))
    else:
        lines += _flex_call(graph, emitter, form, per_element)
    lines.append(f"{name(form.reduction)} = library_output.unsqueeze({emitter.axis['j']})"
                 f"{emitter.dims_comment(form.reduction)}")
    lines += computed(set(epilogue))
    return lines + _out_lines(graph, emitter, name(graph.output))


def _unaligned(graph: Graph, emitter: _Emitter, node_id: str, dims=None) -> str:
    """An aligned value as a plain tensor over its dims (or `dims`, kept with size 1 if need be)."""
    dims = dims or graph.node(node_id).dims
    dropped = tuple(n for n, d in enumerate(emitter.layout) if d not in dims)
    kept = [d for d in emitter.layout if d in dims]
    assert kept == list(dims), (node_id, kept, dims)   # the layout orders dims as the library wants them
    return f"{variable(graph, node_id)}.squeeze({dropped})" if dropped else variable(graph, node_id)


def _score_mask(graph: Graph, emitter: _Emitter, form) -> list[str]:
    """`library_mask`: SDPA's attn_mask over [b, h, i, j] (broadcast): the keeps as a boolean, the
    biases added, dropped keys -inf."""
    score_dims = ("b", "h", "i", "j")
    whole = lambda n: _unaligned(graph, emitter, n, score_dims)  # noqa: E731
    keep = " & ".join(whole(k) for k in form.keeps)
    bias = " + ".join(whole(b) for b in form.biases)
    if form.biases and form.keeps:
        return [f"library_mask = torch.where({keep}, ({bias}).to({LEAD}.dtype), float('-inf'))"]
    if form.biases:
        return [f"library_mask = ({bias}).to({LEAD}.dtype)"]
    return [f"library_mask = {keep or 'None'}"]


def _sdpa_call(graph: Graph, emitter: _Emitter, form, mask_lines: list[str]) -> list[str]:
    call = ("library_output = library.sdpa(library_query, library_key, library_value, {mask}, "
            "library_scale, {causal})")
    general = mask_lines + _score_mask(graph, emitter, form) + [call.format(mask="library_mask", causal=False)]
    if form.causal_row is None:
        return general
    offset = scalar_expression(graph, form.causal_row, row="0")
    return ([f"if {offset} == 0:  # the only keep is j <= i: SDPA's own (top-left) causal mask",
             "    " + call.format(mask="None", causal=True), "else:"]
            + ["    " + line for line in general])


def _flex_call(graph: Graph, emitter: _Emitter, form, mod_nodes: set) -> list[str]:
    inputs = sorted({n for n in mod_nodes if graph.node(n).op == "input"}, key=lambda n: graph.node(n).order)
    full = ", ".join(names.size(d) if d in library.SCORE_DIMS else "1" for d in emitter.layout)
    lines = [f"{names.derived('expanded', variable(graph, n))} = {variable(graph, n)}.expand({full})"
             for n in inputs]

    def element(n: str) -> str:
        node = graph.node(n)
        if node.op == "index":
            return _MOD_INDEX[node.attrs["dim"]]
        if n not in mod_nodes:
            return variable(graph, n)   # a host scalar or a table, computed outside
        if node.op == "input":
            index = ", ".join(_MOD_INDEX.get(d, "0") for d in emitter.layout)
            return f"{names.derived('expanded', variable(graph, n))}[{index}]"
        return variable(graph, n)

    def body(roots) -> list[str]:
        nodes = set(roots).union(*(graph.upstream(r) for r in roots)) & mod_nodes
        out = []
        for n, node in graph.nodes():
            if n not in nodes or node.op in ("input", "index"):
                continue
            args = [element(a) for a in node.args]
            if node.op == "gather":
                text = f"{args[0]}[{', '.join(args[1:])}]"
            else:
                text = ops.render(node.op, "torch", args, node.dtype)
            out.append(f"    {variable(graph, n)} = {text}")
        return out

    index_args = ", ".join(_MOD_INDEX[d] for d in ("b", "h", "i", "j"))
    score_mod = "None"
    if form.score_function:   # the scores as a function of dot(q', k') * scale, FlexAttention's score
        scaled, *path = form.score_function
        lines.append(f"def score_mod(score, {index_args}):  # the scores from q.k * scale, per score")
        lines += body(form.score_terms)
        lines.append(f"    {variable(graph, scaled)} = score")
        for n in path:
            node = graph.node(n)
            text = ops.render(node.op, "torch", [element(a) if a not in form.score_function else variable(graph, a)
                                                 for a in node.args], node.dtype)
            lines.append(f"    {variable(graph, n)} = {text}")
        lines.append(f"    return {variable(graph, path[-1]) if path else 'score'}")
        score_mod = "score_mod"
    elif form.biases:
        lines.append(f"def score_mod(score, {index_args}):  # the biases, per score")
        lines += body(form.biases)
        lines.append(f"    return score + {' + '.join(element(b) for b in form.biases)}")
        score_mod = "score_mod"
    mask_mod = "None"
    if form.keeps:
        lines.append(f"def mask_mod({index_args}):  # the keep-predicates, per score")
        lines += body(form.keeps)
        lines.append(f"    return {' & '.join(element(k) for k in form.keeps)}")
        mask_mod = "mask_mod"
    first_key, last_key = key_range(graph, "library.BLOCK")
    ranges = f"({first_key}, {last_key})"
    if form.full_blocks:   # the keys every row of the block keeps: mask_mod is skipped there
        first_full, last_full = key_range(graph, None, full=True)
        ranges = f"({first_key}, {last_key}, {first_full}, {last_full})"
    lines += ["# the keys every block of query rows can keep (the plan's key-block bounds"
              + (", and those all its rows keep" if form.full_blocks else "") + "): FlexAttention's block mask",
              "key_ranges = []",
              "for query_start in range(0, I, library.BLOCK):",
              "    query_end = min(query_start + library.BLOCK, I)",
              f"    key_ranges.append({ranges})",
              f"block_mask = library.block_mask(key_ranges, I, J, {mask_mod})",
              "library_output = library.flex(library_query, library_key, library_value, "
              f"{score_mod}, block_mask, library_scale)"]
    return lines


def scalar_expression(graph: Graph, node_id: str, row: str) -> str:
    """A node over i, sizes and constants as a Python int expression, with i = row."""
    return scalar_walk(graph, node_id, lambda: f"({row})", names.size, repr,
                       lambda node, args: ops.render(node.op, "python", args, node.dtype))


# -- the plan's block mask (passes/block_mask.py), rendered for the torch and Triton files ----------

BLOCK_MASK_FUNCTION = "block_mask"
BLOCK_MASK_CACHE = "_BLOCK_MASKS"


def _block_mask_nodes(graph: Graph) -> list[str]:
    """The nodes the block mask's conjuncts are computed from, in graph order."""
    conjuncts = graph.plan.block_mask.conjuncts
    upstream = set().union(*(graph.upstream(c) for c in conjuncts))
    return [n for n in graph.ids() if n in upstream]


def _bound_nodes(tree) -> set:
    if tree is None or tree[0] == "const":
        return set()
    if tree[0] == "node":
        return {tree[1]}
    return _bound_nodes(tree[1]) | _bound_nodes(tree[2])


def block_mask_arguments(graph: Graph) -> tuple[list[str], list[str]]:
    """(inputs, size dims) `block_mask()` takes, besides BLOCK_M, BLOCK_N and the device."""
    mask, bounds = graph.plan.block_mask, graph.key_bounds
    nodes = _block_mask_nodes(graph)
    bound_nodes = _bound_nodes(bounds.lower) | _bound_nodes(bounds.upper)
    reached = set(nodes).union(*(graph.upstream(n) for n in bound_nodes))
    dims = set(mask.dims) | {"i", "j"}
    dims |= {graph.node(n).attrs["dim"] for n in reached if graph.node(n).op in ("size", "index")}
    order = list(graph.dim_order) + sorted(dims - set(graph.dim_order))
    return list(mask.inputs), [d for d in order if d in dims]


def block_mask_call(graph: Graph, block_m: str, block_n: str, device: str) -> str:
    """The call of `block_mask()` from a lowering or a launcher (they hold the inputs and sizes)."""
    inputs, dims = block_mask_arguments(graph)
    args = [names.argument(n) for n in inputs] + [names.size(d) for d in dims] + [block_m, block_n, device]
    return f"{BLOCK_MASK_FUNCTION}({', '.join(args)})"


def block_mask_source(graph: Graph) -> str:
    """`def block_mask(<inputs>, <sizes>, BLOCK_M, BLOCK_N, device)`: the plan's block mask at one
    block size, as runtime/block_masks.BlockMask - each conjunct by its rule (passes/block_mask.py):
    the bounded ones from the key-block bounds of each query block, `a == b` from per-block
    ranges, the others evaluated over chunks of whole query blocks and the keys their rows'
    bounds allow; cached per shape and block size when they read no input."""
    mask = graph.plan.block_mask
    emitter = _Emitter(graph, device="device")
    inputs, dims = block_mask_arguments(graph)
    params = [names.argument(n) for n in inputs] + [names.size(d) for d in dims] + ["BLOCK_M: int", "BLOCK_N: int",
                                                                                    "device"]
    nodes = _block_mask_nodes(graph)
    in_tile = [n for n in nodes if {"i", "j"} <= set(graph.node(n).dims) and graph.node(n).op != "input"
               and n in set().union(*(graph.upstream(c) for c in mask.evaluated))]
    computed = set().union(*(graph.upstream(n) for r in mask.ranges for n in r[1:]),
                           *(graph.upstream(c) for c in mask.evaluated))   # the bounded rule reads no tensor
    whole = [n for n in nodes if {"i", "j"} - set(graph.node(n).dims) and graph.node(n).op not in ("input", "size")
             and n in computed]
    from ..passes.plan import _labels
    reads = f"reads {', '.join(inputs)}: computed per call" if inputs else \
        "reads no input: computed once per shape and block size, cached"
    lines = ([f"{BLOCK_MASK_CACHE} = {{}}  # (sizes, block sizes, device) -> BlockMask", "", ""]
             if not mask.per_call else [])
    lines += _wrapped(f"def {BLOCK_MASK_FUNCTION}(", params, "):")
    lines.append(f'    """Which BLOCK_M x BLOCK_N tiles {_escaped(_labels(graph, mask.conjuncts))} keep something / '
                 f'everything in (the plan\'s block mask); {reads}."""')
    body = []
    if not mask.per_call:
        key = ", ".join([names.size(d) for d in dims] + ["BLOCK_M", "BLOCK_N", "str(device)"])
        body += [f"key = ({key})", f"cached = block_masks.lookup({BLOCK_MASK_CACHE}, key)", "if cached is not None:",
                 "    return cached"]
    body += _input_lines(graph, emitter, inputs, cast=False)
    body += [f"{variable(graph, n)} = {emitter.expression(n, lambda a: variable(graph, a))}{emitter.dims_comment(n)}"
             for n in whole]
    axes = ", ".join(str(emitter.axis[d]) for d in ("b", "h", "i", "j"))
    batch = names.size("b") if "b" in mask.dims else "1"
    heads = names.size("h") if "h" in mask.dims else "1"
    body.append(f"tiles = block_masks.Tiles({batch}, {heads}, I, J, BLOCK_M, BLOCK_N, ({axes}), device)")
    if mask.bounded:
        first_key, last_key = key_range(graph, None)
        first_full, last_full = key_range(graph, None, full=True)
        body += [f"# {_escaped(_labels(graph, mask.bounded))}: the key-block bounds of each query block "
                 "(the keys its rows can keep, and those all of them keep)",
                 "key_ranges = []",
                 "for query_start in range(0, I, BLOCK_M):",
                 "    query_end = min(query_start + BLOCK_M, I)",
                 f"    key_ranges.append(({first_key}, {last_key}, {first_full}, {last_full}))",
                 "tiles.bounds(key_ranges)"]
    for conjunct, query_side, key_side in mask.ranges:
        body.append(f"tiles.equal_ranges({variable(graph, query_side)}, {variable(graph, key_side)})  "
                    f"# {_escaped(_labels(graph, [conjunct]))}: each side's min and max per block")
    if mask.evaluated:
        body += _evaluated_lines(graph, emitter, mask, inputs, whole, in_tile)
    body.append(f"return block_masks.store({BLOCK_MASK_CACHE}, key, tiles.result())" if not mask.per_call
                else "return tiles.result()")
    lines += ["    " + line for line in body]
    return "\n".join(lines) + "\n"


def _evaluated_lines(graph: Graph, emitter: _Emitter, mask, inputs, whole, in_tile) -> list[str]:
    """The loop evaluating the conjuncts no cheaper rule covers, chunk by chunk of whole query blocks."""
    from ..passes.plan import _labels
    first_key, last_key = key_range(graph, "BLOCK_N")
    sliced = {}
    loop = ["key_start, key_end = " + f"{first_key}, {last_key}  # the keys these rows' bounds allow",
            "if key_end <= key_start:", "    tiles.skip_rows(query_start, query_end)", "    continue"]
    readers = set(mask.evaluated).union(*(graph.node(t).args for t in in_tile))
    for n in inputs + whole:
        node_dims = graph.node(n).dims
        if n in emitter.raw or not ({"i", "j"} & set(node_dims)) or n not in readers:
            continue
        index = [":"] * (max(emitter.axis[d] for d in ("i", "j") if d in node_dims) + 1)
        if "i" in node_dims:
            index[emitter.axis["i"]] = "query_start:query_end"
        if "j" in node_dims:
            index[emitter.axis["j"]] = "key_start:key_end"
        sliced[n] = names.derived("tile", variable(graph, n))
        loop.append(f"{sliced[n]} = {variable(graph, n)}[{', '.join(index)}]")
    name = lambda a: sliced.get(a, variable(graph, a))  # noqa: E731
    loop += [f"{variable(graph, n)} = {emitter.expression(n, name)}{emitter.dims_comment(n)}" for n in in_tile]
    keep = " & ".join(name(c) for c in mask.evaluated)
    loop.append(f"tiles.add({keep}, query_start, query_end, key_start, key_end)")
    comment = f"# {_escaped(_labels(graph, mask.evaluated))}: evaluated over whole query blocks x the keys they can keep"
    return ([comment]
            + ["for query_start, query_end in tiles.row_chunks():"] + ["    " + line for line in loop])


def _escaped(text: str) -> str:
    """Spec text inside a generated docstring: as a literal's contents, no quote can end it."""
    return repr(text)[1:-1].replace('"', '\\"')
