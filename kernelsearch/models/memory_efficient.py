"""Seed 002: the memory-efficient-attention-pytorch LM — a reversible stack, around any spec.

- token + position embeddings; blocks ``f = PreNorm(LN, attention)``, ``g = PreNorm(LN, FF)``;
  attention: ``to_q`` and ``to_kv`` Linear without bias, ``to_out`` without bias;
  FF = Linear(d, 4d, bias) -> GELU (erf) -> Linear(4d, d, bias), optionally evaluated in
  ``ff_chunks`` chunks along the sequence (memory of the hidden layer / ff_chunks);
- the stack is a **reversible sequence** (RevNet coupling): features duplicated ``[x, x]``,
  ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``, output ``y1 + y2``. ``_ReversibleFunction`` keeps only
  the stack's output for backward and recomputes every block's activations from it, walking the
  stack backwards (``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``), so activation memory does not grow
  with depth. ``reversible=False`` evaluates the same coupling with plain autograd (the
  reference for gradient tests and memory comparisons);
- final LayerNorm + Linear with bias.

The seed attention is plain softmax ``q·k * d**-0.5`` (the spec's default); the seed's bucket
sizes are the compiler's business (the torch backend chunks keys itself). There is no dropout,
so unlike the upstream ``Deterministic`` wrapper no RNG state is recorded for the recomputation.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import Attention as AttentionModule, merge_heads, split_heads
from .common import LM


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class Attention(AttentionModule):
    """The seed's projections (``to_q``, ``to_kv``, ``to_out``: its names) around the spec's attention."""

    def __init__(self, dim: int, heads: int, dim_head: int, attn):
        super().__init__(attn, heads=heads, dim_head=dim_head, projections=False, learned=[])
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, mask=None):
        q = split_heads(self.to_q(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(x).chunk(2, dim=-1))
        o = self.attend(q, k, v, mask=mask)
        return self.to_out(merge_heads(o.to(x.dtype)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, chunks: int = 1):
        super().__init__()
        self.chunks = chunks
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        if self.chunks <= 1:
            return self.net(x)
        return torch.cat([self.net(c) for c in x.chunk(self.chunks, dim=1)], dim=1)


def _grad(out, x, params, grad_out):
    """[d out/d x, *d out/d params] contracted with grad_out; None for frozen/unused params."""
    live = [p for p in params if p.requires_grad]
    got = iter(torch.autograd.grad(out, [x, *live], grad_out, allow_unused=True))
    dx = next(got)
    return [dx, *(next(got) if p.requires_grad else None for p in params)]


class ReversibleBlock(nn.Module):
    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f = f
        self.g = g

    def forward(self, x, f_kwargs=None):
        x1, x2 = x.chunk(2, dim=-1)
        y1 = x1 + self.f(x2, **(f_kwargs or {}))
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=-1)

    def backward_pass(self, y, dy, f_kwargs=None):
        """From the block's output and its gradient: its input, the input's gradient, and the
        gradients of f's and g's parameters (in ``parameters()`` order, None where unused)."""
        f_params, g_params = list(self.f.parameters()), list(self.g.parameters())
        y1, y2 = y.chunk(2, dim=-1)
        dy1, dy2 = dy.chunk(2, dim=-1)
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            gy1 = self.g(y1)
            dy1_g, *g_grads = _grad(gy1, y1, g_params, dy2)
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + dy1_g
            del gy1, dy1_g
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_()
            fx2 = self.f(x2, **(f_kwargs or {}))
            dx2_f, *f_grads = _grad(fx2, x2, f_params, dx1)
        with torch.no_grad():
            x1 = y1.detach() - fx2
            dx2 = dy2 + dx2_f
            x = torch.cat([x1, x2.detach()], dim=-1)
            dx = torch.cat([dx1, dx2], dim=-1)
        return x, dx, f_grads + g_grads


class _ReversibleFunction(torch.autograd.Function):
    """Forward without a graph; backward recomputes each block from its output.

    The blocks' parameters are passed as inputs so that autograd hands their gradients back
    (``loss.backward()`` and ``torch.autograd.grad`` both work). Only the stack's output is saved.
    """

    @staticmethod
    def forward(ctx, x, blocks, f_kwargs, *params):
        for block in blocks:
            x = block(x, f_kwargs)
        ctx.blocks = blocks
        ctx.f_kwargs = f_kwargs
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        grads = []
        for block in reversed(ctx.blocks):
            y, dy, block_grads = block.backward_pass(y, dy, ctx.f_kwargs)
            grads = block_grads + grads
        return (dy, None, None, *grads)


class ReversibleSequence(nn.Module):
    def __init__(self, blocks: list[tuple[nn.Module, nn.Module]], reversible: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList([ReversibleBlock(f, g) for f, g in blocks])
        self.reversible = reversible

    def forward(self, x, f_kwargs=None):
        x = torch.cat([x, x], dim=-1)
        if self.reversible and torch.is_grad_enabled():
            params = [p for block in self.blocks for p in
                      (*block.f.parameters(), *block.g.parameters())]
            x = _ReversibleFunction.apply(x, list(self.blocks), f_kwargs or {}, *params)
        else:
            for block in self.blocks:
                x = block(x, f_kwargs)
        y1, y2 = x.chunk(2, dim=-1)
        return y1 + y2


class MemoryEfficientLM(LM):
    family = "memory_efficient"
    native_spec = "memory_efficient.yaml"

    def __init__(self, *, spec, backend="auto", attn_params=None, num_tokens=256,
                 max_seq_len=256, dim=128, depth=2, heads=4, dim_head=32, ff_mult=4,
                 ff_chunks=1, reversible=True):
        super().__init__(spec=spec, backend=backend, attn_params=attn_params,
                         num_tokens=num_tokens, max_seq_len=max_seq_len)
        attn = self.build_attention(structural={"causal": True})
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.net = ReversibleSequence([
            (PreNorm(dim, Attention(dim, heads, dim_head, attn)),
             PreNorm(dim, FeedForward(dim, ff_mult, ff_chunks)))
            for _ in range(depth)], reversible=reversible)
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens))

    def forward(self, x, mask=None):
        n = x.shape[1]
        x = self.token_emb(x) + self.pos_emb(torch.arange(n, device=x.device))
        x = self.net(x, f_kwargs=None if mask is None else {"mask": mask})
        return self.to_logits(x)
