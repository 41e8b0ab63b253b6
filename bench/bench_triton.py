"""The generated Triton forward kernels against PyTorch's attention kernels, on a CUDA GPU.

    python bench/bench_triton.py                          # N = 1k..16k, d = 64, 128, causal and not, bf16
    python bench/bench_triton.py --sizes 4096 --head-dims 64 --variants talking_heads
    python bench/bench_triton.py --save                   # also write bench/results/triton_<device>_<date>.md
    python bench/bench_triton.py --dry-run                # CPU: the plumbing only (Triton interpreter)

For every variant, N, head dim and causal flag it times (``triton.testing.do_bench``, median)

- ``kernelsearch`` triton backend (``kernelsearch.load(spec, backend="triton")``, default or tuned config);
- ``F.scaled_dot_product_attention`` restricted to the flash backend, where it can express the variant;
- FlexAttention compiled with ``torch.compile``, where it can express the variant (block masks are
  built outside the timed call; rotary and l2norm, which flex cannot fuse, run inside it);
- the compiled torch backend for talking heads, which neither SDPA nor flex can express.

TFLOP/s count the two attention matmuls over the kept (i, j) pairs only: 4 * B * H * D * kept,
kept = N^2 (full), N (N + 1) / 2 (causal), the window's pairs (local). Before timing, every
implementation's output is compared with the kernelsearch output (bf16 tolerance); a mismatch is
printed and makes the exit code 1.

`--dry-run` runs the same plumbing on the CPU at tiny sizes with TRITON_INTERPRET=1 (fp32, since
the interpreter has no bf16 arithmetic), checks every output against the float64 reference, and
prints no performance numbers: the interpreter's wall times say nothing about a GPU.
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
TOKENS = 16384            # B * N: the batch shrinks as N grows
MODEL_DIM = 1024          # H * D


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


def make_inputs(case: Case, spec, dtype, device):
    import torch
    from kernelsearch.inputs import random_inputs
    streams = 2 if case.variant == "talking_heads" else 1
    sizes = {"B": case.batch * streams, "H": case.heads, "I": case.n, "J": case.n, "D": case.d}
    wanted = {"memory_efficient": ["mask"], "local": ["pos_bias_table"],
              "talking_heads": ["pre_mix", "post_mix"]}.get(case.variant, [])
    tensors = random_inputs(spec, sizes, dtype=dtype, device=device, optional=wanted, params=case.params)
    if "mask" in tensors:
        tensors["mask"][:, 0] = True      # no fully-masked rows: baselines differ there, not what is measured
    return tensors


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
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
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

def run_case(case: Case, args, rows: list, failures: list) -> None:
    import torch
    import kernelsearch
    spec_path = ROOT / f"specs/{case.variant}.yaml"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    device = "cpu" if args.dry_run else "cuda"
    triton_attn = kernelsearch.load(spec_path, backend="triton", **case.params)
    inputs = make_inputs(case, triton_attn.spec, dtype, device)
    impls = {"kernelsearch triton": lambda: triton_attn(**inputs)}
    try:
        impls.update(baselines(case, inputs, args.dry_run))
    except Exception as e:    # a baseline that cannot be built is reported, not fatal
        print(f"  ({case.variant}: baseline unavailable: {type(e).__name__}: {e})", file=sys.stderr)
    with torch.no_grad():
        if args.dry_run:
            reference = kernelsearch.load(spec_path, backend="reference", **case.params)
            check = reference(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
            tol = 1e-3
        else:
            check = impls["kernelsearch triton"]().float()
            tol = 3e-2
        results = {}
        for label, fn in impls.items():
            start = time.perf_counter()
            try:
                out = fn()
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:
                print(f"  {case.variant} N={case.n} d={case.d} causal={case.causal} {label}: FAILED "
                      f"{type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                failures.append((case, label, str(e)[:300]))
                continue
            wall = time.perf_counter() - start
            err = (out.double() - check.double()).abs().max().item()
            ok = err <= tol
            if not ok:
                failures.append((case, label, f"max abs difference {err:.3g} > {tol}"))
            results[label] = (ok, err, wall)
        if args.dry_run:
            for label, (ok, err, wall) in results.items():
                print(f"  dry-run {case.variant:<16} N={case.n:<4} d={case.d:<3} causal={case.causal!s:<5} "
                      f"{label:<36} {'ok' if ok else 'MISMATCH'} (max diff {err:.1e}; "
                      f"interpreter/CPU wall {wall:.2f}s, not a GPU number)")
            return
        from triton.testing import do_bench
        flops = 4 * case.batch * (2 if case.variant == "talking_heads" else 1) * case.heads * case.d * kept_pairs(case)
        timed = {}
        for label, fn in impls.items():
            if label not in results:
                continue
            try:
                timed[label] = do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
            except Exception as e:
                failures.append((case, label, f"timing failed: {e}"[:300]))
        best = min((ms for label, ms in timed.items() if label != "kernelsearch triton"), default=None)
        for label, ms in timed.items():
            ok, err, _ = results[label]
            rows.append((case.variant, case.causal, case.n, case.d, label, ms, flops / ms / 1e9,
                         (best / ms) if best and label == "kernelsearch triton" else None, ok))
            print(f"  {case.variant:<16} causal={case.causal!s:<5} N={case.n:<6} d={case.d:<4} {label:<36} "
                  f"{ms:9.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s" + ("" if ok else "  MISMATCH"), flush=True)


def table(rows) -> str:
    lines = ["| variant | causal | N | d | implementation | ms | TFLOP/s | kernelsearch speed-up vs best baseline |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for variant, causal, n, d, label, ms, tflops, ratio, ok in rows:
        lines.append(f"| {variant} | {causal} | {n} | {d} | {label}{'' if ok else ' (MISMATCH)'} | {ms:.3f} | "
                     f"{tflops:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check (Triton interpreter, tiny sizes)")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 1024,2048,4096,8192,16384)")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--causal", default="false,true", help="false, true or both (default)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    parser.add_argument("--save", action="store_true", help="write the table to bench/results/")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here; run with --dry-run to check the plumbing on the CPU "
              "(no performance numbers are produced without a GPU)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in (args.sizes or ("32,48" if args.dry_run else "1024,2048,4096,8192,16384")).split(",")]
    head_dims = [int(d) for d in (args.head_dims if not args.dry_run else "16").split(",")]
    causal_flags = [c.strip().lower() == "true" for c in args.causal.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    rows, failures = [], []
    device_name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(f"bench_triton on {device_name}, torch {torch.__version__}")
    for variant in variants:
        for d in head_dims:
            for n in sizes:
                for causal in causal_flags:
                    if args.dry_run:
                        case = Case(variant, n, d, causal, batch=1, heads=2)
                    else:
                        case = Case(variant, n, d, causal, batch=max(1, TOKENS // n), heads=max(1, MODEL_DIM // d))
                    run_case(case, args, rows, failures)
    if not args.dry_run:
        text = table(rows)
        print()
        print(text)
        if args.save:
            out_dir = ROOT / "bench" / "results"
            out_dir.mkdir(parents=True, exist_ok=True)
            stamp = datetime.date.today().isoformat()
            device_tag = device_name.replace(" ", "_").replace("/", "_")
            path = out_dir / f"triton_{device_tag}_{stamp}.md"
            path.write_text(f"# kernelsearch triton forward vs PyTorch, {device_name}, {stamp}\n\n"
                            f"torch {torch.__version__}, bf16, B = {TOKENS} // N, H = {MODEL_DIM} // d; "
                            f"`python bench/bench_triton.py {' '.join(argv or sys.argv[1:])}`\n\n{text}\n")
            print(f"wrote {path}")
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for case, label, why in failures:
            print(f"  {case.variant} N={case.n} d={case.d} causal={case.causal} {label}: {why}", file=sys.stderr)
        return 1
    if args.dry_run:
        print("dry run ok: every implementation ran and matched the reference (no performance numbers recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
