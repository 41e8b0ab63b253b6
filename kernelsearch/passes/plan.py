"""Pass: the plan - every decision about how a graph runs, made once (ir.Plan on `graph.plan`).

    schedule       one_pass | heads_in_tile | two_pass (passes/schedule.py)
    heads in tile  a program holds every (stream, head) channel of a sample when heads are mixed;
                   head_groups: the streams the mixing groups heads by
    sweeps         1: one sweep over the key blocks with an online softmax (rescaling the
                   accumulators), possible when what reaches dot(p, v) is linear in p;
                   2: exact row statistics (max, sum) first, then p normalised exactly - when
                   heads are mixed after softmax (rows of different heads have different sums)
                   or p is transformed non-linearly
    accumulators   the dot(p, v) nodes: what the key loop accumulates over j
    prepass        key-side dot operands made by a transform (l2norm(k), rotary(k), a transformed
                   v): a prepass over the keys writes them once, in the dot's dtype, instead of
                   every query tile recomputing them (one extra read and write of [B, H, J, D]
                   against I / BLOCK_M recomputations next to the tensor cores)
    host           scalars computed from sizes and params only: the launcher computes them once
    key bounds     which key blocks a query block needs (passes/bounds.py) and the conjuncts they
                   come from (those need no mask in blocks they keep whole)
    delta sweep    backward: delta = rowsum(p * dp) needs a sweep of its own when p is transformed
                   before dot(p, v); otherwise it is rowsum(dO * O)
    normalisers    the row normalisers (kernelsearch/normalisers.py): each softmax keeps its own row
                   statistics (and its sink), masked ones none; with one sweep, the normaliser each
                   accumulator is linear in (reduced_by: whose rescaling and division it takes)
    KV groups      grouped KV heads (k, v with H_kv heads, H_kv dividing H; a runtime size): the
                   forward packs the G = H / H_kv query heads of a KV head into its programs'
                   rows - row r of a tile is query r // G of head r % G, FlashAttention-3's
                   PackGQA - so each K/V tile is loaded once per group, not G times. Per-query-head
                   values without i (an ALiBi slope) become per-row values. Not packed: heads-in-tile
                   programs (they hold every head already) and graphs with a per-query-head value
                   over keys but not queries (it would need [rows, keys, features] tiles); those
                   read KV head h // G per program or channel
    block mask     keep conjuncts over i and j the key bounds miss (document ids, prefix-or-causal,
                   neighbourhoods): which tiles keep something / everything, computed at run time
                   per block size - cached per shape when they read no input, per call when they
                   do (passes/block_mask.py); the kernels visit only the listed tiles

Code generators (codegen/) render the plan; they decide none of this.
"""
from __future__ import annotations

from .. import ops
from ..exprs import INDEX_VARIABLES
from ..normalisers import normalisers as find_normalisers
from ..ir import Graph, Plan
from .block_mask import block_mask_plan
from .bounds import key_block_bounds, scalar_walk
from .schedule import HEADS_IN_TILE, head_groups, schedule_of

__all__ = ["plan", "describe_plan", "linearity"]


def linearity(graph: Graph, node_id: str, source: str, memo: dict) -> bool | None:
    """True if node is linear (homogeneous of degree 1) in `source`, None if it does not depend
    on it, False otherwise - from the ops' `linear` facts (ops.py)."""
    if node_id in memo:
        return memo[node_id]
    if node_id == source:
        memo[node_id] = True
        return True
    if source not in graph.upstream(node_id):
        memo[node_id] = None
        return None
    node = graph.node(node_id)
    args = [linearity(graph, a, source, memo) for a in node.args]
    rule = ops.OPS[node.op].linear if node.op in ops.OPS else None
    if rule == "every":
        result = all(a is True for a in args)
    elif rule == "one":
        result = args.count(True) == 1 and args.count(None) == len(args) - 1
    elif isinstance(rule, tuple):
        result = all((a is True) if kind == "linear" else (a is None) for a, kind in zip(args, rule))
    else:
        result = False
    memo[node_id] = result
    return result


def accumulators(graph: Graph) -> tuple[str, ...]:
    """The dot(p, v) nodes: dots contracting j."""
    return tuple(n for n, node in graph.nodes()
                 if node.op == "dot" and graph.node(node.args[0]).dims[-1:] == ("j",))


def sweeps(graph: Graph, schedule: str, accs: tuple, norms: tuple) -> tuple[int, str, tuple]:
    """(1 or 2, why, reduced_by): one online sweep when every accumulator reduces what exactly one
    normaliser made, linearly when that one keeps row statistics (a softmax's rescaling and final
    division apply to it); otherwise the exact two-sweep form (row statistics first). A dot of a
    combination of several normalisers (dot(p1 - lam * p2, v)) is not distributed over them: it
    takes the two sweeps."""
    if schedule == "two_pass":
        return 2, "heads are mixed after softmax: every head's rows are normalised exactly first", ()
    memo: dict = {}
    reduced_by = []
    for acc in accs:
        operand = graph.node(acc).args[0]
        used = [k for k, n in enumerate(norms) if n.node in graph.upstream(operand)]
        if len(used) != 1:
            what = ", ".join(_label(graph, norms[k].node) for k in used) or "no normaliser"
            return 2, (f"{_label(graph, acc)} reduces a combination of {what}: the dot is not distributed over "
                       "them, so every row is normalised exactly first (two sweeps)"), ()
        (k,) = used
        if norms[k].statistics and linearity(graph, operand, norms[k].node, {**memo}) is not True:
            return 2, (f"what {_label(graph, acc)} reduces is not linear in the probabilities: they are normalised "
                       "exactly first"), ()
        reduced_by.append(k)
    if not any(n.statistics for n in norms):
        return 1, "one sweep: no row statistics (masked: p is the kept values themselves)", tuple(reduced_by)
    several = " (each softmax its own statistics, one key sweep)" if len(norms) > 1 else ""
    return 1, f"online softmax: what reaches dot(p, v) is linear in the probabilities{several}", tuple(reduced_by)


def delta_sweep(graph: Graph, accs: tuple, norms: tuple) -> bool:
    """The backward's delta = rowsum(p * dp) is rowsum(dO * O) only for one softmax whose p goes
    straight into the one dot(p, v); otherwise it takes a sweep of its own."""
    statistics = [n for n in norms if n.statistics]
    if not statistics:
        return False    # masked normalisers need no delta
    direct = len(norms) == 1 and len(accs) == 1 and graph.node(accs[0]).args[0] == norms[0].node
    return not direct


def prepass(graph: Graph, accs: tuple) -> tuple[str, ...]:
    """Key-side dot operands that are computed (not plain loads), over b, h, j and one feature dim."""
    out: list[str] = []
    for node_id, node in graph.nodes():
        if node.op != "dot":
            continue
        operand = node.args[1]
        o = graph.node(operand)
        if o.stage != "k_prologue" or o.op == "input" or not set(o.dims) <= ({"b", "h", "j"} | set(o.dims[-1:])):
            continue
        if o.dims[-1] in INDEX_VARIABLES:
            continue
        if (node_id in accs or "j" in o.dims) and operand not in out:
            out.append(operand)
    return tuple(out)


def host_scalars(graph: Graph) -> tuple[str, ...]:
    """Computed scalars over sizes, params and constants (no input, no index)."""
    def on_host(node_id: str) -> bool:
        node = graph.node(node_id)
        if node.dims or node.op in ("const", "size", "input", "absent"):
            return False
        return all(graph.node(n).op not in ("input", "index") for n in graph.upstream(node_id))
    return tuple(n for n in graph.ids() if on_host(n))


def query_head_nodes(graph: Graph) -> set[str]:
    """The nodes that vary with the query head: an index h, an input over h that is not per KV head
    (inputs.per_key_head), and whatever is computed from one. A node over h that is not among them
    varies with the KV head only (k, v, their transforms, a [b, h, j] bias)."""
    from ..inputs import per_key_head
    out: set[str] = set()
    for node_id, node in graph.nodes():
        if node.op == "index" and node.attrs["dim"] == "h":
            out.add(node_id)
        elif node.op == "input":
            dims = graph.spec.inputs[node_id].shape if node_id in graph.spec.inputs else node.dims
            if "h" in dims and not per_key_head(dims):
                out.add(node_id)
        elif "h" in node.dims and (node.op == "mix_heads" or any(a in out for a in node.args)):
            out.add(node_id)
    return out


def pack_kv_group(graph: Graph, schedule: str, block_mask) -> tuple[bool, str]:
    """(pack, why): does the forward pack a KV group's query heads into its programs' rows."""
    if schedule in HEADS_IN_TILE:
        return False, "heads in tile: a program holds every head; each reads KV head h // G"
    if block_mask is not None:
        return False, "the block mask lists key blocks per block of one head's queries: each program reads KV head h // G"
    per_query = query_head_nodes(graph)
    for node_id, node in graph.nodes():
        if node_id in per_query and "j" in node.dims and "i" not in node.dims:
            return False, (f"{_label(graph, node_id)} varies with the query head over keys: each program is one "
                           "query head and reads KV head h // G")
    return True, "a program's rows are (query, head of the KV group): each K/V tile is loaded once per group"


def plan(graph: Graph) -> Graph:
    graph = graph.copy()
    norms = find_normalisers(graph)
    schedule = schedule_of(graph)
    accs = accumulators(graph)
    count, reason, reduced_by = sweeps(graph, schedule, accs, norms)
    bounds = key_block_bounds(graph)
    groups = head_groups(graph)
    block_mask = block_mask_plan(graph, bounds, (groups or 1) if schedule in HEADS_IN_TILE else None)
    packed, pack_reason = pack_kv_group(graph, schedule, block_mask)
    graph.plan = Plan(
        schedule=schedule, sweeps=count, sweeps_reason=reason,
        heads_in_tile=schedule in HEADS_IN_TILE, head_groups=groups,
        accumulators=accs, prepass=prepass(graph, accs), host=host_scalars(graph),
        key_bounds=bounds, delta_sweep=delta_sweep(graph, accs, norms),
        normalisers=norms, reduced_by=reduced_by,
        block_mask=block_mask, pack_kv_group=packed, pack_reason=pack_reason)
    return graph


# ---------------------------------------------------------------------------------------- printing

def _spelled(graph: Graph, node_id: str, row: str) -> str:
    """A bound's node as the spec would write it (i = row), for people to read."""
    return scalar_walk(graph, node_id, lambda: row, str.upper, repr,
                       lambda node, args: ops.render(node.op, "python", args, node.dtype),
                       other=lambda other_id, node: other_id)


def _label(graph: Graph, node_id: str) -> str:
    """A node as a reader finds it in the spec: its entry's name, or `op in entry` for a part of one."""
    node = graph.node(node_id)
    if node.name:
        return node.name
    owner = node_id.rsplit(".", 1)[0]
    return f"{node.op} in {owner}" if owner != node_id else node_id


def _labels(graph: Graph, node_ids) -> str:
    return ", ".join(_label(graph, n) for n in node_ids)


def describe_plan(graph: Graph) -> list[str]:
    """The plan as lines for `kernelsearch check` (node ids as the spec named them: escape them to print)."""
    from .bounds import render_bound
    p = graph.plan
    heads = f"heads in tile, {p.head_groups} stream(s) per sample" if p.heads_in_tile else "one head per program"
    lines = [f"schedule {p.schedule}: {heads}",
             f"sweeps   {p.sweeps}: {p.sweeps_reason}"]
    for k, n in enumerate(p.normalisers):
        what = "row statistics (max, sum)" if n.statistics else "no row statistics (p = x where kept, else 0)"
        sink = "" if n.sink is None else f", sink {_spelled(graph, n.sink, 'i')} in the denominator"
        keeps = f", keeps {_labels(graph, n.keeps)}" if n.keeps else ""
        lines.append(f"norm     {_label(graph, n.node)} = {graph.node(n.node).op}({_label(graph, n.scores)}): "
                     f"{what}{sink}{keeps}")
    lines.append(f"reduce   {_labels(graph, p.accumulators) or '(nothing: no dot(p, v))'}"
                 + ("" if not p.reduced_by or len(p.normalisers) == 1 else
                    f"  (rescaled by {', '.join(_label(graph, p.normalisers[k].node) for k in p.reduced_by)})"))
    if p.prepass:
        lines.append(f"prepass  {_labels(graph, p.prepass)}  (per-key values written once, not recomputed per query tile)")
    else:
        lines.append("prepass  none")
    if p.host:
        lines.append(f"host     {_labels(graph, p.host)}  (scalars the launcher computes)")
    bounds = p.key_bounds
    if bounds.skips_blocks:
        render = lambda n: _spelled(graph, n, "i")  # noqa: E731
        lo = render_bound(bounds.lower, render) if bounds.lower else "0"
        hi = render_bound(bounds.upper, render) if bounds.upper else "J - 1"
        lines.append(f"keys     row i keeps keys {lo} .. {hi}  (whole key blocks outside are skipped; "
                     f"from {_labels(graph, bounds.conjuncts_used)})")
    else:
        lines.append("keys     every key block of every row (no keep-predicate bounds them)")
    lines += _describe_block_mask(graph)
    if not p.statistics:
        lines.append("backward no delta: no row statistics (d x = d p where kept, else 0)")
    else:
        lines.append("backward delta = rowsum(p * dp) " + ("in a sweep of its own" if p.delta_sweep else "= rowsum(dO * O)")
                     + (" per softmax" if len(p.statistics) > 1 else ""))
    backward = ("programs holding every head add each head's dk/dv into its KV head atomically" if p.heads_in_tile
                else "the backward's dk/dv programs sum a group's heads in registers")
    lines.append(f"kv heads {'packed' if p.pack_kv_group else 'not packed'}: {p.pack_reason}  (grouped KV heads, "
                 f"G = H / H_kv at the call; {backward})")
    return lines


def _describe_block_mask(graph: Graph) -> list[str]:
    mask = graph.plan.block_mask
    if mask is None:
        return []
    others = [c for c in mask.conjuncts if c not in mask.unbounded]
    over = ", ".join(mask.dims + ("query block", "key block"))
    when = (f"per call (reads {', '.join(mask.inputs)})" if mask.per_call
            else "once per shape and block size (reads no input; cached)")
    return [f"blocks   block mask of {_labels(graph, mask.unbounded)}"
            + (f" (with {_labels(graph, others)})" if others else "")
            + f" over [{over}]: {when}; tiles it keeps nothing in are skipped, tiles it keeps whole run without its masks"
            + (f"; the kernels read it per sample ({mask.streams} stream(s) x H heads per program)" if mask.streams else "")]
