"""Non-linear talking heads (specs/talking_heads_mlp.yaml, seed 004's non_linear_talking_heads).

The seed's TalkingHeadsFeedForward over the C = s*h channels of a sample,
x + W2 gelu(W1 (x * rsqrt(mean_c x^2 + eps) * g)), is written here once, directly from the seed
(`seed_mlp`), and the spec - fed the weights the way the LM's TalkingHeadsMLP feeds them - is
checked against it in float64; then the torch backend (both lowerings) and the triton kernels
(interpreter, forward and backward) against the reference, and the LM with the option on.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernelsearch
from kernelsearch.models.talking_heads import TalkingHeadsMLP
from tests.test_triton_bwd import gradients
from tests.test_triton_fwd import interpreter  # noqa: F401

SPEC = "specs/talking_heads_mlp.yaml"
S, H, I, J, D = 2, 2, 17, 33, 16
C = S * H


def seed_mlp(x, W1, W2, g, eps=1e-5):
    """TalkingHeadsFeedForward on [b, c, i, j]: Residual(Norm over c -> conv 2C -> GELU -> conv C)."""
    n = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * g[None, :, None, None]
    return x + torch.einsum("oc,bcij->boij", W2, F.gelu(torch.einsum("oc,bcij->boij", W1, n)))


def seed_attention(q, k, v, mask, pre, post, causal=False):
    b = q.shape[0] // S
    sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
    if pre is not None:
        sim = seed_mlp(sim.reshape(b, C, I, J), *pre).reshape(b * S, H, I, J)
    keep = mask[:, None, None, :].expand(-1, H, I, -1)
    if causal:
        keep = keep & torch.ones(I, J, dtype=torch.bool).tril(J - I)
    attn = sim.masked_fill(~keep, float("-inf")).softmax(-1)
    attn = torch.where(keep.any(-1, keepdim=True), attn, torch.zeros_like(attn))   # kernelsearch: empty rows 0
    if post is not None:
        attn = seed_mlp(attn.reshape(b, C, I, J), *post).reshape(b * S, H, I, J)
    return torch.einsum("bhij,bhjd->bhid", attn, v)


def problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2 * S, H, n, D, generator=g, dtype=dtype) for n in (I, J, J))
    mask = torch.rand(2 * S, J, generator=g) > 0.2
    mask[-S:] = False        # the last sample's streams keep nothing: fully-masked rows

    def weights():
        mlp = TalkingHeadsMLP(C).to(dtype)
        with torch.no_grad():       # non-zero down projection and norm scale, so every path matters
            mlp.up.copy_(torch.randn(2 * C, C, generator=g, dtype=dtype) * 0.5)
            mlp.down.copy_(torch.randn(C, 2 * C, generator=g, dtype=dtype) * 0.5)
            mlp.scale.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
        return mlp
    pre, post = weights(), weights()
    inputs = {"q": q, "k": k, "v": v, "mask": mask, "head_mean": torch.full((C, C), 1.0 / C, dtype=dtype)}
    with torch.no_grad():
        inputs.update(pre.inputs("pre"))
        inputs.update(post.inputs("post"))
    return inputs, pre, post


@pytest.mark.parametrize("pre_on,post_on,causal", [(True, True, False), (True, False, True), (False, True, False)])
def test_reference_matches_the_seed(pre_on, post_on, causal):
    inputs, pre, post = problem()
    params = {"pre_talking_heads": pre_on, "post_talking_heads": post_on, "causal": causal}
    out = kernelsearch.load(SPEC, backend="reference", **params)(**inputs)
    expected = seed_attention(inputs["q"], inputs["k"], inputs["v"], inputs["mask"],
                              (pre.up.detach(), pre.down.detach(), pre.scale.detach()) if pre_on else None,
                              (post.up.detach(), post.down.detach(), post.scale.detach()) if post_on else None,
                              causal)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def _compare(attn, tol):
    inputs, _, _ = problem()
    out, grads = gradients(attn, inputs, torch.float32)
    ref_out, ref_grads = gradients(kernelsearch.load(SPEC, backend="reference"), inputs, torch.float64)
    assert (out.double() - ref_out).abs().max() < tol
    for n, g in ref_grads.items():
        assert torch.isfinite(grads[n]).all(), n
        err = (grads[n].double() - g).abs().max().item() / max(1.0, g.abs().max().item())
        assert err < tol, (n, err)


@pytest.mark.parametrize("lowering", ["materialized", "chunked"])
def test_torch_backend(lowering):
    config = {"lowering": lowering, "CHUNK_N": 8} if lowering == "chunked" else {"lowering": lowering}
    _compare(kernelsearch.load(SPEC, backend="torch", config=config), 2e-4)


def test_triton_forward_and_backward(interpreter):
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_M_BWD": 16, "BLOCK_N_BWD": 16}
    _compare(kernelsearch.load(SPEC, backend="triton", config=config), 5e-4)


def test_aot_forward_compiles_for_sm90():
    from kernelsearch.codegen.triton_aot import aot_check
    result = aot_check(SPEC, {}, None, arch=90, sizes={"d": 64, "h": 4})
    assert result["ok"], result["error"]


def test_lm_with_non_linear_talking_heads_trains():
    from kernelsearch.models import data as lm_data, train as lm_train
    from kernelsearch.models.config import ModelConfig, TrainConfig
    from tests.test_models import TINY, TINY_TRAIN
    cfg = ModelConfig(family="talking_heads", spec=SPEC,
                      model={**TINY, "num_streams": 2, "non_linear_talking_heads": True},
                      train=TrainConfig(**TINY_TRAIN))
    corpus = lm_data.load_corpus(TINY_TRAIN["corpus_bytes"])
    losses = {}
    for backend in ("reference", "torch"):
        model = lm_train.make_model(cfg, backend, seed=0)
        assert any("up" in n for n, _ in model.named_parameters())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses[backend] = lm_train.train_steps(model, opt, corpus, cfg, 3, generator=torch.Generator().manual_seed(0),
                                               progress=False)
    torch.testing.assert_close(torch.tensor(losses["torch"]), torch.tensor(losses["reference"]), rtol=1e-4, atol=1e-5)


def test_lm_refuses_a_spec_without_the_mlp_inputs():
    from kernelsearch.models.talking_heads import TalkingHeadsLM
    with pytest.raises(ValueError, match="talking_heads_mlp"):
        TalkingHeadsLM(spec="specs/talking_heads.yaml", backend="reference", dim=32, depth=1, heads=2, dim_head=8,
                       non_linear_talking_heads=True)
