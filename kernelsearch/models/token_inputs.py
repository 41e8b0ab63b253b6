"""Inputs a language model makes from its own tokens, for specs that need more than q, k and v.

A spec's required integer inputs are facts about the sequence, not learned weights: an LM can
make the ones it knows from the tokens it is given. Which one an input is follows from its
declaration (dtype and dims), never from its name:

    int [b, i] / [b, j]   the document of each position: the corpus joins files with a
                          separator byte (data.SEPARATOR), so a window holds pieces of several
                          files and the id of position n counts the separators before it
                          (document masking: packed sequences)
    int [b]               the prefix length of each sequence: the first PREFIX_FRACTION of the
                          window is the prefix (prefix LM); positions inside it see each other, so
                          next-token losses whose target lies inside the prefix are left out

Anything else a spec requires (and that is not a learned input of the layer) cannot be made by
an LM: `token_input_rules` says which and what the LM could make instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from . import data as _data

PREFIX_FRACTION = 0.25       # of each window: the prefix of a prefix LM


@dataclass(frozen=True)
class TokenInput:
    name: str                # the spec's input name (a key of the call's keyword arguments only)
    kind: str                # document_ids | prefix_length


KINDS = {("int", ("b", "i")): "document_ids", ("int", ("b", "j")): "document_ids",
         ("int", ("b",)): "prefix_length"}
_DESCRIBED = "int [b, i] or [b, j] (the document of each position) and int [b] (a prefix length)"


def projected_inputs(spec) -> dict[str, str]:
    """name -> "query" | "key": the required float inputs shaped like q or like k (differential
    attention's q2, k2), which a model projects from its activations as it does q and k."""
    roles = {tuple(spec.inputs["q"].shape): "query", tuple(spec.inputs["k"].shape): "key"}
    return {name: roles[tuple(decl.shape)] for name, decl in spec.inputs.items()
            if name not in ("q", "k", "v") and not decl.optional and decl.dtype == "float"
            and tuple(decl.shape) in roles}


def token_input_rules(spec, learned: set[str], family: str, projected: set[str] = frozenset(),
                      strict: bool = True) -> tuple[TokenInput, ...]:
    """The inputs of `spec` the LM makes per call from its tokens: its required inputs other than
    q, k, v, the layer's learned ones and those it projects. UsageError for one it cannot make
    (strict; otherwise it is left to the family, which may pass it itself)."""
    rules = []
    for name, decl in spec.inputs.items():
        if decl.optional or name in ("q", "k", "v") or name in learned or name in projected:
            continue
        kind = KINDS.get((decl.dtype, tuple(d.rstrip("?") for d in decl.shape)))
        if kind is None and not strict:
            continue
        if kind is None:
            raise UsageError(
                f"the {family} LM cannot make the input '{name}' [{', '.join(decl.shape)}] ({decl.dtype}) "
                f"that {spec.name} requires: an LM makes {_DESCRIBED} from its tokens, projects float "
                f"inputs shaped like q or k, and learns float inputs without b, i, j dims; make '{name}' "
                f"optional in the spec or one of those")
        rules.append(TokenInput(name, kind))
    return tuple(rules)


def prefix_length(tokens: torch.Tensor) -> int:
    return int(tokens.shape[1] * PREFIX_FRACTION)


def make(rules: tuple[TokenInput, ...], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """tokens [b, n] -> the inputs by the spec's names."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.kind == "document_ids":
            separators = (tokens == _data.SEPARATOR[0]).long()
            # the separator ends its document: position n's id counts the separators before n
            out[rule.name] = torch.cumsum(separators, dim=1) - separators      # [b, n]
        else:
            out[rule.name] = torch.full((tokens.shape[0],), prefix_length(tokens),
                                        dtype=torch.long, device=tokens.device)   # [b]
    return out


def loss_mask(rules: tuple[TokenInput, ...], inputs: torch.Tensor) -> torch.Tensor | None:
    """[b, n] bool: which next-token losses count (None: all). With a prefix, the prediction of a
    token inside it would see that token: positions n < prefix - 1 do not count."""
    if not any(rule.kind == "prefix_length" for rule in rules):
        return None
    n = inputs.shape[1]
    positions = torch.arange(n, device=inputs.device)
    return (positions >= prefix_length(inputs) - 1).expand(inputs.shape[0], n)
