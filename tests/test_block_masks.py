"""Block masks from any keep-predicate (issue 13 item 6): passes/block_mask.py's plan decision, the
generated block_mask() (runtime/block_masks.py), the torch chunked lowering skipping chunk pairs
and the Triton forward, dq and dk/dv kernels iterating the listed blocks.

Every result is compared with an independent float64 definition written here: document masking
(uneven documents, I != J, per-query and per-key ids, a query whose document has no key), prefix
LM (prefix_len per batch), and two predicates of indices only written in this file's specs - a
2-D neighbourhood on a grid and a per-head window - with causal on and off, key padding, sizes
that do not divide the tiles, and the gradients of every float input. What is skipped is counted
(the lists against a brute force over the definition's keep; the chunked lowering's steps), not
timed; the kernels are shown to read the lists (an emptied list empties the output).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import kernelsearch
from kernelsearch.backends import loader
from kernelsearch.codegen.files import torch_file, triton_file
from kernelsearch.compiler import compile_graph
from kernelsearch.runtime import block_masks
from kernelsearch.spec import load_spec, parse_spec
from tests.test_ops import interpreter  # noqa: F401 (a fixture)

from .conftest import spec_path

FP32 = dict(rtol=2e-4, atol=2e-4)
FP32_GRAD = dict(rtol=1e-3, atol=1e-3)

NEIGHBOURHOOD = """\
name: neighbourhood
summary: 2-D neighbourhood attention - positions on a grid of `width` columns, keys within `radius` rows and columns.
params:
  scale: {type: float, default: "D ** -0.5"}
  width: {type: int, default: 5}
  radius: {type: int, default: 1}
  causal: {type: bool, default: false}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  mask: {shape: [b, j], dtype: bool, optional: true}
graph:
  s: dot(q, k) * scale
  rows_near: abs(i // width - j // width) <= radius
  columns_near: abs(i % width - j % width) <= radius
  causal_keep: (j <= i + J - I) if causal else None
  p: softmax(s, keep=[rows_near, columns_near, causal_keep, mask])
  o: dot(p, v)
outputs: [o]
"""

HEAD_WINDOW = """\
name: head_window
summary: Causal attention whose window grows with the head - head h keeps the last (h + 1) * window keys.
params:
  scale: {type: float, default: "D ** -0.5"}
  window: {type: int, default: 6}
  causal: {type: bool, default: true}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  mask: {shape: [b, j], dtype: bool, optional: true}
graph:
  s: dot(q, k) * scale
  head_window: i + J - I - j < (h + 1) * window
  causal_keep: (j <= i + J - I) if causal else None
  p: softmax(s, keep=[head_window, causal_keep, mask])
  o: dot(p, v)
outputs: [o]
"""
SHARPENED_DOCUMENTS = """\
name: sharpened_documents
summary: Document masking with squared probabilities - not linear in p, so two sweeps (exact softmax) and a delta sweep.
params:
  scale: {type: float, default: "D ** -0.5"}
  causal: {type: bool, default: true}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  q_doc: {shape: [b, i], dtype: int}
  k_doc: {shape: [b, j], dtype: int}
  mask: {shape: [b, j], dtype: bool, optional: true}
graph:
  s: dot(q, k) * scale
  causal_keep: (j <= i + J - I) if causal else None
  p: softmax(s, keep=[q_doc == k_doc, causal_keep, mask])
  o: dot(p * p, v)
outputs: [o]
"""
TALKING_DOCUMENTS = """\
name: talking_documents
summary: Document masking with talking heads - logits mixed across a sample's (stream, head) channels; a program holds them all.
params:
  scale: {type: float, default: "D ** -0.5"}
  causal: {type: bool, default: true}
  num_streams: {type: int, default: 2}
inputs:
  q: [b, h, i, d]
  k: [b, h, j, d]
  v: [b, h, j, d]
  q_doc: {shape: [b, i], dtype: int}
  k_doc: {shape: [b, j], dtype: int}
  pre_mix: {shape: [mix_out, mix_in]}
graph:
  s: dot(q * scale, k)
  s_mixed: mix_heads(s, pre_mix, streams=num_streams)
  causal_keep: (j <= i + J - I) if causal else None
  p: softmax(s_mixed, keep=[q_doc == k_doc, causal_keep])
  o: dot(p, v)
outputs: [o]
"""
SPEC_TEXT = {"talking_documents": TALKING_DOCUMENTS, "neighbourhood": NEIGHBOURHOOD, "head_window": HEAD_WINDOW, "sharpened_documents": SHARPENED_DOCUMENTS}


# ------------------------------------------------------------------------- the definitions (float64)

def _grid(I, J):
    """i as a column, j as a row, and the query's position among the keys (bottom-right aligned)."""
    i, j = torch.arange(I)[:, None], torch.arange(J)[None, :]
    return i, j, i + J - I


def keep_parts(spec: str, params: dict, given: dict) -> list:
    """[B, H, I, J] bools whose conjunction the spec keeps: the causal part first (if any), then
    the spec's own predicate, then the key padding mask (if given)."""
    B, H, I, _ = given["q"].shape
    J = given["k"].shape[2]
    i, j, position = _grid(I, J)
    causal = params.get("causal", spec not in ("neighbourhood",))
    parts = [(j <= position).expand(B, H, I, J)] if causal else []
    if spec in ("document", "sharpened_documents", "talking_documents"):
        parts.append(given["q_doc"][:, None, :, None] == given["k_doc"][:, None, None, :])
    elif spec == "prefix_lm" and causal:
        parts = [(j <= position) | (j[None] < given["prefix_len"][:, None, None])[:, None]]
    elif spec == "neighbourhood":
        width, radius = params.get("width", 5), params.get("radius", 1)
        parts.append(((i // width - j // width).abs() <= radius) & ((i % width - j % width).abs() <= radius))
    elif spec == "head_window":
        window = params.get("window", 6)
        parts.append((position - j < (torch.arange(H)[:, None, None] + 1) * window)[None])
    if "mask" in given:
        parts.append(given["mask"][:, None, None, :])
    return [p.expand(B, H, I, J) for p in parts]


def keep_of(spec: str, params: dict, given: dict) -> torch.Tensor:
    """[B, H, I, J] bool: what the spec keeps (the key padding mask included)."""
    B, H, I, _ = given["q"].shape
    keep = torch.ones(B, H, I, given["k"].shape[2], dtype=torch.bool)
    for part in keep_parts(spec, params, given):
        keep = keep & part
    return keep


def attend(q, k, v, keep, scale=None, power=1):
    """softmax over the kept keys (to the `power`); a row that keeps nothing gives 0."""
    s = torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    empty = ~keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(empty, 0.0, s.masked_fill(~keep, float("-inf"))), dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p.masked_fill(empty, 0.0) ** power, v)


# ------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    spec: str
    params: dict = field(default_factory=dict)
    sizes: tuple = (2, 2, 17, 33, 16)          # B, H, I, J, D
    mask: bool = False

    @property
    def id(self) -> str:
        B, H, I, J, D = self.sizes
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.spec}[{params}]-{I}x{J}" + ("-mask" if self.mask else "")

    def source(self):
        return SPEC_TEXT.get(self.spec) or spec_path(self.spec)


def make_inputs(case: Case, seed: int = 0, stray: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, H, I, J, D = case.sizes
    given = {n: torch.randn(B, H, size, D, generator=g, dtype=torch.float64) for n, size in (("q", I), ("k", J), ("v", J))}
    if case.mask:
        given["mask"] = torch.rand(B, J, generator=g) < 0.8
    if case.spec == "talking_documents":
        B, H = case.sizes[:2]
        given["pre_mix"] = torch.eye(2 * H, dtype=torch.float64) + 0.3 * torch.randn(2 * H, 2 * H, generator=g,
                                                                                     dtype=torch.float64)
    if case.spec == "talking_documents":
        # the two streams of a sample cut their documents differently (one at every 16 keys, one
        # not at all): a program holding both must visit the tiles of either
        J = case.sizes[3]
        j = torch.arange(J)
        k_doc = torch.stack([j // 16, torch.zeros_like(j), j // 20, (j // 7) % 2][:case.sizes[0]])
        given.update(k_doc=k_doc, q_doc=k_doc[:, J - case.sizes[2]:].clone())
        return given
    if case.spec in ("document", "sharpened_documents", "talking_documents"):
        # uneven documents; the queries are the last I keys, one of them (stray) in a document without keys
        k_doc = torch.cumsum(torch.rand(B, J, generator=g) < 0.25, dim=1)
        q_doc = k_doc[:, J - I:].clone()
        if stray:
            q_doc[0, I // 2] = 1000
        given.update(q_doc=q_doc, k_doc=k_doc)
    if case.spec == "prefix_lm":
        given["prefix_len"] = torch.tensor([J - 5, 3, 0][:B])
    return given


CASES = [
    Case("document", mask=True),
    Case("document", {"causal": False}, (2, 2, 20, 20, 16)),
    Case("prefix_lm", mask=True),
    Case("prefix_lm", {"causal": False}, (1, 2, 20, 20, 16)),
    Case("neighbourhood", {}, (1, 2, 23, 23, 16), mask=True),
    Case("neighbourhood", {"causal": True, "width": 4}, (2, 1, 17, 21, 16)),
    Case("head_window", {"window": 5}, (1, 3, 18, 33, 16), mask=True),
    Case("head_window", {"causal": False}, (1, 2, 20, 20, 16)),
    Case("sharpened_documents", {}, (1, 2, 17, 33, 16), mask=True),
    Case("talking_documents", {}, (4, 2, 40, 48, 16)),          # 2 samples of 2 streams x 2 heads
]


def talking(q, k, v, keep, pre_mix, streams=2):
    """Logits mixed across a sample's (stream, head) channels (the batch is laid out (b s)), then
    softmax over the kept keys (rows that keep nothing give 0)."""
    B, H, I, _ = q.shape
    s = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
    s = torch.einsum("oc,ncij->noij", pre_mix, s.reshape(B // streams, streams * H, I, -1)).reshape(B, H, I, -1)
    empty = ~keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(empty, 0.0, s.masked_fill(~keep, float("-inf"))), dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p.masked_fill(empty, 0.0), v)


def _expected(case: Case, given: dict):
    leaves = {n: t.clone().requires_grad_() if t.is_floating_point() else t for n, t in given.items()}
    keep = keep_of(case.spec, case.params, given)
    if case.spec == "talking_documents":
        out = talking(leaves["q"], leaves["k"], leaves["v"], keep, leaves["pre_mix"])
    else:
        out = attend(leaves["q"], leaves["k"], leaves["v"], keep, case.params.get("scale"),
                     power=2 if case.spec == "sharpened_documents" else 1)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(dout)
    return out.detach(), {n: t.grad for n, t in leaves.items() if t.is_floating_point()}, dout


def _run(attention, given: dict, dout):
    leaves = {n: t.float().requires_grad_() if t.is_floating_point() else t for n, t in given.items()}
    out = attention(**leaves)
    out.backward(dout.float())
    return out.detach().double(), {n: t.grad.double() for n, t in leaves.items() if t.is_floating_point()}


def _check(case, out, grads, expected, expected_grads):
    torch.testing.assert_close(out, expected, **FP32, msg=lambda m: f"{case.id} output: {m}")
    assert set(grads) == set(expected_grads) == {"q", "k", "v"} | ({"pre_mix"} if "pre_mix" in grads else set())
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **FP32_GRAD, msg=lambda m: f"{case.id} d{name}: {m}")


def _graph(case: Case, present=()):
    spec = parse_spec(SPEC_TEXT[case.spec], "<test>") if case.spec in SPEC_TEXT else load_spec(spec_path(case.spec))
    return compile_graph(spec, case.params, frozenset(present))


def _tiles(keep: torch.Tensor, block_m: int, block_n: int):
    """[B, H, I, J] -> (some, every) [B, H, query blocks, key blocks], one tile at a time: kept
    anywhere; kept everywhere (a tile crossing J is never whole)."""
    B, H, I, J = keep.shape
    rows, cols = -(-I // block_m), -(-J // block_n)
    some = torch.zeros(B, H, rows, cols, dtype=torch.bool)
    every = torch.zeros(B, H, rows, cols, dtype=torch.bool)
    for m in range(rows):
        for n in range(cols):
            tile = keep[:, :, m * block_m:(m + 1) * block_m, n * block_n:(n + 1) * block_n]
            some[:, :, m, n] = tile.flatten(2).any(-1)
            every[:, :, m, n] = tile.flatten(2).all(-1) & ((n + 1) * block_n <= J)
    return some, every


def _mask_args(module, graph, given: dict, block_m: int, block_n: int):
    """Call the generated block_mask() the way the launchers do (inputs, sizes, tiles, device)."""
    from kernelsearch.codegen.torch_module import block_mask_arguments
    from kernelsearch.codegen import names
    inputs, dims = block_mask_arguments(graph)
    B, H, I, _ = given["q"].shape
    sizes = {"b": B, "h": H, "i": I, "j": given["k"].shape[2], "d": given["q"].shape[3]}
    return module.block_mask(*[given[n] for n in inputs], *[sizes[d] for d in dims], block_m, block_n, "cpu")


# ------------------------------------------------------------------------------------- the plan

def test_the_plan_decides_which_conjuncts_make_a_block_mask():
    document = _graph(Case("document")).plan.block_mask
    assert document is not None and document.per_call and document.inputs == ("q_doc", "k_doc")
    assert document.dims == ("b",) and len(document.conjuncts) == 2       # q_doc == k_doc, and the causal bound
    assert _graph(Case("document", {"causal": False})).plan.block_mask.conjuncts == document.unbounded
    prefix = _graph(Case("prefix_lm")).plan.block_mask
    assert prefix.per_call and prefix.inputs == ("prefix_len",) and prefix.dims == ("b",)
    assert _graph(Case("prefix_lm", {"causal": False})).plan.block_mask is None       # keeps everything
    grid = _graph(Case("neighbourhood")).plan.block_mask
    assert not grid.per_call and grid.dims == () and len(grid.unbounded) == 2
    heads = _graph(Case("head_window")).plan.block_mask
    assert not heads.per_call and heads.dims == ("h",)
    # a key padding mask (over j alone) stays in-tile: the mask stays once per shape
    assert _graph(Case("neighbourhood"), present={"mask"}).plan.block_mask == grid
    for name, params in (("softmax", {"causal": True}), ("sliding_window", {}), ("local", {})):
        graph = compile_graph(load_spec(spec_path(name)), params)
        assert graph.plan.block_mask is None, name      # the bounds are exact: nothing to list


def test_kernelsearch_check_prints_the_block_mask(capsys):
    from kernelsearch.cli import main
    assert main(["check", spec_path("document")]) == 0
    out = capsys.readouterr().out
    assert "blocks   block mask of same_document" in out and "per call (reads q_doc, k_doc)" in out


# ------------------------------------------------------------------------- correctness, every backend

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_torch_chunked_against_the_definition(case):
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given)
    attention = kernelsearch.load(case.source(), backend="torch", **case.params,
                                  config={"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 8})
    _check(case, *_run(attention, given, dout), expected, expected_grads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_forward_and_backward_against_the_definition(case, interpreter):  # noqa: F811
    given = make_inputs(case)
    expected, expected_grads, dout = _expected(case, given)
    attention = kernelsearch.load(case.source(), backend="triton", **case.params,
                                  config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_M_BWD": 16, "BLOCK_N_BWD": 32})
    with torch.no_grad():
        inference = attention(**{n: t.float() if t.is_floating_point() else t for n, t in given.items()})
    torch.testing.assert_close(inference.double(), expected, **FP32, msg=lambda m: f"{case.id} inference: {m}")
    _check(case, *_run(attention, given, dout), expected, expected_grads)


# ------------------------------------------------------------------------- what is skipped

@pytest.mark.parametrize("case", CASES[:1] + CASES[2:3] + CASES[4:5] + CASES[6:7], ids=lambda c: c.id)
@pytest.mark.parametrize("block_m, block_n", [(16, 16), (8, 32)])
def test_the_lists_are_the_tiles_the_definition_keeps(case, block_m, block_n):
    """keeps / keeps_all against a brute force over the definition (padding left out: it stays
    in-tile): keeps_all exactly the tiles the conjunction keeps whole; keeps at least the tiles the
    conjunction keeps something in, at most those each part (the causal bound, the spec's own
    predicate) keeps something in - exactly those where one rule covers each part. With
    document ids that run in order, a block's ids are a range and `q_doc == k_doc` per block is
    its ranges meeting. The sparse lists (both directions) hold exactly these tables."""
    given = make_inputs(case, stray=False)
    given.pop("mask", None)
    graph = _graph(case)
    module = loader.import_file(torch_file(graph))
    mask = _mask_args(module, graph, given, block_m, block_n)
    parts = keep_parts(case.spec, case.params, given)
    some = torch.stack([_tiles(part, block_m, block_n)[0] for part in parts]).all(0)
    needed, every = _tiles(keep_of(case.spec, case.params, given), block_m, block_n)
    keep_dims = graph.plan.block_mask.dims
    some, every, needed = (t[:, :1] if "h" not in keep_dims else t for t in (some, every, needed))
    some, every, needed = (t[:1] if "b" not in keep_dims else t for t in (some, every, needed))
    assert bool((mask.keeps | ~needed).all()) and bool((some | ~mask.keeps).all()), case.id   # needed <= keeps <= some
    plan = graph.plan.block_mask
    if not (plan.evaluated and plan.bounded):     # (evaluated within the bounds it can only be tighter)
        assert torch.equal(mask.keeps, some), case.id
    assert torch.equal(mask.keeps_all, every), case.id
    partial = some & ~every
    for lists, dense in ((mask.kv_blocks, partial), (mask.full_kv_blocks, every),
                         (mask.q_blocks, partial.transpose(-1, -2)), (mask.full_q_blocks, every.transpose(-1, -2))):
        assert lists.dtype == torch.int32 and lists.is_contiguous()
        for index in torch.cartesian_prod(*[torch.arange(n) for n in dense.shape[:3]]):
            row, listed = lists[tuple(index)], dense[tuple(index)].nonzero().flatten()
            assert row[0] == len(listed) and torch.equal(row[1:1 + len(listed)].long(), listed), (case.id, index)
    assert torch.equal(mask.kv_num_blocks, mask.kv_blocks[..., 0])


def test_a_stray_document_id_widens_the_ranges_but_skips_nothing_needed():
    case = CASES[0]
    given = make_inputs(case)          # one query's document has no key: its block's id range is wide
    given.pop("mask")
    graph = _graph(case)
    mask = _mask_args(loader.import_file(torch_file(graph)), graph, given, 8, 8)
    needed, every = _tiles(keep_of(case.spec, case.params, given), 8, 8)
    assert bool((mask.keeps | ~needed[:, :1]).all()) and torch.equal(mask.keeps_all, every[:, :1])


def test_document_masking_skips_what_the_documents_do_not_share():
    """64 documents over 2048 keys, 64 x 64 tiles: the visited fraction is that of the tiles two
    documents (or one) share - far below the causal triangle's half; with 16 documents whole
    tiles appear, listed as full exactly where every pair is kept."""
    from bench.bench_block_masks import document_ids
    case = Case("document")
    graph = _graph(case)
    module = loader.import_file(torch_file(graph))
    for documents in (64, 16):
        ids = document_ids(2048, documents)
        given = {"q": torch.zeros(1, 1, 2048, 8), "k": torch.zeros(1, 1, 2048, 8), "q_doc": ids, "k_doc": ids}
        mask = _mask_args(module, graph, given, 64, 64)
        needed, every = _tiles(keep_of("document", {}, given), 64, 64)
        assert torch.equal(mask.keeps, needed[:, :1])      # ids in order: the ranges are exact
        assert torch.equal(mask.keeps_all, every[:, :1])
        assert mask.fraction_visited() < (0.1 if documents == 64 else 0.2)
    assert int(every.sum()) > 10


class _Counting:
    """A chunk_step that counts its calls (the chunked lowering's debug counter: one per tile)."""

    def __init__(self, step):
        self.step, self.calls = step, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.step(*args)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[6]], ids=lambda c: c.id)
def test_the_chunked_lowering_visits_only_the_chunk_pairs_that_keep_something(case):
    given = make_inputs(case)
    graph = _graph(case, present={"mask"} if case.mask else ())
    module = loader.import_file(torch_file(graph))
    args = [given[n].float() if given[n].is_floating_point() else given[n] for n in module.INPUTS]
    chunk_m, chunk_n = 8, 16
    with_mask, without = _Counting(module.chunk_step), _Counting(module.chunk_step)
    out = module.chunked(*args, CHUNK_N=chunk_n, CHUNK_M=chunk_m, chunk_step=with_mask)
    reference_out = module.chunked(*args, CHUNK_N=chunk_n, CHUNK_M=chunk_m, chunk_step=without, block_mask=None)
    torch.testing.assert_close(out, reference_out)
    keep = keep_of(case.spec, case.params, {n: t for n, t in given.items() if n != "mask"})
    needed, _ = _tiles(keep, chunk_m, chunk_n)
    visits = _mask_args(module, graph, given, chunk_m, chunk_n).keeps.any(0).any(0)   # a chunk holds every b and h
    assert len(with_mask.calls) == int(visits.sum()) >= int(needed.any(0).any(0).sum())
    assert bool((visits | ~needed.any(0).any(0)).all())
    assert len(with_mask.calls) < len(without.calls)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[-1]], ids=lambda c: c.id)
def test_the_kernels_read_the_lists(case, interpreter, monkeypatch):  # noqa: F811
    """The forward kernel visits only the listed tiles: with every list emptied it keeps nothing
    (rows give 0), and with the lists of the true mask it gives the definition's output."""
    given = make_inputs(case)
    graph = _graph(case, present={"mask"} if case.mask else ())
    module = interpreter.load_module(triton_file(graph), interpret=True)
    args = [given[n].float() if given[n].is_floating_point() else given[n] for n in module_inputs(graph)]
    out = module.forward(*args, BLOCK_M=16, BLOCK_N=16)
    keep = keep_of(case.spec, case.params, given)
    expected = talking(given["q"], given["k"], given["v"], keep, given["pre_mix"]) if "pre_mix" in given else \
        attend(given["q"], given["k"], given["v"], keep)
    torch.testing.assert_close(out.double(), expected, **FP32)
    true_mask = module.block_mask

    def emptied(*a):
        mask = true_mask(*a)
        nothing = torch.zeros_like(mask.keeps)
        return block_masks.from_tiles(nothing, nothing, mask.block_m, mask.block_n)
    monkeypatch.setattr(module, "block_mask", emptied)
    assert module.forward(*args, BLOCK_M=16, BLOCK_N=16).abs().max().item() == 0.0


def test_heads_in_tile_programs_read_the_mask_per_sample():
    """A program holds a sample's streams x heads: a tile is listed when some channel keeps
    something in it, whole when every channel keeps all of it."""
    case = CASES[-1]
    given = make_inputs(case, stray=False)
    graph = _graph(case)
    assert graph.plan.heads_in_tile and graph.plan.block_mask.streams == 2
    mask = _mask_args(loader.import_file(torch_file(graph)), graph, given, 16, 16)
    some, every = _tiles(keep_of(case.spec, case.params, given), 16, 16)    # [4 = (2 samples x 2 streams), 2, ...]
    assert not torch.equal(some[0], some[1])       # the streams of a sample differ
    sample = mask.per_sample(2)
    assert sample.keeps.shape[:2] == (2, 1)
    assert torch.equal(sample.keeps[:, 0], some.view(2, 2 * 2, *some.shape[2:]).any(1))
    assert torch.equal(sample.keeps_all[:, 0], every.view(2, 2 * 2, *every.shape[2:]).all(1))
    assert "per_sample(2)" in triton_file(graph).source


def module_inputs(graph):
    from kernelsearch.codegen.triton_fwd import plan
    return [t.name for t in plan(graph).tensors]


# ------------------------------------------------------------------------- per call, and the cache

def test_a_per_call_mask_follows_the_ids(interpreter):  # noqa: F811
    """Two calls with other document ids (same shapes): each gives its own definition's output
    on the chunked lowering and the Triton kernels (no mask is kept from the first call)."""
    case = Case("document", {}, (1, 2, 24, 24, 16))
    first = make_inputs(case, seed=0)
    second = dict(first, q_doc=torch.arange(24)[None] // 3, k_doc=torch.arange(24)[None] // 3)
    for backend, config in (("torch", {"lowering": "chunked", "CHUNK_N": 8, "CHUNK_M": 8}),
                            ("triton", {"BLOCK_M": 16, "BLOCK_N": 16})):
        attention = kernelsearch.load(case.source(), backend=backend, config=config)
        for given in (first, second, first):
            expected = attend(given["q"], given["k"], given["v"], keep_of("document", {}, given))
            with torch.no_grad():
                out = attention(**{n: t.float() if t.is_floating_point() else t for n, t in given.items()})
            torch.testing.assert_close(out.double(), expected, **FP32, msg=lambda m: f"{backend}: {m}")
    graph = _graph(case)
    assert not hasattr(loader.import_file(torch_file(graph)), "_BLOCK_MASKS")     # nothing cached per call


def test_an_index_only_mask_is_cached_per_shape_and_block_size():
    case = Case("neighbourhood", {}, (1, 1, 23, 23, 16))
    graph = _graph(case)
    module = loader.import_file(torch_file(graph))
    module._BLOCK_MASKS.clear()
    given = make_inputs(case)
    a = _mask_args(module, graph, given, 16, 16)
    assert _mask_args(module, graph, given, 16, 16) is a                # cached
    b = _mask_args(module, graph, given, 8, 32)
    assert b is not a and b.keeps.shape[-2:] == (3, 1) and a.keeps.shape[-2:] == (2, 2)
    c = _mask_args(module, graph, dict(given, q=torch.zeros(1, 1, 30, 16), k=torch.zeros(1, 1, 30, 16)), 16, 16)
    assert c.keeps.shape[-2:] == (2, 2) and c is not a                  # another shape
    assert len(module._BLOCK_MASKS) == 3
    for mask, (bm, bn, I) in ((a, (16, 16, 23)), (b, (8, 32, 23)), (c, (16, 16, 30))):
        keep = keep_of("neighbourhood", {}, {"q": torch.zeros(1, 1, I, 1), "k": torch.zeros(1, 1, I, 1)})
        assert torch.equal(mask.keeps, _tiles(keep, bm, bn)[0])


def test_the_kernels_tiles_key_the_cached_mask(interpreter):  # noqa: F811
    """The tuner's tiles: the same static mask spec run at 16x16, 32x16 and 16x16 again on the
    Triton kernels - each correct, one cached mask per tile shape (the backward's tiles too)."""
    case = Case("neighbourhood", {}, (1, 2, 23, 23, 16))
    given = make_inputs(case)
    expected = attend(given["q"], given["k"], given["v"], keep_of(case.spec, case.params, given))
    attention = kernelsearch.load(case.source(), backend="triton")
    graph = _graph(case)
    module = interpreter.load_module(triton_file(graph), interpret=True)
    module._BLOCK_MASKS.clear()
    for block_m, block_n in ((16, 16), (32, 16), (16, 16)):
        attention.config = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        with torch.no_grad():
            out = attention(**{n: t.float() for n, t in given.items()})
        torch.testing.assert_close(out.double(), expected, **FP32, msg=lambda m: f"{block_m}x{block_n}: {m}")
    assert sorted(key[-3:-1] for key in module._BLOCK_MASKS) == [(16, 16), (32, 16)]


def test_a_traced_caller_runs_the_chunked_lowering_with_its_masks_in_tile():
    """torch.compile(fullgraph=True) over a caller: the block mask (a host sync) is not traced -
    every chunk the bounds allow runs, the masks in-tile - and the output is the definition's."""
    torch._dynamo.reset()
    case = Case("document", {}, (1, 2, 20, 20, 16))
    given = make_inputs(case)
    attention = kernelsearch.load(case.source(), backend="torch",
                                  config={"lowering": "chunked", "CHUNK_N": 8, "CHUNK_M": 8})
    compiled = torch.compile(lambda **t: attention(**t) * 2.0, fullgraph=True, backend="aot_eager")
    out = compiled(**{n: t.float() if t.is_floating_point() else t for n, t in given.items()})
    expected = attend(given["q"], given["k"], given["v"], keep_of("document", {}, given))
    torch.testing.assert_close(out.double() / 2.0, expected, **FP32)


def test_the_generated_files_show_the_mask_they_run():
    graph = _graph(Case("document"))
    torch_source = torch_file(graph).source
    assert "def block_mask(" in torch_source and "block_mask=block_mask" in torch_source
    triton_source = triton_file(graph).source
    assert "tiles = block_mask(in_q_doc, in_k_doc, B, I, J, BLOCK_M, BLOCK_N, in_q.device)" in triton_source
    assert "for listed in range(0, count_kv_blocks)" in triton_source


def test_the_torch_default_prefers_the_skipping_chunked_lowering_at_length():
    """SDPA would get the document mask materialised and visit every key: from COMPILE_MIN_SCORES
    scores the default is the chunked lowering, which skips the tiles the block mask leaves out."""
    from kernelsearch.backends.torch_backend import default_config
    graph = _graph(Case("document", {"causal": False}))
    assert default_config(graph, {"b": 1, "h": 4, "i": 4096, "j": 4096, "d": 64})["lowering"] == "chunked"
    assert default_config(graph, {"b": 1, "h": 4, "i": 512, "j": 512, "d": 64})["lowering"] == "sdpa"
