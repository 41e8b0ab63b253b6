"""Pass (training path only): a linear combination of key reductions over the same values is one
reduction of the combined probabilities,

    dot(p1, v) - lam * dot(p2, v)   ->   dot(p1 - lam * p2, v)

The backward kernels differentiate one dot(p, v) that is the output (codegen/triton_bwd.py); a
spec that writes differential attention's one-sweep form gets its gradients through this form
(two sweeps in the training forward, every softmax's delta in a sweep of its own). A coefficient
may vary along b, h and i (a per-head lambda, a per-row gate), not along j or a feature dim. The
rewrite follows the ops' `linear` facts (ops.py); anything else leaves the graph as it is.
"""
from __future__ import annotations

from .. import ops
from ..ir import Graph, Node
from .classify import classify
from .infer import infer


def factor_dots(graph: Graph) -> Graph:
    """The graph with its output a single dot(p, v) when it is a linear combination of dot(p_k, v)
    over one v; the graph itself otherwise. Returns an inferred and classified graph (plan it again)."""
    accs = [n for n, node in graph.nodes() if node.op == "dot" and graph.node(node.args[0]).dims[-1:] == ("j",)]
    values = {graph.node(a).args[1] for a in accs}
    if len(accs) < 2 or len(values) != 1 or graph.output in accs:
        return graph
    (value,) = values
    work = graph.copy()

    def add(op: str, args: tuple, like: str) -> str:
        return work.add_intermediate(like, Node(op, args, location=work.node(like).location))

    def coefficient(node_id: str) -> bool:
        dims = set(graph.node(node_id).dims)
        return graph.node(node_id).dtype != "bool" and dims <= {"b", "h", "i"} and \
            not any(a in graph.upstream(node_id) for a in accs)

    def lift(node_id: str):
        """P with node == dot(P, value), or None."""
        if node_id in accs:
            return graph.node(node_id).args[0]
        node = graph.node(node_id)
        rule = ops.OPS[node.op].linear if ops.is_elementwise(node.op) else None
        if rule == "every":
            lifted = [lift(a) for a in node.args]
            return None if None in lifted else add(node.op, tuple(lifted), node_id)
        if rule == "one" or isinstance(rule, tuple):
            kinds = rule if isinstance(rule, tuple) else None
            args = []
            for position, a in enumerate(node.args):
                if (kinds is None or kinds[position] == "linear") and not coefficient(a):
                    lifted = lift(a)
                    if lifted is None:
                        return None
                    args.append(lifted)
                elif coefficient(a):
                    args.append(a)
                else:
                    return None
            if all(a == b for a, b in zip(args, node.args)):
                return None   # no dot among them
            return add(node.op, tuple(args), node_id)
        return None

    combined = lift(graph.output)
    if combined is None:
        return graph
    reduction = add("dot", (combined, value), graph.output)
    work.output = reduction
    work.remove_dead()
    return classify(infer(work))
