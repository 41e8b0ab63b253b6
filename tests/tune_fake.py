"""A fake target: a test double for the tuner, and a synthetic landscape for its benchmark.

It implements the interface of `kernelsearch.tune.adapter` (as kernelsearch's own backends do)
and is injected with ``TuneOptions(adapter=FakeTarget(behaviour))``; ``python -m tests.tune_fake
tune --fake JSON ...`` is the ``kernelsearch tune`` command with it (subprocess tests).

It has the Triton target's knobs (``BLOCK_M, BLOCK_N, num_warps, num_stages``) and a
deterministic cost model shaped like a flash-attention kernel's (tile efficiency, warps per
tile, pipeline depth, occupancy), so the samplers face a realistic, rugged landscape without a
GPU. Its "kernel" is plain PyTorch attention, checked for real by `check.py` against a float64
reference, so every failure path of a trial can be provoked on purpose with ``behaviour``:

- ``wrong``: list of partial configs whose output is wrong (and, to tempt the tuner, 2x faster);
- ``hang``: configs whose first call never returns; ``crash``: configs that kill the process;
- ``compile_error``: configs whose build raises a compilation error (a type it declares expected);
- ``bug``: configs whose build raises an unexpected exception (an internal error, not a bad config);
- ``smem_limit``: configs with ``BLOCK_M*BLOCK_N*num_stages`` above it are out of resources
  (raised by the feasibility hook, like Triton's AOT shared-memory check);
- ``sleep_s``: seconds each build takes (to simulate compile time; kill tests use it);
- ``measure``: time the plain-PyTorch call for real instead of using the cost model;
- ``barrier``: ``{"dir": path, "n": n}``: each trial process, when it starts, waits until
  ``n`` of them have started (tests of several workers, so that all of them take part).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from kernelsearch.tune.adapter import torch_dtype
from kernelsearch.tune.policy import TrialFailure
from kernelsearch.tune.space import Constraint, Knob, SearchSpace

FAKE_TUNE = {"BLOCK_M": [16, 32, 64, 128], "BLOCK_N": [16, 32, 64, 128], "num_warps": [2, 4, 8],
             "num_stages": [1, 2, 3, 4]}
FAKE_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@dataclass
class _Decl:
    shape: tuple
    dtype: str = "float"
    optional: bool = False


@dataclass
class FakeSpec:
    behaviour: dict = field(default_factory=dict)
    name: str = "fake"
    path: str = "<fake>"
    params: dict = field(default_factory=dict)
    tune: dict = field(default_factory=lambda: dict(FAKE_TUNE))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.behaviour, sort_keys=True).encode()).hexdigest()

    @property
    def inputs(self) -> dict:
        return {"q": _Decl(("b", "h", "i", "d")), "k": _Decl(("b", "h", "j", "d")),
                "v": _Decl(("b", "h", "j", "d")), "mask": _Decl(("b", "j"), "bool", True)}


def fake_spec(behaviour: Mapping[str, Any] | None = None) -> FakeSpec:
    return FakeSpec(dict(behaviour or {}))


def fake_space(spec: Any, sizes: Mapping[str, int], direction: str = "fwd") -> SearchSpace:
    knobs = [Knob(n, tuple(c), FAKE_DEFAULT[n]) for n, c in FAKE_TUNE.items()]
    cons = [Constraint("BLOCK_M % 16 == 0", lambda c: c["BLOCK_M"] % 16 == 0, "BLOCK_M not a multiple of 16"),
            Constraint("BLOCK_N % 16 == 0", lambda c: c["BLOCK_N"] % 16 == 0, "BLOCK_N not a multiple of 16")]
    return SearchSpace(knobs, cons, target="fake")


def matches(config: Mapping[str, Any], patterns: Any) -> bool:
    for p in patterns or ():
        if all(config.get(k) == v for k, v in p.items()):
            return True
    return False


def model_time(config: Mapping[str, Any], sizes: Mapping[str, int]) -> float:
    """Synthetic flash-attention-like time in ms (deterministic, rugged)."""
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    nw, ns = config["num_warps"], config["num_stages"]
    B, H, I, J, D = (sizes[k] for k in "BHIJD")
    work = B * H * I * J * D * 4e-9  # "ms" at perfect efficiency
    eff_m = {16: 0.42, 32: 0.66, 64: 0.9, 128: 1.0}[bm]
    eff_n = {16: 0.5, 32: 0.78, 64: 1.0, 128: 0.9}[bn]
    ideal_w = min(8, max(2, bm * bn // 1024))
    pen_w = 1 + 0.18 * abs(math.log2(nw) - math.log2(ideal_w))
    pen_s = 1 + 0.09 * abs(ns - 3) + (0.12 if ns == 1 and bn >= 64 else 0.0)
    if bm * bn * ns > 128 * 64 * 3:  # register/smem pressure
        pen_s *= 1.25
    tiles = math.ceil(I / bm) * B * H
    occupancy = min(1.0, tiles / 132)
    h = int(hashlib.md5(json.dumps(dict(config), sort_keys=True).encode()).hexdigest()[:8], 16)
    rugged = 1 + 0.06 * ((h % 1000) / 1000 - 0.5)
    return work / (eff_m * eff_n) * pen_w * pen_s / max(occupancy, 0.05) * rugged + 0.002


class FakeCompileError(Exception):
    """The fake compiler's refusal: declared an expected failure in `FakeBackend.expected_errors`."""


def _attention(q, k, v, mask=None, scale=None):
    import torch

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p, v)


class FakeKernel:
    def __init__(self, config: dict, behaviour: dict):
        self.config = config
        self.last_config = dict(config)
        self.wrong = matches(config, behaviour.get("wrong"))
        self.hang = matches(config, behaviour.get("hang"))
        self.crash = matches(config, behaviour.get("crash"))

    def __call__(self, q, k, v, mask=None):
        import torch

        if self.hang:
            while True:
                time.sleep(1)
        if self.crash:
            os.kill(os.getpid(), signal.SIGSEGV)
        dt = q.dtype
        f = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        scale = q.shape[-1] ** -0.5 * (1.7 if self.wrong else 1.0)
        o = _attention(q.to(f), k.to(f), v.to(f), mask, scale)
        return o.to(dt)


@dataclass
class FakeTarget:
    """The tuner's side of the fake (see `kernelsearch.tune.adapter`); picklable, so that it travels
    to the trial processes inside the problem."""

    behaviour: dict = field(default_factory=dict)
    backend = "fake"
    target = "fake"
    defaults = {"shape": (1, 2, 64, 64, 16), "dtype": "float32", "trials": 30, "timeout": None,
                "trial_timeout": 30.0}

    def load_spec(self, spec_path: Any, params: Mapping[str, Any]) -> tuple[FakeSpec, dict]:
        return fake_spec(self.behaviour), dict(params)   # the fake has no declared params

    def space(self, spec: Any, sizes: Mapping[str, int], direction: str, dtype: str, params=None,
              present=(), device: str = "cpu") -> SearchSpace:
        return fake_space(spec, sizes, direction)

    def open(self, problem: Any) -> "FakeBackend":
        return FakeBackend(problem, self.behaviour)


class FakeBackend:
    expected_errors = {FakeCompileError: "compile_error"}

    def __init__(self, problem: Any, behaviour: Mapping[str, Any]):
        self.p = problem
        self.behaviour = dict(behaviour)
        self.spec = fake_spec(self.behaviour)
        barrier = self.behaviour.get("barrier")
        if barrier:
            d = barrier["dir"]
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, str(os.getpid())), "w").close()
            deadline = time.monotonic() + float(barrier.get("timeout", 120))
            while len(os.listdir(d)) < int(barrier["n"]) and time.monotonic() < deadline:
                time.sleep(0.1)

    def inputs(self, sizes: Mapping[str, int], seed: int, optional: bool, device: str) -> dict:
        import torch

        g = torch.Generator(device="cpu").manual_seed(int(seed))
        B, H, I, J, D = (int(sizes[k]) for k in "BHIJD")
        dt = torch_dtype(self.p.dtype)
        out = {"q": torch.randn(B, H, I, D, generator=g).to(dt).to(device),
               "k": torch.randn(B, H, J, D, generator=g).to(dt).to(device),
               "v": torch.randn(B, H, J, D, generator=g).to(dt).to(device)}
        if optional:
            m = torch.rand(B, J, generator=g) > 0.2
            m[:, 0] = True
            out["mask"] = m.to(device)
        return out

    def build(self, config: dict) -> FakeKernel:
        if self.behaviour.get("sleep_s"):
            time.sleep(float(self.behaviour["sleep_s"]))
        if matches(config, self.behaviour.get("compile_error")):
            raise FakeCompileError(f"fake compile error for {config}")
        if matches(config, self.behaviour.get("bug")):
            raise KeyError(f"fake bug in the code generator for {config}")
        return FakeKernel(config, self.behaviour)

    def reference(self):
        return lambda q, k, v, mask=None: _attention(q, k, v, mask)

    def feasibility(self, config: dict) -> None:
        lim = self.behaviour.get("smem_limit")
        if lim is not None and config["BLOCK_M"] * config["BLOCK_N"] * config["num_stages"] > lim:
            need = config["BLOCK_M"] * config["BLOCK_N"] * config["num_stages"]
            raise TrialFailure("out_of_resources", f"shared memory {need} > limit {lim}")

    def synthetic_time(self, config: dict) -> float | None:
        if self.behaviour.get("measure"):
            return None
        t = model_time(config, self.p.sizes)
        if matches(config, self.behaviour.get("wrong")):
            t *= 0.5
        return t


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.tune_fake tune|report --fake JSON ...``: the kernelsearch commands with the fake."""
    import argparse
    import sys

    from kernelsearch.errors import KernelsearchError
    from kernelsearch.tune.cli import register

    ap = argparse.ArgumentParser(prog="python -m tests.tune_fake")
    ap.add_argument("--fake", default="{}", help="the fake's behaviour, JSON")
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    args = ap.parse_args(argv)
    # the class by its importable name, not __main__'s: the trial processes unpickle it
    from tests.tune_fake import FakeTarget as Target

    try:
        return int(args.func(args, adapter=Target(json.loads(args.fake))))
    except KernelsearchError as e:
        print(f"kernelsearch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
