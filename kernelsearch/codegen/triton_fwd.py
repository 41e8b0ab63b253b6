"""Codegen: a scheduled graph -> the source of a fused Triton forward kernel and its launcher.

Pure functions (no I/O): `TRITON_PRELUDE` + `triton_functions(graph)` are a module's source text
(codegen/files.py assembles the files that run); `plan(graph)` says what the kernels take (the
launcher and the AOT check use it).
Nothing here knows a variant by name: the kernel is assembled from the graph's stages, its
schedule and its key bounds. The skeleton reads as an ordinary flash-attention kernel with slots
for the layout (which tensors, strides, sizes), the flags (schedule, sweeps) and the user's code
(the ops of each stage, rendered one line per graph node):

    constant      per program: loads with no i/j (per-head scales, mixing weights)
    q_prologue    once per query tile [BLOCK_M, BLOCK_D]: loads of q and its row transforms
                  (l2norm, rmsnorm, rotary, xpos need the whole feature dim: D is padded to a
                  power of two and masked unless EVEN_D; rotary's rotate_half is the same chain
                  evaluated at the permuted feature offsets (d + D/2) mod D, so no register shuffles)
    key loop      over the key blocks the interval analysis allows (graph.key_bounds): causal
                  tiles stop at the diagonal, windows visit only their blocks. Blocks in which
                  the bounded predicates keep every (i, j) are swept first without masks; the
                  edge blocks (diagonal, window ends, the end of J) after, with every mask
      k_prologue  per key tile [BLOCK_N, BLOCK_D]; a computed dot operand (l2norm(k), rotary(k),
                  a transformed v) is written once by a prepass kernel instead (schedule
                  decision: one extra read and write of [B, H, J, D] against I / BLOCK_M
                  recomputations next to the tensor cores)
      score/keep  elementwise on [BLOCK_M, BLOCK_N]; bias tables gathered with computed offsets;
                  keep-predicates -> tl.where(keep, s, -inf)
      softmax     online, fp32, base-2; rows with nothing kept give 0 (like the reference)
      post        post-softmax ops, then acc += dot(p, v) (fp32 accumulation)
    epilogue      o = acc / l, epilogue ops, masked store

Grouped KV heads (k, v and other per-key inputs with H_kv heads, G = H / H_kv query heads each):
G is a runtime argument (one compiled kernel serves every group size; Triton's JIT specialises
G = 1 as it does any int argument equal to 1). Per-KV-head tensors are addressed with
off_hkv = off_h // G. Where the plan packs the group (plan.pack_kv_group), a forward program is
(block of packed rows, batch * KV head): row r is query r // G of the group's head r % G
(FlashAttention-3's PackGQA), so every K/V tile a program loads serves the G heads of its group
at once - rather than a loop over the group's heads inside the program, which would reload each
tile G times or keep G accumulators; packing keeps the one-accumulator template and fills small-I
(decoding) tiles. off_h is then a per-row value, and so is every per-query-head value without i.

Two kernel shapes, chosen from the schedule:

    per-head      one_pass: a program is (query tile, batch * head); values are 2-D tiles.
    heads-in-tile heads_in_tile / two_pass: a program is (query tile, sample) and holds every
                  (stream, head) channel of the sample: values that vary with b or h get a
                  leading channel axis [CP, ...] (CP = next power of two of streams * heads),
                  dots are batched over it, and mix_heads is a [CP, CP] x [CP, rows] product in
                  registers (tl.dot when CP >= 16, else a loop over output channels).

and two softmax strategies:

    online        one sweep, rescaling the accumulator (post-softmax ops must be linear in p)
    exact         two sweeps: row max and sum first, then p normalised exactly before the
                  post-softmax ops (two_pass: heads mixed after softmax; or any non-linear
                  post-softmax op)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import normalisers, ops
from ..ir import Graph
from ..inputs import per_key_head
from ..layout import raw_inputs
from ..passes.plan import query_head_nodes
from ..passes.bounds import conjuncts, render_bound
from . import names

from ..backends.knobs import TRITON_FWD_DEFAULTS as DEFAULT_CONFIG  # noqa: E402  (the knobs are declared there)
from ..backends.knobs import TRITON_FWD_DEFAULTS_HEADS_IN_TILE as DEFAULT_CONFIG_HEADS_IN_TILE  # noqa: E402
from ..backends.knobs import TRITON_FWD_KNOBS as CONFIG_KEYS  # noqa: E402
INDEX_DIMS = ("b", "h", "i", "j")
MIN_DOT_BLOCK = 16   # tl.dot needs every dim >= 16 on a GPU
PREPASS_BLOCK_N = 64

TRITON_BOUND_CALLS = {"min": "tl.minimum", "max": "tl.maximum", "//": "_floordiv"}   # how a bound is spelled here

# the block mask's lists (runtime/block_masks.BlockMask): per query block the key blocks kept partly / whole
# (forward, dq), per key block the query blocks (dk/dv); [b?, h?, blocks, 1 + count and indices] int32
KEY_BLOCK_LISTS = ("kv_blocks", "full_kv_blocks")
QUERY_BLOCK_LISTS = ("q_blocks", "full_q_blocks")

class CodegenError(NotImplementedError):
    """The graph needs something this code generator does not do (names the schedule or op)."""


@dataclass(frozen=True)
class TensorArg:
    name: str                  # the spec's input name (or the node a scratch tensor holds)
    ptr: str                   # pointer argument of the kernel
    dims: tuple                # declared dims (a leading `b?` may be missing in the call: stride 0)
    dtype: str                 # float | bool | int
    raw: bool                  # a gather table or a mixing weight (indexed, not a value)
    strides: tuple             # stride argument names, one per declared dim
    var: str = ""              # the launcher's variable holding the tensor
    kv_heads: bool | None = None   # indexed by KV head (None: when its dims say so, inputs.per_key_head)

    @property
    def per_kv_head(self) -> bool:
        return per_key_head(self.dims) if self.kv_heads is None else self.kv_heads


def tensor_arg(var: str, name: str, dims, dtype: str = "float", raw: bool = False, kv_heads=None) -> TensorArg:
    """A tensor argument whose launcher variable is `var` (a namespaced name, codegen/names.py):
    pointer `ptr_<var>`, strides `stride_<var>_<axis>` (by position: dims may be spec names)."""
    return TensorArg(name, names.derived("ptr", var), tuple(dims), dtype, raw,
                     tuple(names.derived("stride", f"{var}_{axis}") for axis in range(len(dims))), var, kv_heads)


def block_list_args(lists) -> list:
    """The block mask's lists as kernel tensors (the launcher's variables of the same names)."""
    return [tensor_arg(name, name, ("b", "h", "blocks", "listed"), "int32") for name in lists]


@dataclass(frozen=True)
class ArgGroup:
    """Kernel parameters and the launcher's arguments that fill them: one line of the kernel's
    signature and one line of its launch, rendered from the same object (so they cannot drift)."""
    params: tuple              # the kernel's parameter names
    launch: tuple              # the launcher's expressions (`*_strides(in_q, 4)` fills four params)
    constexpr: bool = False    # tl.constexpr parameters, passed by keyword


def _tensor_groups(tensors) -> list:
    """A group of pointers (one per tensor), then each tensor's strides."""
    groups = [ArgGroup(tuple(t.ptr for t in tensors), tuple(t.var for t in tensors))]
    return groups + [ArgGroup(t.strides, (f"*_strides({t.var}, {len(t.dims)})",)) for t in tensors]


def _scalar_groups(p) -> list:
    groups = [ArgGroup(tuple(a for a, _ in p.sizes), tuple(a for a, _ in p.sizes))]
    groups.append(ArgGroup(("G",), ("G",)))    # query heads per KV head: a runtime int (see the module doc)
    if p.host:
        groups.append(ArgGroup(tuple(a for a, _, _, _ in p.host), tuple(a for a, _, _, _ in p.host)))
    return groups


def _feature_constexprs(p) -> list:
    """The feature dims' constexprs: padded block, and whether it is exact."""
    groups = []
    for feature, block in p.features:
        size = names.size(feature)
        padded = f"max({MIN_DOT_BLOCK}, triton.next_power_of_2({size}))"
        groups.append(ArgGroup((block, names.axis_name("EVEN", feature)), (padded, f"{size} == {padded}"), True))
    return groups


def signature_lines(name: str, groups: list) -> list:
    """`@triton.jit def name(...)`: one line per group, constexprs last."""
    lines = ["@triton.jit", f"def {name}("]
    lines += [f"    {', '.join(g.params)}," for g in groups if not g.constexpr and g.params]
    constexprs = [n for g in groups if g.constexpr for n in g.params]
    lines.append(f"    {', '.join(f'{c}: tl.constexpr' for c in constexprs)},")
    return lines + ["):"]


def launch_lines(groups: list, indent: str = "        ") -> list:
    """The launch's arguments for a kernel of `signature_lines(name, groups)`: one line per group."""
    lines = [f"{indent}{', '.join(g.launch)}," for g in groups if not g.constexpr and g.params]
    for group in (g for g in groups if g.constexpr):
        lines.append(indent + " ".join(f"{n}={e}," for n, e in zip(group.params, group.launch)))
    return lines


def flat_params(groups: list, constexpr: bool = False) -> list:
    return [n for g in groups if g.constexpr == constexpr for n in g.params]


@dataclass
class KernelPlan:
    """What the kernel takes and how it is launched; shared by codegen, launcher and AOT check."""
    kernel: str
    schedule: str
    channels: bool             # heads-in-tile kernel shape (a program holds a sample's channels)
    exact: bool                # two sweeps over the keys
    streams: int | None
    tensors: list              # [TensorArg] in call order (q, k, v, then present inputs)
    out_dims: tuple
    out_strides: tuple
    sizes: list                # [(arg, dim)] runtime ints
    size_sources: dict         # dim -> (input name, axis from the end)
    features: list             # [(dim, BLOCK_<F> constexpr)]
    host: list                 # [(arg, node_id, dtype, python expression)]
    out_feature: str
    materialized: list = field(default_factory=list)   # [TensorArg]: k-prologue values the prepass writes
    prepass_kernel: str = ""
    notes: list = field(default_factory=list)
    lead: str = "q"            # the query-side input whose dtype and device the kernels follow
    packed: bool = False       # the forward's rows are (query, head of the KV group) pairs (plan.pack_kv_group)
    kv_source: str = "k"       # the per-KV-head input the launcher reads H_kv from
    prepass_kv: bool = True    # the prepass runs per KV head (every value it writes is per KV head)
    block_lists: list = field(default_factory=list)   # [TensorArg]: the block mask's key-block lists (forward, dq)

    @property
    def lse_axes(self) -> str:
        return "[b, h, i] float32, contiguous"

    def forward_args(self) -> list:
        """The forward kernel's parameters and launch arguments ([ArgGroup]): the one list its
        signature, its launcher's call and its AOT signature are rendered from."""
        lead = self.tensors_by_name()[self.lead].var
        out = TensorArg("out", "out_ptr", self.out_dims, "float", False, self.out_strides, "out")
        groups = _tensor_groups(self.tensors + self.materialized + self.block_lists)
        groups[0] = ArgGroup(groups[0].params + ("out_ptr", "lse_ptr"),
                             groups[0].launch + ("out", "out if lse is None else lse"))
        groups.append(ArgGroup(out.strides, (f"*_strides(out, {len(out.dims)})",)))
        groups += _scalar_groups(self)
        groups.append(ArgGroup(("BLOCK_M", "BLOCK_N"), ("BLOCK_M", "BLOCK_N"), True))
        groups += _feature_constexprs(self)
        if self.channels:
            groups.append(ArgGroup(("CP",), (f"triton.next_power_of_2({self.streams} * H)",), True))
        groups.append(ArgGroup(("DOT_PRECISION", "STORE_LSE"),
                               (f'"ieee" if {lead}.dtype == torch.float32 else "tf32"', "lse is not None"), True))
        return groups

    def prepass_args(self) -> list:
        """The k-prologue prepass's parameters and launch arguments ([ArgGroup])."""
        groups = _tensor_groups(self.tensors + self.materialized) + _scalar_groups(self)
        return groups + [ArgGroup(("BLOCK_N",), (str(PREPASS_BLOCK_N),), True)] + _feature_constexprs(self)

    def tensors_by_name(self) -> dict:
        return {t.name: t for t in self.tensors}

    def runtime_args(self) -> list[str]:
        return flat_params(self.forward_args())

    def constexpr_args(self) -> list[str]:
        return flat_params(self.forward_args(), constexpr=True)

    def prepass_runtime_args(self) -> list[str]:
        return flat_params(self.prepass_args())

    def prepass_constexpr_args(self) -> list[str]:
        return flat_params(self.prepass_args(), constexpr=True)


# --------------------------------------------------------------------------------------------- plan

def plan(graph: Graph) -> KernelPlan:
    """What the kernels take, from the graph and its plan (passes/plan.py: every schedule decision)."""
    spec, schedule = graph.spec, graph.plan
    channels = schedule.heads_in_tile
    exact = schedule.sweeps == 2
    if not schedule.accumulators:
        raise CodegenError(f"triton codegen ({graph.schedule}): no dot(p, v) reduces the probabilities over j")
    streams = schedule.head_groups if channels else None
    if channels and not streams:
        raise CodegenError(f"triton codegen ({graph.schedule}): the heads are mixed with different "
                           "stream groupings; one grouping per kernel is supported")

    raw = raw_inputs(graph)
    tensors = []
    for name, decl in spec.inputs.items():
        if name not in graph or graph.node(name).op != "input":
            continue
        tensors.append(tensor_arg(names.argument(name), name, decl.shape, decl.dtype, name in raw))
    order = {n: k for k, n in enumerate(spec.inputs)}
    tensors.sort(key=lambda t: order[t.name])
    out_node = graph.node(graph.output)
    out_dims = out_node.dims
    if tuple(d for d in out_dims if d in INDEX_DIMS) != ("b", "h", "i") or len(out_dims) != 4:
        raise CodegenError(f"triton codegen: the output must have dims [b, h, i, <feature>], got {list(out_dims)}")
    out_feature = out_dims[-1]
    out_strides = tuple(f"stride_out_{axis}" for axis in range(len(out_dims)))

    # dims and where their sizes come from (q, k, v first, then other inputs); axis counted from the end
    size_sources: dict = {}
    ranked = sorted(tensors, key=lambda t: (t.name not in ("q", "k", "v"), order[t.name]))
    for t in ranked:
        decl = spec.inputs[t.name]
        for k, dim in enumerate(decl.shape):
            if dim in decl.optional_dims or dim == "h" and t.per_kv_head:   # H: the query heads
                continue
            size_sources.setdefault(dim, (t.name, k - len(decl.shape)))
    used_dims = set(size_sources)
    for node_id, node in graph.nodes():
        if node.op == "size" and node.attrs["dim"] not in size_sources:
            raise CodegenError(f"triton codegen: size '{node.attrs['dim'].upper()}' has no input to read it from")
    sizes = [(names.size(d), d) for d in graph.dim_order if d in used_dims] + \
        [(names.size(d), d) for d in sorted(used_dims - set(graph.dim_order))]
    features = []
    for node_id, node in graph.nodes():
        if node_id in raw:
            continue
        extra = [d for d in node.dims if d not in INDEX_DIMS]
        if len(extra) > 1:
            raise CodegenError(f"triton codegen: value '{node_id}' has two feature dims {extra}; "
                               "one feature dim per value is supported")
        if extra and extra[0] not in [f for f, _ in features]:
            features.append((extra[0], names.axis_name("BLOCK", extra[0])))
        if "i" in node.dims and "j" in node.dims and extra:
            raise CodegenError(f"triton codegen: value '{node_id}' varies along i, j and {extra[0]} at once "
                               "(a [BLOCK_M, BLOCK_N, BLOCK_D] tile); this code generator keeps tiles 2-D")
    features.sort(key=lambda f: graph.dim_order.index(f[0]) if f[0] in graph.dim_order else 99)

    value_names = _Names(graph)
    host = [(value_names.of(node_id), node_id, graph.node(node_id).dtype, _python_expression(graph, node_id, value_names))
            for node_id in schedule.host]
    kernel = f"_fwd_{spec.name}"
    lead = next(t.name for t in tensors if t.dtype == "float" and not t.raw and "i" in t.dims)
    materialized = []
    query_heads = query_head_nodes(graph)
    for node_id in schedule.prepass:
        dims = graph.node(node_id).dims
        materialized.append(tensor_arg(names.derived("pre", value_names.of(node_id)), node_id, dims,
                                       kv_heads="h" in dims and node_id not in query_heads))
    kv_source = sorted((t for t in tensors if t.per_kv_head and not t.raw and t.dtype == "float"),
                       key=lambda t: t.name not in ("k", "v"))[0].name
    return KernelPlan(kernel, graph.schedule, channels, exact, streams, tensors, out_dims, out_strides,
                      sizes, size_sources, features, host, out_feature, materialized,
                      f"_kprologue_{spec.name}" if materialized else "", lead=lead,
                      packed=schedule.pack_kv_group, kv_source=kv_source,
                      prepass_kv=all(t.per_kv_head or "h" not in t.dims for t in materialized),
                      block_lists=block_list_args(KEY_BLOCK_LISTS) if schedule.block_mask is not None else [])


def triton_function_name(graph: Graph) -> str:
    """The launcher's name (one specialisation per generated file: codegen/files.py)."""
    return "triton_forward"


class _Names:
    """The variables of graph values in the kernels: codegen/names.py's namespaces, so no spec name
    can meet the kernel's own locals."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.names: dict = {}

    def of(self, node_id: str) -> str:
        if node_id not in self.names:
            node = self.graph.node(node_id)
            self.names[node_id] = names.size(node.attrs["dim"]) if node.op == "size" else names.value(node_id)
        return self.names[node_id]


def _python_expression(graph: Graph, node_id: str, value_names: _Names) -> str:
    """A host-side Python expression for a constant scalar node (over sizes and other constants)."""
    node = graph.node(node_id)

    def arg(a):
        n = graph.node(a)
        if n.op == "const":
            return repr(n.attrs["value"])
        return value_names.of(a)
    args = [arg(a) for a in node.args]
    if not ops.is_elementwise(node.op):
        raise CodegenError(f"triton codegen: cannot evaluate constant node '{node_id}' ({node.op}) on the host")
    return ops.render(node.op, "python", args, node.dtype)


# ---------------------------------------------------------------------------------------- kernel

@dataclass
class _Value:
    expr: str
    axes: tuple
    kind: str          # native (a load, the input's dtype) | f32 | int | bool


class _KernelWriter:
    def __init__(self, graph: Graph, p: KernelPlan):
        self.g = graph
        self.p = p
        self.names = _Names(graph)
        for arg, node_id, _, _ in p.host:
            self.names.names[node_id] = arg
        self.raw = {t.name for t in p.tensors if t.raw}
        self.tensor = {t.name: t for t in p.tensors}
        self.host = {node_id for _, node_id, _, _ in p.host}
        self.features = dict(p.features)
        self.norms = graph.plan.normalisers       # the row normalisers (kernelsearch/normalisers.py)
        self.suffix = {n.node: "" if k == 0 else f"_{k}" for k, n in enumerate(self.norms)}   # of their tile names
        self.accs = list(graph.plan.accumulators)
        self.lines: list[str] = []
        self.indent = 1
        self.memo: dict = {}
        self.acc_names = {a: f"acc_{k}" for k, a in enumerate(self.accs)}
        self.channels = p.channels
        self.materialized = {t.name: t for t in p.materialized}
        self.in_prepass = False
        self.packed = p.packed                        # rows are (query, head of the KV group)
        self.query_heads = query_head_nodes(graph)    # values that vary with the query head
        self.scope_lines = None       # set while a template's sweeps are rendered apart from the kernel's lines
        self.block_list = {t.name: t for t in block_list_args(KEY_BLOCK_LISTS + QUERY_BLOCK_LISTS)}
        self.used_conjuncts: set = set()

    # -- shapes
    def axes(self, node_id: str) -> tuple:
        dims = self.g.node(node_id).dims
        axes = []
        if self.channels and ("b" in dims or "h" in dims):
            axes.append("c")
        if self.packed and "i" not in dims and node_id in self.query_heads:
            axes.append("i")       # packed rows: the query head varies along the rows
        for d in ("i", "j"):
            if d in dims:
                axes.append(d)
        axes += [d for d in dims if d not in INDEX_DIMS]
        return tuple(axes)

    def block(self, axis: str) -> str:
        return {"c": "CP", "i": "BLOCK_M", "j": "BLOCK_N"}.get(axis) or self.features[axis]

    @staticmethod
    def view(value: _Value, to_axes: tuple) -> str:
        if not value.axes or value.axes == tuple(to_axes):
            return value.expr
        assert set(value.axes) <= set(to_axes), (value.axes, to_axes)
        index = ", ".join(":" if a in value.axes else "None" for a in to_axes)
        return f"{value.expr}[{index}]"

    def variant_name(self, node_id: str, variant: int) -> str:
        """A value's variable, or (variant 1) its variable at the rotated feature offsets."""
        name = self.names.of(node_id)
        return names.derived("rot", name) if variant else name

    def offsets(self, axis: str, variant: int) -> _Value:
        if axis == "i":
            return _Value("offs_i", ("i",), "int")
        if axis == "j":
            return _Value("offs_j", ("j",), "int")
        if axis == "c":
            return _Value("offs_c", ("c",), "int")
        offsets = names.axis_name("offs", axis)
        return _Value(names.derived("rot", offsets) if variant else offsets, (axis,), "int")

    def axis_mask(self, axis: str) -> _Value:
        name = {"c": "c_ok", "i": "row_ok", "j": "col_ok"}.get(axis) or names.axis_name("ok", axis)
        return _Value(name, (axis,), "bool")

    # -- emission
    def line(self, text: str = "") -> None:
        self.lines.append(("    " * self.indent + text) if text else "")

    def assign(self, name: str, expr: str, comment: str = "") -> None:
        self.line(f"{name} = {expr}" + (f"  # {comment}" if comment else ""))

    def f32(self, v: _Value) -> str:
        if v.kind == "native":
            return f"{v.expr}.to(tl.float32)"
        return v.expr

    def f32v(self, v: _Value, to_axes) -> str:
        e = self.view(v, to_axes)
        return f"{e}.to(tl.float32)" if v.kind == "native" else e

    def value(self, node_id: str, variant: int = 0) -> _Value:
        node = self.g.node(node_id)
        axes = self.axes(node_id)
        feature = axes[-1] if axes and axes[-1] not in ("c", "i", "j") else None
        if not feature:
            variant = 0
        key = (node_id, variant)
        if key in self.memo:
            return self.memo[key]
        op = node.op
        if op == "const":
            v = node.attrs["value"]
            text = repr(v) if not isinstance(v, float) or v == v and abs(v) != float("inf") else f'float("{v}")'
            result = _Value(text, (), {"bool": "bool", "int": "int"}.get(node.dtype, "f32"))
        elif op == "size":
            result = _Value(names.size(node.attrs["dim"]), (), "int")
        elif node_id in self.host:
            result = _Value(self.names.of(node_id), (), {"int": "int", "bool": "bool"}.get(node.dtype, "f32"))
        elif op == "index":
            dim = node.attrs["dim"]
            if dim in ("i", "j"):
                result = self.offsets(dim, 0)
            elif dim == "h":
                result = self.head(kv=False)
            elif self.channels:
                result = _Value(f"off_{dim}", ("c",), "int")
            else:
                result = _Value(f"off_{dim}", (), "int")
        elif normalisers.is_normaliser(op):
            result = self.memo[(node_id, 0)]   # set by the normaliser section of the key loop
        elif node_id in self.acc_names:
            result = self.memo[(node_id, 0)]   # set after the key loop
        elif node_id in self.materialized and not self.in_prepass:
            t = self.materialized[node_id]
            name = self.variant_name(node_id, variant)
            terms, masks = self.index_terms(t, axes, variant)
            self.assign(name, self.load_expr(t, terms, masks), f"[{', '.join(node.dims)}] written by the prepass")
            result = _Value(name, axes, "native")
        else:
            name = self.variant_name(node_id, variant)
            expr, kind = self.compute(node_id, axes, variant, name)
            if expr is not None:
                self.assign(name, expr, f"[{', '.join(node.dims)}]" + (" at (d + D/2) mod D" if variant else ""))
            result = _Value(name, axes, kind)
        self.memo[key] = result
        return result

    def compute(self, node_id, axes, variant, name):
        """(expression, kind) of a node; multi-line ops emit their own lines and return (None, kind)."""
        g, node = self.g, self.g.node(node_id)
        op = node.op
        if op == "input":
            return self.load(node_id, axes, variant)
        if op == "gather":
            return self.gather(node_id, axes, variant)
        if op == "dot":
            return self.dot(node_id, axes, variant)
        if op in ("l2norm", "rmsnorm", "rotary", "xpos"):
            return self.row_transform(node_id, axes, variant, name)
        if op == "mix_heads":
            return self.mix_heads(node_id, axes, variant)
        if not ops.is_elementwise(op):
            raise CodegenError(f"triton codegen ({self.g.schedule}): no rule for op '{op}' (node '{node_id}')")
        return self.elementwise(node, axes, variant)

    def elementwise(self, node, axes, variant):
        """(expression, kind) of an elementwise op: its Triton rendering in the op registry (ops.py),
        each argument cast to fp32 or left as it is, as the op asks."""
        is_float = node.dtype == "float"

        def operand(position: int, arg: str) -> str:
            value = self.value(arg, variant)
            mode = ops.triton_operand_mode(node.op, position)
            if mode == "float" or (mode == "auto" and is_float):
                if is_float and value.kind in ("int", "bool"):   # `2 ** (h + 1)`: an integer operand of a float op
                    constant = self.g.node(arg)
                    if constant.op == "const":
                        return repr(float(constant.attrs["value"]))
                    return f"{self.view(value, axes)}.to(tl.float32)"
                return self.f32v(value, axes)
            return self.view(value, axes)
        args = [operand(position, arg) for position, arg in enumerate(node.args)]
        constants = [self.g.node(a).attrs["value"] if self.g.node(a).op == "const" else None for a in node.args]
        text = ops.render(node.op, "triton", args, node.dtype, constants, self.shape(axes) if axes else None)
        return text, {"float": "f32", "int": "int", "bool": "bool"}[node.dtype]

    def shape(self, axes) -> str:
        return "[" + ", ".join(self.block(a) for a in axes) + "]"

    def head(self, kv: bool) -> _Value:
        """The query head (off_h) or KV head (off_hkv = off_h // G) of the program, its channels
        (heads in tile), or its rows (packed KV groups: the query head varies along them)."""
        name = "off_hkv" if kv else "off_h"
        if self.channels:
            return _Value(name, ("c",), "int")
        if self.packed and not kv:
            return _Value(name, ("i",), "int")
        return _Value(name, (), "int")

    # -- memory
    def index_terms(self, t: TensorArg, axes, variant, index_of=None):
        """Offset terms and mask terms of input t at the program's tile, broadcast to `axes`."""
        terms, masks = [], []
        for dim, stride in zip(t.dims, t.strides):
            if index_of is not None and dim in index_of:
                continue
            if dim == "h":
                terms.append(f"{self.view(self.head(kv=t.per_kv_head), axes)} * {stride}")
                if self.channels and "c" in axes and self.axis_mask("c").expr not in masks:
                    masks.append(self.view(self.axis_mask("c"), axes))
                continue
            if dim in ("b", "h"):
                if self.channels:
                    terms.append(f"{self.view(_Value(f'off_{dim}', ('c',), 'int'), axes)} * {stride}")
                    if "c" in axes and self.axis_mask("c").expr not in masks:
                        masks.append(self.view(self.axis_mask("c"), axes))
                else:
                    terms.append(f"off_{dim} * {stride}")
                continue
            axis = dim
            terms.append(f"{self.view(self.offsets(axis, variant), axes)} * {stride}")
            masks.append(self.view(self.axis_mask(axis), axes))
        return terms, masks

    def load(self, node_id, axes, variant):
        t = self.tensor[node_id]
        terms, masks = self.index_terms(t, axes, variant)
        return self.load_expr(t, terms, masks), self.load_kind(t)

    @staticmethod
    def load_kind(t: TensorArg) -> str:
        return {"bool": "bool", "int": "int"}.get(t.dtype, "native")

    def load_expr(self, t: TensorArg, terms, masks) -> str:
        pointer = " + ".join([t.ptr] + terms)
        other = {"bool": "0", "int": "0"}.get(t.dtype, "0.0")
        mask = " & ".join(dict.fromkeys(masks))
        text = f"tl.load({pointer}, mask={mask}, other={other})" if mask else f"tl.load({pointer})"
        if t.dtype == "bool":
            text += " != 0"
        return text

    def gather_offsets(self, node_id, axes, strides=None) -> tuple[list, list]:
        """Offset terms and bounds masks of a gather's table entries at the tile (`strides`: of
        another tensor of the table's shape, e.g. its gradient)."""
        node = self.g.node(node_id)
        table = self.tensor[node.args[0]]
        indices = [self.value(a) for a in node.args[1:]]
        terms, masks = [], []
        for dim, stride, index in zip(table.dims, strides or table.strides, indices):
            idx = self.view(index, axes)
            terms.append(f"({idx}) * {stride}")
            if axes and not index.axes:   # a bounds test of a scalar index joins the tile's: make it a tile
                idx = f"({idx} + tl.zeros({self.shape(axes)}, tl.int32))"   # (masks of mixed rank fail in triton 3.9's interpreter)
            masks.append(f"({idx} >= 0) & ({idx} < {names.size(dim)})")
        return terms, masks

    def gather(self, node_id, axes, variant):
        table = self.tensor[self.g.node(node_id).args[0]]
        terms, masks = self.gather_offsets(node_id, axes)
        pointer = " + ".join([table.ptr] + terms)
        mask = " & ".join(masks)
        other = "0" if table.dtype in ("int", "bool") else "0.0"
        text = f"tl.load({pointer}, mask={mask}, other={other})"
        if table.dtype == "bool":
            text += " != 0"
        return text, self.load_kind(table)

    # -- contractions
    def mma_operand(self, node_id, variant=0) -> str:
        """The value as a tl.dot operand (the input dtype); casts of loop-invariant values are hoisted."""
        key = (node_id, variant, "mma")
        if key in self.memo:
            return self.memo[key].expr
        v = self.value(node_id, variant)
        if v.kind == "native" and (node_id in self.materialized or
                                   self.g.node(node_id).op == "input" and node_id in ("q", "k", "v")):
            result = v
        else:
            name = names.derived("mma", v.expr)
            self.assign(name, f"{v.expr}.to(DOT_DTYPE)")
            result = _Value(name, v.axes, "native")
        self.memo[key] = result
        return result.expr

    def dot(self, node_id, axes, variant):
        node = self.g.node(node_id)
        a_id, b_id = node.args
        a, b = self.value(a_id, variant), self.value(b_id, variant)
        contracted = self.g.node(a_id).dims[-1]
        if contracted == "j":
            raise CodegenError(f"triton codegen ({self.g.schedule}): dot '{node_id}' contracts j but is not "
                               "the dot(p, v) of the softmax probabilities")
        if contracted in ("i", "b", "h"):
            raise CodegenError(f"triton codegen: dot '{node_id}' contracts '{contracted}'")
        if "i" in a.axes and "j" in b.axes and a.axes[-1] == contracted and b.axes[-1] == contracted \
                and "j" not in a.axes and "i" not in b.axes:
            # the scores: [.., BLOCK_M, D] x [.., BLOCK_N, D]^T on the tensor cores, fp32 accumulation
            qa, kb = self.mma_operand(a_id, variant), self.mma_operand(b_id, variant)
            if "c" in axes:
                if "c" not in a.axes:
                    qa = f"tl.broadcast_to({qa}[None, :, :], {self.shape(('c',) + a.axes)})"
                if "c" not in b.axes:
                    kb = f"tl.broadcast_to({kb}[None, :, :], {self.shape(('c',) + b.axes)})"
                kt = f"tl.permute({kb}, (0, 2, 1))"
            else:
                kt = f"tl.trans({kb})"
            return f"tl.dot({qa}, {kt}, input_precision=DOT_PRECISION)", "f32"
        union = tuple(x for x in ("c", "i", "j", *self.features) if x in a.axes or x in b.axes)
        product = f"{self.f32v(a, union)} * {self.f32v(b, union)}"
        return f"tl.sum({product}, axis={union.index(contracted)})", "f32"

    def row_transform(self, node_id, axes, variant, name):
        node = self.g.node(node_id)
        op = node.op
        feature = axes[-1]
        size = names.size(feature)
        x = self.value(node.args[0], variant)
        xf = self.f32v(x, axes)
        last = len(axes) - 1
        keep_dims = lambda e: f"tl.expand_dims({e}, {last})"
        offs = self.offsets(feature, variant)
        offs_view = self.view(offs, axes)
        if op == "l2norm":
            groups, eps = node.attrs.get("groups", 1), node.attrs.get("eps", 1e-12)
            if groups == 1:
                norm = f"tl.sqrt(tl.sum({xf} * {xf}, axis={last}))"
                return f"{xf} / {keep_dims(f'tl.maximum({norm}, {eps!r})')}", "f32"
            self.line(f"# l2norm in {groups} groups of {size} // {groups} features")
            x_f32, group_id = names.derived("x", name), names.derived("gid", name)
            selected, square_sum = names.derived("sel", name), names.derived("ss", name)
            self.assign(x_f32, xf)
            self.assign(group_id, f"{offs_view} // ({size} // {groups})")
            self.assign(name, f"tl.zeros({self.shape(axes)}, tl.float32)")
            self.line(f"for g in tl.static_range({groups}):")
            self.indent += 1
            self.assign(selected, f"{group_id} == g")
            self.assign(square_sum, f"tl.sum(tl.where({selected}, {x_f32} * {x_f32}, 0.0), axis={last})")
            norm = keep_dims(f"tl.maximum(tl.sqrt({square_sum}), {eps!r})")
            self.assign(name, f"tl.where({selected}, {x_f32} / {norm}, {name})")
            self.indent -= 1
            return None, "f32"
        if op == "rmsnorm":
            eps = node.attrs.get("eps", 1e-6)
            mean = f"tl.sum({xf} * {xf}, axis={last}) / {size}"
            return f"{xf} * {keep_dims(f'tl.rsqrt({mean} + {eps!r})')}", "f32"
        pos = self.value(node.args[1], variant)
        pos_f = f"{pos.expr}.to(tl.float32)" if pos.axes else f"({pos.expr} * 1.0)"
        pos_view = self.view(_Value(pos_f, pos.axes, "f32"), axes)
        pair = f"({offs.expr} % ({size} // 2)).to(tl.float32)"       # m: the feature's pair index
        if op == "rotary":
            theta = float(node.attrs.get("theta", 10000.0))
            import math
            freq, angle, sign = (names.derived(role, name) for role in ("freq", "angle", "sign"))
            self.assign(freq, f"tl.exp2({pair} * {-2.0 * math.log2(theta)!r} / {size})", "theta ** (-2m / D)")
            self.assign(angle, f"{pos_view} * {self.view(_Value(freq, (feature,), 'f32'), axes)}")
            self.assign(sign, f"tl.where({offs.expr} < {size} // 2, -1.0, 1.0)", "rotate_half: [-x2, x1]")
            partner = self.value(node.args[0], 1 - variant)
            sign_view = self.view(_Value(sign, (feature,), "f32"), axes)
            return f"{xf} * tl.cos({angle}) + {sign_view} * {self.f32v(partner, axes)} * tl.sin({angle})", "f32"
        # xpos: x * sv ** (pos / scale_base), sv = (2m + 0.4 D) / (1.4 D)
        scale_base = float(node.attrs.get("scale_base", 512.0))
        inverse = bool(node.attrs.get("inverse", False))
        log2sv = names.derived("log2sv", name)
        self.assign(log2sv, f"tl.log2((2.0 * {pair} + 0.4 * {size}) / (1.4 * {size}))")
        exponent = f"{self.view(_Value(log2sv, (feature,), 'f32'), axes)} * {pos_view} / {scale_base!r}"
        return f"{xf} * tl.exp2({'-' if inverse else ''}({exponent}))", "f32"

    def mix_heads(self, node_id, axes, variant):
        node = self.g.node(node_id)
        if not self.channels:
            raise CodegenError(f"triton codegen ({self.g.schedule}): mix_heads needs the heads-in-tile kernel")
        x = self.value(node.args[0], variant)
        if not axes or axes[0] != "c":
            raise CodegenError(f"triton codegen: mix_heads '{node_id}' of a value that does not vary by head")
        weight = self.weight_tile(node.args[1])
        rest = axes[1:]
        rows = " * ".join(self.block(a) for a in rest) or "1"
        flat = f"tl.reshape({self.f32v(x, axes)}, [CP, {rows}])"
        return f"tl.reshape(_mix_heads({flat}, {weight}, CP, DOT_PRECISION), {self.shape(axes)})", "f32"

    def weight_tile(self, weight_id, transposed: bool = False) -> str:
        key = (weight_id, "tile_t" if transposed else "tile")
        if key not in self.memo:
            t = self.tensor[weight_id]
            name = names.derived("tilet" if transposed else "tile", self.names.of(weight_id))
            out_stride, in_stride = t.strides[::-1] if transposed else t.strides
            self.assign(name, f"tl.load({t.ptr} + offs_c[:, None] * {out_stride} + offs_c[None, :] * {in_stride}, "
                              f"mask=c_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)",
                        "[(s h) in, (s h) out]: transposed" if transposed else "[(s h) out, (s h) in]")
            self.memo[key] = _Value(name, ("c", "c"), "f32")
        return self.memo[key].expr

    # -- bounds
    def inline_int(self, node_id: str, i_name: str) -> str:
        node = self.g.node(node_id)
        op = node.op
        if op == "const":
            return repr(node.attrs["value"])
        if op == "size":
            return names.size(node.attrs["dim"])
        if node_id in self.host:
            return self.names.of(node_id)
        if op == "index":
            if node.attrs["dim"] != "i":
                raise CodegenError("bound depends on an index other than i")
            return i_name
        if not ops.is_elementwise(op):
            raise CodegenError(f"bound uses op {op}")
        args = [self.inline_int(a, i_name) for a in node.args]
        return ops.render(op, "triton", args, node.dtype, nested=True)

    def render_key_bound(self, bound, i_name: str) -> str:
        """A key-block bound at row `i_name`, in Triton (exact floor division: passes/bounds.py)."""
        return render_bound(bound, lambda n: self.inline_int(n, i_name), TRITON_BOUND_CALLS)

    # -- the kernel
    def kernel(self) -> str:
        """The forward kernel: FORWARD_HEAD, the sweeps (ONLINE_SWEEP or EXACT_SWEEPS, each key block
        an inner function: KEY_BLOCK_*), FORWARD_TAIL; the slots hold layout and the spec's code."""
        p, g = self.p, self.g
        self.lines, self.memo, self.indent = [], {}, 1
        header = signature_lines(p.kernel, p.forward_args())
        args = p.runtime_args() + p.constexpr_args()
        assert len(args) == len(set(args)), args
        self.kernel_header, self.inner_functions = header, []
        stages = {n: g.node(n).stage for n in g.ids()}

        def values_of(stage):
            for node_id in g.ids():
                if stages[node_id] == stage and self._in_kernel(node_id):
                    self.value(node_id)

        def q_prologue():
            values_of("q_prologue")
            for node_id in g.ids():   # hoist the casts of q-side dot operands out of the key loop
                node = g.node(node_id)
                if node.op == "dot" and stages[node.args[0]] == "q_prologue" and node_id not in self.accs:
                    if "j" in self.axes(node.args[1]):
                        self.mma_operand(node.args[0])

        def per_program():
            values_of("constant")
            for mix in g.find("mix_heads"):
                self.weight_tile(g.node(mix).args[1])

        score_axes = tuple(a for a in ("c", "i", "j") if a == "c" and p.channels or a in ("i", "j"))
        stat_axes = score_axes[:-1]
        flags = dict(last=len(score_axes) - 1, expand=f"[{', '.join([':'] * len(stat_axes) + ['None'])}]",
                     stat_shape=self.shape(stat_axes))
        statistics = [n for n in self.norms if n.statistics]

        def per_softmax(template, **more):
            """`template` once per softmax normaliser, with its suffix."""
            return [line for n in statistics for line in fill(template, x=self.suffix[n.node], **flags, **more)]

        def statistics_init():
            for n in statistics:
                if n.sink is None:
                    self.emit(fill(STATISTICS_INIT, x=self.suffix[n.node], **flags))
                else:
                    sink = self.f32v(self.value(n.sink), stat_axes)
                    self.emit(fill(SINK_STATISTICS_INIT, x=self.suffix[n.node], sink=f"({sink})", **flags))
        kinds = ", ".join(f"{g.node(n.node).op}" for n in self.norms)
        head = fill(FORWARD_HEAD, signature=header, doc=f"{g.spec.name}: schedule {g.schedule}, "
                    f"{'heads-in-tile' if p.channels else 'per-head'} programs, "
                    f"{'two sweeps (exact row statistics)' if p.exact else 'one sweep (online)'}; {kinds}.",
                    program=self.capture(lambda: self.batch_and_heads(per_kv_head=self.packed)),
                    rows=self.capture(self.rows), features=self.capture(self.feature_offsets),
                    lead_ptr=self.tensor[p.lead].ptr, per_program=self.capture(per_program),
                    q_prologue=self.capture(q_prologue), key_range=self.capture(self.key_range),
                    statistics=self.capture(statistics_init))
        self.outer = dict(self.memo)

        def scores(which):
            for n in which:
                self.masked_scores(n.scores, n.keeps, score_axes, None, self.suffix[n.node], n.statistics)

        def updates():
            for n in self.norms:
                self.memo[(n.node, 0)] = _Value(f"p_tile{self.suffix[n.node]}", score_axes, "f32")
            for acc in self.accs:
                self.accumulate(acc, score_axes, flags["expand"])

        def block(template, which, per_normaliser):
            return lambda full: self.emit(fill(template, scores=self.capture(lambda: scores(which)),
                                               statistics=per_softmax(per_normaliser),
                                               updates=self.capture(updates), **flags))
        # the inner functions may read what the kernel has defined before their loops (_kernel_scope)
        self.scope_lines = head[len(header):]
        if p.exact:
            stats = self.capture(lambda: self.sweep(block(STATS_BLOCK, statistics, STATS_STATISTICS),
                                                    f"{p.kernel}_stats_block"))
            sweeps = fill(EXACT_SWEEPS, stats=stats, normalise=per_softmax(EXACT_NORMALISE),
                          accumulators=self.capture(self.init_accumulators), keys=[KEYS])
            template = block(EXACT_KEY_BLOCK, self.norms, EXACT_PROBABILITIES)
        else:
            sweeps = fill(ONLINE_SWEEP, accumulators=self.capture(self.init_accumulators), keys=[KEYS])
            template = block(ONLINE_KEY_BLOCK, self.norms, ONLINE_STATISTICS)
        self.scope_lines += sweeps[:sweeps.index(KEYS)]
        keys = self.capture(lambda: self.sweep(template, f"{p.kernel}_key_block"))
        sweeps[sweeps.index(KEYS):sweeps.index(KEYS) + 1] = keys
        self.scope_lines = None

        def epilogue():
            for acc in self.accs:
                name = self.names.of(acc)
                normaliser = self.acc_normaliser(acc)
                value = self.acc_names[acc]
                if normaliser is not None and normaliser.statistics:   # online: divided by its row sum
                    value += f" / l_safe{self.suffix[normaliser.node]}{flags['expand']}"
                self.assign(name, value, f"[{', '.join(g.node(acc).dims)}]")
                self.memo[(acc, 0)] = _Value(name, self.acc_axes(acc), "f32")
            self.value(g.output)
        lines = self.capture(epilogue)
        out, out_axes = self.value(g.output), self.axes(g.output)
        terms, masks = self.index_terms(TensorArg("out", "out_ptr", p.out_dims, "float", False, p.out_strides),
                                        out_axes, 0)
        lse = []
        for plane, n in enumerate(statistics):
            lse_offsets, lse_mask = self.lse_offsets(plane)
            lse += fill(LSE_STORE, x=self.suffix[n.node], lse_offsets=lse_offsets, lse_mask=lse_mask)
        tail = fill(TAIL, normalise=[] if p.exact else per_softmax(ONLINE_NORMALISE), epilogue=lines,
                    out_offsets=" + ".join(terms), out_mask=" & ".join(dict.fromkeys(masks)), out=self.f32(out), lse=lse)
        return "\n".join(head + sweeps + tail) + "\n"

    def acc_normaliser(self, acc: str):
        """With one sweep, the normaliser whose rescaling and final division accumulator `acc` takes
        (the plan's reduced_by); None with two sweeps (p is exact there)."""
        reduced_by = self.g.plan.reduced_by
        return self.norms[reduced_by[self.accs.index(acc)]] if reduced_by else None

    def accumulate(self, acc: str, score_axes: tuple, expand: str) -> None:
        """acc += p @ v for one accumulator (post-softmax ops rendered on the way: p may be mixed)."""
        g, p = self.g, self.p
        node = g.node(acc)
        pv = self.value(node.args[0])
        v_id = node.args[1]
        v = self.value(v_id)
        acc_name = self.acc_names[acc]
        ptile = self.view(pv, score_axes)
        vv = self.mma_operand(v_id)
        if "c" in score_axes and "c" not in v.axes:
            vv = f"tl.broadcast_to({vv}[None, :, :], {self.shape(('c',) + v.axes)})"
        if pv.axes != score_axes:
            ptile = f"tl.broadcast_to({ptile}, {self.shape(score_axes)})"
        update = f"tl.dot({ptile}.to(DOT_DTYPE), {vv}, input_precision=DOT_PRECISION)"
        normaliser = self.acc_normaliser(acc)
        if normaliser is None or not normaliser.statistics:   # exact p, or no row statistics: nothing to rescale
            self.assign(acc_name, f"{acc_name} + {update}")
        else:
            self.assign(acc_name, f"{acc_name} * alpha{self.suffix[normaliser.node]}{expand} + {update}")

    def capture(self, render, indent: int = 1) -> list:
        """The lines `render()` emits (at `indent` levels: the kernel body's by default), instead of
        emitting them."""
        lines, outer_indent = self.lines, self.indent
        self.lines, self.indent = [], indent
        try:
            render()
            return self.lines
        finally:
            self.lines, self.indent = lines, outer_indent

    def emit(self, lines: list) -> None:
        self.lines += lines

    def batch_and_heads(self, per_kv_head: bool = False) -> None:
        """off_b, off_h (query head), off_hkv (KV head) of the program (axis 1): one (batch, head), or
        every channel of a sample; per_kv_head (packed KV groups, the dkdv kernel): one (batch, KV
        head), off_h set per row or per group member later."""
        if self.channels:
            S = self.p.streams
            self.line(f"sample = tl.program_id(1)          # programs hold all {S} * H (stream, head) channels")
            self.assign("C", f"{S} * H")
            self.assign("offs_c", "tl.arange(0, CP)", "channel c = stream * H + head")
            self.assign("c_ok", "offs_c < C")
            self.assign("off_b", f"sample * {S} + offs_c // H", "batch is laid out (b s)")
            self.assign("off_h", "offs_c % H")
            self.assign("off_hkv", "off_h // G", "grouped KV heads: G query heads per KV head")
        elif per_kv_head:
            self.line("off_bh = tl.program_id(1)")
            self.assign("KV_H", "H // G", "KV heads; G query heads share each")
            self.assign("off_b", "(off_bh // KV_H).to(tl.int64)", "64-bit: base offsets of large tensors")
            self.assign("off_hkv", "(off_bh % KV_H).to(tl.int64)")
        else:
            self.line("off_bh = tl.program_id(1)")
            self.assign("off_b", "(off_bh // H).to(tl.int64)", "64-bit: base offsets of large tensors")
            self.assign("off_h", "(off_bh % H).to(tl.int64)")
            self.assign("off_hkv", "off_h // G", "grouped KV heads: G query heads per KV head")

    def rows(self) -> None:
        """offs_i and row_ok of the program's query tile (packed: rows are (query, head of the group))."""
        if self.packed:
            self.assign("offs_m", "start_m * BLOCK_M + tl.arange(0, BLOCK_M)", "packed row = query * G + member")
            self.assign("offs_i", "offs_m // G")
            self.assign("off_h", "off_hkv * G + offs_m % G", "each row's query head")
        else:
            self.assign("offs_i", "start_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        self.assign("row_ok", "offs_i < I")

    def lse_offsets(self, plane: int = 0) -> tuple[str, str]:
        """Offsets and mask of the row statistics ([softmaxes, B, H, I] fp32, contiguous) of the
        program's rows, in the plane of the `plane`-th softmax."""
        first = f"{plane} * B * H * I + " if plane else ""
        if self.channels:
            return f"{first}(off_b * H + off_h)[:, None] * I + offs_i[None, :]", "c_ok[:, None] & row_ok[None, :]"
        return f"{first}(off_b * H + off_h) * I + offs_i", "row_ok"

    def prepass(self) -> str:
        """The k-prologue prepass: one program per (key block, batch * head) writes the materialized values."""
        p, g = self.p, self.g
        self.in_prepass, self.channels, self.packed = True, False, False
        self.lines, self.memo, self.indent = [], {}, 1
        header = signature_lines(p.prepass_kernel, p.prepass_args())
        computed = ", ".join(t.var for t in p.materialized)
        self.line(f'"""{g.spec.name}: per-key values computed once ({computed}), stored in the dot dtype."""')
        self.line("start_n = tl.program_id(0)")
        self.batch_and_heads(per_kv_head=p.prepass_kv)
        self.assign("offs_j", "start_n * BLOCK_N + tl.arange(0, BLOCK_N)")
        self.assign("col_ok", "offs_j < J")
        self.feature_offsets()
        self.assign("DOT_DTYPE", f"{self.tensor[self.p.lead].ptr}.dtype.element_ty")
        for t in p.materialized:
            v = self.value(t.name)
            terms, masks = self.index_terms(t, v.axes, 0)
            self.line(f"tl.store({t.ptr} + {' + '.join(terms)}, {self.f32(v)}.to(DOT_DTYPE), "
                      f"mask={' & '.join(dict.fromkeys(masks))})")
        self.in_prepass, self.channels, self.packed = False, p.channels, p.packed
        return "\n".join(header + self.lines) + "\n"

    def feature_offsets(self) -> None:
        for feature, block in self.p.features:
            size, even = names.size(feature), names.axis_name("EVEN", feature)
            offsets, ok = self.offsets(feature, 0).expr, self.axis_mask(feature).expr
            self.assign(offsets, f"tl.arange(0, {block})")
            self.line(f"if {even}:   # {size} == {block}: no feature mask, so loads stay vectorised")
            self.line(f"    {ok} = tl.full([{block}], 1, tl.int1)")
            self.line("else:")
            self.line(f"    {ok} = {offsets} < {size}")
            if self._uses_rotation(feature):
                self.assign(self.offsets(feature, 1).expr, f"tl.where({ok}, ({offsets} + {size} // 2) % {size}, "
                                                           f"{offsets})", "rotate_half's partner feature")

    def _uses_rotation(self, feature: str) -> bool:
        return any(self.g.node(n).op == "rotary" and self.axes(n)[-1] == feature for n in self.g.ids())

    def _in_kernel(self, node_id: str) -> bool:
        node = self.g.node(node_id)
        if node_id in self.raw or node.op in ("const", "size", "absent") or node_id in self.host:
            return False
        return True

    def acc_axes(self, acc: str) -> tuple:
        return self.axes(acc)

    def init_accumulators(self):
        for acc in self.accs:
            self.assign(self.acc_names[acc], f"tl.zeros({self.shape(self.acc_axes(acc))}, tl.float32)")

    def block_list_rows(self, lists, block: str) -> None:
        """Offsets of this program's rows of the block mask's lists (block: start_m or start_n), and
        their counts; the listed blocks follow each count."""
        for name in lists:
            t = self.block_list[name]
            row = names.derived("row", name)
            program = f"sample * {t.strides[0]}" if self.channels else \
                f"off_b * {t.strides[0]} + off_h * {t.strides[1]}"
            self.assign(row, f"{program} + {block} * {t.strides[2]}")
            self.assign(names.derived("count", name), f"tl.load({t.ptr} + {row})")

    def listed_block(self, name: str, listed: str) -> str:
        """The index of the `listed`-th block of a block list row (after its count)."""
        t = self.block_list[name]
        return f"tl.load({t.ptr} + {names.derived('row', name)} + (1 + {listed}) * {t.strides[3]})"

    def key_range(self):
        mask = self.g.plan.block_mask
        if mask is not None:
            self.line("# -- key blocks: the plan's block mask lists those this query block keeps something in "
                      "(full: every (i, j) kept) --")
            self.block_list_rows(KEY_BLOCK_LISTS, "start_m")
            self.used_conjuncts, self.has_lower = set(mask.conjuncts), False
            return
        bounds = self.g.key_bounds
        self.line("# -- key blocks: the keep-predicates' interval analysis bounds the keys that rows "
                  "i_first..i_last keep --")
        if self.packed:   # rows start_m * BLOCK_M .. + BLOCK_M - 1 are queries (row // G)
            self.assign("i_first", "(start_m * BLOCK_M) // G")
            self.assign("i_last", "tl.minimum((start_m * BLOCK_M + BLOCK_M - 1) // G, I - 1)")
        else:
            self.assign("i_first", "start_m * BLOCK_M")
            self.assign("i_last", "tl.minimum(i_first + BLOCK_M, I) - 1")
        lower = upper = full_lower = full_upper = None
        try:
            if bounds is not None and bounds.lower is not None:
                lower = self.render_key_bound(bounds.lower, "i_first")
                full_lower = self.render_key_bound(bounds.lower, "i_last")
            if bounds is not None and bounds.upper is not None:
                upper = self.render_key_bound(bounds.upper, "i_last")
                full_upper = self.render_key_bound(bounds.upper, "i_first")
        except CodegenError:
            lower = upper = full_lower = full_upper = None
        self.used_conjuncts = set(bounds.conjuncts_used) if (lower or upper) and bounds is not None else set()
        self.has_lower = lower is not None
        if lower is None and upper is None:
            self.line("# (no keep-predicate bounds the keys: every key block is visited)")
        else:
            self.line(f"# from: {', '.join(bounds.conjuncts_used)}")
        self.assign("kv_lo", f"(tl.maximum({lower}, 0) // BLOCK_N) * BLOCK_N" if lower else "0")
        self.assign("kv_hi", f"tl.minimum({upper} + 1, J)" if upper else "J")
        self.line("# blocks in which those predicates keep every (i, j) and j < J: no masks there")
        if lower:
            self.assign("full_lo", f"tl.minimum(tl.maximum(tl.cdiv(tl.maximum({full_lower}, 0), BLOCK_N) * BLOCK_N, "
                                   "kv_lo), tl.cdiv(kv_hi, BLOCK_N) * BLOCK_N)")
        else:
            self.assign("full_lo", "kv_lo")
        hi = f"tl.minimum({full_upper} + 1, kv_hi)" if upper else "kv_hi"
        self.assign("full_hi", f"tl.maximum(({hi} // BLOCK_N) * BLOCK_N, full_lo)")

    def sweep(self, body, block: str) -> None:
        """One sweep over the key blocks: `body` is rendered once, as the inner @triton.jit function
        `block`, called for the blocks the bounded predicates keep whole (IS_FULL_BLOCK: no masks
        there) and for the edge blocks - flags, not copies (Inductor's flex templates do likewise)."""
        kernel_lines, kernel_indent = self.lines, self.indent
        self.lines, self.indent, self.memo = [], 1, dict(self.outer)
        self.assign("offs_j", "start_n + tl.arange(0, BLOCK_N)")
        self.line("if IS_FULL_BLOCK:")
        self.line("    col_ok = tl.full([BLOCK_N], 1, tl.int1)")
        self.line("else:")
        self.line("    col_ok = offs_j < J")
        body(None)
        body_lines = self.lines
        self.lines, self.indent, self.memo = kernel_lines, kernel_indent, dict(self.outer)
        call = self.inner_function(block, body_lines)
        if self.g.plan.block_mask is not None:
            partial, full = KEY_BLOCK_LISTS
            for name, is_full, what in ((full, True,
                                         "listed blocks kept whole: no masks of the block mask's conjuncts"),
                                        (partial, False, "listed blocks kept partly: every mask")):
                self.line(f"for listed in range(0, {names.derived('count', name)}):  # {what}")
                self.line(f"    start_n = {self.listed_block(name, 'listed')} * BLOCK_N")
                for line in call(is_full):
                    self.line(f"    {line}")
            return
        ranges = [("full_lo", "full_hi", True, "blocks fully kept: no masks")]
        if self.has_lower:
            ranges.append(("kv_lo", "full_lo", False, "edge blocks before them"))
        ranges.append(("full_hi", "kv_hi", False, "edge blocks after them (the diagonal, the end of J)"))
        for lo, hi, full, what in ranges:
            self.line(f"for start_n in range({lo}, {hi}, BLOCK_N):  # {what}")
            for line in call(full):
                self.line(f"    {line}")

    def inner_function(self, name: str, body_lines: list):
        """Wrap a loop body as `@triton.jit def name(<carried>, start_n, <what it reads>, IS_FULL_BLOCK)`
        returning the carried state; returns `call(full) -> the lines of the call`. What it reads and carries is
        read off the rendered code (Python's ast), so the signature cannot miss a name."""
        import ast
        import textwrap
        scope = _kernel_scope(self.kernel_header, self.lines if self.scope_lines is None else self.scope_lines)
        body = textwrap.dedent("\n".join(body_lines))
        tree = ast.parse(body)
        stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        loaded = sorted((n.lineno, n.col_offset, n.id) for n in ast.walk(tree)
                        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load))
        reads = list(dict.fromkeys(n for _, _, n in loaded if n in scope and n != "start_n"))
        carried = [n for n in reads if n in stored and n != "DOT_DTYPE"]
        lead = self.tensor[self.p.lead].ptr
        if "DOT_DTYPE" in reads:   # a dtype is no argument: the inner function reads it off the lead pointer
            reads = [lead if n == "DOT_DTYPE" else n for n in reads if n != lead]
        params = carried + ["start_n"] + [n for n in reads if n not in carried]
        signature = [f"{n}: tl.constexpr" if scope.get(n) else n for n in params] + ["IS_FULL_BLOCK: tl.constexpr"]
        lines = ["@triton.jit", f"def {name}("]
        lines += [f"    {', '.join(signature[k:k + 6])}," for k in range(0, len(signature), 6)]
        lines.append("):")
        lines.append(f'    """One key block of {self.p.kernel}; IS_FULL_BLOCK: the bounded keep-predicates hold for all of it."""')
        if "DOT_DTYPE" in {n for _, _, n in loaded}:
            lines.append(f"    DOT_DTYPE = {lead}.dtype.element_ty")
        lines += body_lines
        if carried:
            lines.append(f"    return {', '.join(carried)}")
        self.inner_functions.append("\n".join(lines) + "\n")
        rows = [", ".join(params[k:k + 8]) + "," for k in range(0, len(params), 8)]
        target = f"{', '.join(carried)} = " if carried else ""
        return lambda full: [f"{target}{name}("] + ["    " + row for row in rows + [f"IS_FULL_BLOCK={full},"]] + [")"]

    def conjuncts(self, node_id: str) -> list[str]:
        return conjuncts(self.g, node_id)   # split as the key bounds were (passes/bounds.py)

    def masked_scores(self, scores_id, keeps, score_axes, full, x: str = "", statistics: bool = True):
        """One normaliser's scores (suffix `x`): for a softmax (`statistics`), s_tile in log2 units,
        -inf where a keep-predicate drops (i, j); for a masked normaliser, keep_tile and p_tile, the
        values where kept and 0 elsewhere. full: True / False for a block known to be fully kept or
        not; None renders both, under IS_FULL_BLOCK (in fully kept blocks only the conjuncts the key
        bounds did not use still apply)."""
        s = self.value(scores_id)
        s_expr = self.f32v(s, score_axes)

        def terms_of(node_ids):
            values = [self.value(n) for n in node_ids]
            return [self.view(k, score_axes) if k.axes else f"({k.expr})" for k in values]
        unbounded = terms_of([c for keep in keeps for c in self.conjuncts(keep) if c not in self.used_conjuncts])
        every = [self.view(_Value("col_ok", ("j",), "bool"), score_axes)] + terms_of(keeps)

        def render(terms):
            if not statistics:   # keep_tile is always defined: the backward masks the gradient with it
                self.assign(f"keep_tile{x}", " & ".join(terms) if terms else f"tl.full({self.shape(score_axes)}, 1, tl.int1)")
                self.assign(f"p_tile{x}", f"tl.where(keep_tile{x}, {s_expr}, 0.0)", "kept values; dropped: 0")
                return
            if not terms:
                self.assign(f"s_tile{x}", f"{s_expr} * LOG2E", "log2 units")
                return
            self.assign(f"keep_tile{x}", " & ".join(terms))
            self.assign(f"s_tile{x}", f"tl.where(keep_tile{x}, {s_expr} * LOG2E, float('-inf'))",
                        "log2 units; dropped: -inf")
        if full is not None:
            render(unbounded if full else every)
            return
        self.line("if IS_FULL_BLOCK:")
        self.indent += 1
        render(unbounded)
        self.indent -= 1
        self.line("else:")
        self.indent += 1
        render(every)
        self.indent -= 1


# ------------------------------------------------------------------------------------- templates
# The forward kernel as it reads: Triton with slots. `{name}` alone on a line is a slot of whole
# lines (the spec's code, or layout-dependent set-up; it may be empty); `{name}` inside a line is
# a value (a shape, an axis). fill() puts them in.

# a program over one query tile (of one head, or of every head of a sample: {program}); the
# forward and the dq kernel start alike
QUERY_TILE_PROGRAM = """\
{signature}
    \"\"\"{doc}\"\"\"
    start_m = tl.program_id(0)
{program}
{rows}
{features}
    DOT_DTYPE = {lead_ptr}.dtype.element_ty"""

FORWARD_HEAD = QUERY_TILE_PROGRAM + """

    # -- per program: values without i or j --
{per_program}

    # -- q prologue: once per query tile --
{q_prologue}

{key_range}

{statistics}"""

# the pieces below are per normaliser (kernelsearch/normalisers.py): {x} is its suffix ("" for the
# first), so that several softmaxes keep their own row statistics side by side

# a softmax's row statistics, before the sweep(s)
STATISTICS_INIT = """\
    m_i{x} = tl.full({stat_shape}, float('-inf'), tl.float32)  # row max (log2 units)
    l_i{x} = tl.zeros({stat_shape}, tl.float32)  # row sum"""

# ... of a softmax with a sink: the sink is a logit every row starts with (it adds to the sum only)
SINK_STATISTICS_INIT = """\
    m_i{x} = tl.zeros({stat_shape}, tl.float32) + {sink} * LOG2E  # row max (log2 units): the sink's logit first
    l_i{x} = tl.full({stat_shape}, 1.0, tl.float32)  # row sum: exp(sink - m) = 1"""

ONLINE_SWEEP = """\
{accumulators}
{keys}"""

EXACT_SWEEPS = """\
    # -- sweep 1 of 2: exact row statistics --
{stats}
{normalise}

    # -- sweep 2 of 2: exact probabilities, post-softmax ops, p @ v --
{accumulators}
{keys}"""

EXACT_NORMALISE = """\
    m_use{x} = tl.where(m_i{x} == float('-inf'), 0.0, m_i{x})
    inv_l{x} = tl.where(l_i{x} > 0.0, 1.0 / tl.where(l_i{x} > 0.0, l_i{x}, 1.0), 0.0)  # rows with nothing kept give 0"""

# one key block (the body of an inner function; offs_j and col_ok come first: see sweep()):
# {scores} renders every normaliser's s_tile (or a masked one's p_tile), {statistics} each softmax's
ONLINE_KEY_BLOCK = """\
{scores}
{statistics}
{updates}"""

ONLINE_STATISTICS = """\
    m_new{x} = tl.maximum(m_i{x}, tl.max(s_tile{x}, axis={last}))
    m_use{x} = tl.where(m_new{x} == float('-inf'), 0.0, m_new{x})  # rows with nothing kept yet
    alpha{x} = tl.exp2(m_i{x} - m_use{x})
    p_tile{x} = tl.exp2(s_tile{x} - m_use{x}{expand})
    l_i{x} = l_i{x} * alpha{x} + tl.sum(p_tile{x}, axis={last})
    m_i{x} = m_new{x}"""

STATS_BLOCK = """\
{scores}
{statistics}"""

STATS_STATISTICS = """\
    m_new{x} = tl.maximum(m_i{x}, tl.max(s_tile{x}, axis={last}))
    m_use{x} = tl.where(m_new{x} == float('-inf'), 0.0, m_new{x})  # rows with nothing kept yet
    l_i{x} = l_i{x} * tl.exp2(m_i{x} - m_use{x}) + tl.sum(tl.exp2(s_tile{x} - m_use{x}{expand}), axis={last})
    m_i{x} = m_new{x}"""

EXACT_KEY_BLOCK = """\
{scores}
{statistics}
{updates}"""

EXACT_PROBABILITIES = """\
    p_tile{x} = tl.exp2(s_tile{x} - m_use{x}{expand}) * inv_l{x}{expand}"""

TAIL = """\

    # -- epilogue --
{normalise}
{epilogue}
    out_offs = {out_offsets}
    out_mask = {out_mask}
    tl.store(out_ptr + out_offs, {out}.to(out_ptr.dtype.element_ty), mask=out_mask)
{lse}"""

ONLINE_NORMALISE = """\
    l_safe{x} = tl.where(l_i{x} > 0.0, l_i{x}, 1.0)  # rows with nothing kept give 0"""

# a softmax's row log-sum-exp for the backward (plane `{plane}` of lse: one per softmax)
LSE_STORE = """\
    if STORE_LSE:   # row log-sum-exp (log2 units) for the backward; rows with nothing kept: +inf
        tl.store(lse_ptr + {lse_offsets}, tl.where(l_i{x} > 0.0, m_i{x} + tl.log2(tl.where(l_i{x} > 0.0, l_i{x}, 1.0)), float('inf')), mask={lse_mask})"""


KEYS = "<the key sweep>"   # where it goes, while the lines before it tell what its blocks may read


def fill(template: str, **slots) -> list:
    """The template's lines with its slots filled: a slot alone on a line takes a list of lines
    (none, one or many), a slot inside a line a value."""
    lines = []
    for line in template.split("\n"):
        name = line.strip()[1:-1] if line.strip().startswith("{") and line.strip().endswith("}") else None
        if name is not None and name.isidentifier() and isinstance(slots.get(name), list):
            lines += slots[name]
        else:
            lines.append(line.format(**{k: v for k, v in slots.items() if not isinstance(v, list)}))
    return lines


def _kernel_scope(header: list, lines: list) -> dict:
    """{name: is constexpr} of what a kernel's body can read so far: its parameters and the names it
    has assigned (module globals - tl, LOG2E, helpers - are not in it)."""
    import ast
    import textwrap
    function = ast.parse("\n".join(header) + "\n    pass\n").body[0]
    scope = {a.arg: a.annotation is not None for a in function.args.args}
    body = ast.parse(textwrap.dedent("\n".join(lines)))
    for node in ast.walk(body):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            scope.setdefault(node.id, False)
    return scope


_HELPERS = '''
LOG2E = tl.constexpr(1.4426950408889634)


''' + ops.triton_helpers() + '''

@triton.jit
def _mix_heads(x, w, CP: tl.constexpr, PRECISION: tl.constexpr):
    """w @ x over channels: x [CP, rows] fp32, w [CP out, CP in] (zero outside the real channels)."""
    if CP >= 16:
        mixed = tl.dot(w, x, input_precision=PRECISION)
    else:
        offs_c = tl.arange(0, CP)
        mixed = tl.zeros_like(x)
        for o in tl.static_range(CP):
            w_o = tl.sum(tl.where(offs_c[:, None] == o, w, 0.0), axis=0)      # row o of w
            row = tl.sum(w_o[:, None] * x, axis=0)
            mixed = tl.where(offs_c[:, None] == o, row[None, :], mixed)
    return mixed
'''


# --------------------------------------------------------------------------------------- launcher

def _launcher(graph: Graph, p: KernelPlan, defaults: dict) -> str:
    spec = graph.spec
    params = [t.name for t in p.tensors]
    pnames = {t.name: t.var for t in p.tensors}
    lines = []
    sig = ", ".join(pnames[n] for n in params)
    lines.append(f"def {triton_function_name(graph)}({sig}, *, BLOCK_M={defaults['BLOCK_M']}, BLOCK_N={defaults['BLOCK_N']}, "
                 f"num_warps={defaults['num_warps']}, num_stages={defaults['num_stages']}, "
                 "wrap=None, poison=False, lse=None):")
    lines.append(f'    """{spec.name} forward ({graph.schedule}); returns [b, h, i, {p.out_feature}] in q\'s dtype.')
    lines.append("")
    lines.append("    wrap: torch.library.wrap_triton inside a triton_op; poison: fill the output with NaN first;")
    lines.append("    lse: a [B, H, I] float32 tensor to receive the rows' log-sum-exp (log2 units) for the backward.")
    lines.append('    """')
    lines += launcher_sizes(p, pnames)
    out_shape = ", ".join(names.size(d) for d in p.out_dims)
    lead = pnames[p.lead]
    lines.append(f"    out = _empty(({out_shape},), {lead}, poison)")
    if p.channels:
        lines.append(f"    if B % {p.streams}:")
        lines.append(f"        raise ValueError(f'{spec.name}: the batch ({{B}}) is not a multiple of streams={p.streams}')")
        for weight in dict.fromkeys(graph.node(m).args[1] for m in graph.find("mix_heads")):
            w = pnames[weight]
            lines.append(f"    if tuple({w}.shape) != ({p.streams} * H, {p.streams} * H):")
            lines.append(f"        raise ValueError(f'{spec.name}: {weight} must be [(s h), (s h)] = "
                         f"[{{{p.streams} * H}}, {{{p.streams} * H}}], got {{list({w}.shape)}}')")
    lines.append("    if out.numel() == 0:")
    lines.append("        return out")
    lines += block_list_lines(graph, p, KEY_BLOCK_LISTS, "BLOCK_M", "BLOCK_N")
    if p.materialized:
        lines.append("    # per-key transforms, computed once for all query tiles (the k-prologue prepass)")
        for t in p.materialized:
            shape = ", ".join("KV_H" if d == "h" and t.per_kv_head else names.size(d) for d in t.dims)
            lines.append(f"    {t.var} = torch.empty(({shape},), dtype={lead}.dtype, device={lead}.device)")
        lines.append(f"    prepass = {p.prepass_kernel} if wrap is None else wrap({p.prepass_kernel})")
        lines.append(f"    prepass[(max(1, triton.cdiv(J, {PREPASS_BLOCK_N})), B * {'KV_H' if p.prepass_kv else 'H'})](")
        lines += launch_lines(p.prepass_args())
        lines.append("        num_warps=4,")
        lines.append("    )")
    if p.channels:
        lines.append(f"    grid = (triton.cdiv(I, BLOCK_M), B // {p.streams})")
    else:
        lines.append("    grid = (triton.cdiv(I * G, BLOCK_M), B * KV_H)  # rows: (query, head of the KV group)"
                     if p.packed else "    grid = (triton.cdiv(I, BLOCK_M), B * H)")
    lines.append(f"    kernel = {p.kernel} if wrap is None else wrap({p.kernel})")
    lines.append("    kernel[grid](")
    lines += launch_lines(p.forward_args())
    lines.append("        num_warps=num_warps, num_stages=num_stages,")
    lines.append("    )")
    lines.append("    return out")
    lines.append("")
    lines.append("")
    lines.append(f"def {triton_function_name(graph)}_fake({sig}, *args, **kwargs):")
    for arg, dim in p.sizes:
        if dim in p.out_dims:
            source, axis = p.size_sources[dim]
            lines.append(f"    {arg} = {pnames[source]}.shape[{axis}]")
    lines.append(f"    return {lead}.new_empty(({out_shape},))")
    return "\n".join(lines) + "\n"


def block_list_lines(graph: Graph, p: KernelPlan, lists, block_m: str, block_n: str) -> list[str]:
    """Launcher lines computing the plan's block mask at these block sizes and naming its lists."""
    if graph.plan.block_mask is None:
        return []
    from .torch_module import block_mask_call
    lead = p.tensors_by_name()[p.lead].var
    call = block_mask_call(graph, block_m, block_n, f"{lead}.device")
    if p.channels:   # a program holds a sample's channels: its lists are per sample
        call += f".per_sample({graph.plan.block_mask.streams})"
    return [f"    tiles = {call}  # the plan's block mask at these tiles",
            f"    {', '.join(lists)} = {', '.join(f'tiles.{name}' for name in lists)}"]


def launcher_sizes(p: KernelPlan, pnames: dict) -> list[str]:
    """Launcher lines reading every size from its input's shape, then the host-side constants."""
    lines = []
    for arg, dim in p.sizes:
        source, axis = p.size_sources[dim]
        lines.append(f"    {arg} = {pnames[source]}.shape[{axis}]")
    lines.append(f"    KV_H = {pnames[p.kv_source]}.shape[1]")
    lines.append("    G = H // KV_H if KV_H else 1  # query heads per KV head (inputs.check_call: KV_H divides H)")
    for arg, node_id, dtype, expr in p.host:
        lines.append(f"    {arg} = {expr}")
    return lines


_LAUNCH_HELPERS = '''

def _strides(tensor, ndim):
    """One stride per declared dim: 0 for a missing leading dim or a broadcast (size-1) dim."""
    strides = [0 if size == 1 else stride for size, stride in zip(tensor.shape, tensor.stride())]
    return [0] * (ndim - tensor.ndim) + strides


def _empty(shape, like, poison):
    if poison:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)
'''


def kernel_name(graph: Graph) -> str:
    return plan(graph).kernel


def kernel_source(graph: Graph) -> tuple[str, KernelPlan]:
    """The @triton.jit kernels alone - the k-prologue prepass (if any) and the forward kernel - and the plan."""
    p = plan(graph)
    writer = _KernelWriter(graph, p)
    parts = []
    if p.materialized:
        parts.append(writer.prepass())
    kernel = writer.kernel()
    parts += writer.inner_functions + [kernel]
    return "\n\n".join(parts), p


TRITON_PRELUDE = "import math\n\nimport torch\nimport triton\nimport triton.language as tl\n" + _HELPERS \
    + _LAUNCH_HELPERS
"""Imports and helpers every generated Triton module needs once (before any `triton_functions`)."""


def triton_functions(graph: Graph, config: dict | None = None) -> str:
    """The kernels and the launcher `triton_forward(in_q, in_k, in_v, ..., BLOCK_M=...)` of one
    specialisation (to follow `TRITON_PRELUDE`). A config only sets the launcher's default knobs
    (tiles are constexpr launch arguments, so the kernels do not depend on it)."""
    kernel, p = kernel_source(graph)
    defaults = {**default_config(graph), **{k: int(v) for k, v in (config or {}).items() if k in CONFIG_KEYS}}
    mask = ""
    if graph.plan.block_mask is not None:   # torch code, run by the launchers (forward and backward)
        from .torch_module import block_mask_source
        mask = block_mask_source(graph) + "\n\n"
    return kernel + "\n\n" + mask + _launcher(graph, p, defaults)


def default_config(graph: Graph) -> dict:
    return dict(DEFAULT_CONFIG_HEADS_IN_TILE if graph.plan.heads_in_tile else DEFAULT_CONFIG)
