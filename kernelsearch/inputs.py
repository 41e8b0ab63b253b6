"""The inputs of a call: the one check of a call's arguments, and random inputs for tests.

`check_call` is what every entry point runs before a backend sees the tensors (`load(...)`'s
callable, the backends' `layout.bind`, the generated modules): a user's mistake becomes one
TypeError/ValueError naming the input (and the dim, the other input, both devices...), never an
error from deep inside generated code, and never a silently different result.
"""
from __future__ import annotations

import ast
from typing import Mapping

import torch

from .errors import SpecError
from .spec import Spec

QKV = ("q", "k", "v")


def per_key_head(dims) -> bool:
    """An input over heads and keys but not queries (k, v, a per-key bias [b, h, j]): it may have
    H_kv heads, H_kv dividing q's H; query head h reads its head h // (H // H_kv) (grouped-query
    attention; H_kv = 1 is multi-query). Inputs with h but no j stay per query head."""
    return "h" in dims and "j" in dims and "i" not in dims


def check_call(spec: Spec, tensors: Mapping, params: Mapping | None = None) -> dict[str, int]:
    """Check one call's tensors against the spec's inputs; return the size of every dim (lower case).

    `tensors` maps input names to what the caller passed (None: not given). `params`, the
    resolved params of the call, when given, has its size-dependent defaults (`D ** -0.5`)
    evaluated at these sizes: a default that is complex, infinite or divides by zero there is a
    SpecError naming the param. Raises TypeError for a missing input or a wrong type or dtype,
    ValueError for a wrong shape, a size that disagrees with another input's, or another device.
    """
    _check_names(spec, tensors)
    q = tensors["q"]
    sizes: dict[str, int] = {}
    origin: dict[str, str] = {}
    kv_heads: list[tuple[str, int]] = []     # (input, heads) of the per-key-head inputs
    for name, decl in spec.inputs.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        dims = _check_tensor(spec, name, tensor, q)
        for dim, size in zip(dims, tensor.shape):
            broadcast = size == 1 and name not in QKV    # other inputs may broadcast over a dim
            if dim == "h" and per_key_head(dims):
                if not broadcast:
                    kv_heads.append((name, size))
                continue
            if dim in sizes and sizes[dim] != size and not (broadcast and dim in ("b", "h")):
                raise ValueError(f"{spec.name} attention: dim '{dim}' of input '{name}' has size {size}, but "
                                 f"input '{origin[dim]}' gave it size {sizes[dim]} (the spec declares both "
                                 f"with the dim '{dim}': they must agree)")
            if dim not in sizes and not broadcast:
                sizes[dim], origin[dim] = size, name
    if kv_heads:
        _check_kv_heads(spec, sizes.get("h"), kv_heads)
    dtypes = [tensors[n].dtype for n in QKV]
    if len(set(dtypes)) > 1:
        raise TypeError(f"{spec.name} attention: q, k and v must have one dtype, got "
                        f"{', '.join(str(d) for d in dtypes)}; convert them, e.g. k.to(q.dtype)")
    if params:
        _check_dims_named_after_params(spec, check_param_values(spec, params, sizes), sizes, origin)
    return sizes


def call_signature(tensors: Mapping) -> tuple | None:
    """What check_call's outcome depends on: each argument's name, shape, dtype and device; None
    when an argument is neither a tensor nor None (the check then runs and says what is wrong)."""
    signature = []
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            return None
        signature.append((name, tuple(tensor.shape), tensor.dtype, tensor.device))
    return tuple(signature)


def _check_kv_heads(spec: Spec, heads: int | None, kv_heads: list[tuple[str, int]]) -> None:
    """The per-key-head inputs agree on H_kv, and H_kv divides q's heads H."""
    first, size = kv_heads[0]
    for name, other in kv_heads[1:]:
        if other != size:
            raise ValueError(f"{spec.name} attention: input '{name}' has {other} heads, but input '{first}' has "
                             f"{size}: the inputs over heads and keys ({', '.join(n for n, _ in kv_heads)}) share "
                             f"one number of KV heads H_kv")
    if heads is not None and (size == 0 or heads % size):
        raise ValueError(f"{spec.name} attention: input '{first}' has {size} heads, which does not divide the "
                         f"{heads} heads of q; grouped KV heads need H % H_kv == 0 (query head h reads KV head "
                         f"h // (H / H_kv))")


def kv_groups(spec: Spec, tensors: Mapping) -> int:
    """G = H / H_kv: how many query heads share a KV head in this call (1 without grouping)."""
    heads = tensors["q"].shape[1]
    kv = tensors["k"].shape[1]
    return heads // kv if kv else 1


def _check_dims_named_after_params(spec: Spec, values: Mapping, sizes: Mapping[str, int], origin: Mapping) -> None:
    """A dim named after an int param (t5_bias's `bias_table: [h, num_buckets]`) has that param's
    value as its size: a table of another size would be read out of its bounds."""
    for dim, size in sizes.items():
        param = spec.params.get(dim)
        if param is not None and param.type == "int" and isinstance(values.get(dim), int) and size != values[dim]:
            raise ValueError(f"{spec.name} attention: dim '{dim}' of input '{origin[dim]}' has size {size}, but the "
                             f"param '{dim}' is {values[dim]} (the spec names the dim after the param: they must agree)")


def _check_names(spec: Spec, tensors: Mapping) -> None:
    unknown = sorted(set(tensors) - set(spec.inputs))
    if unknown:
        raise TypeError(f"{spec.name} attention got unexpected input(s) {unknown}; "
                        f"its inputs are {', '.join(spec.inputs)}")
    for name, decl in spec.inputs.items():
        if tensors.get(name) is None and not decl.optional:
            raise TypeError(f"{spec.name} attention needs the input '{name}' "
                            f"(a [{', '.join(decl.shape)}] tensor), got None")


def _check_tensor(spec: Spec, name: str, tensor, q) -> tuple[str, ...]:
    """The dims `tensor` has as input `name` (its optional leading dim left out or not)."""
    decl = spec.inputs[name]
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{spec.name} attention: input '{name}' must be a torch.Tensor, got {type(tensor).__name__}")
    dims = decl.shape
    if tensor.ndim == len(dims) - 1 and dims[0] in decl.optional_dims:
        dims = dims[1:]
    if tensor.ndim != len(dims):
        raise ValueError(f"{spec.name} attention: input '{name}' must have dims [{', '.join(decl.shape)}] "
                         f"({len(decl.shape)} axes), got shape {list(tensor.shape)}")
    if decl.dtype == "bool" and tensor.dtype != torch.bool:
        raise TypeError(f"{spec.name} attention: input '{name}' must be a bool tensor (True = keep), "
                        f"got {tensor.dtype}")
    if decl.dtype == "float" and not tensor.is_floating_point():
        raise TypeError(f"{spec.name} attention: input '{name}' must be a floating-point tensor, got {tensor.dtype}")
    if decl.dtype == "int" and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise TypeError(f"{spec.name} attention: input '{name}' must be an integer tensor, got {tensor.dtype}")
    if tensor.device != q.device:
        raise ValueError(f"{spec.name} attention: input '{name}' is on {tensor.device}, but q is on {q.device}; "
                         f"move it, e.g. {name}.to(q.device)")
    return dims


def check_param_values(spec: Spec, params: Mapping, sizes: Mapping[str, int]) -> dict:
    """The size-dependent param defaults (`D ** -0.5`) evaluated at `sizes` (lower-case dims).

    Folding checks the params it can evaluate at compile time; these depend on the call. A
    default that is not a finite real number there is a SpecError at the default's location.
    """
    from .passes.fold import evaluate
    values = {dim.upper(): size for dim, size in sizes.items()}
    values.update({n: v for n, v in params.items() if not isinstance(v, ast.expr)})
    pending = {n: v for n, v in params.items() if isinstance(v, ast.expr)}
    while pending:          # defaults may use other defaults (never in a cycle: spec.py refuses them)
        ready = {n: e for n, e in pending.items()
                 if all(x.id in values or x.id not in pending for x in ast.walk(e) if isinstance(x, ast.Name))}
        for name, expr in ready.items():
            try:
                values[name] = evaluate(expr, values)
            except (ArithmeticError, ValueError, TypeError) as e:
                shown = ", ".join(f"{d}={s}" for d, s in sorted(values.items()) if d.isupper())
                raise SpecError(f"the default of param '{name}' ({ast.unparse(expr)}) is not a finite real number "
                                f"at the sizes of this call ({shown}): {e}", getattr(expr, "location", None),
                                f"pass a value for '{name}' to kernelsearch.load, or change its default") from None
            del pending[name]
        if not ready:
            break   # an unknown name: evaluate() reports it with the next call's param
    return values


def input_shape(spec: Spec, name: str, sizes: dict, params: dict | None = None) -> list[int]:
    """The shape of input `name` at sizes {B, H, I, J, D, ...} (upper-case dim names; `H_KV`, when
    given, is the heads of the inputs over heads and keys: k, v and per-key biases)."""
    decl = spec.inputs[name]
    shape = []
    for dim in decl.shape:
        size = sizes.get(dim.upper())
        if dim == "h" and per_key_head(decl.shape) and "H_KV" in sizes:
            size = sizes["H_KV"]
        if size is None and dim in spec.params and spec.params[dim].type == "int":   # a dim named after a param
            value = (params or {}).get(dim, spec.params[dim].default)
            size = value if isinstance(value, int) else None
        if size is None and dim == "n":           # a distance table: every |i - j| must be a row
            size = max(sizes["I"], sizes["J"])
        if size is None and dim.startswith("mix"):  # a head-mixing weight over streams * heads
            streams = (params or {}).get("num_streams", spec.params["num_streams"].default
                                         if "num_streams" in spec.params else 1)
            size = streams * sizes["H"]
        if size is None:
            size = sizes.get("D")
        shape.append(size)
    return shape


def random_inputs(spec: Spec, sizes: dict, dtype=torch.float32, device="cpu", seed: int = 0,
                  optional=True, params: dict | None = None) -> dict:
    """q, k, v and (when `optional` is True, or for the names it lists) the optional inputs.

    Masks keep about 80% of keys and always fully mask the last batch row's keys when B > 1,
    so that fully-masked rows are exercised; mixing weights are identity plus noise.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    wanted = set(spec.optional_inputs) if optional is True else set(optional or ())
    tensors = {}
    for name, decl in spec.inputs.items():
        if decl.optional and name not in wanted:
            continue
        shape = input_shape(spec, name, sizes, params)
        if decl.dtype == "bool":
            value = torch.rand(shape, generator=generator) < 0.8
            if "b" in decl.shape and shape[0] > 1:
                value[-1] = False
        elif decl.dtype == "int":
            value = torch.randint(0, 8, shape, generator=generator)
        elif name.endswith("mix") and len(shape) == 2 and shape[0] == shape[1]:
            value = torch.eye(shape[0]) + 0.3 * torch.randn(shape, generator=generator)
        else:
            value = torch.randn(shape, generator=generator)
        if value.is_floating_point():
            value = value.to(dtype)
        tensors[name] = value.to(device)
    return tensors
