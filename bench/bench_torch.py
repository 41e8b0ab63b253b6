"""The torch backend against PyTorch's own attention on the CPU, in one run.

    python bench/bench_torch.py                         # N = 512, 2048, 8192
    python bench/bench_torch.py --quick                 # N = 512, 1024, 3 timed calls per cell
    python bench/bench_torch.py --sizes 512,2048 --variants softmax,local --out table.md
    python bench/bench_torch.py --threads 1             # steadier on a machine shared with busy processes

On the 2-CPU development machine (shared, load average 3-7, --threads 1) the default run took
12 minutes and --quick under 2 with inductor's compile cache warm; the first, cold run of each
takes several minutes longer (compiling the flex and chunked graphs, up to ~90 s each at N=8192).

For every seed spec and sequence length N (b=1, h=4, d=64, fp32) it times

- the kernelsearch torch backend: eager and ``torch.compile(fullgraph=True)``, each with the
  materialized and the chunked (online softmax) lowering (``kernelsearch.load(..., config=...)``);
- ``F.scaled_dot_product_attention`` (SDPA) where it can express the variant;
- FlexAttention (``torch.nn.attention.flex_attention``) compiled with ``torch.compile``, where it
  can express the variant;

and prints one markdown table: median ms, the ratio to the fastest baseline of the same
(variant, N) in this run, the peak memory of one call, and each output's largest difference
from the check value. Before anything is timed every implementation's output is compared with
the float64 reference backend (N up to ``--ref-max``) or, beyond it, with the output of the first
implementation that ran for that (variant, N) (a baseline where there is one); a difference beyond
fp32 tolerance is printed as MISMATCH and makes the exit code 1. Cells that would not fit
(``--max-mem-gib``) or would take too long (``--max-call-s``, ``--compile-budget-s``) are skipped
and say why, predicted from the same implementation at the previous N.

What each baseline computes (and what stays outside its timed call) is in ``VARIANTS`` below
and in the notes printed under the table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

ATOL = RTOL = 1e-4          # fp32 outputs of [b, h, N, 64], v ~ N(0, 1)
B, H, D = 1, 4, 64


# ----------------------------------------------------------------------------- memory

def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _malloc_trim() -> None:
    """Give the heap's free pages back to the kernel (glibc), so that memory fn() reuses from
    earlier calls' freed blocks has to be faulted in again and shows in the peak RSS."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_increase(fn: Callable[[], object]) -> int | None:
    """Bytes the process's peak resident set rose above its resident set during fn().

    Resets the peak (VmHWM) by writing "5" to /proc/self/clear_refs after trimming the heap;
    None where that is not possible (not Linux, or a kernel without it)."""
    gc.collect()      # cheap: main() freezes the objects of the imports
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _status_kib("VmRSS")
        if _status_kib("VmHWM") > before + 1024:   # the reset did not take
            return None
    except OSError:
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(0, peak - before) * 1024


def memory_probe_works() -> bool:
    """The reset-and-read measure sees 48 MiB of temporaries (three live 16 MiB tensors), also
    when the allocator serves them from blocks an earlier call freed."""
    import torch

    def three_blocks():
        a = torch.ones(4 * 2**20)
        b = a * 2
        return (a + b).sum()
    for _ in range(3):
        three_blocks()
    got = [peak_rss_increase(three_blocks) for _ in range(2)]
    return all(g is not None and 46 * 2**20 <= g <= 100 * 2**20 for g in got)


# ----------------------------------------------------------------------------- variants

@dataclass
class Variant:
    name: str
    params: dict                        # load-time params for the torch backend
    setup: str                          # how the benchmark calls it, for the notes
    batch: int = B                      # q's leading dim (talking heads: b * streams)
    baselines: tuple = ()               # names of baseline builders below
    no_baseline: str = ""


VARIANTS = {
    "softmax": Variant(
        "softmax", {}, "scale d^-0.5, not causal (the spec's default)",
        baselines=("sdpa", "flex")),
    "cosine_sim": Variant(
        "cosine_sim", {}, "scale 8, causal (defaults); baselines l2-normalise q and k inside the timed call",
        baselines=("sdpa", "flex")),
    "memory_efficient": Variant(
        "memory_efficient", {"causal": True},
        "causal, key padding mask (~80% kept, key 0 always) and an additive attn_bias [h, N, N]; SDPA gets "
        "one dense float attn_mask, the bias with -inf where dropped, made in the timed call from a causal & "
        "padding bool mask built outside it; flex gets a mask_mod (causal & padding) with its block mask built "
        "outside, and a score_mod adding the bias",
        baselines=("sdpa", "flex")),
    "local": Variant(
        "local", {},
        "window 64, look_backward 1, causal, rotary, pos_bias_table [h, N] (defaults); flex gets a "
        "window & causal block mask (built outside) and a score_mod gathering the table; rotary is applied "
        "to q and k in eager inside the timed call (cos/sin tables cached outside)",
        baselines=("flex",)),
    "talking_heads": Variant(
        "talking_heads", {},
        "2 streams (q is [(b s), h, N, d] = [2, 4, N, 64]), pre_mix and post_mix [8, 8], not causal",
        batch=2, no_baseline="no baseline: neither SDPA nor FlexAttention can mix heads before and after softmax"),
}


def make_inputs(variant: Variant, n: int, spec, seed: int = 0) -> dict:
    import torch
    from kernelsearch.inputs import random_inputs
    sizes = {"B": variant.batch, "H": H, "I": n, "J": n, "D": D}
    tensors = random_inputs(spec, sizes, dtype=torch.float32, seed=seed, params=variant.params)
    wanted = {"memory_efficient": {"mask", "attn_bias"}, "local": {"pos_bias_table"},
              "talking_heads": {"pre_mix", "post_mix"}}.get(variant.name, set())
    tensors = {k: v for k, v in tensors.items() if k in ("q", "k", "v") or k in wanted}
    if "mask" in tensors:
        # keep key 0, so that no causal row is fully masked: SDPA gives NaN there where the spec
        # (and flex) give 0, and that difference is not what this benchmark measures
        tensors["mask"][:, 0] = True
    if "attn_bias" in tensors:
        tensors["attn_bias"] = tensors["attn_bias"].reshape(H, n, n).contiguous()
    return tensors


# ----------------------------------------------------------------------------- baselines

def _rotary_tables(n: int, d: int, theta: float = 10000.0):
    import torch
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x, cos, sin):
    import torch
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def build_baseline(kind: str, variant: Variant, inputs: dict, n: int) -> Callable[[], object]:
    """A zero-argument callable computing the variant with SDPA ("sdpa") or compiled flex ("flex")."""
    import torch
    import torch.nn.functional as F
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    scale = D ** -0.5
    name = variant.name

    if kind == "sdpa":
        if name == "softmax":
            return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
        if name == "cosine_sim":
            return lambda: F.scaled_dot_product_attention(
                F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12), v, is_causal=True, scale=8.0)
        if name == "memory_efficient":
            # the keep mask is per batch (built once, outside); the bias goes in with every call
            drop = ~(torch.ones(n, n, dtype=torch.bool).tril() & inputs["mask"][:, None, None, :])  # [1, 1, N, N]
            bias = inputs["attn_bias"]
            return lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.masked_fill(drop, float("-inf")), scale=scale)
        raise ValueError(f"no SDPA baseline for {name}")

    if kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)

        def causal(b, h, qi, kv):
            return qi >= kv
        if name == "softmax":
            return lambda: flex(q, k, v, scale=scale)
        if name == "cosine_sim":
            block_mask = create_block_mask(causal, None, None, n, n, device="cpu")
            return lambda: flex(F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12), v,
                                block_mask=block_mask, scale=8.0)
        if name == "memory_efficient":
            padding, bias = inputs["mask"], inputs["attn_bias"]

            def causal_and_padding(b, h, qi, kv):
                return (qi >= kv) & padding[b, kv]

            def add_bias(score, b, h, qi, kv):
                return score + bias[h, qi, kv]
            block_mask = create_block_mask(causal_and_padding, B, None, n, n, device="cpu")
            return lambda: flex(q, k, v, score_mod=add_bias, block_mask=block_mask, scale=scale)
        if name == "local":
            table = inputs["pos_bias_table"]
            window, look_backward = 64, 1
            cos, sin = _rotary_tables(n, D)

            def window_causal(b, h, qi, kv):
                distance = qi // window - kv // window
                return (distance <= look_backward) & (distance >= 0) & (kv <= qi)

            def add_table(score, b, h, qi, kv):
                return score + table[h, (qi - kv).abs()]
            block_mask = create_block_mask(window_causal, None, None, n, n, device="cpu")
            return lambda: flex(_rotate(q * scale, cos, sin), _rotate(k, cos, sin), v,
                                score_mod=add_table, block_mask=block_mask, scale=1.0)
        raise ValueError(f"no flex baseline for {name}")
    raise ValueError(kind)


# ----------------------------------------------------------------------------- cells

BASELINE_LABELS = {"sdpa": "SDPA", "flex": "flex (compiled)"}


@dataclass
class Impl:
    label: str
    kind: str                       # "baseline" or "torch"
    build: Callable[[], Callable[[], object]]
    lowering: str = ""
    compiled: bool = False

    @property
    def linear_memory(self) -> bool:
        """Designed to need memory linear in N (for predicting the next size's peak)."""
        return self.kind == "baseline" or self.lowering == "chunked"


@dataclass
class Row:
    variant: str
    n: int
    impl: str
    kind: str
    median_ms: float | None = None
    times_ms: list = field(default_factory=list)
    first_call_s: float | None = None
    peak_bytes: int | None = None
    max_diff: float | None = None
    mismatch: bool = False
    checked_against: str = ""
    status: str = ""                # "" or "skipped (...)" / "failed: ..."
    ratio: float | None = None


def implementations(variant: Variant, spec, inputs: dict, n: int, chunk_n: int, chunk_m: int,
                    which: set, more_chunks: tuple = ()) -> list[Impl]:
    import kernelsearch
    extra = {name: t for name, t in inputs.items() if name not in ("q", "k", "v")}
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    impls = []
    for kind in variant.baselines:
        label = BASELINE_LABELS[kind]
        if kind in which:
            impls.append(Impl(label, "baseline", lambda kind=kind: build_baseline(kind, variant, inputs, n),
                              compiled=kind == "flex"))
    for lowering in LIBRARY_LOWERINGS:   # the torch backend's lowerings calling PyTorch's kernels, where they fit
        if f"torch-{lowering}" not in which or lowering not in _lowerings(variant, spec):
            continue

        def build_library(lowering=lowering):
            attn = kernelsearch.load(spec, backend="torch", config={"lowering": lowering}, **variant.params)
            return lambda: attn(q, k, v, **extra)
        impls.append(Impl(f"torch {lowering} lowering", "torch", build_library, lowering, compiled=lowering == "flex"))
    if "reference" in which and variant.no_baseline:   # the goal for variants PyTorch has no kernel for

        def build_reference():
            attn = kernelsearch.load(spec, backend="reference", **variant.params)
            return lambda: attn(q, k, v, **extra)
        impls.append(Impl("reference backend (fp32)", "reference", build_reference))
    if "default" in which:   # what load() runs without a config or a tuned record (knobs.py's heuristic)
        def build_default():
            attn = kernelsearch.load(spec, backend="torch", **variant.params)
            return lambda: attn(q, k, v, **extra)
        impls.append(Impl("torch default (no config)", "default", build_default))
    tiles = [(chunk_m, chunk_n)] + list(more_chunks)   # (CHUNK_M, CHUNK_N); the extra ones compiled only
    for compiled in (False, True):
        for lowering, tile in [("materialized", None)] + [("chunked", t) for t in (tiles if compiled else tiles[:1])]:
            key = ("compiled" if compiled else "eager") + "-" + lowering
            if key not in which:
                continue
            config = {"lowering": lowering, "compile": compiled}
            if lowering == "chunked":
                rows, keys = tile
                config["CHUNK_N"] = keys
                config["CHUNK_M"] = rows if n > rows else 0

            def build(config=config):
                attn = kernelsearch.load(spec, backend="torch", config=config, **variant.params)
                return lambda: attn(q, k, v, **extra)
            label = f"torch {'compiled' if compiled else 'eager'} {lowering}" + (
                f" (CHUNK_N={config['CHUNK_N']}, CHUNK_M={config['CHUNK_M']})" if lowering == "chunked" else "")
            impls.append(Impl(label, "torch", build, lowering, compiled))
    return impls


LIBRARY_LOWERINGS = ("sdpa", "flex")


def _lowerings(variant: Variant, spec) -> tuple:
    """The torch backend's lowerings of this variant's graph (with the inputs the benchmark passes)."""
    from kernelsearch.codegen.torch_module import lowerings
    from kernelsearch.compiler import compile_graph
    present = {"memory_efficient": {"mask", "attn_bias"}, "local": {"pos_bias_table"},
               "talking_heads": {"pre_mix", "post_mix"}}.get(variant.name, set())
    return lowerings(compile_graph(spec, variant.params, frozenset(present)))


def reference_output(variant: Variant, spec, inputs: dict):
    import torch
    import kernelsearch
    attn = kernelsearch.load(spec, backend="reference", **variant.params)
    as64 = {name: (t.double() if t.is_floating_point() else t) for name, t in inputs.items()}
    extra = {name: t for name, t in as64.items() if name not in ("q", "k", "v")}
    with torch.no_grad():
        return attn(as64["q"], as64["k"], as64["v"], **extra).float()


def time_round_robin(live: list, repeats: int, budget_s: float) -> None:
    """Time one call of each live implementation per round, `repeats` rounds.

    Interleaving spreads the machine's load changes (other processes) over all the
    implementations of a cell instead of over whichever ran while the load was high. An
    implementation stops after `budget_s` seconds of timed calls once it has three.
    """
    spent = {id(row): 0.0 for row, _ in live}
    for _ in range(repeats):
        for row, fn in live:
            if len(row.times_ms) >= 3 and spent[id(row)] > budget_s:
                continue
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            spent[id(row)] += elapsed
            row.times_ms.append(elapsed * 1e3)


def skip_reason(variant: Variant, impl: Impl, n: int, args, history: dict) -> str:
    """Why this implementation is not run at this N ("" to run it), predicted from the last N it ran at:
    peak memory (quadratic for the materialized lowering, linear for the chunked one and the
    baselines), time per call (quadratic), compile time (linear: the chunk loop is unrolled), and
    baselines that were already far slower than another baseline."""
    previous = history.get((variant.name, impl.label))
    if previous is None:
        return ""
    prev_n, prev_ms, prev_peak, prev_first = previous
    grow = (n / prev_n) ** 2
    if prev_peak is not None:
        peak = prev_peak * (n / prev_n if impl.linear_memory else grow)
        if peak > args.max_mem_gib * 2**30:
            return (f"skipped (memory: ~{peak / 2**30:.1f} GiB a call expected from {_fmt_mib(prev_peak)} MiB "
                    f"at N={prev_n}, over --max-mem-gib {args.max_mem_gib:g})")
    if prev_ms * grow / 1e3 > args.max_call_s:
        return (f"skipped (time: ~{prev_ms * grow / 1e3:.0f} s a call expected from N={prev_n}, "
                f"over --max-call-s {args.max_call_s:g})")
    # compiling does not grow with N (the chunked lowering compiles one step function, not its
    # unrolled loops); the first call's own run time does
    if impl.compiled and prev_first is not None and prev_first + prev_ms * grow / 1e3 > args.compile_budget_s:
        return (f"skipped (time: the first call took {prev_first:.0f} s at N={prev_n}, "
                f"over --compile-budget-s {args.compile_budget_s:g})")
    if impl.kind == "baseline" and args.dominated > 0 and prev_ms * grow > 1e3:
        for label, ms in history.get((variant.name, "baselines", prev_n), {}).items():
            if label != impl.label and prev_ms > args.dominated * ms:
                return (f"skipped (time: {prev_ms / ms:.1f}x slower than {label} at N={prev_n}, so not the best "
                        f"baseline, and ~{prev_ms * grow / 1e3:.0f} s a call expected; --dominated 0 runs it)")
    return ""


def run_cell_group(variant: Variant, n: int, args, history: dict, log) -> list[Row]:
    """Every implementation of one (variant, N): build, check, warm up, measure memory, then time."""
    import torch
    from kernelsearch.spec import load_spec
    spec = load_spec(str(ROOT / "specs" / f"{variant.name}.yaml"))
    inputs = make_inputs(variant, n, spec)
    rows: list[Row] = []
    live: list = []
    check, check_name = None, ""
    if n <= args.ref_max:
        check, check_name = reference_output(variant, spec, inputs), "reference (float64)"
    gc.collect()

    for impl in implementations(variant, spec, inputs, n, args.chunk_n, args.chunk_m, args.impls, args.more_chunks):
        row = Row(variant.name, n, impl.label, impl.kind)
        rows.append(row)
        row.status = skip_reason(variant, impl, n, args, history)
        if row.status:
            log(f"  {variant.name:17s} N={n:<5d} {impl.label:40s} {row.status}")
            continue
        try:
            t0 = time.perf_counter()
            fn = impl.build()
            with torch.no_grad():
                if impl.compiled:   # compiling allocates too: measure memory on the next call
                    out = fn()
                else:
                    out = None

                    def first():
                        nonlocal out
                        out = fn()
                        return out
                    row.peak_bytes = peak_rss_increase(first)
            row.first_call_s = time.perf_counter() - t0
        except Exception as error:  # a failing implementation is a row, not a crash of the run
            message = str(error).splitlines()[0][:160] if str(error) else ""
            row.status = f"failed: {type(error).__name__}: {message}"
            log(f"  {variant.name:17s} N={n:<5d} {impl.label:40s} {row.status}")
            continue
        if check is None:   # beyond --ref-max: the first implementation that ran is the check value
            check, check_name = out.detach().clone(), impl.label
        else:
            row.max_diff = float((out - check).abs().nan_to_num(float("inf")).max())
            row.mismatch = not torch.allclose(out, check, atol=ATOL, rtol=RTOL)
            row.checked_against = check_name
        del out
        with torch.no_grad():
            t0 = time.perf_counter()
            if impl.compiled:
                row.peak_bytes = peak_rss_increase(fn)
            if time.perf_counter() - t0 < 1.0 and row.first_call_s < 5.0:   # slow calls are warm by now
                for _ in range(args.warmup):
                    fn()
        live.append((row, fn))
        flag = "  MISMATCH" if row.mismatch else ""
        checked = (f"max|diff| {row.max_diff:.1e} vs {check_name}" if row.max_diff is not None
                   else "the check value for the others")
        log(f"  {variant.name:17s} N={n:<5d} {impl.label:40s} first call {row.first_call_s:6.1f} s  "
            f"peak {_fmt_mib(row.peak_bytes):>8s} MiB  {checked}{flag}")

    with torch.no_grad():
        time_round_robin(live, args.repeats, args.time_budget_s)
    for row, _ in live:
        row.median_ms = statistics.median(row.times_ms)
        history[(variant.name, row.impl)] = (n, row.median_ms, row.peak_bytes, row.first_call_s)
        if row.kind == "baseline":
            history.setdefault((variant.name, "baselines", n), {})[row.impl] = row.median_ms
        log(f"  {variant.name:17s} N={n:<5d} {row.impl:40s} median {row.median_ms:10.2f} ms  "
            f"min {min(row.times_ms):10.2f} ms  ({len(row.times_ms)} calls)")
    best = [r.median_ms for r in rows if r.kind == "baseline" and r.median_ms is not None]
    for row in rows:
        if best and row.median_ms is not None:
            row.ratio = row.median_ms / min(best)
    live.clear()
    gc.collect()
    torch._dynamo.reset()      # this cell's compiled code is not needed again; keeps caches small
    return rows


# ----------------------------------------------------------------------------- output

def _fmt_mib(n_bytes) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.1f}"


def machine_description() -> dict:
    import torch
    model, cores = platform.processor() or "unknown", os.cpu_count()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            if key.strip() == "CPU(s)":
                cores = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {"cpu": model, "cpus": cores, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load": load}


def table(rows: list[Row], variants: dict) -> str:
    lines = ["| variant | N | implementation | median ms | vs best baseline | peak MiB | max abs diff | notes |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        if row.status:
            lines.append(f"| {row.variant} | {row.n} | {row.impl} | {row.status} | | | | |")
            continue
        if row.ratio is not None:
            ratio = f"{row.ratio:.2f}x"
        else:
            ratio = "n/a (no baseline)" if variants[row.variant].no_baseline else "n/a (no baseline ran)"
        notes = []
        if row.mismatch:
            notes.append("**MISMATCH**")
        if row.first_call_s is not None and ("compiled" in row.impl):
            notes.append(f"first call (compile) {row.first_call_s:.1f} s")
        notes.append(f"{len(row.times_ms)} timed, min {min(row.times_ms):.2f} ms")
        if row.max_diff is not None:
            diff = f"{row.max_diff:.1e}"
        else:
            others = any(r.variant == row.variant and r.n == row.n and r.checked_against == row.impl for r in rows)
            diff = "(check value)" if others else "unchecked (ran alone)"
        lines.append(f"| {row.variant} | {row.n} | {row.impl} | {row.median_ms:.2f} | {ratio} | "
                     f"{_fmt_mib(row.peak_bytes)} | {diff} | {'; '.join(notes)} |")
    return "\n".join(lines)


IMPLS = ("sdpa", "flex", "reference", "torch-sdpa", "torch-flex", "default", "eager-materialized", "eager-chunked",
         "compiled-materialized", "compiled-chunked")


def goals(rows: list[Row]) -> str:
    """The issue's goals, met or not, with the ratios of this run. "tuned" is the best torch-backend
    row of a cell, the default included (every config the run timed: what a tuner choosing among
    them would find; the tuner's space holds the default row too)."""
    lines = ["| goal | variant | N | measured | met |", "| --- | --- | ---: | --- | --- |"]
    cells = sorted({(r.variant, r.n) for r in rows}, key=lambda c: (list(VARIANTS).index(c[0]), c[1]))
    for variant, n in cells:
        timed = [r for r in rows if r.variant == variant and r.n == n and r.median_ms is not None]
        base = [r for r in timed if r.kind == "baseline"]
        ours = [r for r in timed if r.kind == "torch"]
        generated = [r for r in ours if "lowering" not in r.impl]
        default = [r for r in timed if r.kind == "default"]
        if not ours:
            continue
        tuned = min(ours + default, key=lambda r: r.median_ms)
        if base:
            best = min(base, key=lambda r: r.median_ms)
            ratio = best.median_ms / tuned.median_ms
            lines.append(f"| tuned >= 1.0x best baseline | {variant} | {n} | {ratio:.2f}x ({tuned.impl} "
                         f"{tuned.median_ms:.1f} ms vs {best.impl} {best.median_ms:.1f} ms) | "
                         f"{'met' if ratio >= 1.0 else 'NOT met'} |")
            sdpa = [r for r in base if r.impl == BASELINE_LABELS["sdpa"]]
            if sdpa and tuned.peak_bytes and sdpa[0].peak_bytes:
                mem = tuned.peak_bytes / sdpa[0].peak_bytes
                lines.append(f"| tuned peak memory <= 1.2x SDPA's | {variant} | {n} | {mem:.2f}x "
                             f"({_fmt_mib(tuned.peak_bytes)} vs {_fmt_mib(sdpa[0].peak_bytes)} MiB) | "
                             f"{'met' if mem <= 1.2 else 'NOT met'} |")
            if variant in ("softmax", "cosine_sim") and n == 4096 and sdpa and generated:
                own = min(generated, key=lambda r: r.median_ms)
                ratio = own.median_ms / sdpa[0].median_ms
                lines.append(f"| generated lowering within 1.25x of SDPA | {variant} | {n} | {ratio:.2f}x "
                             f"({own.impl}) | {'met' if ratio <= 1.25 else 'NOT met'} |")
        reference = [r for r in timed if r.kind == "reference"]
        if reference:
            ratio = reference[0].median_ms / tuned.median_ms
            lines.append(f"| >= 3x faster than the reference backend (no baseline) | {variant} | {n} | {ratio:.2f}x "
                         f"({tuned.impl}) | {'met' if ratio >= 3 else 'NOT met'} |")
        if default:
            ratio = default[0].median_ms / tuned.median_ms
            lines.append(f"| default within 1.5x of tuned | {variant} | {n} | {ratio:.2f}x | "
                         f"{'met' if ratio <= 1.5 else 'NOT met'} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench_torch.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Timings are medians of --repeats calls after --warmup calls (time.perf_counter); "
               "cells predicted (from the previous N) to exceed --max-mem-gib or "
               "--max-call-s are skipped and say so.")
    parser.add_argument("--quick", action="store_true", help="N=512,1024, 3 timed calls per cell (under 2 minutes with a warm compile cache)")
    parser.add_argument("--sizes", help="comma-separated sequence lengths (default 512,2048,8192)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated spec names (default: all five)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated, from {', '.join(IMPLS)} (default: all; torch-sdpa and torch-flex are "
                             "the torch backend's library lowerings, default is load() without a config)")
    parser.add_argument("--warmup", type=int,
                        help="untimed calls after the checking (compiling) call and the memory call, for cells "
                             "whose call takes under a second (default 1)")
    parser.add_argument("--repeats", type=int, help="timed calls per cell (default 5; --quick 3)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (default 0: leave torch's default, one per CPU); on a "
                             "machine shared with other busy processes 1 gives steadier numbers")
    parser.add_argument("--chunk-n", type=int, default=512,
                        help="CHUNK_N of the chunked lowering (default 512)")
    parser.add_argument("--chunk-m", type=int, default=256,
                        help="CHUNK_M of the chunked lowering: query rows per chunk, each visiting only the keys "
                             "its rows can keep (default 256, the backend's; 0 below N = 256 + 1)")
    parser.add_argument("--more-chunks", default="",
                        help="more compiled chunked rows, comma-separated CHUNK_MxCHUNK_N tiles (e.g. 512x256,64x64): "
                             "the tiles a tuner would also try")
    parser.add_argument("--ref-max", type=int, default=2048,
                        help="check against the float64 reference backend up to this N (default 2048)")
    parser.add_argument("--max-mem-gib", type=float, default=1.5,
                        help="skip an implementation when its peak at the previous N predicts more than this a call "
                             "(default 1.5)")
    parser.add_argument("--max-call-s", type=float, default=15.0,
                        help="skip an implementation when its time at the previous N predicts calls longer than this "
                             "(default 15)")
    parser.add_argument("--time-budget-s", type=float, default=15.0,
                        help="stop timing an implementation once its timed calls took this long, if it has 3 (default 15)")
    parser.add_argument("--compile-budget-s", type=float, default=180.0,
                        help="skip compiled cells whose compile is expected to take longer (default 180)")
    parser.add_argument("--dominated", type=float, default=2.0,
                        help="skip a baseline whose calls are expected to take over a second when, at the last N "
                             "it ran, it was this many times slower than the other baseline (default 2; 0: never)")
    parser.add_argument("--out", help="also write the table (with a header: date, machine, command) to this markdown file")
    args = parser.parse_args(argv)
    sizes = args.sizes or ("512,1024" if args.quick else "512,2048,8192")
    args.sizes = [int(s) for s in sizes.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        args.more_chunks = tuple(tuple(int(x) for x in tile.lower().split("x")) for tile in args.more_chunks.split(",")
                                 if tile.strip())
        if any(len(tile) != 2 or min(tile) < 0 for tile in args.more_chunks):
            raise ValueError
    except ValueError:
        parser.error(f"--more-chunks {args.more_chunks!r}: give CHUNK_MxCHUNK_N tiles, e.g. 512x256,64x64")
    args.impls = {s.strip() for s in args.impls.split(",") if s.strip()}
    known = set(IMPLS)
    if args.impls - known:
        parser.error(f"unknown implementation(s) {sorted(args.impls - known)}; choose from {', '.join(sorted(known))}")
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = (3 if args.quick else 5) if args.repeats is None else args.repeats
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    import kernelsearch  # noqa: F401  (imported before the freeze below)
    from torch.nn.attention import flex_attention  # noqa: F401
    gc.freeze()          # the imports' objects are permanent: later gc.collect() calls stay cheap
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    machine = machine_description()
    memory_ok = memory_probe_works()
    log(f"kernelsearch torch-backend benchmark: {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
        f"load average {machine['load']}; per-call peak-RSS probe {'works' if memory_ok else 'DOES NOT WORK here'}")
    history: dict = {}
    rows: list[Row] = []
    for name in args.variants:
        for n in args.sizes:
            rows.extend(run_cell_group(VARIANTS[name], n, args, history, log))
    elapsed = time.perf_counter() - started
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_minutes = (own.ru_utime + own.ru_stime) / 60, (children.ru_utime + children.ru_stime) / 60
    machine_after = machine_description()

    mismatches = [r for r in rows if r.mismatch]
    failures = [r for r in rows if r.status.startswith("failed")]
    command = "python bench/bench_torch.py" + ("" if not argv else " " + " ".join(argv))
    notes = [
        f"- command: `{command}`; {elapsed / 60:.1f} minutes wall time, {cpu_minutes[0]:.1f} minutes of CPU time "
        f"in the process (+{cpu_minutes[1]:.1f} in child processes such as compile workers); "
        f"per implementation and N: one checked (and, compiled, compiling) call, which is also the peak-memory "
        f"call for the uncompiled ones (compiled ones get a second call for it), "
        f"{args.warmup} warm-up call(s) (none for slow calls), then up to {args.repeats} timed calls "
        f"(`time.perf_counter`; fewer, but at least {min(3, args.repeats)}, once an implementation has spent "
        f"{args.time_budget_s:g} s) taken round-robin over the cell's implementations, "
        f"so that load changes hit them alike; median reported, min in the notes.",
        f"- b=1 (talking_heads: 1 sample x 2 streams), h={H}, d={D}, float32, {machine['threads']} torch threads, "
        f"chunked lowering with CHUNK_N={args.chunk_n} and CHUNK_M={args.chunk_m} (0 where N <= {args.chunk_m})"
        + "".join(f", and compiled with CHUNK_M={m}, CHUNK_N={k}" for m, k in args.more_chunks) + "; "
        "outputs under `torch.no_grad()`.",
        "- vs best baseline: this row's median over the fastest baseline's (SDPA or compiled flex) median "
        "for the same variant and N in this run; below 1 is faster than PyTorch's own kernels.",
        "- peak MiB: the rise of the process's peak resident set (VmHWM, reset by writing 5 to "
        "/proc/self/clear_refs) over its resident set just before one call (see above), with glibc's free heap pages handed back first (malloc_trim) so that "
        "blocks reused from earlier calls count; inputs, the baselines' precomputed masks and compiled "
        "code are not counted, the output is. "
        + ("The probe was checked at start-up against 48 MiB of reused temporaries." if memory_ok else
           "**The probe did not work on this machine: peak numbers are not meaningful.**"),
        f"- max abs diff: against the float64 reference backend up to N={args.ref_max}; beyond that against "
        f"the first implementation that ran for the same variant and N, marked `(check value)`, or "
        f"`unchecked (ran alone)` when nothing else ran; MISMATCH = not allclose(atol={ATOL:g}, rtol={RTOL:g}).",
        "- compiled rows: torch.compile(fullgraph=True, dynamic=False); `first call` is code generation plus "
        "compilation plus one call (inductor's on-disk cache may make a second run's first calls shorter).",
    ]
    for name in args.variants:
        variant = VARIANTS[name]
        notes.append(f"- {name}: {variant.setup}" + (f"; {variant.no_baseline}" if variant.no_baseline else ""))
    text = table(rows, VARIANTS) + "\n\n" + goals(rows) + "\n\n" + "\n".join(notes) + "\n"
    if mismatches:
        text += (f"\n**MISMATCH in {len(mismatches)} cell(s)**: "
                 + ", ".join(f"{r.variant} N={r.n} {r.impl} (max abs diff {r.max_diff:.1e})" for r in mismatches) + "\n")
    if failures:
        text += f"\n{len(failures)} cell(s) failed: " + "; ".join(f"{r.variant} N={r.n} {r.impl}: {r.status}" for r in failures) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# Torch backend vs SDPA and FlexAttention on the CPU\n\n"
                  f"- date: {datetime.date.today().isoformat()}\n"
                  f"- machine: {machine['cpu']}, {machine['cpus']} CPUs ({platform.machine()}, {platform.system()})\n"
                  f"- torch {machine['torch']}, Python {machine['python']}\n"
                  f"- load average (1/5/15 min) at start: {machine['load']}; at end: {machine_after['load']}\n"
                  f"- command: `{command}`\n\n")
        out.write_text(header + text)
        log(f"wrote {out}")
    if mismatches:
        log(f"MISMATCH: {len(mismatches)} cell(s) disagree with the check value beyond fp32 tolerance")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
