"""`kernelsearch.load`: a spec in, the contract's attention callable out."""
from __future__ import annotations

import torch

from .compiler import compile_graph, resolve_params
from .errors import SpecError, UsageError
from .spec import Spec, load_spec

BACKENDS = ("reference", "torch", "triton")


def _pick_backend(backend: str) -> str:
    if backend == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    return backend


class Attention:
    """attn(q, k, v, **inputs) -> o, for one spec, backend and set of params.

    Optional inputs are passed by keyword with the spec's names; the graph is specialised (and
    code generated) once per combination of present inputs. `config` fixes the backend's knobs;
    without it the tuned config recorded for this device and shape is used when there is one.
    """

    def __init__(self, spec: Spec, backend: str, params: dict, config: dict | None = None):
        self.spec = spec
        self.backend = backend
        self.params = resolve_params(spec, params)   # checks names and types now, not at the first call
        self.overrides = dict(params)
        self.config = dict(config) if config else None
        self.last_config: dict | None = None
        # one implementation per combination of present optional inputs, built now: a call traced by
        # torch.compile must find plain tensor code, not the compiler
        from .codegen.module import presence_sets
        self._implementations = {present: self._build(self.graph(present)) for present in presence_sets(spec)}

    def __repr__(self) -> str:
        return f"kernelsearch.load({self.spec.path!r}, backend={self.backend!r}, **{self.overrides!r})"

    def graph(self, present=None):
        return compile_graph(self.spec, self.overrides, present)

    def __call__(self, q, k, v, **inputs):
        unknown = set(inputs) - set(self.spec.inputs)
        if unknown:
            raise TypeError(f"{self.spec.name} attention got unexpected input(s) {sorted(unknown)}; "
                            f"its inputs are {', '.join(self.spec.inputs)}")
        for name, decl in self.spec.inputs.items():
            if name not in ("q", "k", "v") and not decl.optional and inputs.get(name) is None:
                raise TypeError(f"{self.spec.name} attention needs the input '{name}'")
        present = frozenset(n for n in self.spec.optional_inputs if inputs.get(n) is not None)
        tensors = {"q": q, "k": k, "v": v, **{n: t for n, t in inputs.items() if t is not None}}
        return self._implementations[present](tensors)

    def _build(self, graph):
        if self.backend == "reference":
            from .backends import reference
            evaluator = reference.NodeEvaluator(graph, [graph.output])   # the graph walked once, here

            def run_reference(tensors):
                self.last_config = {}
                return evaluator(tensors)[graph.output]
            return run_reference
        if self.backend == "torch":
            from .backends import torch_backend
            return torch_backend.build(graph, self)
        from .backends import triton_backend
        return triton_backend.build(graph, self)


def load(spec_path, backend: str = "auto", config: dict | None = None, **params) -> Attention:
    """The attention a spec describes, as a callable: attn(q, k, v, **inputs) -> o.

    backend: "reference" (eager, the definition), "torch" (generated PyTorch, compile-able),
    "triton" (generated kernels), or "auto": triton on a GPU, torch on a CPU.
    params override the spec's `params:`; an unknown name or wrong type raises SpecError.
    """
    spec = spec_path if isinstance(spec_path, Spec) else load_spec(spec_path)
    return Attention(spec, _pick_backend(backend), params, config)
