"""Seed 000: the mesh-tensorflow LM (attention-tensorflow-mesh), in PyTorch.

- token embedding + learned absolute position embedding (TF's default glorot-uniform init);
- ``depth`` pre-norm residual blocks ``x = attn(scale_norm(x)) + x; x = ff(scale_norm(x)) + x``,
  scale_norm = LayerNorm without affine (eps 1e-5) times one learned scalar ``g`` (init 1);
- attention: one qkv Linear without bias (q | k | v contiguous), output Linear with bias;
- FF: Linear(d, 4d, bias) -> tanh-approximate GELU (``mtf.gelu``) -> Linear(4d, d, bias);
- no final norm; logits Linear with bias. Linear weights ~ N(0, 1/sqrt(fan_in)), biases 0.

Grouped KV heads (``kv_heads``, default ``heads``: the seed): the qkv Linear makes ``heads``
query heads and ``kv_heads`` key and value heads (q | k | v contiguous), passed to the spec as
they are (``specs/gqa.yaml``, or any spec: query head h reads KV head h // (heads / kv_heads)).

Seed attention params (with ``specs/softmax.yaml``): ``scale = 1`` (the seed's einsum does not
scale scores). The seed's ``dim_head`` argument is the number of heads; here ``heads`` is the
number of heads and ``dim_head`` the head size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Attention as AttentionModule, merge_heads, required_learnable, split_heads
from .common import LM
from .token_inputs import projected_inputs


def _linear(dim_in: int, dim_out: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(dim_in, dim_out, bias=bias)
    nn.init.normal_(lin.weight, std=1 / math.sqrt(dim_in))
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class ScaleNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.g = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return F.layer_norm(x, (self.dim,), eps=self.eps) * self.g


class Attention(AttentionModule):
    """The seed's projections (its names) around the spec's attention."""

    def __init__(self, dim: int, heads: int, dim_head: int, attn, kv_heads: int | None = None):
        # a foreign spec's required tables (T5's bias_table, sink logits) are learned per layer
        super().__init__(attn, heads=heads, dim_head=dim_head, kv_heads=kv_heads, projections=False,
                         learned=required_learnable(attn))
        self.to_qkv = _linear(dim, (heads + 2 * self.kv_heads) * dim_head, bias=False)
        self.combine_output = _linear(heads * dim_head, dim)
        # a foreign spec's inputs shaped like q or k (differential attention's q2, k2): projected as they are
        self.to_inputs = nn.ModuleDict({
            name: _linear(dim, (heads if role == "query" else self.kv_heads) * dim_head, bias=False)
            for name, role in projected_inputs(attn.spec).items()})

    def forward(self, x, mask=None, **inputs):
        sizes = [self.heads * self.dim_head, self.kv_heads * self.dim_head, self.kv_heads * self.dim_head]
        q, k, v = (split_heads(t, n // self.dim_head) for t, n in zip(self.to_qkv(x).split(sizes, dim=-1), sizes))
        projected = {name: split_heads(to(x), to.out_features // self.dim_head) for name, to in self.to_inputs.items()}
        o = self.attend(q, k, v, mask=mask, **inputs, **projected)
        return self.combine_output(merge_heads(o.to(x.dtype)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.w1 = _linear(dim, dim * mult)
        self.w2 = _linear(dim * mult, dim)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class MeshTFLM(LM):
    family = "mesh_tf"
    native_spec = "softmax.yaml"
    makes_token_inputs = True

    def __init__(self, *, spec, backend="auto", attn_params=None, num_tokens=256,
                 max_seq_len=256, dim=128, depth=2, heads=4, dim_head=32, ff_mult=4, kv_heads=None):
        super().__init__(spec=spec, backend=backend, attn_params=attn_params,
                         num_tokens=num_tokens, max_seq_len=max_seq_len)
        attn = self.build_attention(structural={"causal": True}, seed={"scale": 1.0})
        self.wte = nn.Embedding(num_tokens, dim)
        self.wpe = nn.Embedding(max_seq_len, dim)
        nn.init.xavier_uniform_(self.wte.weight)     # tf.get_variable's default initializer
        nn.init.xavier_uniform_(self.wpe.weight)
        self.layers = nn.ModuleList([
            nn.ModuleList([ScaleNorm(dim), Attention(dim, heads, dim_head, attn, kv_heads),
                           ScaleNorm(dim), FeedForward(dim, ff_mult)])
            for _ in range(depth)])
        self.to_logits = _linear(dim, num_tokens)

    def forward(self, x, mask=None):
        n = x.shape[1]
        inputs = self.token_inputs(x)          # document ids, a prefix length: what the spec needs
        x = self.wte(x) + self.wpe(torch.arange(n, device=x.device))
        for norm1, attn, norm2, ff in self.layers:
            x = attn(norm1(x), mask=mask, **inputs) + x
            x = ff(norm2(x)) + x
        return self.to_logits(x)
