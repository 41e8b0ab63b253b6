"""The one door through which every model gets its attention: a spec compiled by kernelsearch.

A model never computes scores, masks, softmax, rotary or head mixing itself; it calls
``make_attention(spec, backend, **params)`` once per distinct parameter set, gets back
``kernelsearch.load``'s callable ``attn(q, k, v, **inputs)`` and hands it to one
``kernelsearch.nn.Attention`` per layer (which owns the learned inputs the model chooses).

Which params a model passes (``resolve_params``):

- *structural* params, always: what the model's own shapes and features decide (``causal`` for
  every LM; the window of the local family; ``num_streams``/``pre_talking_heads``/
  ``post_talking_heads`` of the multi-stream family). A spec that lacks one cannot serve that
  family, and ``kernelsearch.load`` says so with a ``SpecError``.
- *seed* params, only when the spec is the family's own seed spec (same file name, e.g.
  ``softmax.yaml`` for mesh_tf): the quirks that make the model reproduce its seed library
  (unscaled mesh-tensorflow scores, scale 8 for cosine-sim, ``+sqrt(d)`` for talking heads).
  With a foreign spec they are dropped and the spec's own defaults apply.
- the user's ``attention.params`` from the model YAML, always, last (they override both).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError

AttentionFn = Callable[..., Any]


def make_attention(spec: str | Path, backend: str = "auto", **params) -> AttentionFn:
    """``kernelsearch.load(spec, backend=backend, **params)`` — the only call models make."""
    import kernelsearch
    load = getattr(kernelsearch, "load", None)
    if load is None:
        raise UsageError("kernelsearch.load is not available in this installation "
                         "(the compiler is missing); models cannot build their attention")
    return load(str(spec), backend=backend, **params)


def is_native(spec: str | Path, native_spec: str | None) -> bool:
    return native_spec is not None and Path(spec).name == native_spec


def resolve_params(spec: str | Path, native_spec: str | None, structural: dict,
                   seed: dict, user: dict | None) -> dict:
    params = dict(structural)
    if is_native(spec, native_spec):
        params.update(seed)
    params.update(user or {})
    return params
