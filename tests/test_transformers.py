"""kernelsearch as a transformers attention implementation: small random models, no downloads."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from kernelsearch.errors import UsageError  # noqa: E402
from kernelsearch.integrations.transformers import register  # noqa: E402

from .conftest import spec_path  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)       # 2 KV heads for 4 query heads: GQA
FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config}

SOFTMAX = register(spec_path("softmax"), name="kernelsearch_test_softmax", backend="torch")


def _models(family, name, **extra):
    """(the model with transformers' own attention, the same weights on `name`)."""
    config = FAMILIES[family](**TINY, **extra)
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _batch(b=2, n=19, pad=5):
    ids = torch.randint(0, TINY["vocab_size"], (b, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, :pad] = 0                   # left padding: the last sequence starts at `pad`
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_logits_match_transformers_attention(family, reference):
    theirs, ours = _models(family, SOFTMAX)
    theirs.set_attn_implementation(reference)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)
        got, want = ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
    kept = mask.bool()                   # padded query rows keep no key: 0 here, unspecified there
    torch.testing.assert_close(got[kept], want[kept], atol=1e-5, rtol=1e-5)


def test_generation_with_a_kv_cache_matches():
    theirs, ours = _models("llama", SOFTMAX)
    ids, _ = _batch(b=1)
    want = theirs.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step(family):
    theirs, ours = _models(family, SOFTMAX)
    ids, mask = _batch(pad=0)
    for model in (theirs, ours):
        model.train()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    for (name, p_theirs), p_ours in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, atol=1e-5, rtol=1e-4, msg=name)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    before = ours(ids, labels=ids).loss.item()
    optimizer.step()
    assert ours(ids, labels=ids).loss.item() < before


def test_a_variant_spec_end_to_end():
    # cosine-sim attention: its scale is a temperature, fixed here instead of the layer's 1/sqrt(d)
    torch_name = register(spec_path("cosine_sim"), name="kernelsearch_test_cosine", backend="torch", scale=10.0)
    ref_name = register(spec_path("cosine_sim"), name="kernelsearch_test_cosine_ref", backend="reference",
                        scale=10.0)
    _, ours = _models("qwen2", torch_name)
    _, reference = _models("qwen2", ref_name)
    _, softmax = _models("qwen2", SOFTMAX)
    ids, mask = _batch()
    out = ours(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in ours.parameters())
    with torch.no_grad():
        kept = mask.bool()
        torch.testing.assert_close(out.logits.detach()[kept], reference(ids, attention_mask=mask).logits[kept],
                                   atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out.logits.detach(), softmax(ids, attention_mask=mask).logits, atol=1e-3)
    assert ours.generate(ids[:1], min_new_tokens=3, max_new_tokens=3).shape == (1, ids.shape[1] + 3)


def test_refusals():
    with pytest.raises(UsageError, match="transformers' own attention"):
        register(spec_path("softmax"), name="sdpa")
    with pytest.raises(UsageError, match="requires the input"):
        register(spec_path("talking_heads_mlp"), name="kernelsearch_test_mlp")
    with pytest.raises(Exception, match="unknown param"):
        register(spec_path("softmax"), name="kernelsearch_test_typo", casual=True)
    _, ours = _models("llama", SOFTMAX, attention_dropout=0.1)
    ids, _ = _batch()
    ours.eval()
    ours(ids)                                          # no dropout at inference: fine
    ours.train()
    with pytest.raises(UsageError, match="no attention dropout"):
        ours(ids)
    config = MistralConfig(**TINY, sliding_window=8)
    mistral = AutoModelForCausalLM.from_config(config, attn_implementation=SOFTMAX)
    with pytest.raises(UsageError, match="sliding window"):
        mistral(ids)
