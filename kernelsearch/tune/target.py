"""What one trial does, inside the trial's child process: build, check, time.

`Problem` is the picklable description of what is tuned (spec, backend, params, sizes, dtype,
direction, device). `Evaluator(problem)` is created once per child process; it prepares the
timing inputs (rotated copies) and then evaluates configs one after the other:

1. *feasibility*: the backend's check before anything runs (Triton: the AOT compile for the
   device's architecture, shared memory against its limit) — a config that cannot compile or
   fit is dropped here;
2. *build and first call*: ``kernelsearch.load(spec, backend, config=config, **params)`` and one
   call on the timing inputs; the wall time of both is the config's *compile time*;
3. *check*: output (and gradients for fwd+bwd) against the reference in float64 on fresh
   random inputs (`check.py`); with the spec's optional inputs too on CUDA (``check_optional``);
   on the CPU, where ``torch.compile`` would compile every config twice for it, the would-be
   winner is checked with them after re-timing (`Evaluator.validate`; the next best is taken
   when it fails), so that no config is recorded without having passed both;
4. *time*: `bench.py` on the rotated timing inputs.

What the backend is comes with the problem (``Problem.target``, see `adapter.py`): the same
evaluator runs kernelsearch's backends and the test double. Failures follow `policy.py`: an
expected failure (`TrialFailure`, or an exception type the backend declares) is a failed
outcome with its kind and reason; anything else is an internal error, kept with its traceback.
Timeouts and crashes are detected by the parent (`trial.py`).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .adapter import KernelsearchTarget, torch_dtype
from .policy import TrialFailure, failure_outcome

__all__ = ["Problem", "TrialFailure", "Evaluator", "CpuLock"]


@dataclass
class Problem:
    """Everything a child process needs to evaluate configs (picklable)."""

    spec_path: str | None
    backend: str                     # the backend records are written under: "torch" | "triton" | ...
    sizes: dict                      # B, H, I, J, D
    dtype: str = "float32"
    direction: str = "fwd"           # "fwd" | "fwd+bwd"
    device: str = "cpu"              # "cpu" | "cuda" | "cuda:N"
    params: dict = field(default_factory=dict)
    optional_inputs: bool = False    # time with the spec's optional inputs too
    check: bool = True
    check_optional: bool | None = None  # also check with optional inputs in every trial (None: on CUDA only)
    seed: int = 0
    cpu_lock: str | None = None      # lock file shared by every trial process on this machine (CPU target)
    target: Any = None               # what evaluates configs (adapter.py); None: kernelsearch's `backend`
    check_elements: int = 1 << 25    # cap on B*H*I*J for the float64 reference check
    bench: dict = field(default_factory=dict)  # options for bench.bench

    @property
    def device_type(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def open_backend(self) -> Any:
        return (self.target or KernelsearchTarget(self.backend)).open(self)

    @property
    def per_trial_optional(self) -> bool:
        return self.device_type == "cuda" if self.check_optional is None else bool(self.check_optional)


def _nbytes(inputs: Mapping[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if hasattr(t, "element_size"))


class CpuLock:
    """Who may use this machine's cores: timing needs them alone, the rest can share.

    A readers-writer lock on a file (``flock``), shared by every trial process on the machine
    (all workers, and other ``kernelsearch tune`` runs): building, compiling and checking hold
    it shared, timing and re-timing exclusively. So several workers compile in parallel, but no
    config is timed while another process compiles or times, and each one is timed with all the
    threads the runtime will use. The kernel drops a dead process's hold, so a killed trial
    cannot block the others. Waiting is reported as a ``waiting`` phase, which the parent does
    not count against the trial's time limit.
    """

    def __init__(self, path: str | None, phase: Callable[[str], None]):
        self.fd = None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.phase = phase
        self.held: str | None = None

    def hold(self, mode: str, then: str) -> None:
        """Hold the lock ``shared`` or ``exclusive``, then enter phase ``then``."""
        if self.fd is not None and mode != self.held:
            import fcntl

            # the phase before ends here, before the lock changes hands
            self.phase(f"waiting ({then} needs the CPU {'alone' if mode == 'exclusive' else 'shared'})")
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # no upgrade in place: two upgraders would deadlock
            fcntl.flock(self.fd, fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH)
            self.held = mode
        self.phase(then)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the lock
            self.fd = None
        self.held = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Evaluator:
    def __init__(self, problem: Problem):
        import torch

        self.p = problem
        if problem.device_type == "cuda" and ":" in problem.device:
            torch.cuda.set_device(torch.device(problem.device))
        self.backend = problem.open_backend()
        self.dtype = torch_dtype(problem.dtype)
        self.sizes = dict(problem.sizes)
        self.check_sizes = self._reduce_sizes(self.sizes)
        # Timing inputs: rotated copies so that no call finds its operands in cache.
        first = self.backend.inputs(self.sizes, problem.seed, problem.optional_inputs, problem.device)
        if problem.device_type == "cuda":
            cache = 50 << 20
            cache = int(getattr(torch.cuda.get_device_properties(problem.device), "L2_cache_size", 0)) or cache
        else:
            from .bench import llc_bytes

            cache = llc_bytes()
        from .bench import rotation_count

        n = rotation_count(_nbytes(first), cache)
        self.timing_sets = [first] + [
            self.backend.inputs(self.sizes, problem.seed + 1000 + i, problem.optional_inputs, problem.device)
            for i in range(n - 1)
        ]
        self.grad_out = None
        self._optional_exists = None

    # -- helpers ------------------------------------------------------------------------
    def _reduce_sizes(self, sizes: dict) -> dict:
        """Check at a shape whose float64 reference fits: halve B, then H, while too big."""
        s = dict(sizes)
        while s["B"] * s["H"] * s["I"] * s["J"] > self.p.check_elements and s["B"] % 2 == 0:
            s["B"] //= 2
        while s["B"] * s["H"] * s["I"] * s["J"] > self.p.check_elements and s["H"] % 2 == 0:
            s["H"] //= 2
        return s

    def _timed_closure(self, fn: Callable) -> tuple[Callable, list]:
        import torch

        sets = self.timing_sets
        bwd = self.p.direction == "fwd+bwd"
        prepared = []
        grads: list = []
        for s in sets:
            args = {}
            for n, t in s.items():
                if bwd and isinstance(t, torch.Tensor) and t.is_floating_point():
                    t = t.detach().clone().requires_grad_(True)
                    grads.append(t)
                args[n] = t
            prepared.append(args)
        dos: list = []
        state = {"i": 0}

        def call():
            a = prepared[state["i"]]
            state["i"] = (state["i"] + 1) % len(prepared)
            o = fn(a["q"], a["k"], a["v"], **{n: t for n, t in a.items() if n not in ("q", "k", "v")})
            if bwd:
                if not dos:
                    dos.append(torch.randn_like(o))
                o.backward(dos[0])
            return o

        def call_nograd():
            with torch.no_grad():
                return call()

        return (call if bwd else call_nograd), grads

    # -- the trial ---------------------------------------------------------------------
    def evaluate(self, config: Mapping[str, Any], trial_seed: int, phase: Callable[[str], None] = lambda s: None) -> dict:
        import torch

        out: dict[str, Any] = {"config": dict(config)}
        spans: dict[str, list[float]] = {}  # wall-clock [start, end] of each phase but waiting
        reached = phase

        def end_phase() -> None:
            if out.get("phase") in spans:
                spans[out["phase"]][1] = time.time()

        def phase(name: str) -> None:  # a failure says in which phase it happened
            end_phase()
            if not name.startswith("waiting"):
                spans[name] = [time.time()] * 2
            out["phase"] = name
            reached(name)

        cpu = CpuLock(self.p.cpu_lock, phase)
        try:
            cpu.hold("shared", "feasibility")
            aot = self.backend.feasibility(config)
            if aot is not None:
                out["aot"] = aot

            phase("compile")
            t0 = time.perf_counter()
            fn = self.backend.build(config)
            self._remember(config, fn)
            call, grads = self._timed_closure(fn)
            call()
            _sync(self.p.device)
            out["compile_s"] = time.perf_counter() - t0
            out["used_config"] = dict(getattr(fn, "last_config", None) or config)

            if self.p.check:
                phase("check")
                out["check"] = self._check(fn, trial_seed, required=True, optional=self.p.per_trial_optional)

            cpu.hold("exclusive", "time")
            synthetic = self.backend.synthetic_time(config)
            if synthetic is not None:
                from .bench import Timing

                timing = Timing.from_samples([synthetic])
            else:
                from .bench import bench

                for g in grads:
                    g.grad = None
                timing = bench(call, self.p.device, grad_to_none=grads or None, **self.p.bench)
            out["timing"] = timing.as_dict()
            out["time_ms"] = timing.median_ms
            if not (math.isfinite(timing.median_ms) and timing.median_ms > 0):
                raise TrialFailure("bad_timing", f"timing gave {timing.median_ms!r} ms")
            out["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - the policy decides: the config's failure, or a bug
            out.update(failure_outcome(e, self.backend.expected_errors))
            if self.p.device_type == "cuda" and not isinstance(e, TrialFailure):
                # a CUDA error can poison the context; ask the parent to start a fresh child
                out["restart"] = True
        finally:
            end_phase()
            cpu.release()
            out["spans"] = spans
            if out.get("status") == "ok":
                del out["phase"]
            if self.p.device_type == "cuda":
                torch.cuda.empty_cache()
        return out

    def _check(self, fn: Callable, trial_seed: int, required: bool = True, optional: bool = True) -> dict:
        from .check import check_call

        ref = self.backend.reference()
        results = {}
        variants = ([False] if required else []) + ([True] if optional and self._has_optional() else [])
        for optional in variants:
            inputs = self.backend.inputs(self.check_sizes, 7919 * (trial_seed + 1) + optional, optional, self.p.device)
            res = check_call(fn, ref, inputs, direction=self.p.direction, dtype=self.dtype,
                             device_type=self.p.device_type)
            results["with_optional" if optional else "required"] = res.as_dict()
            if not res.ok:
                which = "with optional inputs" if optional else "required inputs only"
                raise TrialFailure("wrong_result", f"{res.message} ({which}, sizes {self.check_sizes})")
        return {"ok": True, "worst": max((r["worst"] for r in results.values()), default=0.0),
                "sizes": self.check_sizes, "variants": sorted(results)}

    def _has_optional(self) -> bool:
        if self._optional_exists is None:
            spec_inputs = getattr(self.backend.spec, "inputs", {}) or {}
            self._optional_exists = any(getattr(d, "optional", False) for d in dict(spec_inputs).values())
        return self._optional_exists

    _KEEP = 32

    def _remember(self, config: Mapping[str, Any], fn: Callable) -> None:
        """Keep the last few built callables, so re-timing does not compile them again."""
        if not hasattr(self, "_built"):
            self._built = {}
        key = json.dumps(dict(config), sort_keys=True)
        self._built.pop(key, None)
        self._built[key] = fn
        while len(self._built) > self._KEEP:
            self._built.pop(next(iter(self._built)))

    def _get_fn(self, config: Mapping[str, Any]) -> Callable:
        fn = getattr(self, "_built", {}).get(json.dumps(dict(config), sort_keys=True))
        if fn is None:
            fn = self.backend.build(config)
            self._remember(config, fn)
        return fn

    def validate(self, config: Mapping[str, Any], seed: int) -> dict:
        """The final check of a would-be winner with the spec's optional inputs (when the trials
        did not check them); {"ok": True} or {"ok": False, "kind", "error"}."""
        if not self.p.check or self.p.per_trial_optional or not self._has_optional():
            return {"ok": True, "skipped": True}
        cpu = CpuLock(self.p.cpu_lock, lambda phase: None)
        try:
            cpu.hold("shared", "check")
            recorded = getattr(self.backend, "recorded", None)   # what a record of it runs with them
            fn = self._get_fn(recorded(config, None) if recorded is not None else config)
            self._check(fn, seed, required=False, optional=True)
            return {"ok": True}
        except Exception as e:  # noqa: BLE001 - the policy decides
            failed = failure_outcome(e, self.backend.expected_errors)
            return {"ok": False, "kind": failed["kind"], "error": f"{failed['kind']}: {failed['reason']}",
                    **({"traceback": failed["traceback"]} if "traceback" in failed else {})}
        finally:
            cpu.release()

    def retime(self, configs: list[Mapping[str, Any]], repeat: int = 5) -> list[dict]:
        """Re-time configs round-robin (interleaved); failures give {"error": ...}."""
        from .bench import Timing, interleaved

        fns, idx, out = [], [], [dict() for _ in configs]
        all_grads: list = []
        cpu = CpuLock(self.p.cpu_lock, lambda phase: None)
        try:
            cpu.hold("shared", "compile")
            for i, c in enumerate(configs):
                try:
                    fn = self._get_fn(c)
                    call, grads = self._timed_closure(fn)
                    call()
                    _sync(self.p.device)
                    fns.append(call)
                    all_grads += grads
                    idx.append(i)
                except Exception as e:  # noqa: BLE001 - the policy decides
                    failed = failure_outcome(e, self.backend.expected_errors)
                    out[i] = {"error": failed["reason"], "kind": failed["kind"]}
            synth = [self.backend.synthetic_time(configs[i]) for i in idx]
            if fns and all(s is not None for s in synth):
                timings = []
                for s in synth:
                    timings.append(Timing.from_samples([s * (1 + 0.002 * r) for r in range(repeat)]))
            elif fns:
                cpu.hold("exclusive", "time")
                timings = interleaved(fns, self.p.device, repeat=repeat, grad_to_none=all_grads or None)
            else:
                timings = []
        finally:
            cpu.release()
        for i, t in zip(idx, timings):
            out[i] = t.as_dict()
        return out
