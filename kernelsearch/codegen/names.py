"""Hygiene: the identifiers generated code gives to things a spec named.

A spec may name its params, inputs, graph entries and dims anything Python accepts as an
identifier - `rescale`, `row_max`, `torch`, `CHUNK_N`, `acc_0`, `offs_c`. None of those names is
ever used raw in generated code: each is mapped into a namespace of its own kind, by a prefix the
code generators never use for their own locals:

    v_<entry>           a graph value the spec named (an entry or an input, once aligned/loaded)
    t<N>_<entry>        an unnamed intermediate of entry `<entry>` (the graph's `<entry>.<N>`)
    in_<input>          an input as the generated function receives it (a core graph's cut
                        intermediate `<entry>.<N>`: in<N>_<entry>)
    size_<dim>          the size of a feature or table dim (b, h, i, j are the language's own:
                        their sizes are B, H, I, J)
    <role>_<name>       anything derived from one of the above (`mma_v_k`, `stride_in_q_2`):
                        a role is one lower-case word, never containing `_`, so two derivations
                        cannot meet

The generators' own names (loop variables, statistics, `torch`, `tl`, `ops`, ...) never start
with one of these prefixes, so no spec can shadow them and they cannot shadow a spec's values.
"""
from __future__ import annotations

import re

INDEX_DIMS = ("b", "h", "i", "j")
_TEMP = re.compile(r"\A(?P<owner>[A-Za-z_][A-Za-z0-9_]*)\.(?P<number>[0-9]+)\Z")


def value(node_id: str) -> str:
    """The variable of graph node `node_id` (an entry, an input or an intermediate `owner.N`)."""
    temp = _TEMP.match(node_id)
    if temp:
        return f"t{temp['number']}_{temp['owner']}"
    return f"v_{node_id}"


def argument(input_name: str) -> str:
    """The parameter of a generated function that receives input `input_name` (a core graph's
    inputs include cut intermediates `owner.N`: those become `in<N>_<owner>`)."""
    temp = _TEMP.match(input_name)
    if temp:
        return f"in{temp['number']}_{temp['owner']}"
    return f"in_{input_name}"


def size(dim: str) -> str:
    """The variable holding the size of `dim`."""
    return dim.upper() if dim in INDEX_DIMS else f"size_{dim}"


def derived(role: str, name: str) -> str:
    """A name derived from a namespaced one: `derived("mma", "v_k") == "mma_v_k"`."""
    assert role.isidentifier() and "_" not in role, role
    return f"{role}_{name}"


def axis_name(role: str, dim: str) -> str:
    """Per-dim generator names (offsets, masks, block sizes) for any dim, index or feature:
    `axis_name("offs", "i") == "offs_i"`, `axis_name("offs", "d") == "offs_size_d"`."""
    return f"{role}_{dim}" if dim in INDEX_DIMS else f"{role}_{size(dim)}"
