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

Where the knobs come from: the spec's ``tune:`` section names the Triton knobs and their
choices; the backend module may add its own (``tune_knobs(spec, sizes, direction)`` returning
dicts with ``name, choices, default, when``) and its defaults (``default_config(spec, sizes)``);
when it does not, the built-in descriptions below are used.

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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "Knob",
    "Constraint",
    "SearchSpace",
    "config_key",
    "build_space",
    "torch_space",
    "triton_space",
    "next_pow2",
    "fix_choices",
    "restrict",
    "nearest_untried",
]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def config_key(config: Mapping[str, Any]) -> str:
    """A config's identity: canonical JSON with sorted keys."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Knob:
    """One tunable parameter with a finite, ordered list of choices.

    ``when=("lowering", ("chunked",))`` makes the knob active only when the knob ``lowering``
    (declared earlier) takes one of the listed values.
    """

    name: str
    choices: tuple
    default: Any
    when: tuple[str, tuple] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"knob {self.name!r} has no choices")
        if self.default not in self.choices:
            raise ValueError(f"knob {self.name!r}: default {self.default!r} is not one of {self.choices}")

    def active(self, config: Mapping[str, Any]) -> bool:
        if self.when is None:
            return True
        parent, values = self.when
        return config.get(parent) in values


@dataclass(frozen=True)
class Constraint:
    """A cheap static predicate; ``check(config) -> bool`` is True when the config is valid."""

    name: str
    check: Callable[[Mapping[str, Any]], bool]
    message: str


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
# Built-in spaces
# ---------------------------------------------------------------------------------------

TORCH_KNOBS = ("lowering", "CHUNK_N", "CHUNK_M", "compile")
TRITON_FWD_KNOBS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
TRITON_BWD_KNOBS = ("BLOCK_M_BWD", "BLOCK_N_BWD", "num_warps_bwd", "num_stages_bwd")
_TRITON_PREFERRED_DEFAULTS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def _nearest(choices: Sequence[Any], want: Any) -> Any:
    if want in choices:
        return want
    try:
        return min(choices, key=lambda c: abs(math.log2(c) - math.log2(want)))
    except Exception:
        return choices[0]


def _backend_module(backend: str):
    """``kernelsearch.backends.<backend>_backend`` (this repository's naming) or ``.<backend>``."""
    import importlib

    for name in (f"kernelsearch.backends.{backend}_backend", f"kernelsearch.backends.{backend}"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
        except Exception:
            return None
    return None


def _backend_defaults(backend: str, spec: Any, sizes: Mapping[str, int]) -> dict:
    """The config the backend uses when it is given none (the baseline of the speedup).

    Asks ``default_config`` of the backend module: with ``(spec, {"B",...})`` or, as the torch
    backend defines it, ``(graph, {"b", "h", "i", "j", ...})`` (it only reads the sizes).
    """
    mod = _backend_module(backend)
    if mod is None:
        return {}
    fn = getattr(mod, "default_config", None)
    if callable(fn):
        both = {**{k.upper(): int(v) for k, v in sizes.items()}, **{k.lower(): int(v) for k, v in sizes.items()}}
        try:
            got = fn(spec, both)
            if isinstance(got, Mapping):
                return dict(got)
        except Exception:
            pass
        try:  # the Triton backend's default_config(graph)
            from ..compiler import compile_graph

            got = fn(compile_graph(spec, {}, frozenset()))
            if isinstance(got, Mapping):
                return dict(got)
        except Exception:
            pass
    const = getattr(mod, "DEFAULT_CONFIG", None)
    return dict(const or {})


def _backend_knobs(backend: str, spec: Any, sizes: Mapping[str, int], direction: str) -> list[Knob] | None:
    mod = _backend_module(backend)
    fn = getattr(mod, "tune_knobs", None) if mod is not None else None
    if not callable(fn):
        return None
    try:
        raw = fn(spec, dict(sizes), direction)
    except Exception:
        return None
    knobs = []
    for d in raw:
        when = d.get("when")
        knobs.append(Knob(d["name"], tuple(d["choices"]), d.get("default", d["choices"][0]),
                          (when[0], tuple(when[1])) if when else None, d.get("doc", "")))
    return knobs


def _spec_tune(spec: Any) -> dict[str, list]:
    tune = getattr(spec, "tune", None) or {}
    return {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in dict(tune).items()}


def torch_space(spec: Any, sizes: Mapping[str, int], direction: str = "fwd") -> SearchSpace:
    """CPU target: the torch backend's own knobs.

    - ``lowering``: ``materialized`` (scores [i, j] in one go) or ``chunked`` (online softmax
      over key chunks, memory O(N));
    - ``CHUNK_N``: key chunk size, only for ``chunked``; powers of two up to the padded key
      length (a chunk larger than J is the same code as a chunk of next_pow2(J));
    - ``CHUNK_M``: query rows per chunk, only for ``chunked`` (0: all rows at once); each query
      chunk visits only the keys its rows can keep, so causal and windowed specs skip work;
    - ``compile``: run the generated function under ``torch.compile`` or eagerly.

    A spec's ``tune:`` section may override the choices of any of these by name.
    """
    J = int(sizes.get("J", 1024))
    I = int(sizes.get("I", J))
    knobs = _backend_knobs("torch", spec, sizes, direction)
    if knobs is None:
        top = max(64, next_pow2(J))
        chunks = [c for c in (32, 64, 128, 256, 512, 1024, 2048, 4096) if c <= top] or [top]
        spec_tune = _spec_tune(spec)
        lowering = tuple(spec_tune.get("lowering", ["materialized", "chunked"]))
        chunks = tuple(c for c in spec_tune.get("CHUNK_N", chunks) if c <= top) or (top,)
        compile_ = tuple(spec_tune.get("compile", [False, True]))
        row_chunks = tuple(spec_tune.get("CHUNK_M", [0] + [c for c in (128, 512) if c < I]))
        defaults = _backend_defaults("torch", spec, sizes)
        lo_def = defaults.get("lowering", "materialized" if "materialized" in lowering else lowering[0])
        ch_def = _nearest(chunks, defaults.get("CHUNK_N", 256))
        co_def = defaults.get("compile", False if False in compile_ else compile_[0])
        knobs = [
            Knob("lowering", lowering, lo_def if lo_def in lowering else lowering[0],
                 doc="materialized scores or chunked online softmax"),
            Knob("CHUNK_N", chunks, ch_def, when=("lowering", ("chunked",)), doc="key chunk size"),
            Knob("CHUNK_M", row_chunks, _nearest(row_chunks, defaults.get("CHUNK_M", 0)),
                 when=("lowering", ("chunked",)), doc="query rows per chunk (0: all)"),
            Knob("compile", compile_, co_def if co_def in compile_ else compile_[0], doc="torch.compile"),
        ]
    return SearchSpace(knobs, [_compiled_blocks_constraint(I, J)], target="cpu")


# torch.compile unrolls the chunked lowering's loops over query and key chunks; compiling takes
# about a second per block on a 2-core machine (softmax: 32 blocks 29 s, 512 blocks 443 s), so
# beyond this many a config would spend its whole --trial-timeout compiling.
MAX_COMPILED_BLOCKS = 128


def _compiled_blocks_constraint(I: int, J: int) -> Constraint:
    def blocks(c: Mapping[str, Any]) -> int:
        return math.ceil(I / (c.get("CHUNK_M") or I)) * math.ceil(J / c["CHUNK_N"])

    def ok(c: Mapping[str, Any]) -> bool:
        return not (c.get("compile") and c.get("lowering") == "chunked") or blocks(c) <= MAX_COMPILED_BLOCKS

    return Constraint(f"compiled chunked lowering unrolls <= {MAX_COMPILED_BLOCKS} blocks", ok,
                      f"compile=True with CHUNK_M={{CHUNK_M}}, CHUNK_N={{CHUNK_N}} unrolls "
                      f"ceil({I}/CHUNK_M) x ceil({J}/CHUNK_N) blocks, more than {MAX_COMPILED_BLOCKS} "
                      "(about a second each to compile)")


def triton_space(spec: Any, sizes: Mapping[str, int], direction: str = "fwd",
                 dtype: str = "float16") -> SearchSpace:
    """CUDA target: the Triton kernels' tile sizes, warps and pipeline stages.

    Choices come from the spec's ``tune:`` section; knobs it does not mention get the usual
    defaults. With ``direction == "fwd+bwd"`` the backward kernels' knobs (``*_BWD``,
    ``*_bwd``) are added, with the spec's choices for them or else the forward choices.
    Constraints: block sizes are multiples of 16 (``tl.dot``'s minimum) and no larger than the
    padded sequence they tile. Shared memory is measured by the feasibility hook (AOT compile).
    """
    I = int(sizes.get("I", 1024))
    J = int(sizes.get("J", 1024))
    tune = _spec_tune(spec)
    base_choices = {
        "BLOCK_M": [16, 32, 64, 128],
        "BLOCK_N": [16, 32, 64, 128],
        "num_warps": [2, 4, 8],
        "num_stages": [1, 2, 3, 4],
    }
    knobs = _backend_knobs("triton", spec, sizes, direction)
    if knobs is None:
        defaults = _backend_defaults("triton", spec, sizes)
        knobs = []
        names = list(TRITON_FWD_KNOBS) + [n for n in tune if n not in TRITON_FWD_KNOBS
                                          and n not in TRITON_BWD_KNOBS and n not in TORCH_KNOBS]
        if direction == "fwd+bwd":
            names += list(TRITON_BWD_KNOBS)
        for n in names:
            fwd_name = {"BLOCK_M_BWD": "BLOCK_M", "BLOCK_N_BWD": "BLOCK_N",
                        "num_warps_bwd": "num_warps", "num_stages_bwd": "num_stages"}.get(n, n)
            choices = tune.get(n) or tune.get(fwd_name) or base_choices.get(fwd_name)
            if not choices:
                continue
            want = defaults.get(n, defaults.get(fwd_name, _TRITON_PREFERRED_DEFAULTS.get(fwd_name, choices[0])))
            knobs.append(Knob(n, tuple(choices), _nearest(choices, want)))
    names = {k.name for k in knobs}
    constraints: list[Constraint] = []
    for n, extent, dim in (("BLOCK_M", I, "I"), ("BLOCK_N", J, "J"),
                           ("BLOCK_M_BWD", I, "I"), ("BLOCK_N_BWD", J, "J")):
        if n not in names:
            continue
        constraints.append(Constraint(f"{n} % 16 == 0", lambda c, n=n: c[n] % 16 == 0,
                                      f"{n}={{{n}}} is not a multiple of 16 (tl.dot needs 16)"))
        cap = max(16, next_pow2(extent))
        constraints.append(Constraint(f"{n} <= next_pow2({dim})", lambda c, n=n, cap=cap: c[n] <= cap,
                                      f"{n}={{{n}}} is larger than the padded {dim} ({cap})"))
    space = SearchSpace(knobs, constraints, target="cuda")
    # The default must be valid; if the preferred default is ruled out, take the first valid one.
    if space.violations(space.default()):
        valid = space.enumerate()
        if valid:
            first = valid[0]
            space.knobs = [Knob(k.name, k.choices, first.get(k.name, k.default), k.when, k.doc) for k in knobs]
            space._valid = None
    return space


def build_space(target: str, spec: Any, sizes: Mapping[str, int], direction: str = "fwd",
                dtype: str = "float32") -> SearchSpace:
    """The space for a target: ``cpu`` (torch backend), ``cuda`` (triton), ``fake`` (tests)."""
    if target == "cpu":
        return torch_space(spec, sizes, direction)
    if target == "cuda":
        return triton_space(spec, sizes, direction, dtype)
    if target == "fake":
        from . import fake

        return fake.fake_space(spec, sizes, direction)
    raise ValueError(f"unknown target {target!r}")


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
            knobs.append(Knob(k.name, choices, default, k.when, k.doc))
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
