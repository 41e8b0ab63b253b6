"""Front door of the compiler: a spec and its specialisation in, a scheduled graph out."""
from __future__ import annotations

import ast

from .errors import SpecError
from .ir import Graph
from .passes import run_pipeline
from .spec import Spec, coerce_param, load_spec


def resolve_params(spec: Spec, overrides: dict | None = None) -> dict:
    """The spec's defaults with `overrides` applied; unknown names and wrong types are SpecErrors."""
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in spec.params:
            from .spec import _suggest
            raise SpecError(f"unknown param '{name}' for spec '{spec.name}'", None,
                            _suggest(name, spec.params) if spec.params else "this spec has no params")
    resolved = {}
    for name, param in spec.params.items():
        if name in overrides:
            resolved[name] = coerce_param(param, overrides[name])
        else:
            resolved[name] = param.default
    return resolved


def params_key(params: dict) -> tuple:
    return tuple(sorted((k, ast.unparse(v) if isinstance(v, ast.expr) else v) for k, v in params.items()))


def compile_graph(spec: Spec, params: dict | None = None, present=None, debug: bool = False) -> Graph:
    """The scheduled graph of `spec` for these param overrides and present optional inputs.

    `present` lists the optional inputs given; None means all of them.
    """
    resolved = resolve_params(spec, params)
    present = frozenset(spec.optional_inputs if present is None else present)
    unknown = present - set(spec.optional_inputs)
    if unknown:
        raise SpecError(f"not optional inputs of '{spec.name}': {sorted(unknown)}", None)
    return _compile_cached(spec, params_key(resolved), present, debug, resolved)


_CACHE: dict = {}


def _compile_cached(spec, key, present, debug, resolved):
    cache_key = (spec.sha256, spec.path, key, present)
    if debug or cache_key not in _CACHE:
        graph = run_pipeline(spec, resolved, present, debug)
        if debug:
            return graph
        _CACHE[cache_key] = graph
    return _CACHE[cache_key]


def check_spec(path) -> Spec:
    """Parse and compile with defaults, for every combination of present optional inputs."""
    import itertools
    spec = load_spec(path)
    optional = spec.optional_inputs
    for r in range(len(optional) + 1):
        for present in itertools.combinations(optional, r):
            compile_graph(spec, None, frozenset(present))
    return spec
