"""The generated Triton kernels, forward and forward+backward, against PyTorch's attention kernels, on a CUDA GPU.

    python bench/bench_triton.py                          # N = 1k..16k, d = 64, 128, causal or not, bf16, both passes
    python bench/bench_triton.py --direction fwd          # the forward only (fwd+bwd: the training step only)
    python bench/bench_triton.py --sizes 4096 --head-dims 64 --variants talking_heads
    python bench/bench_triton.py --out table.md           # also write the table (device, date, command) to table.md
    python bench/bench_triton.py --save                   # ... or to bench/results/triton_<device>_<date>.md
    python bench/bench_triton.py --dry-run                # CPU: the plumbing only (Triton interpreter), no timings

For every variant, N, head dim, causal flag and direction it times (``triton.testing.do_bench``, median)

- ``kernelsearch`` triton backend (``kernelsearch.load(spec, backend="triton")``, default or tuned config);
- ``F.scaled_dot_product_attention`` restricted to the flash backend, where it can express the variant;
- FlexAttention compiled with ``torch.compile``, where it can express the variant (block masks are
  built outside the timed call; rotary and l2norm, which flex cannot fuse, run inside it);
- the compiled torch backend for talking heads, which neither SDPA nor flex can express.

Directions (``--direction fwd|fwd+bwd|both``, default both): ``fwd`` times the output under
``torch.no_grad()``; ``fwd+bwd`` times one training step of the attention, ``attn(...).backward(dO)``
with every floating-point input (q, k, v and the position-bias table / head-mixing matrices) a
leaf that requires grad, ``grad_to_none`` resetting them between repetitions. For the triton
backend that is its training path: the forward that saves the row log-sum-exp and the generated
dq / dkdv kernels, through torch.library's autograd.

TFLOP/s count the attention matmuls over the kept (i, j) pairs only (FlashAttention's convention):
forward 4 * B * H * D * kept (QK^T and PV); backward 2.5 x forward (the S recomputation, dV, dP,
dQ, dK: 5 matmuls), so fwd+bwd is 3.5 x forward = 14 * B * H * D * kept; kept = N^2 (full),
N (N + 1) / 2 (causal: about half), the window's pairs (local). Talking heads counts its two
streams (2 B) and not its small head-mixing matmuls. "vs SDPA flash" and "vs flex" are that
baseline's median time over the row's, measured in the same run (> 1: the row is faster);
"n/a" where the baseline cannot express the variant or did not run.

Before timing, every implementation's output (and, for fwd+bwd, every input's gradient for a
fixed random dO) is compared with the kernelsearch triton backend's (bf16: 3e-2 absolute on the
output, 5e-2 of the largest gradient on gradients); a mismatch is printed and sets the exit code
to 1. Out of memory becomes an "oom" cell, a baseline's NotImplementedError an "n/a (unsupported)"
cell, any other exception an "error" cell (exit code 1); none of them stops the run.

`--dry-run` runs the same plumbing on the CPU at tiny sizes (B = 1, H = 2, d = 16, N = 32, 48)
with TRITON_INTERPRET=1 (fp32, since the interpreter has no bf16 arithmetic), eager flex and the
eager torch backend, checks every output and gradient against autograd through the float64
reference backend (1e-3; FlexAttention has no backward on the CPU: those cells are n/a), and
prints no performance numbers: the interpreter's wall times say nothing about a GPU. `--out`
then writes the check table. Without a CUDA GPU and without --dry-run the script exits with code 2.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("softmax", "cosine_sim", "memory_efficient", "local", "talking_heads")
DIRECTIONS = ("fwd", "fwd+bwd")
TOKENS = 16384            # B * N: the batch shrinks as N grows
MODEL_DIM = 1024          # H * D
FWD_BWD_FLOPS = 3.5       # fwd+bwd FLOPs / fwd FLOPs (FlashAttention: backward = 2.5 x forward)
KERNELSEARCH = "kernelsearch triton"


@dataclass
class Case:
    variant: str
    n: int
    d: int
    causal: bool
    batch: int
    heads: int

    @property
    def params(self) -> dict:
        params = {"causal": self.causal}
        if self.variant == "local" and not self.causal:
            params["look_forward"] = 1
        return params


@dataclass
class Row:
    case: Case
    direction: str
    label: str
    ms: float | None = None       # None: no timing (dry run, oom, error)
    status: str = ""              # "", "oom", "error: ..."
    ok: bool = True               # output / gradients matched
    check: str = ""               # max differences, for the dry run


def kept_pairs(case: Case) -> int:
    n = case.n
    if case.variant == "local":
        import numpy as np
        w, lb, lf = 64, 1, (0 if case.causal else 1)
        i = np.arange(n)
        lo = np.maximum((i // w - lb) * w, 0)
        hi = np.minimum((i // w + lf) * w + w - 1, n - 1)
        if case.causal:
            hi = np.minimum(hi, i)
        return int((hi - lo + 1).clip(min=0).sum())
    return n * (n + 1) // 2 if case.causal else n * n


def flops(case: Case, direction: str) -> float:
    fwd = 4 * case.batch * (2 if case.variant == "talking_heads" else 1) * case.heads * case.d * kept_pairs(case)
    return fwd * (FWD_BWD_FLOPS if direction == "fwd+bwd" else 1.0)


def make_inputs(case: Case, spec, dtype, device, requires_grad: bool):
    from kernelsearch.inputs import random_inputs
    streams = 2 if case.variant == "talking_heads" else 1
    sizes = {"B": case.batch * streams, "H": case.heads, "I": case.n, "J": case.n, "D": case.d}
    wanted = {"memory_efficient": ["mask"], "local": ["pos_bias_table"],
              "talking_heads": ["pre_mix", "post_mix"]}.get(case.variant, [])
    tensors = random_inputs(spec, sizes, dtype=dtype, device=device, optional=wanted, params=case.params)
    if "mask" in tensors:
        tensors["mask"][:, 0] = True      # no fully-masked rows: baselines differ there, not what is measured
    if requires_grad:                     # every float input is a leaf of the training step
        tensors = {n: t.detach().requires_grad_() if t.is_floating_point() else t for n, t in tensors.items()}
    return tensors


def is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------------------------------- baselines

def _rotary(x, theta=10000.0):
    import torch
    n, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()).to(x.dtype)


def baselines(case: Case, inputs: dict, dry_run: bool) -> dict:
    """name -> zero-argument callable, for the baselines that can express the case."""
    import torch
    import torch.nn.functional as F
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    d, n, causal = case.d, case.n, case.causal
    out = {}
    name = case.variant

    def sdpa(*args, **kwargs):
        if dry_run:
            return F.scaled_dot_product_attention(*args, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):     # the backward follows the forward's choice
            return F.scaled_dot_product_attention(*args, **kwargs)

    if name in ("softmax", "cosine_sim"):
        if name == "softmax":
            out["sdpa (flash)"] = lambda: sdpa(q, k, v, is_causal=causal, scale=d ** -0.5)
        else:
            out["sdpa (flash) + l2norm"] = lambda: sdpa(F.normalize(q, dim=-1, eps=1e-12),
                                                        F.normalize(k, dim=-1, eps=1e-12), v,
                                                        is_causal=causal, scale=8.0)
    if name == "talking_heads":
        import kernelsearch
        config = {"lowering": "chunked", "CHUNK_N": min(1024, n), "compile": not dry_run}
        attn = kernelsearch.load(ROOT / "specs/talking_heads.yaml", backend="torch", config=config, **case.params)
        label = "torch backend (compiled, chunked)" if not dry_run else "torch backend (eager, chunked)"
        out[label] = lambda: attn(**inputs)
        return out

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = flex_attention if dry_run else torch.compile(flex_attention, fullgraph=True, dynamic=False)
    device = q.device
    label = "flex (eager)" if dry_run else "flex (compiled)"

    def causal_mod(b, h, qi, kv):
        return qi >= kv
    if name == "softmax":
        mask = create_block_mask(causal_mod, None, None, n, n, device=device) if causal else None
        out[label] = lambda: flex(q, k, v, block_mask=mask, scale=d ** -0.5)
    elif name == "cosine_sim":
        mask = create_block_mask(causal_mod, None, None, n, n, device=device) if causal else None
        out[label + " + l2norm"] = lambda: flex(F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12),
                                                v, block_mask=mask, scale=8.0)
    elif name == "memory_efficient":
        padding = inputs["mask"]

        def keep(b, h, qi, kv):
            return ((qi >= kv) | (not causal)) & padding[b, kv]
        mask = create_block_mask(keep, q.shape[0], None, n, n, device=device)
        out[label] = lambda: flex(q, k, v, block_mask=mask, scale=d ** -0.5)
    elif name == "local":
        table = inputs["pos_bias_table"]
        w, lb, lf = 64, 1, (0 if causal else 1)

        def window(b, h, qi, kv):
            distance = qi // w - kv // w
            keep = (distance <= lb) & (distance >= -lf)
            return keep & (kv <= qi) if causal else keep

        def add_table(score, b, h, qi, kv):
            return score + table[h, (qi - kv).abs()]
        mask = create_block_mask(window, None, None, n, n, device=device)
        out[label + " + rotary"] = lambda: flex(_rotary(q * d ** -0.5), _rotary(k), v, score_mod=add_table,
                                                block_mask=mask, scale=1.0)
    return out


# ------------------------------------------------------------------------------------------ running

def training_step(fn, leaves: dict, dout):
    """Output and the gradient of every leaf for one forward + backward (gradients reset first)."""
    for t in leaves.values():
        t.grad = None
    out = fn()
    out.backward(dout)
    grads = {n: t.grad for n, t in leaves.items()}
    for t in leaves.values():
        t.grad = None
    return out.detach(), grads


def compare(out, grads, expected_out, expected_grads, tol_out, tol_grad):
    """(ok, text): the largest output difference and gradient difference (relative to the largest gradient)."""
    out_err = (out.double() - expected_out.double()).abs().max().item()
    ok, parts = out_err <= tol_out, [f"out {out_err:.1e}"]
    if expected_grads is not None:
        grad_err = 0.0
        for n, g in expected_grads.items():
            if g is None:
                continue
            got = grads.get(n)
            if got is None:
                ok = False
                parts.append(f"no gradient for {n}")
                continue
            scale = max(g.abs().max().item(), 1e-6)
            grad_err = max(grad_err, (got.double() - g.double()).abs().max().item() / scale)
        ok = ok and grad_err <= tol_grad
        parts.append(f"grads {grad_err:.1e}")
    return ok, ", ".join(parts)


def describe(case: Case, direction: str, label: str) -> str:
    return f"{case.variant} N={case.n} d={case.d} causal={case.causal} {direction} {label}"


def run_case(case: Case, args, directions, rows: list, failures: list) -> None:
    import torch
    import kernelsearch
    spec_path = ROOT / f"specs/{case.variant}.yaml"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    device = "cpu" if args.dry_run else "cuda"
    triton_attn = kernelsearch.load(spec_path, backend="triton", **case.params)
    inputs = make_inputs(case, triton_attn.spec, dtype, device, requires_grad="fwd+bwd" in directions)
    leaves = {n: t for n, t in inputs.items() if t.is_floating_point() and t.requires_grad}
    plain = {n: t.detach() for n, t in inputs.items()}       # the forward's inputs: no grad anywhere

    def implementations(tensors: dict) -> dict:
        impls = {KERNELSEARCH: lambda: triton_attn(**tensors)}
        try:
            impls.update(baselines(case, tensors, args.dry_run))
        except Exception as e:    # a baseline that cannot be built is reported, not fatal
            if is_oom(e):
                raise
            print(f"  ({case.variant}: baseline unavailable: {type(e).__name__}: {e})", file=sys.stderr)
        return impls
    tol_out, tol_grad = (1e-3, 1e-3) if args.dry_run else (3e-2, 5e-2)
    if args.dry_run:
        reference = kernelsearch.load(spec_path, backend="reference", **case.params)
        ref_leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
        ref_inputs = {**inputs, **ref_leaves}
    for direction in directions:
        backward = direction == "fwd+bwd"
        impls = implementations(inputs if backward else plain)
        results = {}            # label -> Row of the implementations that ran
        expected = None         # (output, gradients) to compare with
        dout = None
        if args.dry_run:
            if backward:
                with torch.no_grad():
                    shape = reference(**ref_inputs).shape
                dout = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                expected = training_step(lambda: reference(**ref_inputs), ref_leaves, dout)
            else:
                with torch.no_grad():
                    expected = (reference(**ref_inputs), None)
        for label, fn in impls.items():
            row = Row(case, direction, label)
            start = time.perf_counter()
            try:
                if backward:
                    if dout is None:        # GPU: a fixed random dO, shaped like the output
                        with torch.no_grad():
                            shape = fn().shape
                        dout = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(1),
                                           device=device, dtype=torch.float64)
                    out, grads = training_step(fn, leaves, dout.to(dtype))
                else:
                    with torch.no_grad():
                        out, grads = fn(), None
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:
                if is_oom(e):
                    row.status = "oom"
                    print(f"  {describe(case, direction, label)}: out of memory", file=sys.stderr)
                elif isinstance(e, NotImplementedError) and label != KERNELSEARCH:
                    row.status = "n/a (unsupported)"      # e.g. flex has no backward on the CPU
                    print(f"  {describe(case, direction, label)}: unsupported here: {str(e)[:200]}", file=sys.stderr)
                else:
                    row.status = f"error: {type(e).__name__}"      # counted in failures (exit code 1)
                    print(f"  {describe(case, direction, label)}: FAILED {type(e).__name__}: {str(e)[:300]}",
                          file=sys.stderr)
                    failures.append((describe(case, direction, label), f"{type(e).__name__}: {str(e)[:300]}"))
                rows.append(row)
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            wall = time.perf_counter() - start
            if expected is None and label == KERNELSEARCH:
                expected = (out.float(), {n: (g.float() if g is not None else None) for n, g in grads.items()}
                            if grads is not None else None)
            if expected is not None:
                row.ok, row.check = compare(out, grads, expected[0], expected[1], tol_out, tol_grad)
                if not row.ok:
                    failures.append((describe(case, direction, label), f"mismatch: {row.check}"))
            else:
                row.check = "unchecked (kernelsearch did not run)"
            del out, grads
            results[label] = row
            rows.append(row)
            if args.dry_run:
                print(f"  dry-run {case.variant:<16} N={case.n:<4} d={case.d:<3} causal={case.causal!s:<5} "
                      f"{direction:<7} {label:<36} {'ok' if row.ok else 'MISMATCH'} ({row.check}; "
                      f"interpreter/CPU wall {wall:.2f}s, not a GPU number)", flush=True)
        expected = None
        if args.dry_run:
            continue
        from triton.testing import do_bench
        for label, row in results.items():
            fn = impls[label]
            if backward:
                d_o = dout.to(dtype)

                def bench_fn(fn=fn, d_o=d_o):
                    fn().backward(d_o)
                grad_to_none = list(leaves.values())
            else:
                bench_fn, grad_to_none = fn, None
            try:
                if backward:
                    row.ms = do_bench(bench_fn, warmup=args.warmup, rep=args.rep, grad_to_none=grad_to_none,
                                      return_mode="median")
                else:
                    with torch.no_grad():
                        row.ms = do_bench(bench_fn, warmup=args.warmup, rep=args.rep, return_mode="median")
            except Exception as e:
                if is_oom(e):
                    row.status = "oom"
                else:
                    row.status = f"error: {type(e).__name__}"
                    failures.append((describe(case, direction, label), f"timing failed: {e}"[:300]))
                torch.cuda.empty_cache()
            for t in leaves.values():
                t.grad = None
            if row.ms is not None:
                print(f"  {case.variant:<16} causal={case.causal!s:<5} N={case.n:<6} d={case.d:<4} {direction:<7} "
                      f"{label:<36} {row.ms:9.3f} ms {flops(case, direction) / row.ms / 1e9:8.1f} TFLOP/s"
                      + ("" if row.ok else "  MISMATCH"), flush=True)
            else:
                print(f"  {case.variant:<16} causal={case.causal!s:<5} N={case.n:<6} d={case.d:<4} {direction:<7} "
                      f"{label:<36} {row.status}", flush=True)


def _ratio(base: Row | None, row: Row) -> str:
    if base is None or base.ms is None or row.ms is None:
        return "n/a"
    return f"{base.ms / row.ms:.2f}x"


def table(rows: list, dry_run: bool) -> str:
    if dry_run:
        lines = ["| variant | causal | N | d | pass | implementation | check vs float64 reference (max abs out, "
                 "max grad diff / largest grad) |",
                 "| --- | --- | ---: | ---: | --- | --- | --- |"]
        for r in rows:
            c = r.case
            verdict = r.status or ("ok" if r.ok else "MISMATCH")
            lines.append(f"| {c.variant} | {c.causal} | {c.n} | {c.d} | {r.direction} | {r.label} | "
                         f"{verdict}{'; ' + r.check if r.check else ''} |")
        return "\n".join(lines)
    lines = ["| variant | causal | N | d | pass | implementation | ms | TFLOP/s | vs SDPA flash | vs flex | "
             "kernelsearch speed-up vs best baseline |",
             "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.case.variant, r.case.causal, r.case.n, r.case.d, r.direction), []).append(r)
    for group in groups.values():
        sdpa = next((r for r in group if r.label.startswith("sdpa")), None)
        flex = next((r for r in group if r.label.startswith("flex")), None)
        timed = [r.ms for r in group if r.label != KERNELSEARCH and r.ms is not None]
        best = min(timed) if timed else None
        for r in group:
            c = r.case
            ms = f"{r.ms:.3f}" if r.ms is not None else (r.status or "n/a")
            tflops = f"{flops(c, r.direction) / r.ms / 1e9:.1f}" if r.ms is not None else "n/a"
            vs_best = (f"{best / r.ms:.2f}x" if best is not None and r.ms is not None else "n/a") \
                if r.label == KERNELSEARCH else ""
            lines.append(f"| {c.variant} | {c.causal} | {c.n} | {c.d} | {r.direction} | "
                         f"{r.label}{'' if r.ok else ' (MISMATCH)'} | {ms} | {tflops} | {_ratio(sdpa, r)} | "
                         f"{_ratio(flex, r)} | {vs_best} |")
    return "\n".join(lines)


def header(device_name: str, args, argv, torch_version: str) -> str:
    stamp = datetime.date.today().isoformat()
    command = "python bench/bench_triton.py " + " ".join(argv if argv is not None else sys.argv[1:])
    what = "dry run on the CPU (Triton interpreter, fp32): correctness only, no timings" if args.dry_run else \
        (f"bf16, B = {TOKENS} // N, H = {MODEL_DIM} // d; triton.testing.do_bench medians "
         f"(warmup {args.warmup} ms, rep {args.rep} ms)")
    return (f"# kernelsearch triton vs PyTorch attention ({', '.join(args.directions)}), {device_name}\n\n"
            f"- device: {device_name}\n"
            f"- date: {stamp}\n"
            f"- torch {torch_version}; {what}\n"
            f"- command: `{command.strip()}`\n"
            f"- TFLOP/s: attention matmuls over kept (i, j) pairs (FlashAttention convention): fwd 4*B*H*D*kept, "
            f"fwd+bwd 3.5 x fwd = 14*B*H*D*kept (backward = 2.5 x forward); kept = N^2, N(N+1)/2 if causal "
            f"(about half), the window's pairs for local; talking heads counts 2 B (two streams)\n"
            f"- vs SDPA flash / vs flex: that baseline's median ms over the row's, same run (> 1: the row is faster); "
            f"n/a where the baseline cannot express the variant or did not run; oom: out of memory\n\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check (Triton interpreter, tiny sizes)")
    parser.add_argument("--direction", choices=("fwd", "fwd+bwd", "both"), default="both",
                        help="time the forward, forward+backward, or both (default)")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 1024,2048,4096,8192,16384)")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--causal", default="false,true", help="false, true or both (default)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    parser.add_argument("--out", help="also write the table (device, date, command) to this markdown file")
    parser.add_argument("--save", action="store_true", help="write the table to bench/results/")
    args = parser.parse_args(argv)
    args.directions = DIRECTIONS if args.direction == "both" else (args.direction,)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here; run with --dry-run to check the plumbing on the CPU "
              "(no performance numbers are produced without a GPU)", file=sys.stderr)
        return 2
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 64           # every case compiles flex anew (see reset below)
    torch._dynamo.config.accumulated_recompile_limit = 4096
    sizes = [int(s) for s in (args.sizes or ("32,48" if args.dry_run else "1024,2048,4096,8192,16384")).split(",")]
    head_dims = [int(d) for d in (args.head_dims if not args.dry_run else "16").split(",")]
    causal_flags = [c.strip().lower() == "true" for c in args.causal.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    rows, failures = [], []
    device_name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(f"bench_triton on {device_name}, torch {torch.__version__}, {', '.join(args.directions)}")
    for variant in variants:
        for d in head_dims:
            for n in sizes:
                for causal in causal_flags:
                    if args.dry_run:
                        case = Case(variant, n, d, causal, batch=1, heads=2)
                    else:
                        case = Case(variant, n, d, causal, batch=max(1, TOKENS // n), heads=max(1, MODEL_DIM // d))
                    try:
                        run_case(case, args, args.directions, rows, failures)
                    except Exception as e:   # the case's set-up (inputs, block masks): every cell oom / error
                        status = "oom" if is_oom(e) else f"error: {type(e).__name__}"
                        print(f"  {case.variant} N={case.n} d={case.d} causal={case.causal}: {status}: "
                              f"{str(e)[:300]}", file=sys.stderr)
                        if status != "oom":
                            failures.append((f"{case.variant} N={case.n} d={case.d} causal={case.causal}",
                                             f"{type(e).__name__}: {str(e)[:300]}"))
                        done = {r.direction for r in rows if r.case is case}
                        for direction in (x for x in args.directions if x not in done):
                            rows.append(Row(case, direction, KERNELSEARCH, status=status))
                    finally:
                        torch._dynamo.reset()       # this case's compiled code is not needed again
                        if not args.dry_run:
                            torch.cuda.empty_cache()
    text = table(rows, args.dry_run)
    if not args.dry_run:
        print()
        print(text)
    paths = [Path(args.out)] if args.out else []
    if args.save and not args.dry_run:
        stamp = datetime.date.today().isoformat()
        device_tag = device_name.replace(" ", "_").replace("/", "_")
        paths.append(ROOT / "bench" / "results" / f"triton_{device_tag}_{stamp}.md")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header(device_name, args, argv, torch.__version__) + text + "\n")
        print(f"wrote {path}")
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for where, why in failures:
            print(f"  {where}: {why}", file=sys.stderr)
        return 1
    if args.dry_run:
        skipped = [f"{describe(r.case, r.direction, r.label)}: {r.status}" for r in rows if r.status]
        print("dry run ok: every implementation ran and matched the float64 reference, outputs and gradients"
              + (f", except {len(skipped)} n/a or oom cell(s):\n  " + "\n  ".join(skipped) if skipped else "")
              + "\n(no performance numbers recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
