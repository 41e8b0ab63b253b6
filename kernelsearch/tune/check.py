"""The correctness guard: a config is only timed after its results matched the reference.

What is compared: the output, and with ``direction == "fwd+bwd"`` the gradients with respect to
every floating-point input (q, k, v and learned inputs such as bias tables or head-mixing
weights), against the *reference backend evaluated in float64* on the same, freshly drawn
random inputs (a new seed per trial, so that no config is tuned to one lucky draw).

The tolerance is justified by the dtype, in two parts (the larger wins):

1. a floor of a few units of rounding at the output's scale: errors are measured relative to
   the reference's largest magnitude, ``err = max|x - ref| / max|ref|``, and the floor is
   ``4 * eps`` of the dtype the kernel computes in (float16 ``2^-10``; bfloat16 ``2^-7``;
   float32 ``2^-23``, but ``2^-10`` on CUDA where ``tl.dot`` runs in TF32);
2. twice the error of the *reference evaluated in the same low precision* on the same inputs
   (``2 *`` is FlashAttention's rule): a kernel may be as inaccurate as a straightforward
   implementation in that dtype, with margin, and no more.

A wrong kernel (a skipped block, a missing scale, a bad mask) makes O(1) relative errors, many
orders of magnitude above either bound. Positions where the reference is NaN (fully masked
rows, if the spec defines them so) must be NaN in the candidate as well.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["EPS", "floor_tolerance", "rel_error", "CheckResult", "compare_outputs", "check_call"]

# Unit roundoff-ish spacing at 1.0 for each dtype's significand.
EPS = {
    "float64": 2.0 ** -52,
    "float32": 2.0 ** -23,
    "tf32": 2.0 ** -10,
    "float16": 2.0 ** -10,
    "bfloat16": 2.0 ** -7,
}


def dtype_name(dtype: Any) -> str:
    s = str(dtype)
    return s.split(".")[-1]


def floor_tolerance(dtype: Any, device_type: str = "cpu", grad: bool = False) -> float:
    name = dtype_name(dtype)
    if name == "float32" and device_type == "cuda":
        name = "tf32"
    eps = EPS.get(name, 2.0 ** -10)
    tol = 4.0 * eps
    if name == "float64":
        tol = 1e-10
    elif name == "float32":
        tol = 1e-5  # accumulation-order differences dominate float32 eps at these sizes
    if grad:
        tol *= 4.0  # backward sums over the other sequence axis once more
    return tol


def rel_error(x: Any, ref: Any) -> tuple[float, str | None]:
    """Max abs error relative to the reference's max magnitude; (inf, why) on shape/NaN mismatch."""
    import torch

    if x is None:
        return math.inf, "missing (None)"
    if tuple(x.shape) != tuple(ref.shape):
        return math.inf, f"shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    ref_nan = torch.isnan(ref)
    x_nan = torch.isnan(x)
    if not torch.equal(ref_nan, x_nan):
        n = int((ref_nan != x_nan).sum())
        return math.inf, f"{n} NaN positions differ from the reference"
    finite = ~ref_nan
    if not bool(finite.any()):
        return 0.0, None
    diff = (x - ref)[finite].abs()
    if not bool(torch.isfinite(diff).all()):
        return math.inf, "non-finite values where the reference is finite"
    scale = float(ref[finite].abs().max())
    err = float(diff.max())
    return (err / scale if scale > 0 else err), None


@dataclass
class CheckResult:
    ok: bool
    worst: float = 0.0                       # worst err / tol over compared tensors
    details: dict = field(default_factory=dict)  # name -> {"err":, "tol":, "why":}
    message: str = ""

    def as_dict(self) -> dict:
        return {"ok": self.ok, "worst": self.worst, "details": self.details, "message": self.message}


def compare_outputs(cands: Mapping[str, Any], refs: Mapping[str, Any], lowps: Mapping[str, Any] | None,
                    dtype: Any, device_type: str) -> CheckResult:
    details: dict = {}
    worst = 0.0
    bad = []
    for name, ref in refs.items():
        grad = name.startswith("grad_")
        floor = floor_tolerance(dtype, device_type, grad=grad)
        tol = floor
        if lowps is not None and lowps.get(name) is not None:
            e_lowp, why_lowp = rel_error(lowps[name], ref)
            if why_lowp is None and math.isfinite(e_lowp):
                tol = max(floor, 2.0 * e_lowp)
        err, why = rel_error(cands.get(name), ref)
        details[name] = {"err": err, "tol": tol, "why": why}
        ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
        worst = max(worst, ratio)
        if why is not None or not err <= tol:
            bad.append(f"{name}: {why}" if why else f"{name}: rel. error {err:.3g} > tolerance {tol:.3g}")
    ok = not bad
    return CheckResult(ok, worst, details, "; ".join(bad) if bad else "ok")


def _float_inputs(inputs: Mapping[str, Any]) -> list[str]:
    import torch

    return [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(fn: Callable, inputs: Mapping[str, Any], direction: str, grad_out: Any | None,
         cast: Any | None) -> dict:
    """Call ``fn`` on (a copy of) ``inputs``; return {"out": o, "grad_<name>": ...}."""
    import torch

    names = _float_inputs(inputs)
    args = {}
    for n, t in inputs.items():
        if isinstance(t, torch.Tensor):
            t = t.detach()
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            if direction == "fwd+bwd" and n in names:
                t = t.clone().requires_grad_(True)
        args[n] = t
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with torch.set_grad_enabled(direction == "fwd+bwd"):
        o = fn(q, k, v, **args)
    res = {"out": o.detach()}
    if direction == "fwd+bwd":
        g = grad_out.to(o.dtype) if grad_out is not None else torch.ones_like(o)
        leaves = {"q": q, "k": k, "v": v, **{n: args[n] for n in names if n in args}}
        grads = torch.autograd.grad(o, list(leaves.values()), g, allow_unused=True)
        for n, gr in zip(leaves, grads):
            res[f"grad_{n}"] = None if gr is None else gr.detach()
    return res


def check_call(candidate: Callable, reference: Callable, inputs: Mapping[str, Any], *, direction: str,
               dtype: Any, device_type: str, grad_out: Any | None = None,
               lowp_reference: bool = True) -> CheckResult:
    """Run ``candidate`` on ``inputs`` (already in ``dtype`` on the device) and compare.

    ``reference`` is evaluated in float64 on the same values (on the CPU when possible is the
    caller's choice: pass CPU inputs to it by wrapping). With ``lowp_reference`` the reference
    is also evaluated in ``dtype`` to calibrate the tolerance; if that fails (an op without a
    low-precision kernel on this device) the floor tolerance alone applies.
    """
    import torch

    cand = _run(candidate, inputs, direction, grad_out, None)
    ref = _run(reference, inputs, direction, grad_out, torch.float64)
    lowp = None
    if lowp_reference and dtype_name(dtype) != "float64":
        try:
            lowp = _run(reference, inputs, direction, grad_out, None)
        except RuntimeError:   # no low-precision kernel for an op here (NotImplementedError is one too)
            lowp = None
    refs = {n: t for n, t in ref.items() if t is not None}
    # gradients the reference does not produce (inputs it ignores) are not compared
    return compare_outputs(cand, refs, lowp, dtype, device_type)
