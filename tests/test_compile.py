"""The generated torch code runs under torch.compile(fullgraph=True): no graph breaks."""
import pytest
import torch

import kernelsearch
from kernelsearch.inputs import random_inputs

from .conftest import SPECS, spec_path


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("lowering", ["materialized", "chunked"])
def test_fullgraph_compile_matches_reference(name, lowering):
    torch._dynamo.reset()
    params = {"window_size": 8} if name == "local" else {}
    compiled = kernelsearch.load(spec_path(name), backend="torch",
                                 config={"lowering": lowering, "CHUNK_N": 16, "compile": True}, **params)
    reference = kernelsearch.load(spec_path(name), backend="reference", **params)
    tensors = random_inputs(reference.spec, dict(B=2, H=2, I=19, J=40, D=16), params=params)
    expected = reference(**{n: t.double() if t.is_floating_point() else t for n, t in tensors.items()})
    got = compiled(**tensors)   # fullgraph=True raises on any graph break
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-5)


def test_model_calling_attention_compiles_fullgraph_with_backward():
    torch._dynamo.reset()
    attention = kernelsearch.load(spec_path("cosine_sim"), backend="torch",
                                  config={"lowering": "chunked", "CHUNK_N": 16})
    projection = torch.nn.Linear(16, 48)

    def block(x):                                   # [b, n, 16]
        q, k, v = projection(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return attention(q, k, v).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # tracing + autograd; inductor is covered above
    x = torch.randn(2, 24, 16)
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, block(x))
    assert projection.weight.grad is not None and torch.isfinite(projection.weight.grad).all()


def test_compiled_chunked_lowering_compiles_one_step_not_every_chunk():
    """compile=True compiles the chunked lowering's step function (one tile), not its unrolled
    loops: 8 x 12 tiles (short last chunks on both axes) compile a handful of graphs, so compile
    time does not grow with the sequence length."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params = {"window_size": 8}
    compiled = kernelsearch.load(spec_path("local"), backend="torch",
                                 config={"lowering": "chunked", "CHUNK_N": 8, "CHUNK_M": 12, "compile": True}, **params)
    reference = kernelsearch.load(spec_path("local"), backend="reference", **params)
    tensors = random_inputs(reference.spec, dict(B=1, H=2, I=90, J=93, D=16), params=params)
    expected = reference(**{n: t.double() if t.is_floating_point() else t for n, t in tensors.items()})
    torch.testing.assert_close(compiled(**tensors).double(), expected, rtol=2e-4, atol=2e-5)
    assert 1 <= counters["stats"]["unique_graphs"] <= 4


@pytest.mark.parametrize("name, lowering", [("local", "sdpa"), ("cosine_sim", "sdpa"), ("local", "flex")])
def test_library_lowerings_compile_fullgraph(name, lowering):
    """sdpa and flex with compile=True: their prologues, masks and block masks trace without breaks."""
    torch._dynamo.reset()
    params = {"window_size": 8} if name == "local" else {}
    compiled = kernelsearch.load(spec_path(name), backend="torch", config={"lowering": lowering, "compile": True},
                                 **params)
    reference = kernelsearch.load(spec_path(name), backend="reference", **params)
    tensors = random_inputs(reference.spec, dict(B=2, H=2, I=19, J=40, D=16), params=params)
    expected = reference(**{n: t.double() if t.is_floating_point() else t for n, t in tensors.items()})
    with torch.no_grad():
        got = compiled(**tensors)
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-5)


def test_compiled_whole_rows_step_matches_reference():
    """Two-pass talking heads with one key chunk holding every key (whole_rows_step), compiled."""
    torch._dynamo.reset()
    compiled = kernelsearch.load(spec_path("talking_heads"), backend="torch",
                                 config={"lowering": "chunked", "CHUNK_N": 64, "CHUNK_M": 8, "compile": True})
    reference = kernelsearch.load(spec_path("talking_heads"), backend="reference")
    tensors = random_inputs(reference.spec, dict(B=2, H=2, I=19, J=40, D=16))
    expected = reference(**{n: t.double() if t.is_floating_point() else t for n, t in tensors.items()})
    got = compiled(**tensors)
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-5)
    assert compiled.last_config["CHUNK_N"] >= 40
