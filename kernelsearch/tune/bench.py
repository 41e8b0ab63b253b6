"""Timing that can be trusted, and nothing else.

- CUDA: ``triton.testing.do_bench`` (it estimates the call's time, warms up for ``warmup`` ms,
  flushes L2 before every repetition by writing a 256 MB buffer, and records CUDA events);
  we take the median of all repetitions. Inputs are *rotated*: the timed closure cycles
  through several copies of the inputs, so that no repetition finds its operands resident.
- CPU: ``time.perf_counter_ns`` (monotonic), warm-up by count and by time, then enough
  repetitions for ``target_s`` of measurement (between ``min_rep`` and ``max_rep``), median.
  Inputs are rotated across copies that together exceed the last-level cache.
- ``interleaved``: several callables timed round-robin, used to re-time the top configs at the
  end of a study, so that drift (thermal, other load) hits all of them alike.

Every function returns a `Timing` with the median and the spread, in milliseconds.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

__all__ = ["Timing", "bench", "bench_cpu", "bench_cuda", "interleaved", "rotation_count", "llc_bytes"]


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    q20_ms: float
    q80_ms: float
    reps: int

    @property
    def spread(self) -> float:
        """Relative inter-quantile spread (q80 - q20) / median."""
        return (self.q80_ms - self.q20_ms) / self.median_ms if self.median_ms > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["spread"] = self.spread
        return d

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        xs = sorted(float(x) for x in samples_ms)
        if not xs:
            raise ValueError("no timing samples")

        def q(p: float) -> float:
            if len(xs) == 1:
                return xs[0]
            pos = p * (len(xs) - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, len(xs) - 1)
            return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

        return cls(statistics.median(xs), xs[0], xs[-1], q(0.2), q(0.8), len(xs))


def llc_bytes(default: int = 32 << 20) -> int:
    """Size of the CPU's last-level cache (from sysfs), or ``default``."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
            num = int(s[:-1]) if s[-1:].isalpha() else int(s)
            best = max(best, num * mult)
    except OSError:
        pass
    return best or default


def rotation_count(bytes_per_set: int, cache_bytes: int, max_copies: int = 8) -> int:
    """How many input copies make the rotation exceed twice the cache."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(2 * cache_bytes / bytes_per_set)))


def bench_cpu(fn: Callable[[], Any], *, warmup: int = 2, warmup_s: float = 0.05, target_s: float = 0.3,
              min_rep: int = 5, max_rep: int = 200, clock: Callable[[], int] = time.perf_counter_ns) -> Timing:
    """Median of per-call wall times on a monotonic clock, after warm-up."""
    t_start = clock()
    n = 0
    while n < warmup or (clock() - t_start) < warmup_s * 1e9:
        fn()
        n += 1
        if n >= 1000:
            break
    per_call = (clock() - t_start) / max(n, 1)
    reps = int(min(max_rep, max(min_rep, target_s * 1e9 / max(per_call, 1.0))))
    samples = []
    for _ in range(reps):
        t0 = clock()
        fn()
        samples.append((clock() - t0) / 1e6)
    return Timing.from_samples(samples)


def bench_cuda(fn: Callable[[], Any], *, warmup: int = 25, rep: int = 100,
               grad_to_none: Sequence[Any] | None = None) -> Timing:
    """``triton.testing.do_bench`` with L2 flushed before each repetition; all samples kept."""
    from triton.testing import do_bench

    times = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) if grad_to_none else None,
                     return_mode="all")
    if isinstance(times, (int, float)):
        times = [float(times)]
    return Timing.from_samples(list(times))


def bench(fn: Callable[[], Any], device: str, **kw: Any) -> Timing:
    if device.startswith("cuda"):
        return bench_cuda(fn, **{k: v for k, v in kw.items() if k in ("warmup", "rep", "grad_to_none")})
    return bench_cpu(fn, **{k: v for k, v in kw.items() if k in ("warmup", "warmup_s", "target_s", "min_rep", "max_rep")})


def interleaved(fns: Sequence[Callable[[], Any]], device: str, *, repeat: int = 5,
                per_round_s: float = 0.2, grad_to_none: Sequence[Any] | None = None) -> list[Timing]:
    """Time several callables round-robin; each round takes a median-of-calls sample of each.

    Every round runs each callable for about ``per_round_s`` (CPU) or through ``do_bench``
    (CUDA); the returned `Timing` per callable is over its per-round medians, so its spread
    is the spread *between re-timings*, which is what "is this winner real" needs.
    """
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            if device.startswith("cuda"):
                t = bench_cuda(fn, warmup=10, rep=max(20, int(per_round_s * 1000 / 4)), grad_to_none=grad_to_none)
            else:
                t = bench_cpu(fn, warmup=1, warmup_s=0.0, target_s=per_round_s, min_rep=3, max_rep=100)
            samples[i].append(t.median_ms)
    return [Timing.from_samples(s) for s in samples]
