"""The torch backend: the generated torch file of each specialisation (codegen/files.py), imported.

Knobs (the config): lowering "materialized" | "chunked" | "sdpa" | "flex" (PyTorch's own kernels,
where passes/library.py says the graph fits them), CHUNK_N (keys per chunk), CHUNK_M (query
rows per chunk, 0 = all; a query chunk visits only the keys its rows can keep), compile
(wrap in torch.compile(fullgraph=True)). Without a config: the tuned one recorded for this
device and shape bucket if there is one, else the heuristic of knobs.torch_defaults (windows:
chunked; else SDPA where it fits; else materialized up to MATERIALIZE_MAX_SCORES score elements
per call and chunked beyond, so that memory stays linear for long sequences: two-pass graphs with
every key in one chunk, so that each scores tile is computed once).
"""
from __future__ import annotations

import functools

import torch

from ..codegen import torch_module
from ..codegen.files import torch_file
from ..ir import Graph
from ..layout import bind
from ..runtime import config_store
from ..passes import library
from ..passes.bounds import window_width
from . import knobs, library_calls, loader

# the knobs, their defaults and limits are declared in knobs.py; these names stay for the generated module
from .knobs import DEFAULT_CHUNK_M, DEFAULT_CHUNK_N, MATERIALIZE_MAX_SCORES  # noqa: E402,F401


def default_config(graph: Graph, sizes: dict) -> dict:
    return complete_config(None, sizes, graph)


def sdpa_masks_bounds(graph: Graph, available: tuple) -> bool:
    return "sdpa" in available and library.sdpa_visits_skippable_keys(graph)


def complete_config(config: dict | None, sizes: dict, graph: Graph | None = None, available=None,
                    masks_bounds: bool | None = None) -> dict:
    """A partial config (``{"lowering": "chunked", "CHUNK_N": 512}``) takes the defaults for the
    knobs it leaves out; ``last_config`` shows the result. Without a lowering, the graph's defaults
    (knobs.torch_defaults: from its lowerings and whether windows bound its keys) fill what the
    config leaves out. ConfigError for an invalid config, or for a lowering that cannot run
    `graph` (`available`, `masks_bounds`: its lowerings and sdpa_masks_bounds, when the caller
    knows them: a call torch.compile traces runs no graph analysis)."""
    given = config
    if graph is not None and (config is None or isinstance(config, dict)) and (config or {}).get("lowering") is None:
        available = torch_module.lowerings(graph) if available is None else available
        masks_bounds = sdpa_masks_bounds(graph, available) if masks_bounds is None else masks_bounds
        defaults = knobs.torch_defaults(sizes, available, window=window_width(graph, {d.lower(): n for d, n in sizes.items()}),
                                        sdpa_masks_bounds=masks_bounds, two_pass=graph.plan.sweeps == 2)
        given = {**defaults, **{k: v for k, v in (config or {}).items() if v is not None}}
    full = knobs.validate_config("torch", given, sizes)
    if graph is not None:
        check_lowering(graph, full, available)
    return full


def tuned_config(graph: Graph, sizes: dict, dtype, device) -> dict | None:
    if torch.compiler.is_compiling():
        return None  # inside a traced model: no file lookups; the defaults are static
    return config_store.lookup_for_call(graph, "torch", sizes, dtype, device)


class TorchFunctions:
    """The generated file of one specialisation, its functions by lowering (and compiled, on demand)."""

    def __init__(self, graph: Graph, generated: dict | None = None):
        self.graph = graph
        self.file = torch_file(graph)
        if generated:   # a committed generated/<variant>.py runs its own files, or says it is stale
            if self.file.module not in generated:
                raise RuntimeError(f"generated/{graph.spec.name}.py is stale: it has no {self.file.filename} "
                                   f"for inputs {sorted(graph.present)}; run `kernelsearch compile {graph.spec.path}`")
            self.module = generated[self.file.module]
        else:
            self.module = loader.import_file(self.file)
        self.functions: dict = {}

    def get(self, lowering: str, compiled: bool):
        key = (lowering, compiled)
        if key not in self.functions:
            self.functions[key] = self._compiled(lowering) if compiled else getattr(self.module, lowering)
        return self.functions[key]

    def _compiled(self, lowering: str):
        """The lowering under torch.compile. The chunked one keeps its loops over chunks in Python
        and compiles its step functions (the work of one tile): compile time does not grow with
        the number of chunks. Its chunks have at most two sizes per axis (the last may be short),
        and automatic dynamic shapes (dynamic=None) compile a size-generic step once a second
        size is seen, so a step compiles at most a few times whatever the sequence length."""
        function = getattr(self.module, lowering)
        if lowering != "chunked":
            return torch.compile(function, fullgraph=True, dynamic=False)
        steps = {name: torch.compile(getattr(self.module, name), fullgraph=True, dynamic=None)
                 for name in self.module.STEPS}
        return functools.partial(function, **steps)


def check_lowering(graph: Graph, config: dict, available=None) -> None:
    """ConfigError when the config's lowering cannot run this graph (a library kernel that does
    not fit it), naming why and the lowerings that can."""
    lowering = config["lowering"]
    available = torch_module.lowerings(graph) if available is None else available
    if lowering not in available:
        raise knobs.ConfigError(f"torch config: lowering={lowering!r} cannot run {graph.spec.name} with these "
                                f"params and inputs: {library.why_not(graph, lowering)}; its lowerings are "
                                f"{', '.join(available)}")


def record_usable(config: dict, tensors: dict) -> bool:
    """A tuned record's flex lowering is skipped where FlexAttention cannot run the call (CPU:
    float64, or gradients needed); the defaults then run it (same result, no record needed)."""
    if config.get("lowering") != "flex" or tensors["q"].device.type != "cpu":
        return True
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                 for t in tensors.values())
    return tensors["q"].dtype in library_calls.FLEX_CPU_DTYPES and not needs_grad


def build(graph: Graph, attention):
    functions = TorchFunctions(graph, attention.generated)
    available = torch_module.lowerings(graph)     # decided now: a call torch.compile traces reads no graph
    masks_bounds = sdpa_masks_bounds(graph, available)
    for lowering in available:
        functions.get(lowering, compiled=False)   # generate now, not while a caller is being traced
    arguments = functions.file.inputs

    completed: dict = {}   # (sizes, chosen knobs) -> the complete config: the defaults decided once per shape

    def run(tensors: dict, sizes: dict | None = None):
        sizes = bind(graph, tensors) if sizes is None else sizes
        chosen = attention.config
        if not chosen:
            chosen = tuned_config(graph, sizes, tensors["q"].dtype, tensors["q"].device)
            if chosen and (chosen.get("lowering") not in available or not record_usable(chosen, tensors)):
                chosen = None
        if torch.compiler.is_compiling():
            config = complete_config(chosen, sizes, graph, available, masks_bounds)
        else:
            key = (tuple(sizes.items()), tuple(sorted(chosen.items())) if chosen else None)
            if key not in completed:
                completed[key] = complete_config(chosen, sizes, graph, available, masks_bounds)
            config = dict(completed[key])
        attention.last_config = config
        function = functions.get(config["lowering"], bool(config["compile"]))
        args = [tensors[n] for n in arguments]
        if config["lowering"] == "chunked":
            return function(*args, CHUNK_N=int(config["CHUNK_N"]), CHUNK_M=int(config["CHUNK_M"]))
        return function(*args)

    run.functions = functions
    return run
