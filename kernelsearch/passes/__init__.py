"""The compiler pipeline: every pass in order, in one place.

    build         spec -> graph of op nodes; names resolved, cycles and undefined names reported
    infer         named dims and dtypes of every node; dim mismatches reported
    validate      at least one row normaliser (softmax, masked), an output of shape [b, h, i, d]
    fold          specialise to param values and present optional inputs; fold constants
    infer         again, on the specialised graph
    validate      again: folding may have changed what reaches the output
    classify      the stage of each node (q_prologue, k_prologue, score, keep, softmax, ...)
    plan          every decision about how the graph runs, made once (graph.plan): schedule
                  (one_pass | heads_in_tile | two_pass), sweeps, accumulators, prepass, host
                  scalars, key-block bounds (keep-predicates -> which key blocks a query block needs)

Set KERNELSEARCH_DEBUG=passes (or pass debug=True) to print the graph after each pass.
"""
from __future__ import annotations

import os
import sys

from ..ir import Graph
from .build import build
from .classify import classify
from .fold import fold
from .infer import infer
from .plan import describe_plan, plan
from .validate import validate

# (name, pass) in order; `fold` is the one pass that takes the specialisation as well
PIPELINE = (
    ("infer", infer),
    ("validate", validate),
    ("fold", fold),
    ("infer", infer),
    ("validate", validate),
    ("classify", classify),
    ("plan", plan),
)


def run_pipeline(spec, params: dict, present: frozenset, debug: bool = False) -> Graph:
    debug = debug or "passes" in os.environ.get("KERNELSEARCH_DEBUG", "")
    graph = build(spec)
    if debug:
        print(f"== after build\n{graph.dump()}", file=sys.stderr)
    for name, run in PIPELINE:
        graph = run(graph, params, present) if run is fold else run(graph)
        if debug:
            decisions = "".join(f"\n  {line}" for line in describe_plan(graph)) if graph.plan else ""
            print(f"== after {name}{decisions}\n{graph.dump()}", file=sys.stderr)
    return graph
