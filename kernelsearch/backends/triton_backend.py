"""The triton backend: generated fused forward kernels (kernelsearch/codegen/triton_fwd.py).

`build(graph, attention)` returns `run(tensors) -> o`. The generated module is written to a
cache file and imported from it (Triton's @jit reads its function's source with `inspect`), and
its launcher is registered as a `torch.library.triton_op` (kernels launched through
`wrap_triton`), so that a model calling it compiles under torch.compile(fullgraph=True).

Under TRITON_INTERPRET=1 the same kernels run on the CPU in Triton's interpreter (tensors on
the CPU); the launch is then registered as an opaque `torch.library.custom_op` instead, since
`wrap_triton` only takes compiled kernels.

Knobs (the config): BLOCK_M, BLOCK_N, num_warps, num_stages. Without `attention.config` the
tuned config recorded for this device and shape is used, else `default_config`.

There are no backward kernels yet: calling with inputs that require grad (with grad enabled)
raises `BackwardNotImplemented` rather than silently detaching.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..codegen import triton_fwd
from ..codegen.triton_fwd import CONFIG_KEYS, CodegenError, plan, source_hash, triton_source
from ..ir import Graph
from ..layout import bind

# fill outputs with NaN before the launch (tests set this, so unwritten elements cannot pass)
POISON_OUTPUTS = os.environ.get("KERNELSEARCH_POISON", "") == "1"

__all__ = ["build", "default_config", "aot_check", "BackwardNotImplemented", "CodegenError", "load_module",
           "interpreting", "cache_dir"]


class BackwardNotImplemented(NotImplementedError):
    pass


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    import triton
    return bool(triton.knobs.runtime.interpret)


def cache_dir() -> Path:
    root = os.environ.get("KERNELSEARCH_CACHE_DIR")
    if root:
        path = Path(root) / "triton"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "kernelsearch" / "triton"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"kernelsearch-{os.getuid()}" / "triton"
        path.mkdir(parents=True, exist_ok=True)
    return path


def load_module(source: str, stem: str, interpret: bool | None = None):
    """Import generated source from a cache file named by its hash (so inspect.getsource works).

    interpret: import with Triton's interpreter on/off regardless of TRITON_INTERPRET (the AOT
    check needs real JITFunctions even in an interpreted test session); None follows it.
    """
    import triton
    digest = source_hash(source)
    path = cache_dir() / f"{stem}_{digest}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    if interpret is None:
        interpret = interpreting()
    name = f"kernelsearch_triton_{stem}_{digest}_{'interp' if interpret else 'jit'}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = bool(interpret)
        spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def default_config(spec_or_graph, sizes: dict | None = None) -> dict:
    """Default knobs: 64x64 tiles per head; small tiles when a program holds every head of a sample."""
    graph = spec_or_graph
    if not isinstance(graph, Graph):
        from ..compiler import compile_graph
        from ..spec import Spec, load_spec
        spec = graph if isinstance(graph, Spec) else load_spec(graph)
        graph = compile_graph(spec)
    config = triton_fwd.default_config(graph)
    if sizes:
        # tiles no larger than the (padded) sequence they cover
        top_i = max(16, 1 << max(0, int(sizes.get("i", sizes.get("I", 1)) - 1)).bit_length())
        top_j = max(16, 1 << max(0, int(sizes.get("j", sizes.get("J", 1)) - 1)).bit_length())
        config["BLOCK_M"] = min(config["BLOCK_M"], top_i)
        config["BLOCK_N"] = min(config["BLOCK_N"], top_j)
    return config


def tuned_config(graph: Graph, sizes: dict, dtype, device) -> dict | None:
    try:
        from ..tune import records
        return records.lookup_for_call(graph, "triton", sizes, dtype, device)
    except Exception:
        return None


def check_no_grad(spec_name: str, tensors: dict) -> None:
    if not torch.is_grad_enabled():
        return
    needing = [n for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if needing:
        raise BackwardNotImplemented(
            f"{spec_name}: the triton backend has no backward kernels yet, but input(s) {needing} require grad. "
            "Use backend='torch' (differentiable) to train, or call under torch.no_grad() / with detached "
            "inputs for inference.")


class TritonForward:
    """The generated module of one specialisation, and its torch.library op."""

    _ops: dict = {}

    def __init__(self, graph: Graph, interpret: bool | None = None):
        self.graph = graph
        # decided once: under torch.compile nothing may ask triton's knobs (dynamo cannot trace them)
        self.interpret = interpreting() if interpret is None else interpret
        self.plan = plan(graph)
        self.source = triton_source(graph)
        self.digest = source_hash(self.source)
        self.stem = f"{triton_fwd._sanitize(graph.spec.name)}_fwd"
        self.inputs = [t.name for t in self.plan.tensors]
        self._module = None
        self._op = None

    @property
    def module(self):
        if self._module is None:
            self._module = load_module(self.source, self.stem, interpret=self.interpret)
        return self._module

    def op(self):
        """torch.ops.kernelsearch.<name>: triton_op (compiled kernels) or custom_op (interpreter)."""
        if self._op is not None:
            return self._op
        interp = self.interpret
        name = f"{self.stem}_{self.digest}" + ("_interp" if interp else "")
        if name in self._ops:
            self._op = self._ops[name]
            return self._op
        module = self.module
        params = ", ".join(f"Tensor {triton_fwd._sanitize(n)}" for n in self.inputs)
        schema = f"({params}, int BLOCK_M, int BLOCK_N, int num_warps, int num_stages, bool poison) -> Tensor"
        count = len(self.inputs)

        if interp:
            def launch(*args):
                tensors, (block_m, block_n, warps, stages, poison) = args[:count], args[count:]
                return module.forward(*tensors, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                      num_stages=stages, poison=poison)
            op = torch.library.custom_op(f"kernelsearch::{name}", launch, mutates_args=(), schema=schema)

            @op.register_fake
            def _(*args):
                return module.forward_fake(*args[:count])
        else:
            from torch.library import triton_op, wrap_triton

            def launch(*args):
                tensors, (block_m, block_n, warps, stages, poison) = args[:count], args[count:]
                return module.forward(*tensors, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                      num_stages=stages, poison=poison, wrap=wrap_triton)
            op = triton_op(f"kernelsearch::{name}", launch, mutates_args=(), schema=schema)
        self._ops[name] = op
        self._op = op
        return op

    def __call__(self, tensors: dict, config: dict, poison: bool = False):
        args = [tensors[n] for n in self.inputs]
        q = tensors["q"]
        if not self.interpret and q.device.type != "cuda":
            raise RuntimeError(f"{self.graph.spec.name}: the triton backend runs on CUDA tensors (got {q.device}); "
                               "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU "
                               "in Triton's interpreter, or use backend='torch'")
        return self.op()(*args, int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["num_warps"]),
                         int(config["num_stages"]), bool(poison))


def resolve_config(attention, graph: Graph, sizes: dict, q) -> dict:
    """attention.config, else the tuned config for this call (not while torch.compile traces: no
    file I/O in a graph), else the defaults; knobs the config leaves out take their defaults."""
    config = attention.config if attention is not None and attention.config else None
    if config is None and not torch.compiler.is_compiling():
        config = tuned_config(graph, sizes, q.dtype, q.device)
    merged = default_config(graph, sizes)
    if config:
        merged.update({k: config[k] for k in CONFIG_KEYS if k in config})
    return merged


def build(graph: Graph, attention):
    forward = TritonForward(graph)

    def run(tensors: dict):
        check_no_grad(graph.spec.name, tensors)
        sizes = bind(graph, tensors)
        config = resolve_config(attention, graph, sizes, tensors["q"])
        if attention is not None:
            attention.last_config = dict(config)
        return forward(tensors, config, poison=POISON_OUTPUTS)

    run.forward = forward
    return run


def aot_check(spec_or_graph, params=None, config=None, arch=90, **kwargs) -> dict:
    """Compile the forward kernel for a GPU architecture without a GPU; see codegen/triton_aot.py."""
    from ..codegen.triton_aot import aot_check as check
    return check(spec_or_graph, params, config, arch=arch, **kwargs)
