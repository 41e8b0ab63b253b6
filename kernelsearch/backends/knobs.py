"""The knobs of each backend, declared once: names, types, allowed values, defaults, conditions.

Everything that reads or checks a config goes through this module: `kernelsearch.load(...,
config=...)`, the tuned records the runtime finds (`runtime.config_store`), the generated
module's ``attention(..., lowering=, chunk_n=, chunk_m=)`` and the tuner's search space
(`tune.space`). The reference backend has no knobs.

A `Knob` holds what is *allowed* (validation: any value a backend runs correctly) and what the
tuner *tries* (``choices``: a short list of sensible values). Defaults may depend on the call's
sizes (``b, h, i, j, d``; upper case accepted) and, for Triton, on the graph's schedule (programs
that hold every head of a sample take small tiles).

    validate_config("torch", {"lowering": "chunked", "CHUNK_N": 512}, sizes)
    -> {"lowering": "chunked", "CHUNK_N": 512, "CHUNK_M": 256, "compile": False}
"""
from __future__ import annotations

import difflib
import numbers
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from ..errors import UsageError

__all__ = [
    "ConfigError", "Knob", "Allowed", "OneOf", "AtLeast", "PowerOfTwo", "Constraint", "BACKENDS_WITH_KNOBS",
    "knobs", "knob_names", "default_config", "validate_config", "check_choices", "size_of", "next_pow2",
    "MATERIALIZE_MAX_SCORES", "CHUNK_MAX_SCORES", "DEFAULT_CHUNK_N", "DEFAULT_CHUNK_M", "window_chunk", "COMPILE_MIN_SCORES", "torch_defaults",
    "TRITON_FWD_DEFAULTS", "TRITON_FWD_DEFAULTS_HEADS_IN_TILE", "TRITON_BWD_DEFAULTS",
    "TRITON_BWD_DEFAULTS_HEADS_IN_TILE", "TRITON_FWD_KNOBS", "TRITON_BWD_KNOBS", "HEADS_IN_TILE_SCHEDULES",
    "TORCH_LOWERINGS", "TRITON_LOWERINGS",
]


class ConfigError(UsageError, ValueError):
    """An invalid config: names the knob, the value and what is allowed (CLI: exit code 2)."""


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def size_of(sizes: Mapping[str, int] | None, dim: str, default: int = 1) -> int:
    """A dim's size from `layout.bind`'s lower-case sizes or the tuner's upper-case ones."""
    sizes = sizes or {}
    value = sizes.get(dim.lower(), sizes.get(dim.upper()))
    return int(value) if value is not None else default


# -- what a knob allows --------------------------------------------------------------------

class Allowed:
    kind: type = int

    def admits(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def admits_type(self, value: Any) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is int:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return isinstance(value, self.kind)


@dataclass(frozen=True)
class OneOf(Allowed):
    values: tuple

    @property
    def kind(self) -> type:
        return type(self.values[0])

    def admits(self, value: Any) -> bool:
        return self.admits_type(value) and value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class AtLeast(Allowed):
    lowest: int
    meaning: str = ""

    def admits(self, value: Any) -> bool:
        return self.admits_type(value) and value >= self.lowest

    def describe(self) -> str:
        return f"an integer >= {self.lowest}" + (f" ({self.meaning})" if self.meaning else "")


@dataclass(frozen=True)
class PowerOfTwo(Allowed):
    lowest: int
    highest: int | None = None
    why: str = ""

    def admits(self, value: Any) -> bool:
        return (self.admits_type(value) and value >= self.lowest and value & (value - 1) == 0
                and (self.highest is None or value <= self.highest))

    def describe(self) -> str:
        top = f" and <= {self.highest}" if self.highest is not None else ""
        return f"a power of two >= {self.lowest}{top}" + (f" ({self.why})" if self.why else "")


# -- the declaration ---------------------------------------------------------------------------

Default = Callable[[Mapping[str, int], "str | None"], Any]   # (sizes, schedule) -> value


@dataclass(frozen=True)
class Knob:
    """One knob of a backend.

    ``choices``: what the tuner tries (it may cap them by size, see `tune.space`); ``allowed``:
    what a config may say. ``default`` is a value or ``default(sizes, schedule)``. ``when =
    ("lowering", ("chunked",))``: the knob only applies when the (earlier) knob ``lowering`` takes
    one of those values; otherwise it is dropped from a completed config.
    """

    name: str
    choices: tuple
    default: Any
    when: tuple[str, tuple] | None = None
    doc: str = ""
    allowed: Allowed | None = None

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"knob {self.name!r} has no choices")
        if not callable(self.default) and self.default not in self.choices:
            raise ValueError(f"knob {self.name!r}: default {self.default!r} is not one of {self.choices}")

    def active(self, config: Mapping[str, Any]) -> bool:
        if self.when is None:
            return True
        parent, values = self.when
        return config.get(parent) in values

    def default_for(self, sizes: Mapping[str, int] | None, schedule: str | None = None) -> Any:
        return self.default(sizes or {}, schedule) if callable(self.default) else self.default

    def admits(self, value: Any) -> bool:
        return self.allowed.admits(value) if self.allowed is not None else value in self.choices

    def describe_allowed(self) -> str:
        return self.allowed.describe() if self.allowed is not None else OneOf(self.choices).describe()

    def with_choices(self, choices: tuple, default: Any) -> "Knob":
        return replace(self, choices=tuple(choices), default=default)


@dataclass(frozen=True)
class Constraint:
    """A cheap predicate on a whole config, for the tuner: ``check(config) -> bool`` (True: keep)."""

    name: str
    check: Callable[[Mapping[str, Any]], bool]
    message: str


# -- torch -----------------------------------------------------------------------------------

MATERIALIZE_MAX_SCORES = 1 << 22   # score elements per call up to which the default is materialized
# score elements per key chunk the default chunk size stays under: a chunk's scores (and their exp)
# stay in a 2 MiB L2 (softmax N=4096, compiled, 1 thread: 256 rows x 256 keys 225 ms, x 512 366 ms)
CHUNK_MAX_SCORES = 1 << 19
DEFAULT_CHUNK_N = 256
DEFAULT_CHUNK_M = 256              # query rows per chunk: causal / windowed specs skip the keys a chunk cannot keep


# query rows and keys per chunk when windows bound the keys from below: half the window's width
# (the most keys a row keeps) as a power of two, within these (compiled, N=4096, 1 thread: local's
# 128-key windows 64 x 64 34 ms, 128 x 128 47 ms, flex 36-40 ms; sliding_window's 1024 keys
# 256 x 256 88 ms, 128 x 128 101 ms, 64 x 64 190 ms)
WINDOW_CHUNK_MIN, WINDOW_CHUNK_MAX = 64, 256


def window_chunk(width: int) -> int:
    """Query rows and keys per chunk for windows `width` keys wide (see above)."""
    chunk = WINDOW_CHUNK_MIN
    while chunk < WINDOW_CHUNK_MAX and chunk * 4 <= width:
        chunk *= 2
    return chunk


# two-pass graphs (heads mixed around softmax): every key in one chunk, so that whole_rows_step computes
# each scores tile once (talking heads, b*h = 8, compiled, 1 thread: N=1024 45 ms with 64-row chunks
# against 70 ms for two passes over 256-key chunks; N=4096 ~1.0 s, as two passes; N=8192 6.7 s against
# 4.1 s: the tile leaves the caches), while one query chunk's scores stay under WHOLE_ROWS_MAX_SCORES
# (4 MiB in fp32)
WHOLE_ROWS_CHUNK_M = 64
WHOLE_ROWS_MAX_SCORES = 1 << 20
COMPILE_MIN_SCORES = 1 << 26   # score elements per call from which the default compiles (b h N^2: 4 x 4096^2)


def torch_defaults(sizes: Mapping[str, int], lowerings: tuple = ("materialized", "chunked"),
                   window: int | None = None, sdpa_masks_bounds: bool = False, two_pass: bool = False) -> dict:
    """What the torch backend runs without a config or a tuned record: a heuristic from the sizes
    and the graph (its lowerings, and `window`: the most keys a row keeps where its keep-predicates
    bound the keys from below, as windows do; passes/bounds.window_width), picking what the tuner
    found on the bench shapes (b=1, h=4, d=64, fp32, one thread, N = 1024 and 4096; bench/results/):

    - windows: the chunked lowering with `window_chunk(window)` rows and keys per chunk visits only
      the keys near each block (local N=4096 compiled: 34 ms, against ~1 s for SDPA, which computes
      every score, and 36-40 ms for flex); compiled from MATERIALIZE_MAX_SCORES scores, where the
      compile (~3 s) pays for itself (N=1024: 22-36 ms eager, 14-15.5 ms compiled);
    - else SDPA where it fits the graph (its fused kernel: softmax N=4096 171 ms, the generated
      chunked lowering 225 ms at best), except from COMPILE_MIN_SCORES scores when the
      keep-predicates bound the keys but SDPA would get them as a mask and visit every key
      (`sdpa_masks_bounds`; memory_efficient N=4096, causal + padding + bias: SDPA 464 ms, the
      chunked lowering compiled 256 ms), or make a block mask (document, 64 documents, N=4096,
      bidirectional / causal: SDPA 432 / 361 ms, the chunked lowering's 128 x 128 chunks 183 / 67 ms
      eager, 100 / 35 ms compiled);
    - two-pass graphs (heads mixed before softmax: its statistics need every head's scores) beyond
      MATERIALIZE_MAX_SCORES: chunked and compiled, each query chunk of WHOLE_ROWS_CHUNK_M rows with
      all its keys in one chunk (one scores tile for both passes) while that stays under
      WHOLE_ROWS_MAX_SCORES scores;
    - else (heads mixed, scores transformed) materialized up to MATERIALIZE_MAX_SCORES scores,
      then chunked (memory linear in N), compiled from COMPILE_MIN_SCORES.

    Returns the lowering, compile, and the chunk sizes where they differ from the knobs' defaults."""
    scores = size_of(sizes, "b") * size_of(sizes, "h") * size_of(sizes, "i") * size_of(sizes, "j", size_of(sizes, "i"))
    compiled = scores >= COMPILE_MIN_SCORES
    if window is not None and "chunked" in lowerings:
        chunk = window_chunk(window)
        return {"lowering": "chunked", "CHUNK_N": chunk, "CHUNK_M": chunk, "compile": scores >= MATERIALIZE_MAX_SCORES}
    if "sdpa" in lowerings and not (sdpa_masks_bounds and compiled):
        return {"lowering": "sdpa", "compile": False}
    if "sdpa" in lowerings:
        return {"lowering": "chunked", "compile": True}
    keys = size_of(sizes, "j", size_of(sizes, "i"))
    whole_rows = size_of(sizes, "b") * size_of(sizes, "h") * WHOLE_ROWS_CHUNK_M * keys
    if two_pass and scores > MATERIALIZE_MAX_SCORES and whole_rows <= WHOLE_ROWS_MAX_SCORES:
        return {"lowering": "chunked", "CHUNK_N": keys, "CHUNK_M": WHOLE_ROWS_CHUNK_M, "compile": True}
    if scores > MATERIALIZE_MAX_SCORES:
        return {"lowering": "chunked", "compile": compiled}
    return {"lowering": "materialized", "compile": False}


def _default_lowering(sizes: Mapping[str, int], schedule: str | None) -> str:
    return torch_defaults(sizes)["lowering"]


def _default_chunk_m(sizes: Mapping[str, int], schedule: str | None) -> int:
    return DEFAULT_CHUNK_M if size_of(sizes, "i") > DEFAULT_CHUNK_M else 0


def _default_chunk_n(sizes: Mapping[str, int], schedule: str | None) -> int:
    """The largest power of two (16..512) keeping one chunk's scores under CHUNK_MAX_SCORES."""
    rows = size_of(sizes, "b") * size_of(sizes, "h") * (_default_chunk_m(sizes, schedule) or size_of(sizes, "i"))
    chunk = 16
    while chunk < 512 and rows * chunk * 2 <= CHUNK_MAX_SCORES:
        chunk *= 2
    return chunk


# generated, then library kernels (offered for a graph only where passes/library.py says they fit)
TORCH_LOWERINGS = ("materialized", "chunked", "sdpa", "flex")
_CHUNKED = ("lowering", ("chunked",))
TORCH_KNOBS = (
    Knob("lowering", TORCH_LOWERINGS, _default_lowering,
         doc="materialized scores, chunked online softmax, or PyTorch's sdpa / flex where they fit the graph",
         allowed=OneOf(TORCH_LOWERINGS)),
    Knob("CHUNK_N", (32, 64, 128, 256, 512, 1024, 2048, 4096), _default_chunk_n, when=_CHUNKED,
         doc="key chunk size", allowed=AtLeast(1, "keys per chunk")),
    Knob("CHUNK_M", (0, 64, 128, 512), _default_chunk_m, when=_CHUNKED,
         doc="query rows per chunk (0: all)", allowed=AtLeast(0, "query rows per chunk; 0: all rows at once")),
    Knob("compile", (False, True), False, doc="torch.compile", allowed=OneOf((False, True))),
)


# -- triton ----------------------------------------------------------------------------------

from ..passes.schedule import HEADS_IN_TILE as HEADS_IN_TILE_SCHEDULES  # noqa: E402  (defined once there)
TRITON_FWD_DEFAULTS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
TRITON_FWD_DEFAULTS_HEADS_IN_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1}
TRITON_BWD_DEFAULTS = {"BLOCK_M_BWD": 64, "BLOCK_N_BWD": 64, "num_warps_bwd": 8, "num_stages_bwd": 1}
TRITON_BWD_DEFAULTS_HEADS_IN_TILE = {"BLOCK_M_BWD": 16, "BLOCK_N_BWD": 16, "num_warps_bwd": 8, "num_stages_bwd": 1}
TRITON_FWD_KNOBS = tuple(TRITON_FWD_DEFAULTS)
TRITON_BWD_KNOBS = tuple(TRITON_BWD_DEFAULTS)
_TILE_DIM = {"BLOCK_M": "i", "BLOCK_N": "j", "BLOCK_M_BWD": "i", "BLOCK_N_BWD": "j"}


def _triton_default(name: str) -> Default:
    def default(sizes: Mapping[str, int], schedule: str | None) -> int:
        tiled = schedule in HEADS_IN_TILE_SCHEDULES
        table = {**(TRITON_FWD_DEFAULTS_HEADS_IN_TILE if tiled else TRITON_FWD_DEFAULTS),
                 **(TRITON_BWD_DEFAULTS_HEADS_IN_TILE if tiled else TRITON_BWD_DEFAULTS)}
        value = table[name]
        dim = _TILE_DIM.get(name)
        if dim is not None and size_of(sizes, dim, 0):
            value = min(value, max(16, next_pow2(size_of(sizes, dim))))   # no larger than the padded sequence
        return value
    default.__name__ = f"default_{name}"
    return default


# the generated Triton kernels, then PyTorch's own kernels run by the torch backend's generated
# library lowerings (offered for a graph only where passes/library.py says they fit), so that a
# tuned triton backend is compared with them in the same study and is never slower on what they express
TRITON_LOWERINGS = ("triton", "sdpa", "flex")
_KERNELS = ("lowering", ("triton",))


def _triton_knob(name: str, choices: tuple, allowed: Allowed, doc: str) -> Knob:
    return Knob(name, choices, _triton_default(name), when=_KERNELS, doc=doc, allowed=allowed)


_TILE = PowerOfTwo(16, why="tl.dot needs 16; tl.arange needs a power of two")
_WARPS = PowerOfTwo(1, 32)
TRITON_KNOB_LIST = (
    Knob("lowering", TRITON_LOWERINGS, "triton",
         doc="the generated Triton kernels, or PyTorch's sdpa / flex where they fit the graph",
         allowed=OneOf(TRITON_LOWERINGS)),
    _triton_knob("BLOCK_M", (16, 32, 64, 128), _TILE, "query rows per program"),
    _triton_knob("BLOCK_N", (16, 32, 64, 128), _TILE, "keys per inner-loop step"),
    _triton_knob("num_warps", (2, 4, 8), _WARPS, "warps per program"),
    _triton_knob("num_stages", (1, 2, 3, 4), AtLeast(1, "software pipeline stages"), "pipeline stages"),
    _triton_knob("BLOCK_M_BWD", (16, 32, 64, 128), _TILE, "backward: query rows per program"),
    _triton_knob("BLOCK_N_BWD", (16, 32, 64, 128), _TILE, "backward: keys per program"),
    _triton_knob("num_warps_bwd", (2, 4, 8), _WARPS, "backward: warps per program"),
    _triton_knob("num_stages_bwd", (1, 2, 3, 4), AtLeast(1, "software pipeline stages"), "backward: stages"),
)


def tile_constraints(names, sizes: Mapping[str, int]) -> list[Constraint]:
    """Tiles no larger than the padded sequence they cover (a larger one is the same kernel)."""
    out = []
    for name in names:
        dim = _TILE_DIM.get(name)
        if dim is None:
            continue
        cap = max(16, next_pow2(size_of(sizes, dim, 1024)))
        # a config without the knob (a library lowering: no tiles) breaks neither
        out.append(Constraint(f"{name} % 16 == 0", lambda c, n=name: n not in c or c[n] % 16 == 0,
                              f"{name}={{{name}}} is not a multiple of 16 (tl.dot needs 16)"))
        out.append(Constraint(f"{name} <= next_pow2({dim.upper()})",
                              lambda c, n=name, cap=cap: n not in c or c[n] <= cap,
                              f"{name}={{{name}}} is larger than the padded {dim.upper()} ({cap})"))
    return out


# -- lookups ---------------------------------------------------------------------------------

_DECLARED = {"torch": TORCH_KNOBS, "triton": TRITON_KNOB_LIST, "reference": ()}
BACKENDS_WITH_KNOBS = ("torch", "triton")


def knobs(backend: str) -> tuple[Knob, ...]:
    """The knobs a backend declares, in order (a knob's condition names an earlier knob)."""
    if backend not in _DECLARED:
        raise ConfigError(f"unknown backend {backend!r}; backends: {', '.join(_DECLARED)}")
    return _DECLARED[backend]


def knob_names(backend: str) -> tuple[str, ...]:
    return tuple(k.name for k in knobs(backend))


def _unknown_knob(backend: str, name: Any) -> ConfigError:
    names = knob_names(backend)
    if not names:
        return ConfigError(f"the {backend} backend has no knobs; got config key {name!r} (pass no config)")
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return ConfigError(f"{backend} config: unknown knob {name!r}{hint} The {backend} backend's knobs are "
                       f"{', '.join(names)}")


def _invalid_value(backend: str, knob: Knob, value: Any) -> ConfigError:
    return ConfigError(f"{backend} config: {knob.name}={value!r} is not allowed; {knob.name} ({knob.doc}) "
                       f"must be {knob.describe_allowed()}")


def validate_config(backend: str, config: Mapping[str, Any] | None, sizes: Mapping[str, int] | None = None,
                    schedule: str | None = None) -> dict:
    """The completed config: every knob checked (name, type, value), the knobs it leaves out at
    their defaults for these sizes and schedule, and the knobs whose condition does not hold
    dropped. Raises `ConfigError` (a ValueError) naming the knob, the value and what is allowed."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"{backend} config must be a dict of knob values, e.g. "
                          f"{default_config(backend, sizes, schedule)}; got {type(config).__name__} {config!r:.80}")
    declared = {k.name: k for k in knobs(backend)}
    for name, value in config.items():
        knob = declared.get(name)
        if knob is None:
            raise _unknown_knob(backend, name)
        if value is not None and not knob.admits(value):   # None: the default
            raise _invalid_value(backend, knob, value)
    full: dict[str, Any] = {}
    for knob in declared.values():
        if knob.active(full):
            value = config.get(knob.name)
            full[knob.name] = knob.default_for(sizes, schedule) if value is None else _plain(value)
    return full


def _plain(value: Any) -> Any:
    """numpy integers and the like as Python ints (configs are JSON and launch arguments)."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def default_config(backend: str, sizes: Mapping[str, int] | None = None, schedule: str | None = None) -> dict:
    return validate_config(backend, {}, sizes, schedule)


def check_choices(name: str, choices, backends=BACKENDS_WITH_KNOBS) -> str | None:
    """Why a spec's ``tune:`` entry ``name: choices`` is wrong (None: some backend takes it)."""
    found = [k for b in backends for k in knobs(b) if k.name == name]
    if not found:
        every = sorted({k.name for b in backends for k in knobs(b)})
        close = difflib.get_close_matches(str(name), every, n=1)
        return (f"unknown knob {name!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
                + f" The knobs are {', '.join(every)}")
    knob = found[0]
    for value in choices:
        if not knob.admits(value):
            return f"{name}: {value!r} is not allowed; {name} must be {knob.describe_allowed()}"
    return None
