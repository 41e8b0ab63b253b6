"""bench/bench_block_masks.py (issue 13 item 6's measurement) counts what it says: needed tiles
against a brute force over the definition of document masking, visited tiles against the causal
triangle and the sliding window's band, and the bounds never skip a needed tile."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_block_masks", ROOT / "bench" / "bench_block_masks.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench      # its dataclasses look their module up
spec.loader.exec_module(bench)

N, TILE = 100, 16          # 7 x 7 tiles, the last ones partial


def _scenario(spec_name, params=None, inputs=lambda n: {}):
    return bench.Scenario(spec_name, spec_name, params or {}, inputs)


def _brute_force_tiles(keep: torch.Tensor) -> torch.Tensor:
    """[I, J] -> [query tiles, key tiles]: any entry kept, one tile at a time."""
    tiles = -(-N // TILE)
    return torch.tensor([[bool(keep[m * TILE:(m + 1) * TILE, n * TILE:(n + 1) * TILE].any()) for n in range(tiles)]
                         for m in range(tiles)])


@pytest.mark.parametrize("causal", [True, False])
def test_document_tiles_needed_and_visited(causal):
    ids = bench.document_ids(N, 6)
    assert ids.shape == (1, N) and int(ids.max()) == 5 and bool((ids.diff() >= 0).all())
    scenario = _scenario("document", {"causal": causal}, lambda n: {"q_doc": ids, "k_doc": ids})
    graph, tensors = bench.graph_and_tensors(scenario, N)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    keep = (ids[0][:, None] == ids[0][None, :]) & ((j <= i) if causal else True)
    needed = bench.needed_blocks(bench.keep_mask(graph, tensors), TILE, TILE)
    assert torch.equal(needed[0, 0], _brute_force_tiles(keep))
    visited = bench.visited_blocks(graph, tensors, TILE, TILE)
    assert torch.equal(visited, _brute_force_tiles(j <= i) if causal else torch.ones_like(visited))


def test_sliding_window_bounds_visit_its_band():
    scenario = _scenario("sliding_window", {"window": 20})
    graph, tensors = bench.graph_and_tensors(scenario, N)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    band = _brute_force_tiles((j <= i) & (i - j < 20))
    assert torch.equal(bench.visited_blocks(graph, tensors, TILE, TILE), band)
    assert torch.equal(bench.needed_blocks(bench.keep_mask(graph, tensors), TILE, TILE)[0, 0], band)


def test_the_report_has_a_row_per_scenario_and_tile(capsys):
    assert bench.main(["--sizes", "64", "--blocks", "16x16,32x16", "--scenarios", "document,softmax"]) == 0
    out = capsys.readouterr().out
    assert out.count("| document, 64 documents") == 4 and out.count("| softmax, causal | 64 |") == 2


@pytest.mark.parametrize("causal", [True, False])
def test_the_block_mask_visits_the_needed_document_tiles(causal):
    """With document ids in order, the block mask's tiles are exactly the needed ones (the brute
    force over the definition); prefix_lm's too."""
    ids = bench.document_ids(N, 6)
    scenario = _scenario("document", {"causal": causal}, lambda n: {"q_doc": ids, "k_doc": ids})
    graph, tensors = bench.graph_and_tensors(scenario, N)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    keep = (ids[0][:, None] == ids[0][None, :]) & ((j <= i) if causal else True)
    assert torch.equal(bench.masked_blocks(graph, tensors, TILE, TILE), _brute_force_tiles(keep))
    prefix = _scenario("prefix_lm", {}, lambda n: {"prefix_len": torch.tensor([30])})
    graph, tensors = bench.graph_and_tensors(prefix, N)
    assert torch.equal(bench.masked_blocks(graph, tensors, TILE, TILE), _brute_force_tiles((j <= i) | (j < 30)))
