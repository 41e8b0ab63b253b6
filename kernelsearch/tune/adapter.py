"""What the tuner needs of a backend: the interface, and its implementation for kernelsearch's own.

A *target* is a small picklable object chosen in the tuner's process; it travels to every trial
process inside the `target.Problem`. It answers, in the tuner's process:

- ``backend``: the backend name records are written under (``torch``, ``triton``);
- ``load_spec(spec_path, params) -> (spec, resolved params)``: the spec (``name``, ``sha256``,
  ``path``, ``inputs``, ``params``, ``tune``), SpecError/UsageError for bad input;
- ``space(spec, sizes, direction, dtype, params=, present=, device=) -> SearchSpace``: the knobs to search
  for this problem: the spec with the ``params`` given (--param) and the optional inputs ``present`` that
  the trials give, timed on ``device`` (its default config is the one the backend runs without a record);
- ``defaults``: None, or the tuner's defaults for it (shape, dtype, trials, time budgets), as
  in `study.DEFAULTS`;

and, in a trial process, ``open(problem) -> evaluator backend`` with:

- ``spec``; ``inputs(sizes, seed, optional, device) -> dict`` of tensors;
- ``build(config) -> callable`` (``attn(q, k, v, **inputs)``, with ``last_config``);
- ``reference() -> callable``: the float64 definition the output is checked against;
- ``recorded(config, present) -> config`` (optional): what a record of ``config`` runs for calls
  with the optional inputs ``present``, which the final check of a winner then checks;
- ``feasibility(config) -> dict | None``: a check before anything runs (the AOT compile for a
  GPU architecture); raises `policy.TrialFailure` for a config that cannot compile or fit;
- ``synthetic_time(config) -> float | None``: a modelled time instead of a measurement (test
  doubles), None to measure;
- ``expected_errors``: ``{exception type: failure kind}`` - the exceptions that are the
  config's fault (`policy.py`); anything else raised is an internal error.

The test double (``tests/tune_fake.py``) implements the same interface and is injected with
``TuneOptions(target=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .policy import TrialFailure
from .space import SearchSpace, backend_space

__all__ = ["KernelsearchTarget", "KernelsearchBackend", "torch_dtype"]


def torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
            "float64": torch.float64}[name]


@dataclass(frozen=True)
class KernelsearchTarget:
    """kernelsearch's torch (CPU) or triton (CUDA, or Triton's interpreter) backend."""

    backend: str   # "torch" | "triton"

    def load_spec(self, spec_path: str, params: Mapping[str, Any]) -> tuple[Any, dict]:
        from ..compiler import resolve_params
        from ..spec import load_spec

        spec = load_spec(spec_path)
        return spec, resolve_params(spec, dict(params))

    defaults = None   # the study's, per target (cpu, cuda)

    def space(self, spec: Any, sizes: Mapping[str, int], direction: str, dtype: str,
              params: Mapping[str, Any] | None = None, present: tuple = (), device: str = "cuda") -> SearchSpace:
        return backend_space(self.backend, spec, sizes, direction, dtype, params=params, present=present,
                             device=device)

    def open(self, problem: Any) -> "KernelsearchBackend":
        return KernelsearchBackend(problem)


def _lowerings(backend: str, graph: Any) -> tuple:
    """The lowerings a backend can run for a graph (its `lowering` knob's values that fit it)."""
    if backend == "torch":
        from ..codegen.torch_module import lowerings

        return lowerings(graph)
    from ..backends.triton_backend import lowerings

    return lowerings(graph)


class KernelsearchBackend:
    """The trial process's side: `kernelsearch.load` with a config, checked against the reference."""

    def __init__(self, problem: Any):
        import torch

        from ..api import load
        from ..inputs import random_inputs

        self.p = problem
        self._load = load
        self._random_inputs = random_inputs
        self.reference_fn = load(problem.spec_path, backend="reference", **problem.params)
        self.spec = self.reference_fn.spec
        self.expected_errors: dict[type, str] = {torch.OutOfMemoryError: "out_of_resources"}
        from torch._dynamo.exc import BackendCompilerFailed

        # Inductor refused a compile: the torch backend's compile=True, or FlexAttention (both backends)
        self.expected_errors[BackendCompilerFailed] = "compile_error"
        if problem.backend == "triton":
            from triton.compiler.errors import CompilationError
            from triton.runtime.errors import OutOfResources

            self.expected_errors.update({CompilationError: "compile_error", OutOfResources: "out_of_resources"})

    def inputs(self, sizes: Mapping[str, int], seed: int, optional: bool, device: str) -> dict:
        return self._random_inputs(self.spec, dict(sizes), dtype=torch_dtype(self.p.dtype), device=device,
                                   seed=seed, optional=optional)

    def build(self, config: Mapping[str, Any]) -> Callable:
        return self._load(self.p.spec_path, backend=self.p.backend, config=dict(config), **self.p.params)

    def reference(self) -> Callable:
        return self.reference_fn

    def recorded(self, config: Mapping[str, Any], present=None) -> dict:
        """The config `load` runs, with `config` recorded, for calls giving the optional inputs
        `present` (None: all): `config` where its lowering can run that call's graph, else the
        backend's defaults for the call (``{"lowering": None}``: the runtime skips a record whose
        lowering cannot run the call, e.g. an sdpa record of talking heads timed without its
        head-mixing inputs). The final check of a winner checks this."""
        from ..backends import knobs
        from ..compiler import compile_graph

        graph = compile_graph(self.spec, dict(self.p.params), present)
        lowering = knobs.validate_config(self.p.backend, dict(config), self.p.sizes).get("lowering")
        if lowering is None or lowering in _lowerings(self.p.backend, graph):
            return dict(config)
        return {"lowering": None}

    def feasibility(self, config: Mapping[str, Any]) -> dict | None:
        """The Triton kernels compiled for the device's architecture (sm_90 without a GPU) at the
        tuned sizes: TrialFailure when they do not compile or their shared memory does not fit."""
        if self.p.backend != "triton" or config.get("lowering", "triton") != "triton":
            return None   # no Triton kernel to compile: PyTorch's own (sdpa, flex) or the torch backend
        from ..codegen.triton_aot import aot_check, is_resource_error

        arch = 90
        if self.p.device_type == "cuda":
            import torch

            major, minor = torch.cuda.get_device_capability(self.p.device)
            arch = major * 10 + minor
        res = aot_check(self.spec, dict(self.p.params), dict(config), arch=arch, sizes=dict(self.p.sizes),
                        dtype=self.p.dtype, resources=False, direction=self.p.direction)
        if not res["ok"]:
            kind = "out_of_resources" if is_resource_error(res) else "compile_error"
            raise TrialFailure(kind, str(res.get("error") or "AOT check failed"))
        return {"arch": f"sm_{arch}", "shared": res.get("shared"), "compile_s": res.get("compile_s")}

    def synthetic_time(self, config: Mapping[str, Any]) -> float | None:
        return None
