"""Seed 004: ``MultiStreamTransformer`` (quartic-transformer), around any spec.

- The batch is laid out ``(b s)`` for ``s = num_streams`` streams. Embeddings: shared token +
  position embeddings plus a learned per-stream embedding (N(0, 0.02)), or, with
  ``separate_stream_emb``, separate token and position tables per stream (N(0, 0.02)).
- Blocks ``x = x + attn(x); x = ff(x) + x``. Attention: RMSNorm (``x * rsqrt(mean(x²) + 1e-5) *
  scale[d]``) -> qkv Linear without bias -> the spec's attention -> per-head gate
  ``sigmoid(Linear(x_normed) -> heads)`` (with bias) -> output Linear without bias.
  FF = RMSNorm -> Linear -> GELU -> Linear, no biases.
- Logits: sum over streams -> RMSNorm -> Linear without bias.
- **Talking heads** are the spec's job: each layer's attention is a ``kernelsearch.nn.Attention``
  that owns the mixing weights as the spec's learned inputs — ``learned["pre_mix"]`` /
  ``learned["post_mix"]`` of shape ``[s*h, s*h]`` (a 1x1 convolution's weight, output head first,
  heads ordered ``(s h)``), identity (dirac) init, only those that are on — with structural params
  ``num_streams``, ``pre_talking_heads``, ``post_talking_heads``.
  ``cross_stream_talking_heads=False`` mixes heads within each stream only (upstream's
  ``ablate_cross_stream_talking_heads``).
- Seed param (with ``specs/talking_heads.yaml``): ``scale = +sqrt(dim_head)`` (upstream quirk).
- ``causal`` is passed as True: upstream's LM never sets it (its attention defaults to
  non-causal), which makes next-token training leak the answer; an LM must be causal here.
- Not reproduced (upstream bugs, SEMANTICS.md §5): identity init applied to absent mixers;
  separate position embeddings indexed by tokens; the mixing group hard-coded to 2 streams.
- ``non_linear_talking_heads``: upstream's ``TalkingHeadsFeedForward`` (a residual MLP over the
  ``(s h)`` channels: RMSNorm over channels -> 1x1 conv to 2C -> GELU -> 1x1 conv back, the last
  zero-initialised) before and/or after softmax, with ``specs/talking_heads_mlp.yaml``: the model
  owns the weights and passes them as that spec's inputs (``TalkingHeadsMLP.inputs``).

**Stream-diversity auxiliary loss** (``stream_diversity_weight > 0`` and ``s > 1``):
upstream's ``calc_stream_loss`` on each layer's post-softmax (pre-post-mix) attention
``p [(b s), h, i, j]``: for every choice of one head per stream, the mean of their
distributions; the loss is minus its entropy over ``j``, averaged, summed over layers, times the
weight. Upstream's entropy helper clamps where it meant to take a log (``log(t) =
t.clamp(min=eps)``); we use the real log.

The attention callable returns only ``o``, so ``p`` is recovered *through the same compiled
attention*: calling it with ``v = `` a slice of the identity over ``j`` gives ``o = p @ v = `` the
matching columns of ``p``. ``ceil(J / d)`` calls with ``d``-wide identity slices (zero-padded)
give all of ``p``, differentiable with respect to q, k and ``pre_mix``; the probe attention is
built with ``post_talking_heads=False`` so that ``p`` is taken before the post-softmax mixing,
as upstream does. Cost: ``J / d`` extra attention calls per layer, only when the loss is on.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from ..nn import Attention as AttentionModule, merge_heads
from .common import LM, load_legacy_learned_keys


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def calc_stream_loss(attn: torch.Tensor, streams: int) -> torch.Tensor:
    """-entropy over j of the mean of one head per stream, for every such choice:
    attn [(b s), h, i, j] -> [b, h**s, i]."""
    a = rearrange(attn, "(b s) h i j -> s b h i j", s=streams)
    accum = a[0]
    for rest in a[1:]:   # every pair (heads so far, head of this stream)
        pairs = rearrange(accum, "b h i j -> b h 1 i j") + rearrange(rest, "b h i j -> b 1 h i j")
        accum = rearrange(pairs, "b h1 h2 i j -> b (h1 h2) i j")
    mean = accum / streams
    return (mean * torch.log(mean.clamp(min=1e-20))).sum(-1)


class TalkingHeadsMLP(nn.Module):
    """Upstream's TalkingHeadsFeedForward (mult 2) as inputs of specs/talking_heads_mlp.yaml:
    x + W2 gelu(W1 (x * rsqrt(mean_c x^2 + eps) * g)) over C channels. The spec mixes C channels at a
    time, so the 2C hidden channels go in two halves; the norm scale g is folded into W1."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.up = nn.Parameter(torch.empty(2 * channels, channels))
        nn.init.kaiming_uniform_(self.up, a=math.sqrt(5))           # nn.Conv2d's default init
        self.down = nn.Parameter(torch.zeros(channels, 2 * channels))  # zero init: starts as identity

    def inputs(self, prefix: str) -> dict:
        c = self.scale.numel()
        up = self.up * self.scale[None, :]
        return {f"{prefix}_up_a": up[:c], f"{prefix}_up_b": up[c:],
                f"{prefix}_down_a": self.down[:, :c], f"{prefix}_down_b": self.down[:, c:]}


class Attention(AttentionModule):
    """The seed's attention block around the spec's attention. Linear talking heads: the mixers
    that are on are the spec's learned inputs (``learned["pre_mix"]``, ``learned["post_mix"]``);
    non-linear: ``TalkingHeadsMLP`` modules ``pre_mix``/``post_mix`` whose weights go per call."""

    def __init__(self, *, dim: int, heads: int, dim_head: int, mix_streams: int,
                 pre_talking_heads: bool, post_talking_heads: bool, attn, probe=None,
                 non_linear: bool = False):
        mixers = [name for name, on in (("pre_mix", pre_talking_heads), ("post_mix", post_talking_heads)) if on]
        super().__init__(attn, heads=heads, dim_head=dim_head, projections=False,
                         learned=[] if non_linear else mixers)
        inner = heads * dim_head
        all_heads = mix_streams * heads
        self.rmsnorm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.non_linear = non_linear
        if non_linear:
            self.pre_mix = TalkingHeadsMLP(all_heads) if pre_talking_heads else None
            self.post_mix = TalkingHeadsMLP(all_heads) if post_talking_heads else None
            # the spec's inputs are all required: the channel mean, and zeros for a disabled MLP's weights
            self.register_buffer("head_mean", torch.full((all_heads, all_heads), 1.0 / all_heads), persistent=False)
            self.register_buffer("no_mix", torch.zeros(all_heads, all_heads), persistent=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        load_legacy_learned_keys(self)
        object.__setattr__(self, "probe", probe)

    def _inputs(self, mask) -> dict:
        """The inputs passed per call: the mask, and the non-linear mixers' weights."""
        if not self.non_linear:
            return {"mask": mask}
        inputs = {"mask": mask, "head_mean": self.head_mean}
        for prefix, mlp in (("pre", self.pre_mix), ("post", self.post_mix)):
            if mlp is not None:
                inputs.update(mlp.inputs(prefix))
            else:
                inputs.update({f"{prefix}_{part}": self.no_mix for part in ("up_a", "up_b", "down_a", "down_b")})
        return inputs

    def forward(self, x, mask=None, return_probs=False):
        x = self.rmsnorm(x)
        q, k, v = rearrange(self.to_qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)
        out = self.attend(q, k, v, **self._inputs(mask)).to(x.dtype)
        out = out * rearrange(self.to_gates(x), "b n h -> b h n 1").sigmoid()
        out = self.to_out(merge_heads(out))
        if not return_probs:
            return out, None
        return out, self.probabilities(q, k, mask)

    def probabilities(self, q, k, mask=None):
        """Post-softmax, pre-post-mix attention [(b s), h, i, j] through the probe attention
        (built without post-softmax mixing, so it does not read post_mix)."""
        bs, h, n_j, d = k.shape
        eye = torch.eye(n_j, dtype=q.dtype, device=q.device)
        inputs = self.inputs(**self._inputs(mask))
        cols = []
        for start in range(0, n_j, d):
            v = eye[:, start:start + d]
            width = v.shape[1]
            v = F.pad(v, (0, d - width)).expand(bs, h, n_j, d)
            cols.append(self.probe(q, k, v, **inputs)[..., :width])
        return torch.cat(cols, dim=-1).to(q.dtype)


def FeedForward(dim: int, mult: float = 4) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(RMSNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class TokenAndPosEmb(nn.Module):
    def __init__(self, *, dim, num_tokens, max_seq_len, num_streams):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.stream_emb = nn.Parameter(torch.randn(num_streams, dim) * 0.02)

    def forward(self, x):
        n = x.shape[-1]
        e = self.token_emb(x) + self.pos_emb(torch.arange(n, device=x.device))
        e = rearrange(e, "b n d -> b 1 n d") + rearrange(self.stream_emb, "s d -> 1 s 1 d")
        return rearrange(e, "b s n d -> (b s) n d")


class SeparateTokenAndPosEmb(nn.Module):
    def __init__(self, *, dim, num_tokens, max_seq_len, num_streams):
        super().__init__()
        self.token_emb = nn.Parameter(torch.randn(num_streams, num_tokens, dim) * 0.02)
        self.pos_emb = nn.Parameter(torch.randn(num_streams, max_seq_len, dim) * 0.02)

    def forward(self, x):
        n = x.shape[-1]
        tok = rearrange(self.token_emb[:, x], "s b n d -> b s n d")
        e = tok + rearrange(self.pos_emb[:, :n], "s n d -> 1 s n d")      # positions, not tokens
        return rearrange(e, "b s n d -> (b s) n d")


class TalkingHeadsLM(LM):
    family = "talking_heads"
    native_spec = "talking_heads.yaml"

    def __init__(self, *, spec, backend="auto", attn_params=None, num_tokens=256,
                 max_seq_len=256, dim=128, depth=2, heads=4, dim_head=32, ff_mult=4,
                 num_streams=2, pre_talking_heads=True, post_talking_heads=True,
                 cross_stream_talking_heads=True, separate_stream_emb=False,
                 stream_diversity_weight=0.0, non_linear_talking_heads=False):
        super().__init__(spec=spec, backend=backend, attn_params=attn_params,
                         num_tokens=num_tokens, max_seq_len=max_seq_len)
        self.num_streams = num_streams
        mix_streams = num_streams if cross_stream_talking_heads else 1
        structural = {"causal": True}
        if pre_talking_heads or post_talking_heads:
            structural.update(num_streams=mix_streams, pre_talking_heads=pre_talking_heads,
                              post_talking_heads=post_talking_heads)
        seed = {"scale": math.sqrt(dim_head)}
        if non_linear_talking_heads:
            self.native_spec = "talking_heads_mlp.yaml"
        attn = self.build_attention(structural, seed)
        mlp_spec = "head_mean" in attn.spec.inputs
        if non_linear_talking_heads != mlp_spec:
            raise ValueError(f"non_linear_talking_heads={non_linear_talking_heads} needs a spec "
                             f"{'with' if non_linear_talking_heads else 'without'} the talking-heads MLP's inputs "
                             f"(specs/{'talking_heads_mlp' if non_linear_talking_heads else 'talking_heads'}.yaml); "
                             f"got {self.spec}")
        self.stream_diversity_weight = float(stream_diversity_weight)
        probe = None
        if self.stream_diversity_weight > 0 and num_streams > 1:
            probe = (self.build_attention(structural, seed, post_talking_heads=False)
                     if post_talking_heads else attn)
        self.set_attention("probe", probe)
        emb = SeparateTokenAndPosEmb if separate_stream_emb else TokenAndPosEmb
        self.emb = emb(dim=dim, num_tokens=num_tokens, max_seq_len=max_seq_len,
                       num_streams=num_streams)
        self.layers = nn.ModuleList([
            nn.ModuleList([
                Attention(dim=dim, heads=heads, dim_head=dim_head, mix_streams=mix_streams,
                          pre_talking_heads=pre_talking_heads,
                          post_talking_heads=post_talking_heads, attn=attn, probe=probe,
                          non_linear=non_linear_talking_heads),
                FeedForward(dim, ff_mult),
            ]) for _ in range(depth)])
        self.final_norm = RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def _run(self, x, mask, with_probs):
        s = self.num_streams
        x = self.emb(x)
        if mask is not None:
            mask = repeat(mask, "b j -> (b s) j", s=s)
        probs = []
        for attn, ff in self.layers:
            out, p = attn(x, mask=mask, return_probs=with_probs)
            probs.append(p)
            x = x + out
            x = ff(x) + x
        x = reduce(x, "(b s) n d -> b n d", "sum", s=s)
        return self.to_logits(self.final_norm(x)), probs

    def forward(self, x, mask=None):
        return self._run(x, mask, with_probs=False)[0]

    def forward_with_aux(self, x, mask=None):
        if self.probe is None:
            return self(x, mask=mask), None
        logits, probs = self._run(x, mask, with_probs=True)
        aux = sum(calc_stream_loss(p, self.num_streams).mean() for p in probs)
        return logits, aux * self.stream_diversity_weight
