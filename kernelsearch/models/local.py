"""Seed 003: ``LocalTransformer`` / ``LocalMHA`` (local-attention), around any spec.

- token + position embeddings; ``x = attn(x) + x; x = ff(x) + x`` (plain residuals);
  final LayerNorm + Linear without bias.
- ``LocalMHA``: pre-LayerNorm; qkv Linear without bias; optional **qk-rmsnorm**; optional
  per-head **value gate** ``sigmoid(Linear(x_normed) -> heads)`` (with bias) multiplied into
  each head's output; output Linear without bias.
- FF = LN -> Linear(d, 2*int(d*mult*2/3)) -> GEGLU (first half * gelu(second half)) -> Linear,
  no biases.
- **Dynamic position bias** (``use_dynamic_pos_bias``): one MLP for the whole model,
  ``Linear(1, dim//2) -> SiLU -> Linear -> SiLU -> Linear(heads)`` over distances 0..n-1 gives
  ``pos_bias_table [h, n]``, passed to the spec as an input (the spec adds
  ``table[h, |i - j|]``). Upstream evaluates it on the distances 0..2w-1 of its window frame
  only; the MLP is per distance, so the entries the window can see are the same. Rotary is off
  when the dynamic bias is on (as upstream).

Done by the spec (structural params passed by the model): ``window_size``, ``causal``,
``look_backward`` (default 1), ``look_forward`` (default 0 when causal, else 1),
``exact_windowsize`` (LocalMHA's default True), ``rotary`` (= not use_dynamic_pos_bias), ``xpos``,
``xpos_scale_base`` (the spec's default ``w // 2`` unless given), the ``scale`` applied to q
before rotary (``qk_scale`` = 8 with qk-rmsnorm, else the spec's ``d**-0.5``) and, with
``qk_rmsnorm`` (passed only when on), the **qk-rmsnorm** itself: ``l2norm`` of q and k along d
followed by the learned per-dim ``q_scale``/``k_scale`` — upstream's ops in upstream's order,
fused into the kernel. The scales are learned inputs of the spec, parameters of each layer's
``kernelsearch.nn.Attention`` (``learned["q_scale"]``, ``learned["k_scale"]``, init 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..nn import Attention as AttentionModule, merge_heads, split_heads
from .common import LM, load_legacy_learned_keys


class DynamicPositionBias(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(),
                                 nn.Linear(dim, heads))

    def forward(self, n: int) -> torch.Tensor:
        """The table [heads, n]: entry (h, t) is the bias for distance |i - j| = t."""
        w = self.mlp[0].weight
        dist = torch.arange(n, device=w.device, dtype=w.dtype)
        return rearrange(self.mlp(rearrange(dist, "n -> n 1")), "n h -> h n")


class LocalMHA(AttentionModule):
    """The seed's LocalMHA: its projections and value gate around the spec's attention, which
    owns the qk-rmsnorm scales (``learned``) when ``qk_rmsnorm``."""

    def __init__(self, *, dim: int, heads: int, dim_head: int, attn, prenorm: bool = True,
                 qk_rmsnorm: bool = False, gate_values_per_head: bool = False):
        super().__init__(attn, heads=heads, dim_head=dim_head, projections=False,
                         learned=["q_scale", "k_scale"] if qk_rmsnorm else [])
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim) if prenorm else nn.Identity()
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_v_gate = nn.Linear(dim, heads) if gate_values_per_head else None
        self.to_out = nn.Linear(inner, dim, bias=False)
        load_legacy_learned_keys(self)

    def forward(self, x, mask=None, pos_bias_table=None):
        x = self.norm(x)
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = self.attend(q, k, v, mask=mask, pos_bias_table=pos_bias_table).to(x.dtype)
        if self.to_v_gate is not None:
            out = out * rearrange(self.to_v_gate(x), "b n h -> b h n 1").sigmoid()
        return self.to_out(merge_heads(out))


class GEGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


def FeedForward(dim: int, mult: float = 4) -> nn.Sequential:
    inner = int(dim * mult * 2 / 3)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner * 2, bias=False), GEGLU(),
                         nn.Linear(inner, dim, bias=False))


class LocalLM(LM):
    family = "local"
    native_spec = "local.yaml"

    def __init__(self, *, spec, backend="auto", attn_params=None, num_tokens=256,
                 max_seq_len=256, dim=128, depth=2, heads=4, dim_head=32, ff_mult=4,
                 local_attn_window_size=32, look_backward=1, look_forward=None,
                 exact_windowsize=True, use_xpos=False, xpos_scale_base=None,
                 use_dynamic_pos_bias=False, qk_rmsnorm=False, qk_scale=8.0,
                 gate_values_per_head=False):
        super().__init__(spec=spec, backend=backend, attn_params=attn_params,
                         num_tokens=num_tokens, max_seq_len=max_seq_len)
        causal = True
        structural = {
            "causal": causal,
            "window_size": local_attn_window_size,
            "look_backward": look_backward,
            "look_forward": (0 if causal else 1) if look_forward is None else look_forward,
            "exact_windowsize": exact_windowsize,
            "rotary": not use_dynamic_pos_bias,
            "xpos": bool(use_xpos) and not use_dynamic_pos_bias,
        }
        if xpos_scale_base is not None:
            structural["xpos_scale_base"] = xpos_scale_base
        if qk_rmsnorm:
            structural.update(qk_rmsnorm=True, scale=float(qk_scale))
        attn = self.build_attention(structural=structural)
        self.window_size = local_attn_window_size
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.dynamic_pos_bias = DynamicPositionBias(dim // 2, heads) if use_dynamic_pos_bias else None
        self.layers = nn.ModuleList([
            nn.ModuleList([
                LocalMHA(dim=dim, heads=heads, dim_head=dim_head, attn=attn, prenorm=True,
                         qk_rmsnorm=qk_rmsnorm, gate_values_per_head=gate_values_per_head),
                FeedForward(dim, ff_mult),
            ]) for _ in range(depth)])
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens, bias=False))

    def forward(self, x, mask=None):
        n = x.shape[1]
        assert n <= self.max_seq_len, f"sequence of {n} > max_seq_len {self.max_seq_len}"
        x = self.token_emb(x) + self.pos_emb(torch.arange(n, device=x.device))
        table = None
        if self.dynamic_pos_bias is not None:
            w = self.window_size
            table = self.dynamic_pos_bias(max(-(-n // w) * w, 2 * w))  # every distance the padded sequence has
        for attn, ff in self.layers:
            x = attn(x, mask=mask, pos_bias_table=table) + x
            x = ff(x) + x
        return self.to_logits(x)
