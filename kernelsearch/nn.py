"""``kernelsearch.nn.Attention``: a spec's attention as an ``nn.Module`` that owns its learned inputs.

    import kernelsearch.nn
    attn = kernelsearch.nn.Attention("specs/talking_heads.yaml", heads=4, dim=128, causal=True)
    y = attn(x)                       # x: [b, n, dim] -> [b, n, dim]  (q, k, v, out projections)

    core = kernelsearch.nn.Attention("specs/talking_heads.yaml", heads=4, dim_head=32, projections=False)
    o = core(q, k, v, mask=mask)      # q: [b, h, i, d] -> o: [b, h, i, d]

**Learned inputs.** An input of the spec that varies along none of the batch, query and key
dims (a mixing matrix ``[(s h), (s h)]``, a bias table ``[h, n]``, per-dim scales ``[d]``,
sinks ``[h]``) and that the spec reads with these params is an ``nn.Parameter`` of the module,
in ``module.learned[name]`` (a ParameterDict: spec names never become attributes). Each starts
where the seed libraries start it, decided by how the spec uses it, not by its name: the weight
of a ``mix_heads`` is the identity (a dirac 1x1 convolution), a factor is one, anything else
(bias tables, sinks) is zero. ``init={name: value or tensor}`` overrides that;
``learned=[names]`` chooses which inputs are parameters (the others are passed per call).
Sizes: the head dim is ``heads``, the feature dim ``dim_head``, a mixing matrix's dims
``num_streams * heads``, a dim named like an int param takes its value, any other (a distance
table's ``n``) comes from ``sizes={"n": ...}``.

**Projections** (default when ``dim`` is given): ``to_q``, ``to_k``, ``to_v`` (Linear, ``bias``)
and ``to_out``, as a standard multi-head attention; heads are split and merged with einops.
``forward(x, context=None, **inputs)``: keys and values come from ``context`` when given.
A model with projections of its own (a fused qkv Linear, gates: the seed LMs in
``kernelsearch/models``) subclasses it with ``projections=False`` and calls ``attend(q, k, v,
**inputs)`` between them, with ``split_heads``/``merge_heads`` for the layout.

**Grouped KV heads** (``kv_heads``, dividing ``heads``): ``to_k``/``to_v`` make ``kv_heads``
heads and k, v go to the attention as they are - every spec takes k and v with fewer heads than q
(query head h reads KV head h // (heads / kv_heads); ``kv_heads=1`` is multi-query attention), and
no backend copies them per query head.

The attention itself is ``kernelsearch.load(spec, backend=, config=, **params)``: the same
config look-up (``config=`` or the tuned records), shared by every module with the same
spec, backend, config and params (``spec`` may also be what ``kernelsearch.load`` returned). It runs under ``torch.compile(fullgraph=True)`` (torch and
triton backends).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from einops import rearrange
from torch import nn

from . import ops
from .errors import UsageError

__all__ = ["Attention", "LearnedInput", "learned_inputs", "required_learnable", "merge_heads", "shared_attention",
           "split_heads"]


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, n, (h d)] -> [b, h, n, d]: a projection's output in the layout of a spec's q, k and v."""
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """[b, h, n, d] -> [b, n, (h d)]: the attention's output as the input of an output projection."""
    return rearrange(o, "b h n d -> b n (h d)")


@dataclass(frozen=True)
class LearnedInput:
    name: str
    shape: tuple[int, ...]
    init: str                      # "identity" | "ones" | "zeros"


def _roles(spec) -> dict[str, str]:
    """Dim names of the call: batch, heads, queries, keys, KV heads and the feature dim."""
    q, k = spec.inputs["q"].shape, spec.inputs["k"].shape
    return {"batch": q[0], "heads": q[1], "query": q[2], "key": k[2], "kv_heads": k[1], "feature": q[-1]}


def _init_rule(users: list) -> str:
    # the value that makes the input a no-op where the spec uses it (how the seeds start them)
    if users and all(node.op == "mix_heads" for node in users):
        return "identity"
    units = {ops.unit_of(node.op) for node in users}
    if units == {1}:    # only multiplied: ones (the op registry's units: x * 1, x + 0)
        return "ones"
    return "zeros"


def _learnable(attention) -> dict:
    """name -> (declaration, users) of the inputs that could be learned: float, read by the spec,
    varying along none of the call's batch, query and key dims."""
    spec = attention.spec
    roles = _roles(spec)
    call_dims = {roles["batch"], roles["query"], roles["key"]}
    graph = attention.graph(None)                      # every optional input present
    candidates = {}
    for node_id, node in graph.nodes():
        if node.op != "input" or node.name in ("q", "k", "v"):
            continue
        decl = spec.inputs[node.name]
        if decl.dtype != "float" or set(decl.shape) & call_dims:
            continue
        candidates[node.name] = (decl, [graph.node(u) for u in graph.users(node_id)])
    return candidates


def required_learnable(attention) -> list[str]:
    """The required inputs that could be learned, in the spec's order: what a model that knows
    nothing of a spec's extra inputs (a bias table, sink logits) learns so that it can call it."""
    learnable = _learnable(attention)
    return [n for n, decl in attention.spec.inputs.items() if n in learnable and not decl.optional]


def learned_inputs(attention, heads: int, dim_head: int, kv_heads: int | None = None,
                   sizes: Mapping[str, int] | None = None,
                   names: Iterable[str] | None = None) -> dict[str, LearnedInput]:
    """The inputs of `attention` (a kernelsearch.load result) that a module owns as parameters.

    names: which inputs (None: every input that could be learned and that the spec reads).
    """
    spec = attention.spec
    roles = _roles(spec)
    call_dims = {roles["batch"], roles["query"], roles["key"]}
    graph = attention.graph(None)                      # every optional input present
    # a learned input has no key dim, so it is never per KV head: its head dim has the query heads
    known = {roles["heads"]: heads, roles["feature"]: dim_head}
    known.update({n: v for n, v in attention.params.items() if isinstance(v, int) and not isinstance(v, bool)})
    known.update(sizes or {})
    candidates = _learnable(attention)
    wanted = [n for n in spec.inputs if n in candidates] if names is None else list(names)
    for name in wanted:
        if name not in candidates:
            readable = ", ".join(candidates) or "none"
            raise UsageError(f"{spec.name}: '{name}' cannot be a learned input with these params "
                             f"(inputs that can: {readable}); a learned input varies along none of "
                             f"{', '.join(sorted(call_dims))} and is read by the spec")
    found = {}
    for name in wanted:
        decl, users = candidates[name]
        shape = []
        for dim in decl.shape:
            size = known.get(dim)
            mixing = [u for u in users if u.op == "mix_heads"]
            if size is None and mixing:                # a [(s h), (s h)] mixing matrix
                size = mixing[0].attrs.get("streams", 1) * heads
            if size is None:
                raise UsageError(f"{spec.name}: the learned input '{name}' [{', '.join(decl.shape)}] needs "
                                 f"the size of its dim '{dim}': pass sizes={{'{dim}': ...}}, or leave it "
                                 f"out of learned=[...] and pass it per call")
            shape.append(int(size))
        found[name] = LearnedInput(name, tuple(shape), _init_rule(users))
    return found


def _initial_value(item: LearnedInput, override: Any) -> torch.Tensor:
    if override is not None:
        if callable(override):
            return override(torch.empty(item.shape))
        value = torch.as_tensor(override, dtype=torch.float32)
        return value.expand(item.shape).clone()
    if item.init == "identity":
        return torch.eye(item.shape[0], item.shape[1]) if len(item.shape) == 2 else torch.ones(item.shape)
    if item.init == "ones":
        return torch.ones(item.shape)
    return torch.zeros(item.shape)


_SHARED: dict = {}


def shared_attention(spec, backend: str, config: dict | None, params: dict):
    """One kernelsearch.load per (spec, backend, config, params): layers share their compiled code."""
    import kernelsearch
    from .spec import Spec, load_spec
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    key = (spec.path, spec.sha256, backend, repr(sorted((config or {}).items())), repr(sorted(params.items())))
    if key not in _SHARED:
        # whatever the compiler draws from the RNG must not shift the model's initialisation
        with torch.random.fork_rng(devices=[]):
            attention = kernelsearch.load(spec, backend=backend, config=config, **params)
        _SHARED[key] = attention
    return _SHARED[key]


class Attention(nn.Module):
    """An attention spec as a module; see the module docstring."""

    def __init__(self, spec, *, heads: int, dim: int | None = None, dim_head: int | None = None,
                 kv_heads: int | None = None, projections: bool | None = None, bias: bool = False,
                 learned: Iterable[str] | None = None, init: Mapping[str, Any] | None = None,
                 sizes: Mapping[str, int] | None = None, backend: str = "auto", config: dict | None = None,
                 **params):
        super().__init__()
        projections = dim is not None if projections is None else projections
        if dim_head is None:
            if dim is None or dim % heads:
                raise UsageError(f"kernelsearch.nn.Attention needs dim_head, or a dim divisible by heads "
                                 f"(got dim={dim}, heads={heads})")
            dim_head = dim // heads
        if projections and dim is None:
            raise UsageError("kernelsearch.nn.Attention with projections needs dim (the model's width)")
        self.attention = self._attention(spec, backend, config, params)
        self.spec = self.attention.spec
        self.heads, self.dim_head = heads, dim_head
        self.kv_heads = self._check_kv_heads(heads if kv_heads is None else kv_heads)
        items = learned_inputs(self.attention, heads, dim_head, self.kv_heads, sizes, learned)
        unknown = set(init or {}) - set(items)
        if unknown:
            raise UsageError(f"{self.spec.name}: init= names {sorted(unknown)}, which are not learned inputs "
                             f"of this module (its learned inputs: {', '.join(items) or 'none'})")
        self.learned = nn.ParameterDict([   # pairs, not a dict: ParameterDict would sort a dict's keys
            (name, nn.Parameter(_initial_value(item, (init or {}).get(name)))) for name, item in items.items()])
        self.projections = projections
        if projections:
            self.to_q = nn.Linear(dim, heads * dim_head, bias=bias)
            self.to_k = nn.Linear(dim, self.kv_heads * dim_head, bias=bias)
            self.to_v = nn.Linear(dim, self.kv_heads * dim_head, bias=bias)
            self.to_out = nn.Linear(heads * dim_head, dim, bias=bias)

    @staticmethod
    def _attention(spec, backend, config, params):
        """`spec` may be what kernelsearch.load returned (a model that shares one attention between layers)."""
        from .api import Attention as Loaded
        if not isinstance(spec, Loaded):
            return shared_attention(spec, backend, config, params)
        if backend != "auto" or config is not None or params:
            raise UsageError("kernelsearch.nn.Attention: backend=, config= and params go to kernelsearch.load; "
                             "give them there or give a spec path here, not both")
        return spec

    def _check_kv_heads(self, kv_heads: int) -> int:
        if kv_heads < 1 or self.heads % kv_heads:
            raise UsageError(f"kv_heads ({kv_heads}) must divide heads ({self.heads}): query head h reads "
                             f"KV head h // (heads / kv_heads)")
        return kv_heads

    def extra_repr(self) -> str:
        return (f"{self.attention!r}, heads={self.heads}, dim_head={self.dim_head}, kv_heads={self.kv_heads}, "
                f"learned=[{', '.join(self.learned.keys())}]")

    def inputs(self, **per_call) -> dict[str, torch.Tensor]:
        """The spec's inputs for one call: the learned ones and `per_call`, by the spec's names.

        None is an input not given (a model passes ``mask=mask`` whether or not it has one,
        whatever inputs its spec declares)."""
        per_call = {name: t for name, t in per_call.items() if t is not None}
        clash = set(per_call) & set(self.learned.keys())
        if clash:
            raise TypeError(f"{sorted(clash)} are learned parameters of this module; they are not passed per call")
        return {**per_call, **dict(self.learned.items())}

    def attend(self, q, k, v, **inputs) -> torch.Tensor:
        """The spec's attention on [b, h, i, d] tensors with this module's learned inputs."""
        return self.attention(q, k, v, **self.inputs(**inputs))

    def forward(self, *args, **inputs) -> torch.Tensor:
        if not self.projections:
            return self.attend(*args, **inputs)
        x, context = (args + (None,))[:2] if len(args) <= 2 else (None, None)
        if x is None:
            raise TypeError("kernelsearch.nn.Attention with projections takes forward(x, context=None, **inputs)")
        context = inputs.pop("context", context)
        source = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(source), self.kv_heads)
        v = split_heads(self.to_v(source), self.kv_heads)
        o = self.attend(q, k, v, **inputs)
        return self.to_out(merge_heads(o.to(x.dtype)))
