"""The search space: which knobs a target has, their choices, their constraints.

A space is data (a list of `Knob`s and `Constraint`s) plus four operations the rest of the
tuner needs and nothing else:

- `suggest(trial)` maps the space onto an Optuna trial, define-by-run: a knob that is only
  active under a condition (``CHUNK_N`` only when ``lowering == "chunked"``) is only suggested
  then, so TPE sees a conditional space instead of a bag of irrelevant parameters;
- `canonical(config)` drops inactive knobs, so that two configs that run the same code have
  the same key (``key``) and are never timed twice;
- `violations(config)` lists the static constraints a config breaks (cheap predicates; the
  expensive "does it compile and fit in shared memory" check is a *feasibility hook* that the
  target runs in the trial's child process before anything is timed, see `target.py`);
- `enumerate()` lists every valid canonical config (grid search, random fallback, the
  "space exhausted" test).

Where the knobs come from: each backend declares its knobs once (`backends/knobs.py`: choices,
defaults, conditions, constraints); `backend_space` reads that declaration, takes the spec's
``tune:`` choices for the knobs it names, and caps choices by the problem's sizes.

No ``threads`` knob on the CPU, because a recorded config only means something if the runtime
applies it on every call, and it cannot apply a thread count cleanly:

- ``torch.set_num_threads`` is process-wide: setting it around a call changes every other
  thread's torch work meanwhile, and save/restore from two threads at once can leave the
  process at the wrong count for good (the call itself would be cheap: about 0.5 us measured);
- with ``compile=True``, Inductor writes ``#pragma omp parallel num_threads(N)`` with ``N`` =
  ``torch.get_num_threads()`` *when it compiles* (``cpp.dynamic_threads`` is off by default), so
  a count set at call time does not reach the compiled kernel;
- the best count is a property of the machine's load, not of the kernel: on a shared 2-core
  machine, softmax at (1, 4, 1024, 1024, 64), chunked, took 30 ms on 1 thread and 178 ms on 2
  (materialized at 256 keys: 3.5 vs 18 ms), which a record would then impose on a quiet machine.

So the thread count is left to the user (``torch.set_num_threads``), as for any other torch
code; records are per CPU model and logical CPU count (``records.device_name``).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..backends import knobs as declared
from ..backends.knobs import Constraint, Knob, next_pow2

__all__ = [
    "Knob",
    "Constraint",
    "SearchSpace",
    "config_key",
    "backend_space",
    "torch_space",
    "triton_space",
    "next_pow2",
    "fix_choices",
    "restrict",
    "nearest_untried",
    "study_graph",
    "torch_lowerings",
]


def config_key(config: Mapping[str, Any]) -> str:
    """A config's identity: canonical JSON with sorted keys."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"))


@dataclass
class SearchSpace:
    knobs: list[Knob]
    constraints: list[Constraint] = field(default_factory=list)
    target: str = ""
    notes: list[str] = field(default_factory=list)
    enumerate_limit: int = 200_000
    _valid: list[dict] | None = field(default=None, repr=False)

    # -- basic views -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [k.name for k in self.knobs]

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise KeyError(name)

    def default(self) -> dict:
        cfg: dict[str, Any] = {}
        for k in self.knobs:
            if k.active(cfg):
                cfg[k.name] = k.default
        return cfg

    def lowering_defaults(self) -> list[dict]:
        """For each value of a ``lowering`` knob, the default config of that lowering (its other
        knobs at their defaults): every lowering, PyTorch's own kernels included, is timed in the
        study whatever the sampler does (the warm start queues them after the default)."""
        if "lowering" not in self.names:
            return []
        out = []
        for value in self.knob("lowering").choices:
            cfg: dict[str, Any] = {}
            for k in self.knobs:
                if k.active(cfg):
                    cfg[k.name] = value if k.name == "lowering" else k.default
            out.append(cfg)
        return out

    def canonical(self, config: Mapping[str, Any]) -> dict:
        """Keep the active knobs, in declaration order; unknown keys are dropped."""
        cfg: dict[str, Any] = {}
        for k in self.knobs:
            if k.active(cfg) and k.name in config:
                cfg[k.name] = config[k.name]
        return cfg

    def key(self, config: Mapping[str, Any]) -> str:
        return config_key(self.canonical(config))

    # -- validity ------------------------------------------------------------------------
    def violations(self, config: Mapping[str, Any]) -> list[str]:
        out: list[str] = []
        cfg = dict(config)
        for k in self.knobs:
            if not k.active(cfg):
                continue
            if k.name not in cfg:
                out.append(f"{k.name} missing")
            elif cfg[k.name] not in k.choices:
                out.append(f"{k.name}={cfg[k.name]!r} is not one of {list(k.choices)}")
        if out:
            return out
        for c in self.constraints:
            try:
                ok = bool(c.check(cfg))
            except Exception as e:  # a constraint that cannot be evaluated rejects the config
                ok = False
                out.append(f"{c.name}: {type(e).__name__}: {e}")
                continue
            if not ok:
                out.append(c.message.format(**cfg))
        return out

    def is_valid(self, config: Mapping[str, Any]) -> bool:
        return not self.violations(config)

    # -- enumeration ---------------------------------------------------------------------
    def _enumerate_raw(self) -> Iterator[dict]:
        def rec(i: int, cfg: dict) -> Iterator[dict]:
            if i == len(self.knobs):
                yield dict(cfg)
                return
            k = self.knobs[i]
            if not k.active(cfg):
                yield from rec(i + 1, cfg)
                return
            for v in k.choices:
                cfg[k.name] = v
                yield from rec(i + 1, cfg)
                del cfg[k.name]

        yield from rec(0, {})

    def raw_size(self) -> int:
        """Number of canonical configs before constraints (upper bound, cheap)."""
        return sum(1 for _ in itertools.islice(self._enumerate_raw(), self.enumerate_limit + 1))

    def enumerate(self) -> list[dict] | None:
        """All valid canonical configs, default first; None when the space is too large."""
        if self._valid is None:
            raw = list(itertools.islice(self._enumerate_raw(), self.enumerate_limit + 1))
            if len(raw) > self.enumerate_limit:
                return None
            valid = [c for c in raw if not self.violations(c)]
            d = self.default()
            dk = config_key(d)
            valid.sort(key=lambda c: config_key(c) != dk)  # stable: default first
            self._valid = valid
        return self._valid

    def size(self) -> int | None:
        valid = self.enumerate()
        return None if valid is None else len(valid)

    # -- Optuna mapping ------------------------------------------------------------------
    def suggest(self, trial: Any, every_knob: bool = False) -> dict:
        """Define-by-run suggestion: only active knobs are suggested, unless ``every_knob``
        (samplers that model one fixed set of parameters, like Optuna's GP: the inactive knobs'
        values are then proposed and ignored). Returns the canonical config.

        Knobs are categorical. Numeric knobs as integer positions (so that a sampler could learn
        that 32 and 64 behave alike) were tried and gave TPE no gain: evaluations to come within
        5% of the grid's best, median of 30 seeds, 5.5 -> 6.0 (CPU, 22 configs) and 27.5 -> 28.5
        (synthetic Triton space, 192 configs)."""
        cfg: dict[str, Any] = {}
        for k in self.knobs:
            if every_knob or k.active(cfg):
                cfg[k.name] = trial.suggest_categorical(k.name, list(k.choices))
        return self.canonical(cfg)

    def distributions(self) -> dict:
        import optuna

        return {k.name: optuna.distributions.CategoricalDistribution(list(k.choices)) for k in self.knobs}

    def describe(self) -> str:
        lines = []
        for k in self.knobs:
            cond = f"  (when {k.when[0]} in {list(k.when[1])})" if k.when else ""
            lines.append(f"  {k.name:<16} {list(k.choices)}  default {k.default!r}{cond}")
        for c in self.constraints:
            lines.append(f"  constraint {c.name}")
        size = self.size()
        lines.append(f"  {size if size is not None else '>' + str(self.enumerate_limit)} valid configs")
        return "\n".join(lines)

    def signature(self) -> str:
        """A short hash of the knobs, their choices and the constraints: an Optuna study can only
        go on with the distributions it started with, so a study is per space (``--only``, a
        different J that changes the chunk sizes, a spec whose ``tune:`` section changed)."""
        import hashlib

        desc = [[k.name, [repr(c) for c in k.choices], repr(k.default), repr(k.when)] for k in self.knobs]
        desc.append(sorted(c.name for c in self.constraints))
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:8]

    def as_dict(self) -> dict:
        return {
            "target": self.target,
            "knobs": [
                {"name": k.name, "choices": list(k.choices), "default": k.default,
                 "when": [k.when[0], list(k.when[1])] if k.when else None}
                for k in self.knobs
            ],
            "constraints": [c.name for c in self.constraints],
            "size": self.size(),
        }


# ---------------------------------------------------------------------------------------
# Spaces from the backends' declared knobs
# ---------------------------------------------------------------------------------------

def _nearest(choices: Sequence[Any], want: Any) -> Any:
    """``want`` if it is a choice, else the numeric choice nearest to it in log2 (0 only matches 0)."""
    if want in choices:
        return want
    numeric = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0]
    if not numeric or not isinstance(want, (int, float)) or isinstance(want, bool) or want <= 0:
        return choices[0]
    return min(numeric, key=lambda c: abs(math.log2(c) - math.log2(want)))


def _tuned_knob(knob: Knob, choices: Sequence[Any], sizes: Mapping[str, int], schedule: str | None,
                name: str | None = None, default: Any = None) -> Knob:
    """A declared knob with the choices the tuner tries here and its default: ``default`` when
    given (the config `load` runs without a record: it is always among the choices, so that the
    study times exactly that config), else the backend's default nearest among the choices."""
    choices = tuple(choices)
    if default is None:
        default = _nearest(choices, knob.default_for(sizes, schedule))
    elif default not in choices:
        choices = _inserted(choices, default)
    return Knob(name or knob.name, choices, default, knob.when, knob.doc, knob.allowed)


def _inserted(choices: tuple, value: Any) -> tuple:
    """``choices`` with ``value`` added, in order when they are numbers."""
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices + (value,))
    return tuple(sorted(choices + (value,))) if numeric else choices + (value,)


def study_graph(spec: Any, params: Mapping[str, Any] | None = None, present=None):
    """The folded graph a study times: the spec with the params it gives (overrides of the
    spec's defaults, as `load` takes them) and the optional inputs it gives (`present`; None:
    every optional input). Its lowerings, schedule and defaults are the space's, as they are
    `load`'s for those calls."""
    from ..compiler import compile_graph

    return compile_graph(spec, dict(params or {}), present)


def _torch_choices(knob: Knob, spec_tune: Mapping[str, Sequence], sizes: Mapping[str, int]) -> tuple:
    """Chunks no larger than the padded keys (a larger chunk runs the same code); query chunks
    smaller than the queries (0 = all rows)."""
    I, J = declared.size_of(sizes, "i", 1024), declared.size_of(sizes, "j", declared.size_of(sizes, "i", 1024))
    if knob.name == "CHUNK_N":
        top = max(64, next_pow2(J))
        return tuple(c for c in spec_tune.get("CHUNK_N", knob.choices) if c <= top) or (top,)
    if knob.name == "CHUNK_M" and "CHUNK_M" not in spec_tune:
        return tuple(c for c in knob.choices if c == 0 or c < I)
    return tuple(spec_tune.get(knob.name, knob.choices))


def torch_lowerings(spec: Any, direction: str = "fwd", dtype: str = "float32", params=None, present=None,
                    graph=None) -> tuple:
    """The lowerings the torch backend can run for this spec's graph at these params and
    optional inputs (`study_graph`; or `graph` itself): the library kernels only where
    passes/library.py says they fit; FlexAttention has no CPU backward and runs float32,
    bfloat16 and float16 only."""
    from ..codegen.torch_module import lowerings

    found = lowerings(graph if graph is not None else study_graph(spec, params, present))
    return _runnable(found, "cpu", direction, dtype)


def _runnable(lowerings: tuple, device_type: str, direction: str, dtype: str) -> tuple:
    """The lowerings that run calls of this direction and dtype on this kind of device
    (FlexAttention: `library_calls.flex_runs`)."""
    import torch

    from ..backends.library_calls import flex_runs

    runs = flex_runs(device_type, getattr(torch, dtype), direction == "fwd+bwd")
    return tuple(lowering for lowering in lowerings if lowering != "flex" or runs)


def torch_space(spec: Any, sizes: Mapping[str, int], direction: str = "fwd", dtype: str = "float32",
                params: Mapping[str, Any] | None = None, present=None) -> SearchSpace:
    """CPU target: the torch backend's knobs (lowering, CHUNK_N, CHUNK_M, compile; see knobs.py)
    for the graph of these params and optional inputs (`study_graph`): the spec's ``tune:``
    choices for the knobs it names, the lowerings this graph can run (`torch_lowerings`), and as
    the default the config `load` runs for it without a record (`torch_backend.complete_config`).
    (A compiled chunked config compiles one step per chunk shape, not the unrolled loops: its
    compile time does not grow with N.)"""
    from ..backends.torch_backend import complete_config

    graph = study_graph(spec, params, present)
    spec_tune = dict(getattr(spec, "tune", None) or {})
    spec_tune.setdefault("lowering", tuple(lowering for lowering in declared.TORCH_LOWERINGS
                                           if lowering in torch_lowerings(spec, direction, dtype, graph=graph)))
    default = complete_config(None, sizes, graph)
    knobs: list[Knob] = []
    for k in declared.knobs("torch"):
        active = k.name in default   # knobs the default leaves inactive keep the nearest choice
        knobs.append(_tuned_knob(k, _torch_choices(k, spec_tune, sizes), sizes, None,
                                 default=default[k.name] if active else None))
    return SearchSpace(knobs, [], target="cpu")


def triton_space(spec: Any, sizes: Mapping[str, int], direction: str = "fwd", dtype: str = "float16",
                 schedule: str | None = None, params: Mapping[str, Any] | None = None,
                 present=None, device: str = "cuda") -> SearchSpace:
    """CUDA target: the lowering - the generated Triton kernels, or PyTorch's own SDPA and
    FlexAttention where they fit the graph of these params and optional inputs (`study_graph`)
    and run on ``device`` (Triton's interpreter: the CPU) - and for the Triton kernels their
    tiles, warps and stages (knobs.py); with ``direction == "fwd+bwd"`` the backward kernels'
    knobs too, with the spec's choices for them or else the forward ones. Tiles are multiples of
    16 and no larger than the padded sequence they tile; shared memory is measured by the
    feasibility hook (AOT compile). The default is the config `load` runs without a record: the
    declared defaults for that graph's schedule (``schedule`` given: that one)."""
    from ..backends.triton_backend import lowerings

    graph = study_graph(spec, params, present)
    schedule = schedule or graph.schedule
    spec_tune = dict(getattr(spec, "tune", None) or {})
    spec_tune["lowering"] = _runnable(lowerings(graph), "cpu" if device.startswith("cpu") else "cuda",
                                      direction, dtype)
    names = ("lowering",) + declared.TRITON_FWD_KNOBS + (declared.TRITON_BWD_KNOBS if direction == "fwd+bwd" else ())
    forward_of = dict(zip(declared.TRITON_BWD_KNOBS, declared.TRITON_FWD_KNOBS))
    by_name = {k.name: k for k in declared.knobs("triton")}
    default = declared.default_config("triton", sizes, schedule)
    knobs = []
    for name in names:
        knob = by_name[name]
        choices = spec_tune.get(name) or spec_tune.get(forward_of.get(name, name)) or knob.choices
        knobs.append(_tuned_knob(knob, choices, sizes, schedule, default=default[name]))
    return SearchSpace(knobs, declared.tile_constraints(names, sizes), target="cuda")


def backend_space(backend: str, spec: Any, sizes: Mapping[str, int], direction: str = "fwd",
                  dtype: str = "float32", schedule: str | None = None, params: Mapping[str, Any] | None = None,
                  present=None, device: str = "cuda") -> SearchSpace:
    """The search space of a backend's declared knobs for this problem: the spec at ``params``
    with the optional inputs ``present`` (None: all of them), timed on ``device``."""
    if backend == "torch":
        return torch_space(spec, sizes, direction, dtype, params, present)
    if backend == "triton":
        return triton_space(spec, sizes, direction, dtype, schedule, params, present, device)
    raise ValueError(f"the {backend} backend has no knobs to tune")


def fix_choices(space: SearchSpace, only: Mapping[str, Sequence[Any]]) -> SearchSpace:
    """A copy of ``space`` whose knobs take only the given choices (``--only NAME=V1,V2``).

    Raises ValueError for an unknown knob or a choice that is not in the knob's list.
    """
    knobs = []
    names = set(space.names)
    for n in only:
        if n not in names:
            raise ValueError(f"unknown knob {n!r}; the knobs are {', '.join(space.names)}")
    for k in space.knobs:
        if k.name in only:
            want = list(only[k.name])
            bad = [v for v in want if v not in k.choices]
            if bad or not want:
                raise ValueError(f"{k.name}: {bad or want} not among its choices {list(k.choices)}")
            choices = tuple(v for v in k.choices if v in want)
            default = k.default if k.default in choices else choices[0]
            knobs.append(Knob(k.name, choices, default, k.when, k.doc, k.allowed))
        else:
            knobs.append(k)
    return SearchSpace(knobs, list(space.constraints), space.target, list(space.notes), space.enumerate_limit)


def nearest_untried(space: SearchSpace, config: Mapping[str, Any], taken: set[str], rng: Any) -> dict | None:
    """A valid config not in ``taken`` that differs from ``config`` in the fewest knobs (ties
    broken at random; a knob differs less when its choice is adjacent in the knob's list).

    The tuner's answer to a sampler proposing a config that was evaluated already: keep the
    sampler's intent ("around here") without evaluating anything twice.
    """
    valid = space.enumerate()
    if not valid:
        return None
    best, best_d = [], None
    for c in valid:
        if config_key(c) in taken:
            continue
        d = 0.0
        for k in space.knobs:
            a, b = config.get(k.name), c.get(k.name)
            if a == b:
                continue
            if a in k.choices and b in k.choices:
                d += 1.0 + 0.01 * abs(k.choices.index(a) - k.choices.index(b))
            else:
                d += 1.0
        if best_d is None or d < best_d - 1e-9:
            best, best_d = [c], d
        elif abs(d - best_d) <= 1e-9:
            best.append(c)
    return rng.choice(best) if best else None


def restrict(space: SearchSpace, configs: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Canonical valid configs among ``configs``, without duplicates, order kept."""
    seen: set[str] = set()
    out = []
    for c in configs:
        cc = space.canonical(c)
        k = config_key(cc)
        if k in seen or space.violations(cc):
            continue
        seen.add(k)
        out.append(cc)
    return out
