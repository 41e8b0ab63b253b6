"""Codegen: the backward kernels of a core graph (passes/split_prologue.py), derived op by op.

FlashAttention-2 style: nothing of size I x J is stored. Each kernel recomputes its tiles' scores
from the inputs and the rows' log-sum-exp that the forward saved, then walks the tile's ops in
reverse with one local derivative rule per op (`_BackwardWriter.propagate`): a spec made of
existing ops gets its backward without anything written for it, and an op without a rule is a
CodegenError naming it.

    dq kernel    a program per query tile (per batch * head, or per sample with all its
                 channels when heads are coupled); it sweeps the key blocks the forward visited:
                   delta sweep (only when p is transformed after softmax): delta = rowsum(p * dp)
                   dp' = dO @ v'^T; post-softmax ops reversed -> dp; ds = p * (dp - delta)
                   score ops reversed: dq' += ds_q @ k'; bias inputs, gathered tables and
                   mixing weights get their gradients here (fp32 atomic adds)
    dkdv kernel  a program per key tile (per batch * KV head); it loops over the query heads of
                 its KV group (grouped KV heads: G = H / H_kv, 1 without grouping) and, for each,
                 over the query blocks, skipping those whose key range (the same interval
                 analysis) leaves this key block out, so blocks the forward skipped cost nothing
                 here either:
                   dv' += p'^T @ dO; dk' += ds_k^T @ q'
                 dk', dv' of a KV head sum its group's query heads in registers: stored once, no
                 atomics. (Heads-in-tile programs hold every channel: there the per-KV-head
                 gradients are fp32 atomic adds of each channel's sum.)

When p goes straight into p @ v, delta = rowsum(dO * O) is computed by the launcher and the dq
and dkdv kernels are independent; otherwise the dq kernel writes delta first and runs first.

Determinism: q/k/v-side gradients are each written once. Inputs that are not dot operands (bias,
tables, mixing weights) are accumulated with fp32 atomic adds into zeroed buffers: exact when
every element receives one term (an unbroadcast [b, h, i, j] bias), but the summation order of
broadcast biases, gathered tables (many (i, j) pairs share an entry) and mixing weights varies
from run to run, so those are not bitwise reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import normalisers, ops
from ..ir import Graph
from . import names
from .triton_fwd import (KEY_BLOCK_LISTS, KEYS, QUERY_BLOCK_LISTS, QUERY_TILE_PROGRAM, ArgGroup, CodegenError, KernelPlan,
                         TensorArg, _KernelWriter, _Value, _feature_constexprs, block_list_args, block_list_lines, fill,
                         _scalar_groups, flat_params, launch_lines, signature_lines,
                         launcher_sizes, plan, tensor_arg)

# 64x64 with 8 warps: no register spills in the dq kernels of the seed specs on sm_90 (4 warps spill 24-40 B)
from ..backends.knobs import TRITON_BWD_DEFAULTS as DEFAULT_BWD_CONFIG  # noqa: E402  (declared there)
from ..backends.knobs import TRITON_BWD_DEFAULTS_HEADS_IN_TILE as DEFAULT_BWD_CONFIG_HEADS_IN_TILE  # noqa: E402
from ..backends.knobs import TRITON_BWD_KNOBS as BWD_CONFIG_KEYS  # noqa: E402



@dataclass
class BackwardPlan:
    forward: KernelPlan
    dq_kernel: str
    dkdv_kernel: str
    differentiable: tuple    # the float inputs, in call order
    grads: list              # [TensorArg] their gradient buffers (same dims), in the same order
    dout: TensorArg          # dO, dims of the output
    atomic: tuple            # inputs whose gradient is atomically accumulated (fp32 buffer)
    exact_delta: bool        # delta needs its own sweep (the plan's delta_sweep: p transformed after softmax)
    block_lists: list        # [TensorArg]: the block mask's lists, key blocks per query block and transposed
    summed: tuple = ()       # dot operands per KV head whose channels add into one gradient (heads in tile):
                             # fp32 atomic adds into a zeroed buffer

    def args(self) -> list:
        """The dq and dkdv kernels' parameters and launch arguments ([ArgGroup]; both kernels take the
        same): the one list their signatures, the launcher's calls and the AOT signature come from."""
        p = self.forward
        lead = p.tensors_by_name()[p.lead].var
        pointers = ArgGroup(tuple(t.ptr for t in p.tensors) + ("do_ptr", "lse_ptr", "delta_ptr"),
                            tuple(t.var for t in p.tensors) + ("do", "lse", "delta"))
        groups = [pointers, ArgGroup(tuple(g.ptr for g in self.grads), tuple(g.var for g in self.grads))]
        if self.block_lists:
            groups.append(ArgGroup(tuple(t.ptr for t in self.block_lists), tuple(t.var for t in self.block_lists)))
        groups += [ArgGroup(t.strides, (f"*_strides({t.var}, {len(t.dims)})",))
                   for t in p.tensors + [self.dout] + self.grads + self.block_lists]
        groups += _scalar_groups(p)
        groups.append(ArgGroup(("BLOCK_M", "BLOCK_N"), ("BLOCK_M", "BLOCK_N"), True))
        groups += _feature_constexprs(p)
        if p.channels:
            groups.append(ArgGroup(("CP",), (f"triton.next_power_of_2({p.streams} * H)",), True))
        groups.append(ArgGroup(("DOT_PRECISION",), (f'"ieee" if {lead}.dtype == torch.float32 else "tf32"',), True))
        return groups

    def runtime_args(self) -> list[str]:
        return flat_params(self.args())

    def constexpr_args(self) -> list[str]:
        return flat_params(self.args(), constexpr=True)


def backward_plan(graph: Graph) -> BackwardPlan:
    p = plan(graph)
    if p.materialized:
        raise CodegenError("triton backward: the graph still has per-key transforms; split the prologue first "
                           "(passes/split_prologue.py)")
    accs = graph.plan.accumulators
    if len(accs) != 1 or graph.output != accs[0]:
        later = [graph.node(n).op for n in graph.ids() if graph.node(n).stage == "epilogue" and n not in accs]
        raise CodegenError(f"triton backward: ops after dot(p, v) ({', '.join(later) or 'a second dot(p, v)'}) "
                           "have no backward kernel yet; the output must be dot(p, v)")
    grads, atomic = [], []
    dot_operands = set()
    for node_id, node in graph.nodes():
        if node.op == "dot":
            dot_operands.update(node.args)
    differentiable = tuple(t for t in p.tensors if t.dtype == "float")
    for t in differentiable:
        grads.append(tensor_arg(names.derived("grad", t.var), f"d {t.name}", t.dims, "float", t.raw))
        if t.name not in dot_operands:
            atomic.append(t.name)
    dout = TensorArg("dO", "do_ptr", p.out_dims, "float", False,
                     tuple(f"stride_do_{axis}" for axis in range(len(p.out_dims))), "do")
    summed = tuple(t.name for t in differentiable if p.channels and t.per_kv_head and t.name not in atomic)
    return BackwardPlan(p, f"_bwd_dq_{graph.spec.name}", f"_bwd_dkdv_{graph.spec.name}", tuple(t.name for t in differentiable), grads,
                        dout, tuple(atomic), graph.plan.delta_sweep,
                        block_list_args(KEY_BLOCK_LISTS + QUERY_BLOCK_LISTS) if p.block_lists else [], summed)


class _BackwardWriter(_KernelWriter):
    def __init__(self, graph: Graph, bp: BackwardPlan):
        super().__init__(graph, bp.forward)
        self.bp = bp
        self.packed = False    # a backward program is one query head (the dkdv kernel loops over the group)
        (self.acc,) = self.accs
        self.statistics = [n for n in self.norms if n.statistics]
        self.p_mixed, self.v_operand = graph.node(self.acc).args
        self.grad_of = dict(zip(bp.differentiable, bp.grads))
        diff = set(self.grad_of)
        self.needs_grad = set()
        for name in diff:
            self.needs_grad |= graph.downstream(name)
        self.score_axes = tuple(a for a in ("c", "i", "j") if a != "c" or self.channels)
        self.stat_axes = self.score_axes[:-1]
        self.expand = f"[{', '.join([':'] * len(self.stat_axes) + ['None'])}]"
        self.last = len(self.score_axes) - 1
        self.operand_accs: dict = {}    # input name -> accumulator of its gradient (dot operands)
        self.weight_accs: dict = {}     # mixing weight name -> [CP, CP] accumulator
        self.counter = 0

    # -- helpers
    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def reduce_to(self, v: _Value, axes: tuple) -> str:
        """v summed over its axes that `axes` lacks, then broadcast to `axes`."""
        expr, have = v.expr, list(v.axes)
        for position in reversed(range(len(have))):
            if have[position] not in axes:
                expr = f"tl.sum({expr}, axis={position})"
                del have[position]
        return self.view(_Value(expr, tuple(have), "f32"), axes)

    def flat(self, expr: str, axes: tuple) -> str:
        rows = " * ".join(self.block(a) for a in axes[1:]) or "1"
        return f"tl.reshape({expr}, [CP, {rows}])"

    def mma(self, expr: str) -> str:
        return f"{expr}.to(DOT_DTYPE)"

    def trans(self, expr: str, axes: tuple) -> str:
        return f"tl.permute({expr}, (0, 2, 1))" if len(axes) == 3 else f"tl.trans({expr})"

    def broadcast_channels(self, expr: str, value: _Value) -> str:
        if self.channels and "c" not in value.axes:
            return f"tl.broadcast_to({expr}[None, :, :], {self.shape(('c',) + value.axes)})"
        return expr

    # -- program set-up shared by both kernels
    def header(self, kernel: str) -> list[str]:
        return signature_lines(kernel, self.bp.args())

    def values_of_stage(self, stage: str, query_head: bool | None = None) -> None:
        """The stage's values (query_head: only those that vary with the query head, or only those that do not)."""
        for node_id in self.g.ids():
            if self.g.node(node_id).stage == stage and self._in_kernel(node_id) and \
                    (query_head is None or (node_id in self.query_heads) == query_head):
                self.value(node_id)

    def weights(self) -> None:
        for mix in self.g.find("mix_heads"):
            self.weight_tile(self.g.node(mix).args[1])
            self.weight_tile(self.g.node(mix).args[1], transposed=True)

    def row_inputs(self, with_delta: bool) -> None:
        """dO, and each softmax's log-sum-exp and delta of the current query rows."""
        out_axes = self.axes(self.g.output)
        terms, masks = self.index_terms(self.bp.dout, out_axes, 0)
        self.assign("do_tile", f"tl.load(do_ptr + {' + '.join(terms)}, mask={' & '.join(dict.fromkeys(masks))}, "
                               "other=0.0)", f"[{', '.join(self.g.node(self.g.output).dims)}] dO")
        self.memo[("dO", 0)] = _Value("do_tile", out_axes, "native")
        for plane, n in enumerate(self.statistics):
            x = self.suffix[n.node]
            offs, mask = self.lse_offsets(plane)
            self.assign(f"lse_i{x}", f"tl.load(lse_ptr + {offs}, mask={mask}, other=float('inf'))",
                        "log2 units; +inf: no key kept, p = 0")
            if with_delta:
                self.assign(f"delta_i{x}", f"tl.load(delta_ptr + {offs}, mask={mask}, other=0.0)", "rowsum(p * dp)")

    # -- one (query block, key block) tile
    def tile(self, full: bool, kind: str) -> None:
        """kind: delta (accumulate rowsum(p * dp) of every softmax) | dq | dkdv."""
        for n in self.norms:
            x = self.suffix[n.node]
            self.masked_scores(n.scores, n.keeps, self.score_axes, full, x, n.statistics)
            if n.statistics:
                self.assign(f"p_tile{x}", f"tl.exp2(s_tile{x} - lse_i{x}{self.expand})", "the forward's probabilities")
            self.memo[(n.node, 0)] = _Value(f"p_tile{x}", self.score_axes, "f32")
        p_mixed = self.value(self.p_mixed)
        v = self.value(self.v_operand)
        v_mma = self.broadcast_channels(self.mma_operand(self.v_operand), v)
        self.assign("dp_tile", f"tl.dot(do_tile, {self.trans(v_mma, self.score_axes)}, input_precision=DOT_PRECISION)",
                    "d p' = dO @ v'^T")
        grads = self.propagate({self.p_mixed: [_Value("dp_tile", self.score_axes, "f32")]}, kind,
                               stop={n.node for n in self.norms})
        if kind == "delta":
            for n in self.statistics:
                if n.node in grads:
                    x = self.suffix[n.node]
                    self.assign(f"delta_acc{x}", f"delta_acc{x} + tl.sum(p_tile{x} * {grads[n.node].expr}, axis={self.last})")
            return
        seeds: dict = {}
        for n in self.norms:
            if n.node not in grads:
                continue
            x, dp = self.suffix[n.node], grads[n.node].expr
            if n.statistics:
                self.assign(f"ds_tile{x}", f"p_tile{x} * ({dp} - delta_i{x}{self.expand})", "softmax backward")
            else:
                self.assign(f"ds_tile{x}", f"tl.where(keep_tile{x}, {dp}, 0.0)", "masked backward: kept entries only")
            seeds.setdefault(n.scores, []).append(_Value(f"ds_tile{x}", self.score_axes, "f32"))
        if kind == "dkdv" and self.v_operand in self.grad_of:
            pm = self.f32v(p_mixed, self.score_axes)
            if p_mixed.axes != self.score_axes:
                pm = f"tl.broadcast_to({pm}, {self.shape(self.score_axes)})"
            self.accumulate(self.v_operand, f"tl.dot({self.mma(self.trans(pm, self.score_axes))}, do_tile, "
                                            "input_precision=DOT_PRECISION)")
        self.propagate(seeds, kind, stop=())

    def sink_gradients(self) -> None:
        """d sink = -sum over the rows of p_sink * delta, p_sink = exp(sink - lse): the sink takes mass
        from every key of its rows (dq kernel, after the key sweep; atomically summed over query tiles)."""
        for plane, n in enumerate(self.statistics):
            if n.sink is None or n.sink not in self.needs_grad:
                continue
            x = self.suffix[n.node]
            sink = self.f32v(self.value(n.sink), self.stat_axes)
            self.assign(f"p_sink{x}", f"tl.exp2(({sink}) * LOG2E - lse_i{x})", "the sink's probability per row")
            row_axis = len(self.stat_axes) - 1
            self.propagate({n.sink: [_Value(f"-tl.sum(p_sink{x} * delta_i{x}, axis={row_axis})",
                                            self.stat_axes[:-1], "f32")]}, "dq", stop=())

    def accumulate(self, name: str, update: str) -> None:
        acc = self.operand_accs[name]
        self.assign(acc, f"{acc} + {update}")

    # -- reverse mode over a tile's ops
    def propagate(self, seeds: dict, kind: str, stop) -> dict:
        """Push gradients from `seeds` back through the tile's ops in reverse order; returns the
        gradients reaching the nodes in `stop` (the normalisers), by node."""
        grads = {k: list(v) for k, v in seeds.items()}
        result = {}
        for node_id in reversed(self.g.ids()):
            if node_id not in grads:
                continue
            node = self.g.node(node_id)
            axes = self.axes(node_id)
            total = self.total(node_id, grads.pop(node_id), axes)
            if node_id in stop:
                result[node_id] = total
                continue
            for arg, contribution in self.rule(node_id, node, total, axes, kind):
                if arg in self.needs_grad and self.g.node(arg).dtype == "float" and self.wanted(arg, kind):
                    grads.setdefault(arg, []).append(contribution)
        return result

    def wanted(self, node_id: str, kind: str) -> bool:
        """Bias inputs and gathered tables get their gradients in the dq kernel only."""
        if kind == "dq":
            return True
        node = self.g.node(node_id)
        return not (node_id in self.bp.atomic or node.op == "gather")

    def total(self, node_id: str, parts: list, axes: tuple) -> _Value:
        terms = [self.reduce_to(v, axes) for v in parts]
        name = self.fresh(f"grad_{self.names.of(node_id)}")
        self.assign(name, " + ".join(terms), f"d {node_id}")
        return _Value(name, axes, "f32")

    def rule(self, node_id: str, node, gv: _Value, axes: tuple, kind: str):
        """(argument, gradient contribution) pairs: the local derivative of one op."""
        op = node.op
        if op == "input":
            if node_id in self.bp.atomic and kind == "dq":
                self.store_input_grad(node_id, gv)
            return []
        if op == "dot":
            return self.dot_grad(node_id, node, gv, kind)
        if op == "gather":
            if kind == "dq" and node.args[0] in self.grad_of:
                self.store_gather_grad(node_id, gv, axes)
            return []
        if op == "mix_heads":
            return self.mix_grad(node_id, node, gv, axes, kind)
        if normalisers.is_normaliser(op):
            raise CodegenError(f"triton backward: a normaliser ({op}) reached past the normalisers")
        if op not in ops.OPS or ops.OPS[op].grad is None:
            raise CodegenError(f"triton backward: no derivative rule for op '{op}' (node '{node_id}'); "
                               f"ops with rules: dot, gather, mix_heads, softmax, {', '.join(ops.differentiable())}")
        return self.elementwise_rule(node_id, node, gv, axes)

    def elementwise_rule(self, node_id: str, node, gv: _Value, axes: tuple):
        """The op's derivative templates (ops.py) filled in: only the values a template names are computed."""
        def field(name: str) -> str:
            if name == "g":
                return gv.expr
            if name == "out":
                return self.f32v(self.value(node_id), axes)
            value = self.value(node.args[int(name[1:])])
            return self.f32v(value, axes) if name[0] == "x" else self.view(value, axes)
        contributions = []
        for arg, template in zip(node.args, ops.gradient_terms(node.op)):
            if template is None:
                continue      # no gradient to this argument (a predicate, or a derivative that is 0)
            if template == "{g}":
                contributions.append((arg, gv))
                continue
            filled = {name: field(name) for name in ops.template_fields(template)}
            contributions.append((arg, _Value(template.format(**filled), axes, "f32")))
        return contributions

    def dot_grad(self, node_id, node, gv: _Value, kind: str):
        a_id, b_id = node.args
        for operand in (a_id, b_id):
            if operand in self.needs_grad and self.g.node(operand).op != "input":
                raise CodegenError(f"triton backward: dot '{node_id}' has a computed operand '{operand}'; "
                                   "split the prologue first")
        a, b = self.value(a_id), self.value(b_id)
        if not ("i" in a.axes and "j" in b.axes):
            raise CodegenError(f"triton backward: dot '{node_id}' is not a [i, d] x [j, d] score product")
        g = self.mma(gv.expr)
        if kind == "dq" and a_id in self.grad_of:
            kb = self.broadcast_channels(self.mma_operand(b_id), b)
            self.accumulate(a_id, f"tl.dot({g}, {kb}, input_precision=DOT_PRECISION)")
        if kind == "dkdv" and b_id in self.grad_of:
            qa = self.broadcast_channels(self.mma_operand(a_id), a)
            self.accumulate(b_id, f"tl.dot({self.trans(g, gv.axes)}, {qa}, input_precision=DOT_PRECISION)")
        return []

    def mix_grad(self, node_id, node, gv: _Value, axes: tuple, kind: str):
        x_id, weight = node.args
        flat_g = self.flat(gv.expr, axes)
        if kind == "dq" and weight in self.grad_of:
            x = self.value(x_id)
            acc = self.weight_accs[weight]
            self.assign(acc, f"{acc} + _mix_weight_grad({flat_g}, {self.flat(self.f32v(x, axes), axes)}, CP, "
                             "DOT_PRECISION)", f"d {weight} [(s h) out, (s h) in]")
        if x_id not in self.needs_grad:
            return []
        back = f"tl.reshape(_mix_heads({flat_g}, {self.weight_tile(weight, transposed=True)}, CP, DOT_PRECISION), " \
               f"{self.shape(axes)})"
        return [(x_id, _Value(back, axes, "f32"))]

    # -- gradient stores
    def grad_pointer(self, name: str, axes: tuple) -> tuple[str, str]:
        grad = self.grad_of[name]
        terms, masks = self.index_terms(grad, axes, 0)
        return " + ".join([grad.ptr] + terms), " & ".join(dict.fromkeys(masks)) or "None"

    def store_input_grad(self, name: str, gv: _Value) -> None:
        axes = self.axes(name)
        value = self.reduce_to(gv, axes)
        if not set(axes) & {"i", "j"} and "c" not in axes:
            self.line(f"tl.atomic_add({self.grad_of[name].ptr} + {self.scalar_offset(name)}, {value})")
            return
        pointer, mask = self.grad_pointer(name, axes)
        self.line(f"tl.atomic_add({pointer}, {value}, mask={mask})  # d {name}")

    def scalar_offset(self, name: str) -> str:
        grad = self.grad_of[name]
        terms = [f"off_{d} * {s}" for d, s in zip(grad.dims, grad.strides) if d in ("b", "h")]
        return " + ".join(terms) or "0"

    def store_gather_grad(self, node_id: str, gv: _Value, axes: tuple) -> None:
        table = self.g.node(node_id).args[0]
        grad = self.grad_of[table]
        terms, masks = self.gather_offsets(node_id, axes, grad.strides)
        mask = " & ".join(masks + ([self.view(_Value("row_ok", ("i",), "bool"), axes),
                                    self.view(_Value("col_ok", ("j",), "bool"), axes)]))
        if "c" in axes:
            mask += f" & {self.view(_Value('c_ok', ('c',), 'bool'), axes)}"
        self.line(f"tl.atomic_add({grad.ptr} + {' + '.join(terms)}, {gv.expr}, mask={mask})  "
                  f"# d {table}: entries shared by many (i, j) add up")

    def init_operand_accs(self, side: str) -> None:
        """Register accumulators for the gradients of the dot operands on one side (i or j)."""
        self.operand_accs = {}
        for name in self.grad_of:
            if name in self.bp.atomic:
                continue
            axes = self.axes(name)
            if side in axes:
                acc = names.derived("dacc", names.argument(name))
                self.operand_accs[name] = acc
                self.assign(acc, f"tl.zeros({self.shape(axes)}, tl.float32)", f"d {name}")

    def store_operand_accs(self) -> None:
        for name, acc in self.operand_accs.items():
            pointer, mask = self.grad_pointer(name, self.axes(name))
            if name in self.bp.summed:   # channels of one KV group add into one gradient
                self.line(f"tl.atomic_add({pointer}, {acc}, mask={mask})  # d {name}: summed over the KV group")
                continue
            self.line(f"tl.store({pointer}, {acc}.to({self.grad_of[name].ptr}.dtype.element_ty), mask={mask})")

    # -- the kernels
    def dq_kernel(self) -> str:
        """DQ_KERNEL: per query tile, the key sweep(s) as inner functions (tile(): the spec's ops
        reversed), then dq' and the mixing weights' gradients stored."""
        bp, p = self.bp, self.p
        self.lines, self.memo, self.indent = [], {}, 1
        header = self.header(bp.dq_kernel)
        self.kernel_header, self.inner_functions = header, []

        def accumulator_set_up():
            self.init_operand_accs("i")
            self.weight_accs = {}
            for mix in self.g.find("mix_heads"):
                weight = self.g.node(mix).args[1]
                if weight in self.grad_of and weight not in self.weight_accs:
                    self.weight_accs[weight] = names.derived("dacc", names.argument(weight))
                    self.assign(self.weight_accs[weight], "tl.zeros([CP, CP], tl.float32)")
        head = fill(DQ_HEAD, signature=header, doc=f"{self.g.spec.name} backward, per query tile: dq' and the "
                    "gradients of bias, tables and mixing weights.", program=self.capture(self.batch_and_heads),
                    rows=self.capture(self.rows), features=self.capture(self.feature_offsets), lead_ptr=self.tensor[p.lead].ptr,
                    per_program=self.capture(lambda: (self.values_of_stage("constant"), self.weights())),
                    q_prologue=self.capture(lambda: self.values_of_stage("q_prologue")),
                    row_inputs=self.capture(lambda: self.row_inputs(with_delta=not bp.exact_delta)),
                    accumulators=self.capture(accumulator_set_up), key_range=self.capture(self.key_range))
        self.outer = dict(self.memo)
        self.scope_lines = head[len(header):]     # what the inner functions may read (_kernel_scope)

        def sweep(kind, block):
            return self.capture(lambda: self.sweep(lambda full: self.tile(full, kind), f"{bp.dq_kernel}_{block}"))
        sweeps = []
        if bp.exact_delta:
            init, store = [], []
            for plane, n in enumerate(self.statistics):
                offsets, mask = self.lse_offsets(plane)
                slots = dict(x=self.suffix[n.node], stat_shape=self.shape(self.stat_axes), lse_offsets=offsets,
                             lse_mask=mask)
                init += fill(DELTA_INIT, **slots)
                store += fill(DELTA_STORE, **slots)
            sweeps = fill(DELTA_SWEEP, delta_init=init, delta=[KEYS], delta_store=store)
            at = sweeps.index(KEYS)
            self.scope_lines += sweeps[:at]
            sweeps[at:at + 1] = sweep("delta", "delta_block")
            self.scope_lines += sweeps[at:]
        keys = sweep("dq", "key_block")
        self.scope_lines = None

        def stores():
            self.sink_gradients()
            self.store_operand_accs()
            for weight, acc in self.weight_accs.items():
                t = self.grad_of[weight]
                out_stride, in_stride = t.strides
                self.line(f"tl.atomic_add({t.ptr} + offs_c[:, None] * {out_stride} + offs_c[None, :] * {in_stride}, "
                          f"{acc}, mask=c_ok[:, None] & c_ok[None, :])")
        return "\n".join(head + sweeps + keys + fill(DQ_TAIL, stores=self.capture(stores))) + "\n"

    def dkdv_kernel(self) -> str:
        """DKDV_KERNEL: per key tile, the query blocks whose key range holds it (the forward's
        bounds), each one tile() of the spec's ops reversed; dk' and dv' stored."""
        bp, p = self.bp, self.p
        self.lines, self.memo, self.indent = [], {}, 1
        header = self.header(bp.dkdv_kernel)
        grouped = not self.channels   # a program per (batch, KV head), looping over the group's query heads
        kv_side = None if self.channels else False
        head = dict(signature=header, doc=f"{self.g.spec.name} backward, per key tile: dk', dv' over the query "
                    "heads of its KV group and the query blocks that keep it.",
                    program=self.capture(lambda: self.batch_and_heads(per_kv_head=grouped)),
                    features=self.capture(self.feature_offsets), lead_ptr=self.tensor[p.lead].ptr,
                    per_program=self.capture(lambda: (self.values_of_stage("constant", kv_side), self.weights())),
                    k_prologue=self.capture(lambda: self.values_of_stage("k_prologue", kv_side)),
                    accumulators=self.capture(lambda: self.init_operand_accs("j")),
                    members="G" if grouped else "1")
        member = ["        off_h = off_hkv * G + member  # the query head"] if grouped else []
        per_head = self.capture(lambda: (self.values_of_stage("constant", True), self.values_of_stage("k_prologue", True)),
                                indent=2) if grouped else []
        self.outer = dict(self.memo)
        if self.g.plan.block_mask is not None:
            self.used_conjuncts = set(self.g.plan.block_mask.conjuncts)
            query_blocks = self.capture(self.listed_query_blocks, indent=2)
            indent = 3
        else:
            query_blocks = fill(BOUNDED_QUERY_BLOCKS, key_range=self.capture(self.key_range, indent=3))
            indent = 4
        self.memo = dict(self.outer)
        tile = self.capture(lambda: (self.row_inputs(with_delta=True), self.tile(False, "dkdv")), indent=indent)
        self.memo = dict(self.outer)
        return "\n".join(fill(DKDV_KERNEL, query_blocks=query_blocks, tile=tile, member=member, per_head=per_head,
                              stores=self.capture(self.store_operand_accs), **head)) + "\n"

    def listed_query_blocks(self) -> None:
        """The dkdv kernel's loop over the query blocks the block mask lists for this key block
        (kept whole first, then partly: the tile applies every mask either way)."""
        partial, full = QUERY_BLOCK_LISTS
        self.line("# -- query blocks: the plan's block mask lists those that keep something of this key block --")
        self.block_list_rows(QUERY_BLOCK_LISTS, "start_n")
        count_full, count_partial = names.derived("count", full), names.derived("count", partial)
        self.line(f"for listed in range(0, {count_full} + {count_partial}):")
        self.indent += 1
        self.assign("listed_full", f"listed < {count_full}")
        self.assign("listed_partial", f"tl.maximum(listed - {count_full}, 0)")
        self.assign("start_m", f"tl.where(listed_full, {self.listed_block(full, 'listed')}, "
                               f"{self.listed_block(partial, 'listed_partial')})")
        self.assign("offs_i", "start_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        self.assign("row_ok", "offs_i < I")
        self.indent -= 1


# ------------------------------------------------------------------------------------- templates
# The backward kernels as they read (codegen/triton_fwd.py's fill(): a slot alone on a line takes
# lines, inside a line a value).

DQ_HEAD = QUERY_TILE_PROGRAM + """
{per_program}
{q_prologue}
{row_inputs}
{accumulators}

{key_range}"""

DELTA_SWEEP = """\
    # -- sweep 1 of 2: delta = rowsum(p * dp) of every softmax, p transformed after it --
{delta_init}
{delta}
{delta_store}
    # -- sweep 2 of 2: gradients --"""

# per softmax ({x}: its suffix; plane {lse_offsets} of delta, as of lse)
DELTA_INIT = """\
    delta_acc{x} = tl.zeros({stat_shape}, tl.float32)"""

DELTA_STORE = """\
    delta_i{x} = delta_acc{x}
    tl.store(delta_ptr + {lse_offsets}, delta_i{x}, mask={lse_mask})  # for the dkdv kernel"""

DQ_TAIL = """\

{stores}"""

DKDV_KERNEL = """\
{signature}
    \"\"\"{doc}\"\"\"
    start_n = tl.program_id(0)
{program}
    offs_j = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_j < J
{features}
    DOT_DTYPE = {lead_ptr}.dtype.element_ty
{per_program}
{k_prologue}
{accumulators}

    for member in range(0, {members}):   # the query heads of the KV group: dk', dv' summed in registers
{member}
{per_head}
{query_blocks}
{tile}

{stores}"""

# the dkdv kernel's query blocks where only the key-block bounds skip: every one, tested against them
BOUNDED_QUERY_BLOCKS = """\
        for start_m in range(0, tl.cdiv(I, BLOCK_M)):
            offs_i = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_i < I
{key_range}
            if (start_n * BLOCK_N >= kv_lo) & (start_n * BLOCK_N < kv_hi):   # the forward visited this tile"""


_BWD_HELPERS = '''

@triton.jit
def _mix_weight_grad(g, x, CP: tl.constexpr, PRECISION: tl.constexpr):
    """d w of w @ x over channels: g [CP out, rows] @ x^T [rows, CP in], fp32."""
    if CP >= 16:
        dw = tl.dot(g, tl.trans(x), input_precision=PRECISION)
    else:
        offs_c = tl.arange(0, CP)
        dw = tl.zeros([CP, CP], tl.float32)
        for o in tl.static_range(CP):
            g_o = tl.sum(tl.where(offs_c[:, None] == o, g, 0.0), axis=0)      # row o of g
            col = tl.sum(x * g_o[None, :], axis=1)
            dw = tl.where(offs_c[:, None] == o, col[None, :], dw)
    return dw
'''


def backward_function_name(graph: Graph) -> str:
    return "triton_backward"


def _launcher(graph: Graph, bp: BackwardPlan) -> str:
    p = bp.forward
    pnames = {t.name: t.var for t in p.tensors}
    params = [pnames[t.name] for t in p.tensors]
    lead = pnames[p.lead]
    d = DEFAULT_BWD_CONFIG_HEADS_IN_TILE if p.channels else DEFAULT_BWD_CONFIG
    lines = [f"def {backward_function_name(graph)}(do, out, lse, {', '.join(params)}, *, "
             f"BLOCK_M={d['BLOCK_M_BWD']}, BLOCK_N={d['BLOCK_N_BWD']}, num_warps={d['num_warps_bwd']}, "
             f"num_stages={d['num_stages_bwd']}, wrap=None, poison=False):"]
    names = ", ".join(bp.differentiable)
    lines.append(f'    """Gradients of ({names}) from dO, the output and the forward\'s row log-sum-exp;')
    lines.append('    poison: fill the gradients the kernels store (not accumulate) with NaN first."""')
    lines += launcher_sizes(p, pnames)
    lines.append(f"    do = do.to({lead}.dtype)")
    softmaxes = len(graph.plan.statistics)
    if bp.exact_delta:
        lines.append(f"    delta = torch.empty(({softmaxes}, B, H, I), dtype=torch.float32, device={lead}.device)  "
                     "# the dq kernel writes it")
    elif not softmaxes:
        lines.append("    delta = lse  # unused: no row statistics (masked normalisers)")
    else:
        lines.append("    delta = (do.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O) = rowsum(p * dp)")
    grads = []
    for name, g in zip(bp.differentiable, bp.grads):
        var = g.var
        grads.append((name, var))
        if name in bp.atomic or name in bp.summed:
            lines.append(f"    {var} = torch.zeros({pnames[name]}.shape, dtype=torch.float32, device={lead}.device)")
        else:
            lines.append(f"    {var} = _empty({pnames[name]}.shape, {pnames[name]}, poison)")
    # atomically accumulated gradients are fp32: returned in their input's dtype
    fp32 = set(bp.atomic) | set(bp.summed)
    returned = f"[{', '.join(var if n not in fp32 else f'{var}.to({pnames[n]}.dtype)' for n, var in grads)}]"
    lines.append("    if B * H * I * J == 0:")
    for name, var in grads:
        lines.append(f"        {var}.zero_()")
    lines.append(f"        return {returned}")
    lines += block_list_lines(graph, p, KEY_BLOCK_LISTS + QUERY_BLOCK_LISTS, "BLOCK_M", "BLOCK_N")
    programs = f"B // {p.streams}" if p.channels else "B * H"
    kv_programs = programs if p.channels else "B * KV_H"    # dkdv: a program per KV head, looping over its group
    for kernel, tiles, count in ((bp.dq_kernel, "triton.cdiv(I, BLOCK_M)", programs),
                                 (bp.dkdv_kernel, "triton.cdiv(J, BLOCK_N)", kv_programs)):
        lines.append(f"    ({kernel} if wrap is None else wrap({kernel}))[({tiles}, {count})](")
        lines += launch_lines(bp.args())
        lines.append("        num_warps=num_warps, num_stages=num_stages,")
        lines.append("    )")
    lines.append(f"    return {returned}")
    return "\n".join(lines) + "\n"


def backward_functions(graph: Graph) -> str:
    """The dq kernel (its key-block functions first), the dkdv kernel and the launcher `triton_backward(do, out, lse, ...)`
    of one specialisation of a core graph (after split_prologue); appended to a forward module."""
    bp = backward_plan(graph)
    writer = _BackwardWriter(graph, bp)
    dq = writer.dq_kernel()
    dq_blocks = writer.inner_functions
    writer = _BackwardWriter(graph, bp)
    dkdv = writer.dkdv_kernel()
    return "\n\n".join([_BWD_HELPERS.strip("\n") + "\n", *dq_blocks, dq, dkdv, _launcher(graph, bp)])


def default_config(graph: Graph) -> dict:
    return dict(DEFAULT_BWD_CONFIG_HEADS_IN_TILE if graph.plan.heads_in_tile else DEFAULT_BWD_CONFIG)
