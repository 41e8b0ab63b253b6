"""Which key blocks attention visits today, and which it needs to: issue 13 item 6's measurement.

    python bench/bench_block_masks.py                      # the scenarios below at N = 8192, 64x64 and 128x128 tiles
    python bench/bench_block_masks.py --time               # also times the torch backend's chunked lowering
    python bench/bench_block_masks.py --sizes 2048 --blocks 64x64 --out table.md

For a spec with its params and inputs at one shape, and tiles of BLOCK_M queries x BLOCK_N keys:

- visited: the (query block, key block) pairs the kernels visit today. A query block [s, e) visits
  the key blocks from lower(s) to upper(e - 1), the key-block bounds of the plan (passes/bounds.py:
  the interval analysis of the keep-predicates); every key block where no predicate bounds them.
- needed: the pairs where the keep-predicates (all of them: masks, and inputs such as document
  ids) keep at least one entry - what a block mask computed from any predicate would visit.
- at most: visited / needed, the most that skipping the blocks nobody needs could save (the
  work per visited block being equal).

Both come from the reference backend's evaluation of the spec's own keep-predicates and bounds;
no kernel runs. With --time, the torch backend's chunked lowering (CHUNK_M x CHUNK_N = the tile;
it skips the chunks the bounds skip, as the Triton kernels do) is timed at the same shape: the
time today, without block masks, for comparison once they exist.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernelsearch.backends import reference  # noqa: E402
from kernelsearch.compiler import compile_graph  # noqa: E402
from kernelsearch.spec import load_spec  # noqa: E402

B, H, D = 1, 1, 64
DOCUMENTS = 64


# --------------------------------------------------------------------------------- the scenarios

def document_ids(n: int, documents: int, seed: int = 0) -> torch.Tensor:
    """[1, n] ids of `documents` packed documents of random lengths (at least one token each)."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=g)[: documents - 1] + 1
    starts = torch.zeros(n, dtype=torch.long)
    starts[cuts] = 1
    return torch.cumsum(starts, 0)[None, :]


@dataclass(frozen=True)
class Scenario:
    label: str
    spec: str
    params: dict = field(default_factory=dict)
    inputs: Callable[[int], dict] = lambda n: {}      # the spec's own inputs at N = n


def _documents(n):
    ids = document_ids(n, DOCUMENTS)
    return {"q_doc": ids, "k_doc": ids}


SCENARIOS = [
    Scenario(f"document, {DOCUMENTS} documents, causal", "document", {}, _documents),
    Scenario(f"document, {DOCUMENTS} documents, bidirectional", "document", {"causal": False}, _documents),
    Scenario("prefix_lm, prefix N/4", "prefix_lm", {}, lambda n: {"prefix_len": torch.tensor([n // 4])}),
    Scenario("sliding_window, window 1024", "sliding_window", {"window": 1024}),
    Scenario("softmax, causal", "softmax", {"causal": True}),
]


# --------------------------------------------------------------------------------- the measure

def graph_and_tensors(scenario: Scenario, n: int):
    spec = load_spec(str(ROOT / "specs" / f"{scenario.spec}.yaml"))
    given = scenario.inputs(n)
    graph = compile_graph(spec, scenario.params, frozenset(k for k in given if k in spec.optional_inputs))
    qkv = {name: torch.zeros(B, H, n, D) for name in ("q", "k", "v")}   # keeps and bounds do not read them
    return graph, {**qkv, **given}


def keep_mask(graph, tensors) -> torch.Tensor:
    """[B, H, I, J]: what the spec's keep-predicates (all of them) keep."""
    (softmax,) = graph.find("softmax")
    keeps = graph.node(softmax).args[1:]
    I, J = tensors["q"].shape[2], tensors["k"].shape[2]
    keep = torch.ones(B, H, I, J, dtype=torch.bool)
    values = reference.evaluate_nodes(graph, tensors, keeps) if keeps else {}
    for node_id, value in values.items():
        dims = graph.node(node_id).dims
        keep &= value.reshape([value.shape[dims.index(d)] if d in dims else 1 for d in "bhij"])
    return keep


def needed_blocks(keep: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """[B, H, query blocks, key blocks]: the tiles that keep at least one entry."""
    b, h, i, j = keep.shape
    rows, cols = -(-i // block_m), -(-j // block_n)
    padded = torch.zeros(b, h, rows * block_m, cols * block_n, dtype=torch.bool)
    padded[:, :, :i, :j] = keep
    return padded.reshape(b, h, rows, block_m, cols, block_n).any(dim=5).any(dim=3)


_BOUND_OPS = {"+": torch.add, "-": torch.sub, "*": torch.mul, "min": torch.minimum, "max": torch.maximum,
              "//": lambda a, b: torch.div(a, b, rounding_mode="floor")}


def _bound_at_rows(tree, values, rows: torch.Tensor) -> torch.Tensor:
    """A key-block bound tree (passes/bounds.py) at every query row: its graph nodes depend on i only."""
    kind = tree[0]
    if kind == "const":
        return torch.full_like(rows, tree[1])
    if kind == "node":
        value = values[tree[1]]
        return value.expand_as(rows) if value.ndim == 0 else value
    return _BOUND_OPS[kind](_bound_at_rows(tree[1], values, rows), _bound_at_rows(tree[2], values, rows))


def visited_blocks(graph, tensors, block_m: int, block_n: int) -> torch.Tensor:
    """[query blocks, key blocks]: the tiles the kernels visit, from the plan's key-block bounds."""
    I, J = tensors["q"].shape[2], tensors["k"].shape[2]
    rows, cols = -(-I // block_m), -(-J // block_n)
    bounds = graph.plan.key_bounds
    trees = [t for t in (bounds.lower, bounds.upper) if t is not None]
    leaves = sorted({n for t in trees for n in _node_leaves(t)})
    values = reference.evaluate_nodes(graph, tensors, leaves) if leaves else {}
    i = torch.arange(I)
    lower = _bound_at_rows(bounds.lower, values, i) if bounds.lower else torch.zeros_like(i)
    upper = _bound_at_rows(bounds.upper, values, i) if bounds.upper else torch.full_like(i, J - 1)
    starts = torch.arange(rows) * block_m
    ends = torch.clamp(starts + block_m, max=I) - 1
    first = lower[starts].clamp(min=0) // block_n
    last = upper[ends].clamp(max=J - 1) // block_n
    key_blocks = torch.arange(cols)[None, :]
    visited = (key_blocks >= first[:, None]) & (key_blocks <= last[:, None])
    return visited & (upper[ends] >= lower[starts].clamp(min=0))[:, None]


def _node_leaves(tree):
    if tree[0] == "node":
        yield tree[1]
    elif tree[0] != "const":
        yield from _node_leaves(tree[1])
        yield from _node_leaves(tree[2])


@dataclass
class Row:
    label: str
    n: int
    tile: str
    blocks: int
    visited: float       # fractions of all (query block, key block) pairs
    needed: float
    time_ms: str = ""


def measure(scenario: Scenario, n: int, tiles, timing: bool, repeats: int) -> list[Row]:
    graph, tensors = graph_and_tensors(scenario, n)
    keep = keep_mask(graph, tensors)
    rows = []
    for block_m, block_n in tiles:
        needed = needed_blocks(keep, block_m, block_n)
        visited = visited_blocks(graph, tensors, block_m, block_n)
        assert not (needed & ~visited).any(), f"{scenario.label}: the bounds skip a tile that keeps something"
        time_ms = _time_torch(scenario, tensors, block_m, block_n, repeats) if timing else ""
        rows.append(Row(scenario.label, n, f"{block_m}x{block_n}", needed[0, 0].numel(),
                        visited.float().mean().item(), needed.float().mean().item(), time_ms))
    return rows


def _time_torch(scenario: Scenario, tensors: dict, block_m: int, block_n: int, repeats: int) -> str:
    import kernelsearch
    attention = kernelsearch.load(str(ROOT / "specs" / f"{scenario.spec}.yaml"), backend="torch",
                                  config={"lowering": "chunked", "CHUNK_M": block_m, "CHUNK_N": block_n},
                                  **scenario.params)
    g = torch.Generator().manual_seed(0)
    call = {**tensors, **{name: torch.randn(tensors[name].shape, generator=g) for name in ("q", "k", "v")}}
    with torch.no_grad():
        attention(**call)                                   # warm-up: code generation, allocations
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            attention(**call)
            times.append((time.perf_counter() - start) * 1e3)
    return f"{statistics.median(times):.0f}"


# --------------------------------------------------------------------------------- the table

def table(rows: list[Row], timing: bool) -> str:
    header = "| scenario | N | tile | tiles | visited today | needed | at most | " \
             + ("torch chunked ms (today) |" if timing else "")
    lines = [header, "| --- | ---: | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if timing else "")]
    for r in rows:
        saving = f"{r.visited / r.needed:.1f}x" if r.needed else "-"
        lines.append(f"| {r.label} | {r.n} | {r.tile} | {r.blocks} | {r.visited:.1%} | {r.needed:.1%} | {saving} |"
                     + (f" {r.time_ms} |" if timing else ""))
    return "\n".join(lines)


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{cpu}, {os.cpu_count()} CPUs ({platform.machine()}, {platform.system()})"


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8192", help="comma-separated N (I = J = N)")
    parser.add_argument("--blocks", default="64x64,128x128", help="comma-separated BLOCK_MxBLOCK_N")
    parser.add_argument("--scenarios", default="", help="comma-separated spec names to keep (default: all)")
    parser.add_argument("--time", action="store_true", help="also time the torch backend's chunked lowering")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="write the markdown report here too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = _load()
    tiles = [tuple(int(x) for x in tile.split("x")) for tile in args.blocks.split(",")]
    wanted = set(filter(None, args.scenarios.split(",")))
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for scenario in SCENARIOS:
            if not wanted or scenario.spec in wanted:
                rows += measure(scenario, n, tiles, args.time, args.repeats)
    report = "\n".join([
        "# Key blocks visited today and needed (issue 13 item 6)", "",
        f"- date: {datetime.date.today()}",
        f"- machine: {_machine()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, B={B} H={H} D={D} fp32",
        f"- load average (1/5/15 min) at start: {load_at_start}; at end: {_load()}",
        f"- command: `python bench/bench_block_masks.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        table(rows, args.time), "",
        "visited today: tiles inside the plan's key-block bounds; needed: tiles where the keep-predicates keep "
        "something; at most: visited / needed.", ""])
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
