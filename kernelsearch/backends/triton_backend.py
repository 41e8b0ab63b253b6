"""The triton backend: generated fused kernels, forward (codegen/triton_fwd.py) and backward (triton_bwd.py).

`build(graph, attention)` returns `run(tensors) -> o`. The generated module is written to a
cache file and imported from it (Triton's @jit reads its function's source with `inspect`), and
its launcher is registered as a `torch.library.triton_op` (kernels launched through
`wrap_triton`), so that a model calling it compiles under torch.compile(fullgraph=True).

Under TRITON_INTERPRET=1 the same kernels run on the CPU in Triton's interpreter (tensors on
the CPU); the launch is then registered as an opaque `torch.library.custom_op` instead, since
`wrap_triton` only takes compiled kernels.

Two paths per specialisation:

    inference   (no input requires grad, or grad disabled): the forward kernel of the whole graph,
                per-row q/k/v transforms fused into it.
    training    the per-row transforms are evaluated by the reference ops in torch (autograd
                differentiates them; O((I + J) * D)), and the rest - the core graph of
                passes/split_prologue.py - runs as one op with a registered autograd formula:
                forward kernel that also saves the rows' log-sum-exp, and the generated dq and
                dkdv kernels in backward.

Knobs (the config): lowering ("triton": the generated kernels; "sdpa" / "flex": PyTorch's own
kernels, run by the torch backend's generated library lowerings, where passes/library.py says
they fit the graph), and for the kernels BLOCK_M, BLOCK_N, num_warps, num_stages (forward) and
BLOCK_M_BWD, BLOCK_N_BWD, num_warps_bwd, num_stages_bwd (backward). Without `attention.config`
the tuned config recorded for this device, shape and params is used (when its lowering can run
the call), else the defaults (the Triton kernels).
"""
from __future__ import annotations

import os

import torch

from ..codegen import names, triton_bwd, triton_fwd
from ..codegen.files import GeneratedFile, triton_file, triton_training_file
from ..codegen.triton_fwd import CodegenError, plan
from ..ir import Graph
from ..layout import bind
from . import loader
from ..passes import library
from ..runtime import config_store
from . import knobs, torch_backend

# fill outputs with NaN before the launch (tests set this, so unwritten elements cannot pass)
POISON_OUTPUTS = os.environ.get("KERNELSEARCH_POISON", "") == "1"

__all__ = ["build", "default_config", "BackwardNotImplemented", "CodegenError", "load_module",
           "interpreting", "interpret_stdlib_jit_calls"]


class BackwardNotImplemented(NotImplementedError):
    """A spec whose backward the code generator cannot derive (names the op), met with inputs that need grad."""


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    import triton
    return bool(triton.knobs.runtime.interpret)


def interpret_stdlib_jit_calls() -> None:
    """Let interpreted kernels call Triton's @jit standard library whatever the import order.

    Triton's own helpers (tl.zeros, tl.max, tl.sum, tl.sigmoid, tl.cdiv, ...) are @triton.jit
    functions, decorated once when triton.language is first imported: as InterpretedFunction if
    TRITON_INTERPRET=1 then, else as JITFunction. Whatever first imports triton without it - torch.compile /
    inductor does, as does any compiled-kernel test - leaves JITFunctions behind, and an interpreted kernel
    calling one hits JITFunction.__call__, which always raises "Cannot call @triton.jit'd outside of the
    scope of a kernel" (the interpreter patches only builtins, not these). Here such a call, made while
    the interpreter is on, runs the function as the interpreter would have wrapped it. Compilation never
    goes through __call__ (the code generator inlines JITFunctions), so compiled kernels are unaffected.
    """
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    original = JITFunction.__call__
    if getattr(original, "_kernelsearch_interprets", False):
        return
    interpreted = {}

    def __call__(self, *args, **kwargs):
        if not triton.knobs.runtime.interpret:
            return original(self, *args, **kwargs)
        if self.fn not in interpreted:
            interpreted[self.fn] = InterpretedFunction(self.fn)
        return interpreted[self.fn](*args, **kwargs)

    __call__._kernelsearch_interprets = True
    JITFunction.__call__ = __call__


def load_module(file: GeneratedFile, interpret: bool | None = None):
    """Import a generated Triton file (backends/loader.py: the cache holds it under its own name, so
    Triton's @jit reads its source with inspect and `kernelsearch show` prints the same bytes).

    interpret: import with Triton's interpreter on/off regardless of TRITON_INTERPRET (the AOT
    check needs real JITFunctions even in an interpreted test session); None follows it. The two
    are separate modules of one file.
    """
    import triton
    if interpret is None:
        interpret = interpreting()
    if interpret:
        interpret_stdlib_jit_calls()
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = bool(interpret)
        return loader.import_file(file, f"{file.module}_{'interp' if interpret else 'jit'}")


def default_config(spec_or_graph, sizes: dict | None = None) -> dict:
    """Default knobs (knobs.py): 64x64 tiles per head; small tiles when a program holds every head
    of a sample; tiles no larger than the (padded) sequence they cover."""
    graph = spec_or_graph
    if not isinstance(graph, Graph):
        from ..compiler import compile_graph
        from ..spec import Spec, load_spec
        spec = graph if isinstance(graph, Spec) else load_spec(graph)
        graph = compile_graph(spec)
    return knobs.default_config("triton", sizes, graph.schedule)


def tuned_config(graph: Graph, sizes: dict, dtype, device) -> dict | None:
    return config_store.lookup_for_call(graph, "triton", sizes, dtype, device)


def needs_grad(tensors: dict) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors.values())


class TritonForward:
    """The generated module of one specialisation, and its torch.library op."""

    _ops: dict = {}

    def __init__(self, graph: Graph, interpret: bool | None = None):
        self.graph = graph
        # decided once: under torch.compile nothing may ask triton's knobs (dynamo cannot trace them)
        self.interpret = interpreting() if interpret is None else interpret
        self.plan = plan(graph)
        self.file = triton_file(graph)
        self.source = self.file.source
        self.inputs = list(self.file.inputs)
        self._module = None
        self._op = None

    @property
    def module(self):
        if self._module is None:
            self._module = load_module(self.file, interpret=self.interpret)
        return self._module

    def op(self):
        """torch.ops.kernelsearch.<name>: triton_op (compiled kernels) or custom_op (interpreter)."""
        if self._op is not None:
            return self._op
        interp = self.interpret
        name = self.file.module + ("_interp" if interp else "")
        if name in self._ops:
            self._op = self._ops[name]
            return self._op
        module = self.module
        params = ", ".join(f"Tensor {names.argument(n)}" for n in self.inputs)
        schema = f"({params}, int BLOCK_M, int BLOCK_N, int num_warps, int num_stages, bool poison) -> Tensor"
        count = len(self.inputs)
        make, wrap = library_op_kind(interp)

        def launch(*args):
            tensors, (block_m, block_n, warps, stages, poison) = args[:count], args[count:]
            return module.forward(*tensors, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                  num_stages=stages, poison=poison, wrap=wrap)
        op = make(f"kernelsearch::{name}", launch, mutates_args=(), schema=schema)
        if interp:
            @op.register_fake
            def _(*args):
                return module.forward_fake(*args[:count])
        self._ops[name] = op
        self._op = op
        return op

    def __call__(self, tensors: dict, config: dict, poison: bool = False):
        args = [tensors[n] for n in self.inputs]
        return self.op()(*args, int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["num_warps"]),
                         int(config["num_stages"]), bool(poison))


def library_op_kind(interpret: bool):
    """(make, wrap): how to register a launcher as torch.ops.kernelsearch.<name>. Compiled kernels:
    triton_op, kernels launched through wrap_triton (torch.compile sees into them). Interpreter:
    an opaque custom_op (wrap_triton takes compiled kernels only; it needs a registered fake)."""
    if interpret:
        return torch.library.custom_op, None
    from torch.library import triton_op, wrap_triton
    return triton_op, wrap_triton


def lowerings(graph: Graph) -> tuple[str, ...]:
    """The triton backend's lowerings of this graph: its generated kernels, then PyTorch's own
    (sdpa, flex: the torch backend's generated library lowerings) where passes/library.py says
    they fit."""
    return ("triton",) + library.lowerings(graph)


def resolve_config(attention, graph: Graph, sizes: dict, q, available: tuple | None = None,
                   tensors: dict | None = None) -> dict:
    """attention.config, else the tuned config for this call (not while torch.compile traces: no
    file I/O in a graph) when its lowering can run the call, else the defaults; knobs the config
    leaves out take their defaults. ConfigError for a given lowering that cannot run the graph."""
    available = lowerings(graph) if available is None else available
    config = attention.config if attention is not None and attention.config else None
    if config is None and not torch.compiler.is_compiling():
        config = tuned_config(graph, sizes, q.dtype, q.device)
        lowering = (config or {}).get("lowering", "triton")
        if config and (lowering not in available
                       or (tensors is not None and not torch_backend.record_usable(config, tensors))):
            config = None   # a record this call cannot run (another graph's library lowering): the defaults
    full = knobs.validate_config("triton", config, sizes, graph.schedule)
    if full["lowering"] not in available:
        raise knobs.ConfigError(f"triton config: lowering={full['lowering']!r} cannot run {graph.spec.name} with "
                                f"these params and inputs: {library.why_not(graph, full['lowering'])}; its "
                                f"lowerings are {', '.join(available)}")
    return full


class TritonTraining:
    """The training path of one specialisation: the core graph's forward (saving the row
    log-sum-exp) and backward kernels as one torch.library op with a registered autograd formula."""

    _ops: dict = {}

    def __init__(self, graph: Graph, interpret: bool):
        from ..passes.split_prologue import split_prologue
        self.graph = graph
        self.interpret = interpret
        split = split_prologue(graph)
        self.cuts, self.core = split.cuts, split.core
        self.plan = plan(self.core)
        self.backward_plan = triton_bwd.backward_plan(self.core)      # CodegenError if an op has no rule
        self.file = triton_training_file(self.core)
        self.source = self.file.source
        self.inputs = list(self.file.inputs)
        from .reference import NodeEvaluator
        self.prologue = NodeEvaluator(graph, self.cuts) if self.cuts else None
        self._op = None

    def op(self):
        if self._op is not None:
            return self._op
        name = self.file.module + ("_interp" if self.interpret else "")
        if name in self._ops:
            self._op = self._ops[name]
            return self._op
        module = load_module(self.file, interpret=self.interpret)
        count = len(self.inputs)
        tensors = ", ".join(f"Tensor {names.argument(n)}" for n in self.inputs)
        knobs = "int BLOCK_M, int BLOCK_N, int num_warps, int num_stages"
        fwd_schema = f"({tensors}, {knobs}, int BLOCK_M_BWD, int BLOCK_N_BWD, int num_warps_bwd, " \
                     "int num_stages_bwd, bool poison) -> (Tensor, Tensor)"
        bwd_schema = f"(Tensor do, Tensor out, Tensor lse, {tensors}, {knobs}, bool poison) -> Tensor[]"
        make, wrap = library_op_kind(self.interpret)
        # the saved row log-sum-exp: one [B, H, I] plane per softmax (the plan's row statistics)
        planes = len(self.core.plan.statistics)
        lse_shape = (lambda out: (planes,) + tuple(out[:-1])) if planes > 1 else (lambda out: tuple(out[:-1]))

        def forward(*args):
            tensors, (bm, bn, warps, stages, _, _, _, _, poison) = args[:count], args[count:]
            out_shape = module.forward_fake(*tensors).shape
            lse = torch.empty(lse_shape(out_shape), dtype=torch.float32, device=tensors[0].device)
            out = module.forward(*tensors, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                                 poison=poison, lse=lse, wrap=wrap)
            return out, lse

        def backward(do, out, lse, *args):
            tensors, (bm, bn, warps, stages, poison) = args[:count], args[count:]
            return module.backward(do, out, lse, *tensors, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                   num_stages=stages, wrap=wrap, poison=poison)

        fwd_op = make(f"kernelsearch::{name}", forward, mutates_args=(), schema=fwd_schema)
        bwd_op = make(f"kernelsearch::{name}_backward", backward, mutates_args=(), schema=bwd_schema)
        differentiable = [self.inputs.index(n) for n in self.backward_plan.differentiable]

        if self.interpret:
            @fwd_op.register_fake
            def _(*args):
                out = module.forward_fake(*args[:count])
                return out, out.new_empty(lse_shape(out.shape), dtype=torch.float32)

            @bwd_op.register_fake
            def _(do, out, lse, *args):
                return [args[k].new_empty(args[k].shape) for k in differentiable]   # contiguous, as allocated

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:count], *output)
            ctx.knobs = inputs[count + 4:count + 9]     # the *_BWD knobs and poison

        def differentiate(ctx, grad_out, grad_lse):
            *tensors, out, lse = ctx.saved_tensors
            if grad_out is None:
                grad_out = torch.zeros_like(out)
            grads = bwd_op(grad_out, out, lse, *tensors, *ctx.knobs)
            result = [None] * (count + 9)
            for position, grad in zip(differentiable, grads):
                result[position] = grad
            return tuple(result)

        fwd_op.register_autograd(differentiate, setup_context=setup_context)
        self._ops[name] = fwd_op
        self._op = fwd_op
        return fwd_op

    def __call__(self, tensors: dict, config: dict, poison: bool = False):
        cut_values = self.prologue(tensors) if self.prologue is not None else {}
        args = [cut_values[n] if n in cut_values else tensors[n] for n in self.inputs]
        knob_values = [int(config[k]) for k in knobs.TRITON_FWD_KNOBS + knobs.TRITON_BWD_KNOBS]
        out, _ = self.op()(*args, *knob_values, bool(poison))
        return out


def build(graph: Graph, attention):
    """run(tensors) -> o. The ops are registered now, not at the first call: a call that
    torch.compile traces must find them (no code generation or imports inside a graph)."""
    forward = TritonForward(graph)
    forward.op()
    available = lowerings(graph)   # decided now: a call torch.compile traces reads no graph
    # PyTorch's own kernels where they fit: the torch backend's generated library lowerings
    library_functions = torch_backend.TorchFunctions(graph) if len(available) > 1 else None
    try:
        training = TritonTraining(graph, forward.interpret)
        training.op()
        why_not = None
    except CodegenError as e:
        training, why_not = None, str(e)

    def run(tensors: dict, sizes: dict | None = None):
        q = tensors["q"]
        if not forward.interpret and q.device.type != "cuda":
            raise RuntimeError(f"{graph.spec.name}: the triton backend runs on CUDA tensors (got {q.device}); "
                               "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU "
                               "in Triton's interpreter, or use backend='torch'")
        sizes = bind(graph, tensors) if sizes is None else sizes
        config = resolve_config(attention, graph, sizes, tensors["q"], available, tensors)
        if attention is not None:
            attention.last_config = dict(config)
        if config["lowering"] != "triton":
            function = library_functions.get(config["lowering"], compiled=False)
            return function(*[tensors[n] for n in library_functions.file.inputs])
        if needs_grad(tensors):
            if training is None:
                raise BackwardNotImplemented(f"{graph.spec.name}: inputs require grad, but the triton backward "
                                             f"cannot be generated: {why_not}. Use backend='torch' to train.")
            return training(tensors, config, poison=POISON_OUTPUTS)
        return forward(tensors, config, poison=POISON_OUTPUTS)

    run.forward = forward
    run.training = training
    return run
