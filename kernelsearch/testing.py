"""Compare an attention backend against the float64 reference, in a user's own tests.

    from kernelsearch.testing import assert_matches_reference

    def test_my_attention(kernelsearch_backend):          # fixture of the pytest plugin
        assert_matches_reference("specs/cosine_sim.yaml", backend=kernelsearch_backend,
                                 dtype=torch.float16, scale=10.0)

What is compared: the output, and with ``grads=True`` the gradient of every differentiable
input (q, k, v and learned inputs such as bias tables or mixing weights), each against the
*reference backend evaluated in float64* (the definition of what a spec means) on the same
freshly drawn random inputs, at sizes that do not divide the kernels' tiles, with every
optional input present (masks fully mask the last batch row, so fully-masked rows are checked).

The tolerance comes from the dtype, as in Inductor's FlexAttention tests: the error of the
reference evaluated *in the low precision* against float64 is the yardstick. An element
passes when ``|candidate - ref64| <= fudge * max|ref_lowp - ref64| + floor``: a backend may be
as inaccurate as a straightforward eager implementation in that dtype, with margin, and no
more. The floor, ``FLOOR_ULPS`` units of rounding of the dtype at the tensor's largest
magnitude (``torch.finfo(dtype).eps``; TF32's for float32 on CUDA), covers tensors that the
low-precision reference happens to get exactly right. Positions where the reference is NaN must be NaN in the
candidate too, and a non-finite value where the reference is finite always fails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

__all__ = ["DEFAULT_SHAPES", "Comparison", "assert_matches_reference", "compare_tensor"]

# sizes that divide no tile (17, 33, 129) and I != J; B = 2 so that the last batch row can be fully masked
DEFAULT_SHAPES = (
    {"B": 2, "H": 2, "I": 17, "J": 129, "D": 16},
    {"B": 2, "H": 2, "I": 33, "J": 33, "D": 16},
)
# multiples of the eager low-precision error allowed; measured on the seed specs (torch backend,
# 4 seeds x 2 lowerings x fp32/bf16/fp16): at most 2.6x for outputs, 4.2x for gradients
OUTPUT_FUDGE = 3.0
GRAD_FUDGE = 6.0        # the backward sums over the other sequence axis once more
FLOOR_ULPS = 1          # a unit of rounding at the tensor's scale: for tensors lowp computes exactly


def unit_roundoff(dtype, device_type: str = "cpu") -> float:
    """The spacing of the dtype's numbers at 1.0 (float32 on CUDA: TF32's 2^-10, as tl.dot computes)."""
    if dtype == torch.float32 and device_type == "cuda":
        return 2.0 ** -10
    return torch.finfo(dtype).eps


@dataclass(frozen=True)
class Comparison:
    """One tensor (the output or a gradient) of one shape, and how it compared."""
    what: str                 # "output" or "gradient of 'q'"
    shape_label: str          # "B=2 H=2 I=17 J=129 D=16"
    max_error: float          # max |candidate - ref64| (inf when non-finite or missing)
    allowed: float            # fudge * yardstick + floor
    yardstick: float | None   # max |ref_lowp - ref64|; None when the low-precision reference failed
    problem: str | None       # why it failed, naming the element; None when it passed

    @property
    def ok(self) -> bool:
        return self.problem is None


def _index(flat_index: int, shape) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(shape)))


def compare_tensor(what: str, got: torch.Tensor | None, want: torch.Tensor, lowp: torch.Tensor | None,
                   *, dtype, device_type: str, fudge: float, shape_label: str = "") -> Comparison:
    """`got` (the candidate) against `want` (float64 reference), calibrated by `lowp`."""
    def result(max_error, allowed=0.0, yardstick=None, problem=None):
        return Comparison(what, shape_label, max_error, allowed, yardstick, problem)

    if got is None:
        return result(math.inf, problem="missing: the backend gave no value (no gradient flows to it)")
    if tuple(got.shape) != tuple(want.shape):
        return result(math.inf, problem=f"shape {tuple(got.shape)}, the reference has {tuple(want.shape)}")
    got = got.detach().to(torch.float64).cpu()
    want = want.detach().to(torch.float64).cpu()
    want_nan, got_nan = torch.isnan(want), torch.isnan(got)
    if not torch.equal(want_nan, got_nan):
        at = _index(int(torch.nonzero((want_nan != got_nan).flatten())[0]), want.shape)
        return result(math.inf, problem=f"NaN positions differ from the reference: at {at} got "
                                        f"{got[at].item():.6g}, expected {want[at].item():.6g} "
                                        f"({int((want_nan != got_nan).sum())} of {want.numel()} elements)")
    finite = ~want_nan
    error = torch.where(finite, (got - want).abs(), torch.zeros_like(want))
    error = torch.where(torch.isnan(error), torch.full_like(error, math.inf), error)
    scale = float(want[finite].abs().max()) if bool(finite.any()) else 0.0
    floor = FLOOR_ULPS * unit_roundoff(dtype, device_type) * max(scale, 1e-3)
    yardstick = None
    if lowp is not None and tuple(lowp.shape) == tuple(want.shape):
        lowp_error = (lowp.detach().to(torch.float64).cpu() - want)[finite].abs()
        if bool(torch.isfinite(lowp_error).all()):
            yardstick = float(lowp_error.max()) if lowp_error.numel() else 0.0
    allowed = fudge * (yardstick or 0.0) + floor
    max_error = float(error.max()) if error.numel() else 0.0
    if max_error <= allowed:
        return result(max_error, allowed, yardstick)
    at = _index(int(error.flatten().argmax()), want.shape)
    n_bad = int((error > allowed).sum())
    why = (f"{fudge:g} x low-precision error {yardstick:.3g} + floor {floor:.3g}" if yardstick is not None
           else f"floor {floor:.3g}; the low-precision reference could not run")
    return result(max_error, allowed, yardstick,
                  f"at index {at} got {got[at].item():.6g}, expected {want[at].item():.6g}: "
                  f"off by {error[at].item():.3g} > allowed {allowed:.3g} ({why}); "
                  f"{n_bad} of {want.numel()} elements off")


def _spec_and_candidate(attn_or_spec, backend, config, params):
    """(the Attention to test, its spec, the reference Attention in the same params)."""
    import kernelsearch
    from .api import Attention
    if isinstance(attn_or_spec, Attention):
        if backend is not None or config is not None or params:
            raise TypeError("assert_matches_reference: give backend=, config= and params to "
                            "kernelsearch.load, or a spec path here, not both")
        candidate = attn_or_spec
    else:
        candidate = kernelsearch.load(attn_or_spec, backend=backend or "auto", config=config, **params)
    reference = kernelsearch.load(candidate.spec, backend="reference", **candidate.overrides)
    return candidate, reference


def _default_shapes(attention) -> tuple[dict, ...]:
    # a spec whose batch is laid out [(b s), ...] (num_streams, the talking-heads contract) needs B = b * s
    streams = attention.params.get("num_streams")
    if isinstance(streams, int) and not isinstance(streams, bool) and streams > 1:
        return tuple({**shape, "B": shape["B"] * streams} for shape in DEFAULT_SHAPES)
    return DEFAULT_SHAPES


def _shape_label(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())


def _differentiable(spec, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [n for n, t in tensors.items() if t.is_floating_point() and spec.inputs[n].differentiable]


def _run(attention, tensors: Mapping[str, torch.Tensor], dtype, grad_names: list[str],
         grad_out: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """{"output": o, "gradient of 'x'": dx, ...} of `attention` on `tensors` cast to `dtype`."""
    args = {}
    for name, t in tensors.items():
        t = t.detach().to(dtype) if t.is_floating_point() else t
        args[name] = t.clone().requires_grad_(True) if name in grad_names else t
    with torch.set_grad_enabled(bool(grad_names)):
        out = attention(args["q"], args["k"], args["v"],
                        **{n: t for n, t in args.items() if n not in ("q", "k", "v")})
    results: dict[str, torch.Tensor | None] = {"output": out.detach()}
    if grad_names:
        grads = [None] * len(grad_names)      # an output cut off from autograd: every gradient missing
        if out.requires_grad:
            grads = torch.autograd.grad(out, [args[n] for n in grad_names], grad_out.to(out.dtype),
                                        allow_unused=True)
        results.update({f"gradient of '{n}'": g for n, g in zip(grad_names, grads)})
    return results


def _run_or_none(attention, tensors, dtype, grad_names, grad_out):
    """The low-precision reference, or None where an op has no kernel in that dtype here."""
    try:
        return _run(attention, tensors, dtype, grad_names, grad_out)
    except (RuntimeError, NotImplementedError):
        return None


def _input_tensors(spec, sizes, inputs, seed, params, device) -> dict[str, torch.Tensor]:
    from .inputs import random_inputs
    return random_inputs(spec, dict(sizes), dtype=torch.float64, device=device, seed=seed,
                         optional=inputs, params=params)


def _compare_all(candidate, reference, shapes, dtype, grads, inputs, seed, device,
                 fudge, grad_fudge) -> list[Comparison]:
    spec = candidate.spec
    if device is None:
        device = "cuda" if candidate.backend == "triton" and torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    comparisons = []
    for n, sizes in enumerate(shapes or _default_shapes(candidate)):
        # drawn in float64 and rounded to dtype once: the reference sees the values the candidate sees
        drawn = _input_tensors(spec, sizes, inputs, seed + n, candidate.overrides, device)
        tensors = {k: (t.to(dtype).to(torch.float64) if t.is_floating_point() else t) for k, t in drawn.items()}
        grad_names = _differentiable(spec, tensors) if grads else []
        want = _run(reference, tensors, torch.float64, [], None)
        grad_out = None
        if grad_names:
            generator = torch.Generator().manual_seed(seed + n + 1000)
            grad_out = torch.randn(want["output"].shape, generator=generator, dtype=torch.float64)
            grad_out = grad_out.to(dtype).to(torch.float64).to(device)
            want = _run(reference, tensors, torch.float64, grad_names, grad_out)
        got = _run(candidate, tensors, dtype, grad_names, grad_out)
        lowp = want if dtype == torch.float64 else _run_or_none(reference, tensors, dtype, grad_names, grad_out)
        for what, ref in want.items():
            if ref is None:      # an input the reference ignores (e.g. a table a param switched off)
                continue
            comparisons.append(compare_tensor(
                what, got.get(what), ref, (lowp or {}).get(what), dtype=dtype, device_type=device_type,
                fudge=fudge if what == "output" else grad_fudge, shape_label=_shape_label(sizes)))
    return comparisons


def check_against_reference(attn_or_spec, *, shapes: Iterable[Mapping[str, int]] | None = None,
                            dtype=torch.float32, grads: bool = True, backend: str | None = None,
                            config: dict | None = None, inputs: bool | Iterable[str] = True,
                            seed: int = 0, device: str | torch.device | None = None,
                            fudge: float = OUTPUT_FUDGE, grad_fudge: float = GRAD_FUDGE,
                            **params) -> list[Comparison]:
    """Every comparison `assert_matches_reference` makes, passed or not (same arguments)."""
    candidate, reference = _spec_and_candidate(attn_or_spec, backend, config, params)
    return _compare_all(candidate, reference, shapes, dtype, grads, inputs, seed, device, fudge, grad_fudge)


def assert_matches_reference(attn_or_spec, *, shapes: Iterable[Mapping[str, int]] | None = None,
                             dtype=torch.float32, grads: bool = True, backend: str | None = None,
                             config: dict | None = None, inputs: bool | Iterable[str] = True,
                             seed: int = 0, device: str | torch.device | None = None,
                             fudge: float = OUTPUT_FUDGE, grad_fudge: float = GRAD_FUDGE,
                             **params) -> list[Comparison]:
    """Fail with one message naming every tensor that does not match the float64 reference.

    attn_or_spec: what ``kernelsearch.load`` returned, or a spec path (then ``backend``
    (default "auto"), ``config`` and ``**params`` are handed to ``kernelsearch.load``).
    shapes: size dicts ``{"B", "H", "I", "J", "D"}`` (default ``DEFAULT_SHAPES``: I=17,
    J=129 and I=J=33, which divide no tile; B is multiplied by ``num_streams`` where a spec
    lays its batch out ``[(b s), ...]``). dtype: what the candidate computes in.
    grads: compare the gradient of every differentiable input too (for a random output gradient).
    inputs: which optional inputs to pass: True (all), False (none) or their names.
    seed: the random inputs' seed (one more per shape). device: default cuda for triton on a GPU.
    fudge / grad_fudge: the multiple of the low-precision reference's error allowed.
    Returns the comparisons (all passed), so that a caller can print the margins.
    """
    candidate, reference = _spec_and_candidate(attn_or_spec, backend, config, params)
    comparisons = _compare_all(candidate, reference, shapes, dtype, grads, inputs, seed, device,
                               fudge, grad_fudge)
    failed = [c for c in comparisons if not c.ok]
    if failed:
        lines = [f"{c.what} ({c.shape_label}): {c.problem}" for c in failed]
        raise AssertionError(
            f"{candidate!r} does not match the float64 reference in {_dtype_name(dtype)} (seed {seed}, "
            f"config {candidate.last_config}); {len(failed)} of {len(comparisons)} tensors differ:\n  "
            + "\n  ".join(lines))
    return comparisons


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")
