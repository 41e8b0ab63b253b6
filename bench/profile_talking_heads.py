"""Where talking heads' time goes, one thread: round-robin timings and torch.profiler self-CPU shares
of the reference backend, the materialized lowering and the compiled chunked one (b=1 sample x 2
streams, h=4, d=64, fp32). Usage: python bench/profile_talking_heads.py [N]"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kernelsearch
from kernelsearch.inputs import random_inputs

torch.set_num_threads(1)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
sizes = dict(B=2, H=4, I=N, J=N, D=64)
ref = kernelsearch.load("specs/talking_heads.yaml", backend="reference")
t = random_inputs(ref.spec, sizes, seed=0)
candidates = {
    "reference": ref,
    "materialized": kernelsearch.load("specs/talking_heads.yaml", backend="torch", config={"lowering": "materialized"}),
    "compiled chunked 256x256": kernelsearch.load("specs/talking_heads.yaml", backend="torch",
        config={"lowering": "chunked", "CHUNK_N": 256, "CHUNK_M": 256, "compile": True}),
}
with torch.no_grad():
    for f in candidates.values():
        f(**t)
    times = {k: [] for k in candidates}
    for _ in range(7):   # round-robin: the machine's load hits every candidate alike
        for k, f in candidates.items():
            start = time.perf_counter()
            f(**t)
            times[k].append(time.perf_counter() - start)
print("loadavg", open("/proc/loadavg").read().split()[:3])
for k, ts in times.items():
    ts.sort()
    print(f"{k:28s} min {ts[0]*1e3:8.1f} ms  median {ts[3]*1e3:8.1f} ms")
for k, f in candidates.items():
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            f(**t)
    total = sum(e.self_cpu_time_total for e in p.key_averages())
    print(f"\n{k}: self CPU shares")
    for e in sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"  {e.key[:60]:60s} {100*e.self_cpu_time_total/total:5.1f}%  calls {e.count}")
