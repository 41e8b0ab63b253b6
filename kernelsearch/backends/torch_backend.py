"""The torch backend: generated PyTorch source, exec'd once per specialisation and lowering.

Knobs (the config): lowering "materialized" | "chunked", CHUNK_N (keys per chunk), CHUNK_M (query
rows per chunk, 0 = all; a query chunk visits only the keys its rows can keep), compile
(wrap in torch.compile(fullgraph=True)). Without a config: the tuned one recorded for this
device and shape bucket if there is one, else materialized up to MATERIALIZE_MAX_SCORES score
elements per call and chunked beyond, so that memory stays linear for long sequences.
"""
from __future__ import annotations

import linecache
import math

import torch

from ..codegen.torch_module import function_name, torch_source
from ..ir import Graph
from ..layout import bind
from . import torch_ops

MATERIALIZE_MAX_SCORES = 1 << 22
CHUNK_MAX_SCORES = 1 << 22      # score elements per key chunk (all query rows at once)
DEFAULT_CHUNK_N = 256
DEFAULT_CHUNK_M = 256     # query rows per chunk: causal / windowed specs skip the keys a chunk cannot keep


def exec_source(source: str, filename: str, names: dict | None = None) -> dict:
    """exec generated source with a real (linecache) filename, so tracebacks and inspect see it."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"torch": torch, "math": math, "ops": torch_ops, **(names or {})}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def chunk_defaults(sizes: dict) -> dict:
    """CHUNK_M and CHUNK_N of the chunked lowering when the config does not say."""
    row_chunk = DEFAULT_CHUNK_M if sizes.get("i", 1) > DEFAULT_CHUNK_M else 0
    rows = sizes.get("b", 1) * sizes.get("h", 1) * (row_chunk or sizes.get("i", 1))
    chunk = 16
    while chunk < 512 and rows * chunk * 2 <= CHUNK_MAX_SCORES:
        chunk *= 2          # the largest power of two keeping one tile's scores under the budget
    return {"CHUNK_N": chunk, "CHUNK_M": row_chunk}


def default_config(graph: Graph, sizes: dict) -> dict:
    scores = sizes.get("b", 1) * sizes.get("h", 1) * sizes.get("i", 1) * sizes.get("j", 1)
    if scores <= MATERIALIZE_MAX_SCORES:
        return {"lowering": "materialized", "compile": False}
    return {"lowering": "chunked", **chunk_defaults(sizes), "compile": False}


def complete_config(config: dict, sizes: dict) -> dict:
    """A partial config (``{"lowering": "chunked", "CHUNK_N": 512}``) takes the defaults for the
    knobs it leaves out, as the Triton backend's does; ``last_config`` shows the result."""
    full = {"lowering": "materialized", "compile": False, **config}
    if full["lowering"] == "chunked":
        full = {**chunk_defaults(sizes), **full}
    return full


def tuned_config(graph: Graph, sizes: dict, dtype, device) -> dict | None:
    if torch.compiler.is_compiling():
        return None  # inside a traced model: no file lookups; the defaults are static
    try:
        from ..tune import records
    except ImportError:
        return None
    return records.lookup_for_call(graph, "torch", sizes, dtype, device)


class TorchFunctions:
    """The generated functions of one specialisation, by lowering (and compiled, on demand)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.functions: dict = {}

    def get(self, lowering: str, compiled: bool):
        key = (lowering, compiled)
        if key not in self.functions:
            if compiled:
                self.functions[key] = torch.compile(self.get(lowering, False), fullgraph=True, dynamic=False)
            else:
                name = function_name(self.graph, lowering)
                source = torch_source(self.graph, lowering)
                filename = f"<kernelsearch:{self.graph.spec.name}:{name}>"
                self.functions[key] = exec_source(source, filename)[name]
        return self.functions[key]


def build(graph: Graph, attention):
    functions = TorchFunctions(graph)
    for lowering in ("materialized", "chunked"):
        functions.get(lowering, compiled=False)   # generate now, not while a caller is being traced
    arguments = ["q", "k", "v"] + [n for n in graph.spec.inputs if n not in ("q", "k", "v")]

    def run(tensors: dict):
        sizes = bind(graph, tensors)
        config = complete_config(attention.config or tuned_config(graph, sizes, tensors["q"].dtype,
                                                                  tensors["q"].device)
                                 or default_config(graph, sizes), sizes)
        attention.last_config = config
        function = functions.get(config["lowering"], bool(config["compile"]))
        args = [tensors[n] for n in arguments if n in tensors]
        if config["lowering"] == "chunked":
            return function(*args, CHUNK_N=int(config["CHUNK_N"]), CHUNK_M=int(config["CHUNK_M"]))
        return function(*args)

    run.functions = functions
    return run
