"""Seed 001: ``CosineSimCausalTransformer`` (flash-cosine-sim-attention), around any spec.

- token + learned position embeddings; q, k, v, out, FF and logits Linear layers without bias;
  FF = Linear(d, 4d) -> GELU (erf) -> Linear(4d, d).
- Default **post-norm**: ``x = LN(attn(x) + x*rs); x = LN(ff(x) + x*rs)``, ``rs = (2*depth)**0.25``;
  init: embeddings N(0, 1e-5); xavier_normal gain 1 for q, k, logits; gain ``(8*depth)**-0.25``
  for v, out and both FF layers.
- ``pre_norm=True``: ``rs = 1``, LayerNorm inside attention and FF, a final LayerNorm before the
  logits, PyTorch's default init.

Seed attention params (with ``specs/cosine_sim.yaml``): ``scale = attn_scale`` (8), ``groups =
attn_l2norm_groups``. Upstream's LM loses ``groups`` on the way (it passes ``groups=`` where the
attention expects ``l2norm_groups``) and always runs with 1 group; the default ``1`` reproduces
that, and other values are honoured here.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import Attention as AttentionModule, merge_heads, split_heads
from .common import LM


class Attention(AttentionModule):
    """The seed's projections (``to_q``, ``to_k``, ``to_v``, ``to_out``, no bias) around the spec's
    attention, after a LayerNorm when ``pre_norm``. They are kernelsearch.nn.Attention's own
    projections, but registered after the norm, in the order checkpoints hold them."""

    def __init__(self, dim: int, heads: int, dim_head: int, pre_norm: bool, attn):
        super().__init__(attn, heads=heads, dim_head=dim_head, projections=False, learned=[])
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, mask=None):
        x = self.norm(x)
        q, k, v = (split_heads(f(x), self.heads) for f in (self.to_q, self.to_k, self.to_v))
        o = self.attend(q, k, v, mask=mask)
        return self.to_out(merge_heads(o.to(x.dtype)))


def FeedForward(dim: int, mult: int = 4, pre_norm: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim) if pre_norm else nn.Identity(),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class CosineSimLM(LM):
    family = "cosine_sim"
    native_spec = "cosine_sim.yaml"

    def __init__(self, *, spec, backend="auto", attn_params=None, num_tokens=256,
                 max_seq_len=256, dim=128, depth=2, heads=4, dim_head=32, ff_mult=4,
                 attn_scale=8.0, attn_l2norm_groups=1, pre_norm=False):
        super().__init__(spec=spec, backend=backend, attn_params=attn_params,
                         num_tokens=num_tokens, max_seq_len=max_seq_len)
        attn = self.build_attention(structural={"causal": True},
                                    seed={"scale": float(attn_scale), "groups": attn_l2norm_groups})
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.residual_scale = 1.0 if pre_norm else (2 * depth) ** 0.25
        self.layers = nn.ModuleList([
            nn.ModuleList([
                Attention(dim, heads, dim_head, pre_norm, attn),
                nn.LayerNorm(dim) if not pre_norm else nn.Identity(),
                FeedForward(dim, ff_mult, pre_norm),
                nn.LayerNorm(dim) if not pre_norm else nn.Identity(),
            ]) for _ in range(depth)])
        self.to_logits = nn.Sequential(nn.LayerNorm(dim) if pre_norm else nn.Identity(),
                                       nn.Linear(dim, num_tokens, bias=False))
        if not pre_norm:
            self._init(depth)

    def _init(self, depth: int) -> None:
        nn.init.normal_(self.token_emb.weight, std=1e-5)
        nn.init.normal_(self.pos_emb.weight, std=1e-5)
        gain = (8 * depth) ** -0.25
        for attn, _, ff, _ in self.layers:
            nn.init.xavier_normal_(attn.to_q.weight, gain=1.0)
            nn.init.xavier_normal_(attn.to_k.weight, gain=1.0)
            nn.init.xavier_normal_(attn.to_v.weight, gain=gain)
            nn.init.xavier_normal_(attn.to_out.weight, gain=gain)
            nn.init.xavier_normal_(ff[1].weight, gain=gain)
            nn.init.xavier_normal_(ff[3].weight, gain=gain)
        nn.init.xavier_normal_(self.to_logits[-1].weight, gain=1.0)

    def forward(self, x, mask=None):
        n = x.shape[1]
        x = self.token_emb(x) + self.pos_emb(torch.arange(n, device=x.device))
        rs = self.residual_scale
        for attn, attn_norm, ff, ff_norm in self.layers:
            x = attn_norm(attn(x, mask=mask) + x * rs)
            x = ff_norm(ff(x) + x * rs)
        return self.to_logits(x)
