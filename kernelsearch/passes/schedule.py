"""Schedule choice (read by passes/plan.py): how a kernel walks the (i, j) plane.

    one_pass       flash attention: one sweep over key blocks with an online softmax, per head.
    heads_in_tile  heads are mixed before softmax (pre talking heads): one program holds every
                   head of a sample's stream group for its tile, mixes logits in registers,
                   then runs the online softmax per head.
    two_pass       probabilities are mixed after softmax (post talking heads): the first sweep
                   computes every head's row statistics (max, sum); the second recomputes the
                   logits, normalises them exactly, mixes heads and multiplies by v.
"""
from __future__ import annotations

from ..ir import Graph

SCHEDULES = ("one_pass", "heads_in_tile", "two_pass")
HEADS_IN_TILE = ("heads_in_tile", "two_pass")   # the schedules whose programs hold every head of a sample


def _head_mixes(graph: Graph) -> list[str]:
    return graph.find("mix_heads")


def schedule_of(graph: Graph) -> str:
    stages = {graph.node(m).stage for m in _head_mixes(graph)}
    if "post_softmax" in stages:
        return "two_pass"
    return "heads_in_tile" if stages else "one_pass"


def head_groups(graph: Graph) -> int | None:
    """The streams every head mixing groups heads by; None without mixing or with several groupings."""
    streams = {graph.node(m).attrs["streams"] for m in _head_mixes(graph)}
    return streams.pop() if len(streams) == 1 else None
