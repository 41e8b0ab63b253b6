"""What the five families share: the LM base class (loss, top-k sampling) and tiny helpers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError, UsageError
from ..nn import Attention as AttentionModule
from . import attention as _attention
from . import token_inputs as _token_inputs


def load_legacy_learned_keys(block: AttentionModule) -> None:
    """State dicts written before a layer's learned inputs moved into its kernelsearch.nn.Attention
    (``<layer>.pre_mix``, now ``<layer>.learned.pre_mix``) load into ``block``: their keys are renamed.
    The parameters' order did not change, so the optimizer states saved with them still fit."""
    def rename(module, state_dict, prefix, *_):
        for name in module.learned.keys():
            old, new = prefix + name, f"{prefix}learned.{name}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
    block.register_load_state_dict_pre_hook(rename)


def top_k(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """The seeds' filter: keep the top ``int((1 - thres) * vocab)`` logits (at least one)."""
    k = max(1, int((1 - thres) * logits.shape[-1]))
    val, ind = torch.topk(logits, k)
    out = torch.full_like(logits, float("-inf"))
    out.scatter_(-1, ind, val)
    return out


class LM(nn.Module):
    """Base of the five seed LMs: byte tokens in, next-token logits out.

    Subclasses set ``family`` and ``native_spec`` (their seed spec's file name), build their
    attention with ``self.build_attention(structural, seed)``, hand it to one
    ``kernelsearch.nn.Attention`` per layer (``attention_layers()``: each owns the learned inputs
    of its layer, all share the compiled attention) and implement ``forward``.
    ``loss`` is next-token cross entropy (plus the auxiliary loss of ``forward_with_aux`` where a
    family has one).
    """

    family = ""
    native_spec: str | None = None

    def __init__(self, *, spec, backend: str = "auto", attn_params: dict | None = None,
                 num_tokens: int = 256, max_seq_len: int = 256):
        super().__init__()
        self.spec = str(spec)
        self.backend = backend
        self.attn_params = dict(attn_params or {})
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.resolved_attn_params: dict = {}

    def build_attention(self, structural: dict, seed: dict | None = None, **overrides):
        params = _attention.resolve_params(self.spec, self.native_spec, structural, seed or {},
                                           self.attn_params)
        params.update(overrides)
        # whatever the compiler draws from the RNG must not shift the model's initialisation
        with torch.random.fork_rng(devices=[]):
            try:
                attention = _attention.make_attention(self.spec, self.backend, **params)
            except SpecError as e:
                raise SpecError(f"{e.message} (the {self.family} model passes "
                                f"{', '.join(f'{k}={v!r}' for k, v in params.items())})",
                                e.location, e.hint) from None
        if not overrides:       # the model's attention (an override builds a helper, e.g. a probe)
            self.resolved_attn_params = params
            self.set_attention("attn", attention)
        return attention

    def set_attention(self, name: str, fn) -> None:
        # kept out of nn.Module's registry: the compiled attention has no learned state of its own
        object.__setattr__(self, name, fn)

    def attention_layers(self) -> list[AttentionModule]:
        """The model's attention modules, first layer first."""
        return [m for m in self.modules() if isinstance(m, AttentionModule)]

    # families that pass the inputs of token_inputs() to their attention (others refuse specs that need them)
    makes_token_inputs = False

    _token_rules: tuple | None = None     # decided once: the layers' learned and projected inputs are fixed

    def token_input_rules(self) -> tuple:
        """Which of the spec's inputs this LM makes from its tokens (models/token_inputs.py); a
        UsageError for one it cannot make. Every forward and loss reads it: it is decided once."""
        if self._token_rules is not None:
            return self._token_rules
        layers = self.attention_layers()
        learned = set(layers[0].learned.keys()) if layers else set()
        projected = set(getattr(layers[0], "to_inputs", {}).keys()) if layers else set()
        # a family that makes no token inputs may pass other inputs itself (talking heads' head_mean)
        rules = _token_inputs.token_input_rules(self.attn.spec, learned, self.family, projected,
                                                strict=self.makes_token_inputs)
        if rules and not self.makes_token_inputs:
            raise UsageError(
                f"the {self.family} LM does not pass {', '.join(r.name for r in rules)} to its attention, "
                f"which {self.attn.spec.name} requires; the mesh_tf family makes them from its tokens "
                f"(--model mesh_tf)")
        self._token_rules = rules
        return rules

    def token_inputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The spec's per-call inputs made from tokens [b, n] (document ids, a prefix length)."""
        return _token_inputs.make(self.token_input_rules(), tokens)

    def forward_with_aux(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """(logits, auxiliary loss or None); families with an auxiliary loss override this."""
        return self(x, mask=mask), None

    def loss(self, tokens: torch.Tensor, mask: torch.Tensor | None = None):
        """tokens [b, n + 1] -> (total loss, {"ce": ..., "aux": ...})."""
        x, labels = tokens[:, :-1], tokens[:, 1:]
        logits, aux = self.forward_with_aux(x, mask=None if mask is None else mask[:, :-1])
        counted = _token_inputs.loss_mask(self.token_input_rules(), x)    # [b, n] or None: all count
        if counted is not None:
            labels = labels.masked_fill(~counted, -100)       # cross_entropy's ignore_index
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        parts = {"ce": ce.detach()}
        if aux is not None:
            parts["aux"] = aux.detach()
            return ce + aux, parts
        return ce, parts

    @torch.no_grad()
    def generate(self, prime: torch.Tensor, length: int, temperature: float = 1.0,
                 filter_thres: float = 0.9, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``length`` tokens after ``prime`` [b, n] with the seeds' top-k filter."""
        was_training = self.training
        self.eval()
        out = prime
        for _ in range(length):
            logits = self(out[:, -self.max_seq_len:])[:, -1].float()
            probs = F.softmax(top_k(logits, filter_thres) / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat((out, nxt), dim=-1)
        self.train(was_training)
        return out[:, prime.shape[1]:]
