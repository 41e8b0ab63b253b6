"""`kernelsearch.load`: a spec in, the contract's attention callable out."""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .backends.knobs import validate_config
from .compiler import compile_graph, resolve_params
from .errors import SpecError, UsageError
from .inputs import call_signature, check_call
from .spec import Spec, load_spec, parse_spec

BACKENDS = ("reference", "torch", "triton")
MAX_CHECKED_SIGNATURES = 256   # call signatures whose check is remembered (a model sees a handful)


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

    def __init__(self, spec: Spec, backend: str, params: dict, config: dict | None = None, generated=None):
        self.spec = spec
        self.backend = backend
        # generated modules already imported (generated/<variant>.py passes its own files), by module name;
        # the backends import any other file they need from the cache (backends/loader.py)
        self.generated = dict(generated or {})
        self.params = resolve_params(spec, params)   # checks names and types now, not at the first call
        self.overrides = dict(params)
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict of knob values, e.g. {{'lowering': 'chunked'}}, "
                            f"got {type(config).__name__}")
        # checked now (names, types, values: ConfigError); the size-dependent defaults are filled per call
        validate_config(backend, config)
        self.config = dict(config) if config else None
        self.last_config: dict | None = None
        # the sizes of each call signature already checked: a call like the last one pays no check
        self._checked: dict[tuple, dict[str, int]] = {}
        # one implementation per combination of present optional inputs, built now: a call traced by
        # torch.compile must find plain tensor code, not the compiler
        from .codegen.module import presence_sets
        self._implementations = {present: self._build(self.graph(present)) for present in presence_sets(spec)}

    def __repr__(self) -> str:
        return f"kernelsearch.load({self.spec.path!r}, backend={self.backend!r}, **{self.overrides!r})"

    def graph(self, present=None):
        return compile_graph(self.spec, self.overrides, present)

    def __call__(self, q, k, v, **inputs):
        given = {"q": q, "k": k, "v": v, **inputs}
        sizes = self._check(given)
        present = frozenset(n for n in self.spec.optional_inputs if inputs.get(n) is not None)
        return self._implementations[present]({n: t for n, t in given.items() if t is not None}, sizes)

    def _check(self, given: dict) -> dict[str, int]:
        """check_call (names, types, dtypes, devices, sizes, size-dependent defaults) once per call
        signature; its outcome depends on nothing else (the params are fixed at load)."""
        if torch.compiler.is_compiling():
            return check_call(self.spec, given, self.params)   # traced once: no memo in the graph
        signature = call_signature(given)
        sizes = self._checked.get(signature) if signature is not None else None
        if sizes is None:
            sizes = check_call(self.spec, given, self.params)
            if signature is not None:
                if len(self._checked) >= MAX_CHECKED_SIGNATURES:
                    self._checked.clear()
                self._checked[signature] = sizes
        return dict(sizes)

    def _build(self, graph):
        if self.backend == "reference":
            from .backends import reference
            evaluator = reference.NodeEvaluator(graph, [graph.output])   # the graph walked once, here

            def run_reference(tensors, sizes=None):
                self.last_config = {}
                return evaluator(tensors, sizes)[graph.output]
            return run_reference
        if self.backend == "torch":
            from .backends import torch_backend
            return torch_backend.build(graph, self)
        from .backends import triton_backend
        return triton_backend.build(graph, self)


def load(spec_path, backend: str = "auto", config: dict | None = None, **params) -> Attention:
    """The attention a spec describes, as a callable: attn(q, k, v, **inputs) -> o.

    spec_path: the path of a spec file, a spec's YAML text (a string of several lines), or a Spec.

    backend: "reference" (eager, the definition), "torch" (generated PyTorch, compile-able),
    "triton" (generated kernels), or "auto": triton on a GPU, torch on a CPU.
    params override the spec's `params:`; an unknown name or wrong type raises SpecError.
    config: the backend's knobs (backends/knobs.py), e.g. {"lowering": "chunked", "CHUNK_N": 512};
    knobs left out take their defaults; an unknown knob or a bad value raises ConfigError (a ValueError).
    """
    return Attention(_spec_of(spec_path), _pick_backend(backend), params, config)


def _spec_of(source) -> Spec:
    """A Spec, the path of a spec file, or a spec's YAML text (several lines; errors say `<string>:line:col`)."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, str) and "\n" in source:
        return parse_spec(source, "<string>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"spec_path must be the path of a spec file, a spec's YAML text or a Spec, "
                        f"got {type(source).__name__}")
    return load_spec(source)
