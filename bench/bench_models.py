"""Training throughput and memory of the five seed LMs, per attention backend, in one run.

    python bench/bench_models.py                      # CPU: reference vs torch vs torch + torch.compile
    python bench/bench_models.py --device cuda        # GPU: adds the triton backend
    python bench/bench_models.py --families local talking_heads --steps 20 --out table.md

Every (family, backend) row runs in its own fresh Python process, so that peak memory is that
row's alone and compilation caches do not leak between rows. Columns:

- tokens/s: training tokens (batch x seq_len) per second over ``--steps`` Adam steps, after
  ``--warmup`` steps (which absorb code generation and torch.compile);
- step ms: mean wall time of one step;
- peak MiB: on CUDA, ``torch.cuda.max_memory_allocated`` during training; on the CPU, the
  process's peak resident set during training (``VmHWM``, reset through ``/proc/self/clear_refs``
  once the model is built) minus its resident set at that moment;
- saved MiB: bytes of the activations autograd keeps for backward in one step (distinct
  storages seen by ``saved_tensors_hooks``, parameters excluded) — the number the reversible
  stack exists to shrink; ``memory_efficient[plain]`` is the same model with a plain
  (non-reversible) stack for comparison.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("mesh_tf", "cosine_sim", "memory_efficient", "memory_efficient[plain]", "local",
            "talking_heads")


def _config(family: str, args):
    sys.path.insert(0, str(ROOT))
    from kernelsearch.models import resolve_model
    base = family.split("[")[0]
    cfg = resolve_model(base, None)
    if family.endswith("[plain]"):
        cfg.model["reversible"] = False
    cfg.model.update(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim // args.heads,
                     max_seq_len=args.seq_len)
    cfg.train.batch_size, cfg.train.seq_len = args.batch_size, args.seq_len
    cfg.train.corpus_bytes = 2_000_000
    return cfg


def _saved_bytes(model, batch) -> int:
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> int:
    """Reset the peak-RSS mark (Linux); returns the resident set now, in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_kib("VmRSS")


def worker(family: str, backend: str, args) -> dict:
    import torch
    from kernelsearch.models import build_model
    from kernelsearch.models import data as lm_data

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = args.device
    cfg = _config(family, args)
    corpus = lm_data.load_corpus(cfg.train.corpus_bytes)
    attn_backend, compile_model = backend.split("+")[0], backend.endswith("+compile")
    gen = torch.Generator().manual_seed(0)
    batches = [lm_data.get_batch(corpus.train, args.batch_size, args.seq_len, gen, device)
               for _ in range(args.warmup + args.steps)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build_model(cfg, attn_backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rss0 = _reset_peak_rss()
    loss_fn = torch.compile(model.loss) if compile_model else model.loss

    def step(batch):
        loss, _ = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    t_warm = time.perf_counter()
    for b in batches[:args.warmup]:
        step(b)
    if device == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    losses = [step(b) for b in batches[args.warmup:]]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (_rss_kib("VmHWM") - rss0) * 1024
    saved = _saved_bytes(model, batches[0])
    tokens = args.steps * args.batch_size * args.seq_len
    return {"family": family, "backend": backend, "tokens_per_s": tokens / seconds,
            "step_ms": seconds / args.steps * 1e3, "warmup_s": warm_s, "peak_mib": peak / 2**20,
            "saved_mib": saved / 2**20, "final_loss": losses[-1]}


def _row(family, backend, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", family, backend, *args.passthrough]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"family": family, "backend": backend, "error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"family": family, "backend": backend, "error": last[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows, args) -> str:
    head = ("family", "backend", "tokens/s", "step ms", "vs reference", "peak MiB", "saved MiB",
            "warm-up s", "loss")
    ref = {r["family"]: r["tokens_per_s"] for r in rows if r["backend"] == "reference" and "error" not in r}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['backend']} | failed: {r['error']} |" + " |" * (len(head) - 3))
            continue
        ratio = f"{r['tokens_per_s'] / ref[r['family']]:.2f}x" if r["family"] in ref else "-"
        lines.append(f"| {r['family']} | {r['backend']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                     f"{ratio} | {r['peak_mib']:.1f} | {r['saved_mib']:.2f} | {r['warmup_s']:.1f} | "
                     f"{r['final_loss']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--backends", nargs="+", default=None,
                   help="reference, torch, torch+compile, triton (default: all that fit the device)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per row")
    p.add_argument("--out", help="also write the table (markdown) here")
    p.add_argument("--worker", nargs=2, metavar=("FAMILY", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return 0
    backends = args.backends or (["reference", "torch", "torch+compile", "triton"] if args.device == "cuda"
                                 else ["reference", "torch", "torch+compile"])
    args.passthrough = [f"--device={args.device}", f"--dim={args.dim}", f"--depth={args.depth}",
                        f"--heads={args.heads}", f"--batch-size={args.batch_size}",
                        f"--seq-len={args.seq_len}", f"--steps={args.steps}",
                        f"--warmup={args.warmup}", f"--threads={args.threads}"]
    rows = []
    for family in args.families:
        for backend in backends:
            rows.append(_row(family, backend, args))
            r = rows[-1]
            msg = r.get("error") or f"{r['tokens_per_s']:,.0f} tokens/s"
            print(f"  {family:24s} {backend:14s} {msg}", file=sys.stderr, flush=True)
    import torch
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    header = (f"LM training throughput — {datetime.date.today()} — {device} — torch {torch.__version__}\n"
              f"dim {args.dim}, depth {args.depth}, heads {args.heads}, batch {args.batch_size} x "
              f"seq {args.seq_len} bytes, {args.steps} timed steps after {args.warmup} warm-up, fp32; "
              f"load average at the end {os.getloadavg()[0]:.1f} (other processes share the CPUs)\n"
              f"command: python bench/bench_models.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    table = header + "\n" + _table(rows, args)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
