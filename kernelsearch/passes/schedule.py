"""Pass: choose how a kernel walks the (i, j) plane.

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


def choose_schedule(graph: Graph) -> Graph:
    graph = graph.copy()
    mixes = graph.find("mix_heads")
    stages = {graph.node(m).stage for m in mixes}
    if "post_softmax" in stages:
        graph.schedule = "two_pass"
    elif mixes:
        graph.schedule = "heads_in_tile"
    else:
        graph.schedule = "one_pass"
    streams = {graph.node(m).attrs["streams"] for m in mixes}
    graph.notes["head_groups"] = streams.pop() if len(streams) == 1 else None
    return graph
