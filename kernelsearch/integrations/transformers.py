"""A spec as an attention implementation of Hugging Face ``transformers`` (``pip install kernelsearch[hf]``).

    from transformers import AutoModelForCausalLM, LlamaConfig
    from kernelsearch.integrations.transformers import register

    register("specs/softmax.yaml", name="kernelsearch", backend="torch")
    model = AutoModelForCausalLM.from_config(LlamaConfig(...), attn_implementation="kernelsearch")

``register`` adds the spec to transformers' ``AttentionInterface`` (the function every attention
layer calls) and a mask function to its ``AttentionMaskInterface`` (what the model builds its
mask with), under ``name``. What a layer passes is mapped onto the spec:

- **scaling** becomes the spec's ``scale`` param, unless you fix ``scale=`` yourself (cosine-sim
  attention's scale is a temperature, not 1/sqrt(d): pass ``scale=10.0``). A spec without a
  ``scale`` param keeps its own definition.
- **causal**: the layer's ``is_causal`` becomes the spec's ``causal`` param (bottom-right
  aligned, which is what a KV cache needs: the last query sees every key). A causal layer with a
  spec that has no ``causal`` param is refused.
- **attention_mask**: the model's 2-D padding mask ``[b, kv_len]`` (1 = keep) becomes the spec's
  ``mask`` input; causality is the param above, not a 4-D mask. Masks the spec cannot say —
  sliding windows, packed sequences, static caches, a 4-D mask you pass — are refused, never
  ignored. Fully-masked query rows (left padding) give 0, not what sdpa gives: compare logits at
  the kept positions.
- **grouped KV heads** (GQA/MQA, k and v with fewer heads): passed as they are - every spec takes
  k and v with H_kv heads (query head h reads KV head h // (H / H_kv)), never copied per query head.
- **dropout**: none in kernelsearch attention; a non-zero ``attention_dropout`` while training is
  refused (set ``config.attention_dropout = 0.0``). Soft-capping, sinks (``s_aux``) and sliding
  windows passed by a layer are refused too.

Learned inputs of a spec (sinks, bias tables) have no home in a transformers layer: a spec that
requires one is refused at ``register``; optional ones are left out. Needs transformers >= 4.53
(the mask interface).
"""
from __future__ import annotations

import torch

from ..errors import UsageError

__all__ = ["register"]

# names transformers ships: registering over them would change every model that asks for them
RESERVED = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
            "flash_attention_4", "paged|eager")
REFUSED_KWARGS = {
    "sliding_window": "a sliding window (use a spec with a window, e.g. specs/local.yaml, and a model without one)",
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
}


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import masking_utils
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        raise UsageError(f"kernelsearch.integrations.transformers needs transformers >= 4.53 "
                         f"(pip install 'kernelsearch[hf]'): {e}") from None
    return AttentionInterface, masking_utils


def _mask_function(name: str):
    """What the model builds its mask with: the 2-D padding mask itself, or None."""
    _, masking_utils = _transformers()
    plain = (masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function)

    def kernelsearch_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                          mask_function=None, attention_mask=None, **_):
        if mask_function is not None and mask_function not in plain:
            raise UsageError(f"attn_implementation={name!r}: this model asks for a mask kernelsearch "
                             f"cannot express through the spec's params (a sliding window, packed sequences "
                             f"or a custom mask function); use a model config without it")
        if not isinstance(q_offset, int) or not isinstance(kv_offset, int) or \
                (mask_function is masking_utils.causal_mask_function and q_offset + q_length != kv_offset + kv_length):
            raise UsageError(f"attn_implementation={name!r}: the causal diagonal must sit at the last key "
                             f"(a dynamic cache); static or offset caches are not supported")
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise UsageError(f"attn_implementation={name!r}: give a 2-D padding mask [batch, keys], "
                             f"not a {attention_mask.dim()}-D mask")
        return attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    return kernelsearch_mask


def _attention_function(name: str, spec, backend: str, config: dict | None, params: dict):
    from ..nn import shared_attention

    def kernelsearch_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
        if dropout:
            raise UsageError(f"attn_implementation={name!r} has no attention dropout; this layer asks for "
                             f"{dropout} while training (set config.attention_dropout = 0.0)")
        for option, what in REFUSED_KWARGS.items():
            if kwargs.get(option) is not None:
                raise UsageError(f"attn_implementation={name!r}: the layer asks for {what} "
                                 f"({option}={kwargs[option]!r}), which {spec.path} does not do")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        call_params = dict(params)
        if "scale" in spec.params and "scale" not in params and scaling is not None:
            call_params["scale"] = float(scaling)
        if "causal" in spec.params and "causal" not in params:
            call_params["causal"] = bool(causal)
        elif causal and "causal" not in spec.params:
            raise UsageError(f"attn_implementation={name!r}: the layer is causal, and {spec.path} has no "
                             f"`causal` param")
        attention = shared_attention(spec, backend, config, call_params)
        inputs = {}
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise UsageError(f"attn_implementation={name!r}: got a {attention_mask.dim()}-D attention mask; "
                                 f"kernelsearch takes the 2-D padding mask [batch, keys] (causality is the "
                                 f"spec's `causal` param)")
            if "mask" not in spec.inputs:
                raise UsageError(f"attn_implementation={name!r}: the model passes a padding mask and "
                                 f"{spec.path} has no `mask` input")
            inputs["mask"] = attention_mask
        out = attention(query, key, value, **inputs)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return kernelsearch_attention


def register(spec, name: str = "kernelsearch", backend: str = "auto", config: dict | None = None,
             **params) -> str:
    """Make ``attn_implementation=name`` run `spec` in every transformers model; returns `name`.

    backend, config and params are ``kernelsearch.load``'s; ``scale``/``causal`` given here are
    fixed, otherwise they follow each layer's ``scaling`` and ``is_causal``.
    """
    from ..compiler import resolve_params
    from ..spec import Spec, load_spec
    from ..api import _pick_backend
    AttentionInterface, masking_utils = _transformers()
    if name in RESERVED:
        raise UsageError(f"register: {name!r} is transformers' own attention; choose another name")
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    backend = _pick_backend(backend)
    resolve_params(spec, params)                           # unknown names and wrong types fail here
    needed = [n for n, d in spec.inputs.items() if not d.optional and n not in ("q", "k", "v")]
    if needed:
        raise UsageError(f"register: {spec.path} requires the input(s) {', '.join(needed)}, which a "
                         f"transformers attention layer does not have; use kernelsearch.nn.Attention")
    AttentionInterface.register(name, _attention_function(name, spec, backend, config, params))
    masking_utils.AttentionMaskInterface.register(name, _mask_function(name))
    return name
