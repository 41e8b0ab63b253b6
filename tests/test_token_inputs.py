"""Inputs an LM makes from its tokens (kernelsearch/models/token_inputs.py): document ids from the
corpus's separators, a prefix length; end to end, a document-masked LM cannot see other documents
and a prefix LM's prefix is bidirectional while its loss leaves out what the prefix reveals."""
from __future__ import annotations

import pytest
import torch

from kernelsearch.errors import UsageError
from kernelsearch.models import token_inputs
from kernelsearch.models.config import build_model, resolve_model
from kernelsearch.models.data import SEPARATOR

from .conftest import spec_path

SEP = SEPARATOR[0]


def _model(spec: str, family: str = "mesh_tf", **model):
    cfg = resolve_model(family, spec_path(spec))
    cfg.model.update(dict(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64), **model)
    torch.manual_seed(0)
    return build_model(cfg, backend="torch").eval()


def test_document_ids_count_the_separators_before_each_position():
    tokens = torch.tensor([[5, SEP, 7, 7, SEP, SEP, 9], [1, 2, 3, 4, 5, 6, 7]])
    rules = (token_inputs.TokenInput("q_doc", "document_ids"),)
    ids = token_inputs.make(rules, tokens)["q_doc"]
    # a separator belongs to the document it ends
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0] * 7]


def test_a_document_masked_lm_does_not_see_other_documents():
    model = _model("document")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 256, (1, 40), generator=g)
    tokens[0, 12] = SEP                                   # document 0: positions 0..12, document 1: 13..
    other = tokens.clone()
    other[0, :12] = torch.randint(1, 256, (12,), generator=g)   # a different first document
    with torch.no_grad():
        a, b = model(tokens), model(other)
    assert torch.equal(a[0, 13:], b[0, 13:])             # bitwise: nothing of document 0 reaches document 1
    assert not torch.allclose(a[0, :12], b[0, :12])


def test_a_prefix_lm_sees_its_prefix_both_ways_and_does_not_learn_from_it():
    model = _model("prefix_lm")
    n = 40
    prefix = token_inputs.prefix_length(torch.zeros(1, n))
    assert prefix == 10
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 256, (1, n), generator=g)
    inside, outside = tokens.clone(), tokens.clone()
    inside[0, prefix - 1] += 1                           # the last token of the prefix
    outside[0, prefix + 5] += 1                          # a token after it
    with torch.no_grad():
        base, a, b = model(tokens), model(inside), model(outside)
    assert not torch.allclose(base[0, 0], a[0, 0])       # position 0 sees the prefix's last token
    assert torch.equal(base[0, : prefix + 5], b[0, : prefix + 5])   # causal after the prefix
    counted = token_inputs.loss_mask(model.token_input_rules(), tokens)
    assert counted[0].tolist() == [p >= prefix - 1 for p in range(n)]
    # the loss is the mean over the counted positions only
    batch = torch.randint(1, 256, (2, n + 1), generator=g)
    with torch.no_grad():
        loss, _ = model.loss(batch)
        logits = model(batch[:, :-1])
    terms = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="none")
    assert torch.allclose(loss, terms[:, prefix - 1:].mean())


def test_specs_whose_inputs_an_lm_cannot_make_or_pass_are_refused():
    with pytest.raises(UsageError, match="does not pass q_doc, k_doc to its attention.*--model mesh_tf"):
        _model("document", family="cosine_sim")
    spec = """
name: per_pair
params: {}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  pair: {shape: [b, i, j], dtype: int}
graph:
  s: dot(q, k) + to_float(pair)
  p: softmax(s)
  o: dot(p, v)
outputs: [o]
"""
    import kernelsearch
    attn = kernelsearch.load(spec, backend="torch")
    with pytest.raises(UsageError, match=r"cannot make the input 'pair' \[b, i, j\] \(int\).*int \[b\]"):
        token_inputs.token_input_rules(attn.spec, set(), "mesh_tf")


def test_inputs_shaped_like_q_or_k_are_projected_per_layer():
    """diff_attn's q2 (like q) and k2 (like k, so at the KV heads) are projections of the layer's
    input; lam [h] is learned; nothing is made from tokens."""
    model = _model("diff_attn", kv_heads=1)
    layer = model.attention_layers()[0]
    assert token_inputs.projected_inputs(model.attn.spec) == {"q2": "query", "k2": "key"}
    assert {n: t.out_features for n, t in layer.to_inputs.items()} == {"q2": 2 * 16, "k2": 1 * 16}
    assert list(layer.learned) == ["lam"] and model.token_input_rules() == ()
    tokens = torch.randint(1, 256, (2, 17))
    loss, _ = model.loss(tokens)
    loss.backward()
    assert layer.to_inputs["k2"].weight.grad.abs().sum() > 0 and layer.learned["lam"].grad is not None
