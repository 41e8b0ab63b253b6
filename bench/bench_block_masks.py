"""Which key blocks attention visits, with and without the block masks: issue 13 item 6's measurement.

    python bench/bench_block_masks.py                      # the scenarios below at N = 8192, 64x64 and 128x128 tiles
    python bench/bench_block_masks.py --time               # also times the torch chunked lowering, with and without
    python bench/bench_block_masks.py --sizes 2048 --blocks 64x64 --out table.md

For a spec with its params and inputs at one shape, and tiles of BLOCK_M queries x BLOCK_N keys:

- bounds only: the (query block, key block) pairs visited without a block mask. A query block
  [s, e) visits the key blocks from lower(s) to upper(e - 1), the key-block bounds of the plan
  (passes/bounds.py: the interval analysis of the keep-predicates); every key block where no
  predicate bounds them.
- block mask: the pairs visited with the plan's block mask (passes/block_mask.py), as the
  generated block_mask() of the spec's torch file computes it at these tiles (what the Triton
  kernels and the chunked lowering iterate); the bounds only where the plan has none.
- needed: the pairs where the keep-predicates (all of them: masks, and inputs such as document
  ids) keep at least one entry, from the reference backend's evaluation of the spec.
- saved: bounds only / block mask, the work the block mask saves (the work per visited tile being equal).

With --time, the torch backend's chunked lowering (CHUNK_M x CHUNK_N = the tile, eager) is timed
at the same shape with its block mask (the mask computed in the call, as it runs) and without it
(`block_mask=None`: the bounds only, as before the block masks); `mask ms` is the block mask's own
computation per call (its first computation where the plan caches it). The Triton kernels are timed
the same way (without: lists of every tile inside the bounds) where a CUDA GPU is present, and are
marked `gpu/skipped here` otherwise.
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

from kernelsearch.backends import loader, reference  # noqa: E402
from kernelsearch.codegen.files import torch_file, triton_file  # noqa: E402
from kernelsearch.codegen.torch_module import block_mask_arguments  # noqa: E402
from kernelsearch.compiler import compile_graph  # noqa: E402
from kernelsearch.runtime import block_masks  # noqa: E402
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


def _call_block_mask(module, graph, tensors, block_m: int, block_n: int):
    """The generated block_mask() at these tiles, called as the lowerings and launchers call it."""
    inputs, dims = block_mask_arguments(graph)
    sizes = {"b": B, "h": H, "i": tensors["q"].shape[2], "j": tensors["k"].shape[2], "d": D}
    return module.block_mask(*[tensors[n] for n in inputs], *[sizes[d] for d in dims], block_m, block_n,
                             tensors["q"].device)


def masked_blocks(graph, tensors, block_m: int, block_n: int, module=None) -> torch.Tensor:
    """[query blocks, key blocks]: the tiles visited with the plan's block mask (the bounds' where it has none)."""
    if graph.plan.block_mask is None:
        return visited_blocks(graph, tensors, block_m, block_n)
    module = module or loader.import_file(torch_file(graph))
    return _call_block_mask(module, graph, tensors, block_m, block_n).keeps.any(0).any(0)


@dataclass
class Row:
    label: str
    n: int
    tile: str
    blocks: int
    bounds: float        # fractions of all (query block, key block) pairs
    masked: float
    needed: float
    mask_ms: str = ""
    chunked_bounds_ms: str = ""
    chunked_masked_ms: str = ""
    triton: str = ""


def measure(scenario: Scenario, n: int, tiles, timing: bool, repeats: int) -> list[Row]:
    graph, tensors = graph_and_tensors(scenario, n)
    keep = keep_mask(graph, tensors)
    module = loader.import_file(torch_file(graph))
    rows = []
    for block_m, block_n in tiles:
        needed = needed_blocks(keep, block_m, block_n)
        bounds = visited_blocks(graph, tensors, block_m, block_n)
        masked = masked_blocks(graph, tensors, block_m, block_n, module)
        assert not (needed & ~bounds).any(), f"{scenario.label}: the bounds skip a tile that keeps something"
        assert not (needed & ~masked).any(), f"{scenario.label}: the block mask skips a tile that keeps something"
        row = Row(scenario.label, n, f"{block_m}x{block_n}", needed[0, 0].numel(), bounds.float().mean().item(),
                  masked.float().mean().item(), needed.float().mean().item())
        if timing:
            row.mask_ms, row.chunked_bounds_ms, row.chunked_masked_ms = _time_chunked(
                module, graph, tensors, block_m, block_n, repeats)
            row.triton = _time_triton(graph, tensors, bounds, block_m, block_n, repeats)
        rows.append(row)
    return rows


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _time_chunked(module, graph, tensors: dict, block_m: int, block_n: int, repeats: int) -> tuple:
    """(mask ms, chunked ms bounds only, chunked ms with the block mask) of the eager chunked lowering."""
    g = torch.Generator().manual_seed(0)
    call = {**tensors, **{name: torch.randn(tensors[name].shape, generator=g) for name in ("q", "k", "v")}}
    args = [call[name] for name in module.INPUTS]
    chunked = lambda **extra: module.chunked(*args, CHUNK_N=block_n, CHUNK_M=block_m, **extra)  # noqa: E731
    with torch.no_grad():
        if graph.plan.block_mask is None:           # nothing to list: one lowering, as it runs
            chunked()
            ms = _median_ms(chunked, repeats)
            return "-", f"{ms:.0f}", f"{ms:.0f}"

        def fresh_mask():
            getattr(module, "_BLOCK_MASKS", {}).clear()   # a cached mask's first computation
            return _call_block_mask(module, graph, call, block_m, block_n)
        fresh_mask()
        mask_ms = _median_ms(fresh_mask, repeats)
        chunked()                                    # warm-up
        masked = _median_ms(chunked, repeats)
        bounds = _median_ms(lambda: chunked(block_mask=None), repeats)
    return f"{mask_ms:.1f}", f"{bounds:.0f}", f"{masked:.0f}"


def _time_triton(graph, tensors: dict, bounds: torch.Tensor, block_m: int, block_n: int, repeats: int) -> str:
    """`ms bounds only / ms block mask` of the Triton forward kernel (fp16) on a CUDA GPU; without one, `gpu/skipped here`."""
    if not torch.cuda.is_available():
        return "gpu/skipped here"
    if graph.plan.block_mask is None:
        return "-"
    from kernelsearch.backends.triton_backend import load_module
    module = load_module(triton_file(graph), interpret=False)
    g = torch.Generator().manual_seed(0)
    call = {name: t.cuda() for name, t in tensors.items()}
    call.update({name: torch.randn(tensors[name].shape, generator=g).half().cuda() for name in ("q", "k", "v")})
    args = [call[name] for name in triton_file(graph).inputs]
    true_mask = module.block_mask
    every = bounds.cuda()[None, None]       # the tiles inside the bounds, none of them called whole

    def bounds_only(*a):
        return block_masks.from_tiles(every, torch.zeros_like(every), block_m, block_n)

    def timed():
        forward = lambda: module.forward(*args, BLOCK_M=block_m, BLOCK_N=block_n)  # noqa: E731
        forward()
        torch.cuda.synchronize()

        def run():
            forward()
            torch.cuda.synchronize()
        return _median_ms(run, max(repeats, 10))
    masked = timed()
    module.block_mask = bounds_only
    try:
        without = timed()
    finally:
        module.block_mask = true_mask
    return f"{without:.2f} / {masked:.2f}"


# --------------------------------------------------------------------------------- the table

def table(rows: list[Row], timing: bool) -> str:
    header = "| scenario | N | tile | tiles | visited, bounds only | visited, block mask | needed | saved |"
    rule = "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
    if timing:
        header += (" mask ms | chunked ms, bounds only | chunked ms, block mask | speed-up |"
                   " triton fwd ms, bounds only / block mask |")
        rule += " ---: | ---: | ---: | ---: | ---: |"
    lines = [header, rule]
    for r in rows:
        saving = f"{r.bounds / r.masked:.1f}x" if r.masked else "-"
        line = (f"| {r.label} | {r.n} | {r.tile} | {r.blocks} | {r.bounds:.1%} | {r.masked:.1%} | {r.needed:.1%} "
                f"| {saving} |")
        if timing:
            speedup = f"{float(r.chunked_bounds_ms) / max(float(r.chunked_masked_ms), 1e-9):.1f}x"
            line += f" {r.mask_ms} | {r.chunked_bounds_ms} | {r.chunked_masked_ms} | {speedup} | {r.triton} |"
        lines.append(line)
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
    parser.add_argument("--time", action="store_true",
                        help="also time the torch chunked lowering (and the Triton kernels on a GPU), with and without")
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
        "# Key blocks visited with and without block masks, and needed (issue 13 item 6)", "",
        f"- date: {datetime.date.today()}",
        f"- machine: {_machine()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, B={B} H={H} D={D} fp32",
        f"- load average (1/5/15 min) at start: {load_at_start}; at end: {_load()}",
        f"- command: `python bench/bench_block_masks.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        table(rows, args.time), "",
        "bounds only: tiles inside the plan's key-block bounds (no block mask); block mask: tiles its lists hold; "
        "needed: tiles where the keep-predicates keep something; saved: bounds only / block mask.", ""])
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
