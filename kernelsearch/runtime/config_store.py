"""The runtime's config store: tuned winners, where `kernelsearch.load` finds them.

The backends look configs up here (`lookup_for_call`); the tuner writes them (`record`). This
module knows nothing of the tuner.

One JSON file per user, ``$KERNELSEARCH_HOME/records.json`` (``KERNELSEARCH_HOME`` defaults to
``~/.cache/kernelsearch``; ``$KERNELSEARCH_RECORDS`` overrides the file itself). Each record is
keyed by (spec sha256, backend, device name, shape bucket, dtype, direction, params tag) and
holds the winning config, its time, the default config's time and the next-best configs (warm
starts for neighbouring shapes).

The params tag (`params_tag`) is a short hash of the spec's resolved params (defaults with the
load-time overrides applied, as `compiler.resolve_params` gives them) and of the optional inputs
the study timed: a config tuned with ``causal=True`` is never used for ``causal=False``.
Records written before the tag existed have no tag in their key and are never matched.

The runtime calls `lookup_for_call` (the backends do, with the sizes `layout.bind` returns;
`config_for_call` derives them from q and k; `lookup` takes the key itself) on every call
without an explicit config, so all are cheap: the file is parsed once and re-read
only when its mtime/size change, which is checked at most every ``STAT_INTERVAL_S`` seconds
(writes by this process invalidate at once; so does `clear_cache()`, e.g. after changing
``KERNELSEARCH_HOME``); results are memoised per key.

The file is written atomically (a temp file renamed over it) under an exclusive ``flock`` on
``records.json.lock``. A file that cannot be the records file (not JSON, truncated, ``[1, 2]``,
``{"records": [1]}``, a record without a ``config`` object, a directory) is reported once per
process (a `RecordsWarning` naming the path and what is wrong), moved aside as
``records.json.corrupt-<time>`` when it is a file, and treated as empty - never silently
overwritten. A record whose config its backend refuses (`backends.knobs.validate_config`) is
reported once and ignored: the call then runs the backend's defaults.

Shape buckets: ``D`` is exact (it changes the kernel); ``I``, ``J`` and ``B*H`` are rounded
up to powers of two, e.g. ``D64-I1024-J1024-BH32``. Neighbours (for warm starts) are buckets
of the same ``D`` at the smallest log2 distance.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..backends.knobs import ConfigError, validate_config
from ..errors import UsageError

__all__ = [
    "home", "records_path", "RecordsWarning", "read_records", "check_writable", "shape_bucket", "parse_bucket", "bucket_distance", "device_name", "dtype_name",
    "params_tag", "record_key", "lookup", "lookup_for_call", "record", "neighbours", "all_records", "config_for_call",
    "clear_cache",
]

STAT_INTERVAL_S = 1.0
_FORMAT = 2  # 2: keys end with the params tag


class RecordsWarning(UserWarning):
    """The records file, or a record in it, could not be used (reported once per process)."""


def home() -> Path:
    """Per-user directory for the tuner's database, records and reports."""
    env = os.environ.get("KERNELSEARCH_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kernelsearch"


def records_path() -> Path:
    env = os.environ.get("KERNELSEARCH_RECORDS")
    if env:
        return Path(env).expanduser()
    return home() / "records.json"


def _p2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def shape_bucket(sizes: Mapping[str, int]) -> str:
    """``{"B","H","I","J","D"} -> "D64-I1024-J1024-BH32"``."""
    B, H, I, J, D = (int(sizes[k]) for k in ("B", "H", "I", "J", "D"))
    return f"D{D}-I{_p2(I)}-J{_p2(J)}-BH{_p2(B * H)}"


def parse_bucket(bucket: str) -> dict[str, int]:
    out = {}
    for part in bucket.split("-"):
        i = 0
        while i < len(part) and part[i].isalpha():
            i += 1
        out[part[:i]] = int(part[i:])
    return out


def bucket_distance(a: str, b: str) -> float:
    """Sum of |log2| ratios over I, J, BH; infinite when D differs."""
    pa, pb = parse_bucket(a), parse_bucket(b)
    if pa.get("D") != pb.get("D"):
        return math.inf
    return sum(abs(math.log2(pa[k]) - math.log2(pb[k])) for k in ("I", "J", "BH") if k in pa and k in pb)


def dtype_name(dtype: Any) -> str:
    return str(dtype).split(".")[-1]


_CPU_NAME: str | None = None


def device_name(device: Any = None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a CUDA device, ``"cpu:<model> x<threads>"`` for the CPU."""
    global _CPU_NAME
    dev = str(device) if device is not None else "cpu"
    if dev.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(dev))
    if _CPU_NAME is None:
        model = ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        if not model:
            import platform

            model = platform.processor() or platform.machine()
        _CPU_NAME = f"cpu:{' '.join(model.split())} x{os.cpu_count()}"
    return _CPU_NAME


def params_tag(params: Mapping[str, Any] | None = None, present: Iterable[str] = ()) -> str:
    """``"p" + 12 hex digits``: a stable hash of resolved params and present optional inputs.

    ``params`` as `compiler.resolve_params` returns them (or a graph's ``params``); expression
    values are hashed by their source text, so equal params give equal tags across processes.
    """
    from ..compiler import params_key

    text = json.dumps([list(params_key(dict(params or {}))), sorted(present)], default=repr)
    return "p" + hashlib.sha256(text.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _no_params_tag() -> str:
    return params_tag({}, ())


def record_key(spec_sha256: str, backend: str, device: str, bucket: str, dtype: str, direction: str = "fwd",
               params_tag: str | None = None) -> str:
    """``params_tag=None`` is the tag of a spec without params, timed without optional inputs."""
    return "|".join((spec_sha256, backend, device, bucket, dtype_name(dtype), direction,
                     params_tag or _no_params_tag()))


# ---------------------------------------------------------------------------------------
# Reading, and what is wrong with a file
# ---------------------------------------------------------------------------------------

_REPORTED: set = set()
_REPORTED_LOCK = threading.Lock()


def _report_once(key: tuple, message: str) -> None:
    with _REPORTED_LOCK:
        if key in _REPORTED:
            return
        _REPORTED.add(key)
    warnings.warn(message, RecordsWarning, stacklevel=3)


def _structure_problem(data: Any) -> str | None:
    """What keeps parsed JSON from being a records file (None: nothing)."""
    if not isinstance(data, dict):
        return f'holds a JSON {type(data).__name__} at the top, not an object {{"format": {_FORMAT}, "records": {{...}}}}'
    records = data.get("records", {})
    if not isinstance(records, dict):
        return f"its 'records' is a JSON {type(records).__name__}, not an object of records by key"
    for key, entry in records.items():
        if not isinstance(entry, dict):
            return f"record {key!r} is a JSON {type(entry).__name__}, not an object"
        if not isinstance(entry.get("config"), dict):
            return f"record {key!r} has no 'config' object"
    return None


def read_records(path: Path) -> tuple[dict, str | None]:
    """(the file's data, what is wrong with it): ({}, None) when there is no file; ({}, why)
    when it cannot be the records file."""
    if path.is_dir():
        return {}, "is a directory, not a records file"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, None
    except UnicodeDecodeError:
        return {}, "is not UTF-8 text"
    except OSError as e:
        return {}, f"cannot be read ({e.strerror or e})"
    try:
        data = json.loads(text)
    except ValueError as e:
        return {}, f"is not valid JSON ({e})" if text.strip() else "is empty"
    problem = _structure_problem(data)
    return ({}, problem) if problem else (data, None)


def _set_aside(path: Path, problem: str) -> None:
    """Report a corrupt records file once and move it aside (a file) so that nothing is lost."""
    aside = None
    if path.is_file():
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        if aside.exists():
            aside = path.with_name(f"{aside.name}-{os.getpid()}")
        try:
            os.replace(path, aside)
        except OSError as e:
            _report_once((str(path), problem), f"{path} {problem}; it is ignored, and could not be moved aside "
                         f"({e.strerror or e})")
            return
    what = f"moved aside to {aside}" if aside else "remove it or set KERNELSEARCH_RECORDS to a file"
    _report_once((str(path), problem), f"{path} {problem}: no tuned configs are used from it ({what})")


def _read_or_set_aside(path: Path) -> dict:
    """The records of a file; a corrupt one is set aside (under the lock) and reads as empty."""
    data, problem = read_records(path)
    if problem is None:
        return data.get("records", {})
    try:
        with _locked(path):
            data, problem = read_records(path)   # another process may have set it aside meanwhile
            if problem is None:
                return data.get("records", {})
            _set_aside(path, problem)
    except OSError as e:   # no lock here (read-only or missing directory): report, ignore the file
        _report_once((str(path), problem), f"{path} {problem}: no tuned configs are used from it "
                     f"(not moved aside: {e.strerror or e})")
    return {}


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------

class _Cache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.sig: tuple | None = None
        self.checked = -math.inf
        self.data: dict = {}
        self.memo: dict = {}

    def get(self) -> dict:
        now = time.monotonic()
        if now - self.checked < STAT_INTERVAL_S:
            return self.data  # the fast path: no syscalls, no lock, no environment lookups
        path = records_path()
        with self.lock:
            try:
                st = path.stat()
                sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                sig = None
            self.checked = now
            if path == self.path and sig == self.sig:
                return self.data
            data = _read_or_set_aside(path) if sig is not None else {}
            self.path, self.sig, self.data, self.memo = path, sig, data, {}
            return data

    def invalidate(self) -> None:
        with self.lock:
            self.path, self.sig, self.data, self.memo = None, None, {}, {}
            self.checked = -math.inf


_CACHE = _Cache()


def clear_cache() -> None:
    _CACHE.invalidate()


def all_records() -> dict:
    return dict(_CACHE.get())


def _find(data: dict, spec_sha256: str, backend: str, device_name: str, shape_bucket: str, dtype: Any,
          direction: str | None, params_tag: str | None) -> tuple[str, dict] | None:
    """(key, record) of the record for these, or None. ``direction=None`` prefers the
    forward-only record and falls back to the fwd+bwd one (whose forward knobs were tuned too);
    ``"fwd+bwd"`` prefers the training record."""
    order = ("fwd+bwd", "fwd") if direction == "fwd+bwd" else ("fwd", "fwd+bwd")
    for d in order:
        key = record_key(spec_sha256, backend, device_name, shape_bucket, dtype, d, params_tag)
        if key in data:
            return key, data[key]
    return None


def lookup(spec_sha256: str, backend: str, device_name: str, shape_bucket: str, dtype: Any,
           direction: str | None = None, params_tag: str | None = None) -> dict | None:
    """The recorded winning config as recorded, or None (``direction`` as in `_find`,
    ``params_tag`` as in `record_key`)."""
    found = _find(_CACHE.get(), spec_sha256, backend, device_name, shape_bucket, dtype, direction, params_tag)
    return dict(found[1]["config"]) if found else None


def _valid_config(backend: str, key: str, config: dict) -> dict | None:
    """A record's config if its backend takes it; else reported once and None."""
    try:
        validate_config(backend, config)
    except ConfigError as e:
        _report_once((str(records_path()), key, str(e)),
                     f"{records_path()}: the record {key!r} holds a config the {backend} backend refuses ({e}); "
                     "it is ignored and the defaults are used")
        return None
    return config


_DEVICE_NAMES: dict[str, str] = {}


def _device_name_cached(device: Any) -> str:
    key = str(device)
    name = _DEVICE_NAMES.get(key)
    if name is None:
        if key.startswith("cuda"):
            import torch

            dev = torch.device(key)
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            name = device_name(dev)
        else:
            name = device_name("cpu")
        _DEVICE_NAMES[key] = name
    return name


def _call_tags(spec: Any, params: Mapping[str, Any] | None, present: Iterable[str] | None) -> tuple[str, ...]:
    """The params tags a call may use, best first: its own optional inputs, then none.

    A record timed without optional inputs still fits a call with some: the tuner checked its
    config with them (`study` validates the winner with every optional input given).
    """
    if params is None:
        spec_params = getattr(spec, "params", None)
        if spec_params:
            from ..compiler import resolve_params

            params = resolve_params(spec)
        else:
            params = {}
    present = tuple(sorted(present or ()))
    tags = (params_tag(params, present),)
    return tags + (params_tag(params, ()),) if present else tags


def lookup_for_call(spec: Any, backend: str, sizes: Mapping[str, int], dtype: Any, device: Any,
                    direction: str | None = None, *, params: Mapping[str, Any] | None = None,
                    present: Iterable[str] | None = None) -> dict | None:
    """Runtime hook: the tuned config for a call, from the sizes of its dims, or None.

    ``spec`` is the spec or the compiled graph (whose ``params`` and ``present`` are then the
    defaults of ``params`` and ``present``). ``params`` are the call's resolved params; None
    means the spec's defaults. ``present`` lists the optional inputs given; None means none.
    Only a record tuned with equal params is returned (see `_call_tags` for optional inputs).

    ``sizes`` are the call's dim sizes as `layout.bind` returns them (``b, h, i, j, d``; upper
    case accepted); missing batch/head dims count as 1. Memoised per (spec, backend, sizes,
    dtype, device, direction, params, present) until the records file changes.
    """
    if hasattr(spec, "spec") and hasattr(spec, "params"):  # a Graph
        params = spec.params if params is None else params
        present = getattr(spec, "present", None) if present is None else present
        spec = spec.spec

    def get(name: str, default: int = 1) -> int:
        v = sizes.get(name.lower(), sizes.get(name.upper()))
        return int(v) if v is not None else default

    data = _CACHE.get()  # refreshes (and clears the memo) when the file changed
    memo = _CACHE.memo
    # spec params are literals or expressions (hashed by identity); another order or another
    # expression object is a memo miss at worst
    params_id = None if params is None else tuple(params.items())
    try:
        hash(params_id)
    except TypeError:
        params_id = params_tag(params)
    mkey = ("call", spec.sha256, backend, tuple(sizes.items()), dtype, str(device), direction, params_id,
            frozenset(present or ()))
    if mkey in memo:
        c = memo[mkey]
        return dict(c) if c is not None else None
    if not data:
        memo[mkey] = None
        return None
    i = get("i")
    bucket = shape_bucket({"B": get("b"), "H": get("h"), "I": i, "J": get("j", i), "D": get("d", 64)})
    found = None
    for tag in _call_tags(spec, params, present):
        hit = _find(data, spec.sha256, backend, _device_name_cached(device), bucket, dtype, direction, tag)
        if hit is not None:
            found = _valid_config(backend, hit[0], dict(hit[1]["config"]))
            break
    memo[mkey] = found
    return dict(found) if found is not None else None


def config_for_call(spec: Any, backend: str, q: Any, k: Any, direction: str | None = None, *,
                    params: Mapping[str, Any] | None = None, present: Iterable[str] | None = None) -> dict | None:
    """Runtime helper: the tuned config for a call with these tensors, or None.

    ``q: [b, h, i, d]``, ``k: [b, h, j, d]`` (any leading batch layout with heads second);
    ``spec``, ``params`` and ``present`` as in `lookup_for_call`.
    """
    B, H, I, D = (int(x) for x in q.shape[-4:]) if q.dim() >= 4 else (1, 1, int(q.shape[-2]), int(q.shape[-1]))
    J = int(k.shape[-2])
    return lookup_for_call(spec, backend, {"b": B, "h": H, "i": I, "j": J, "d": D}, q.dtype, q.device, direction,
                           params=params, present=present)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_writable(path: Path | None = None) -> Path:
    """The records file, or UsageError saying why the winner of a study could not be written there
    (asked before tuning, so that an hour of trials does not end in an unwritable file)."""
    path = path or records_path()
    if path.is_dir():
        raise UsageError(f"the records file {path} is a directory: remove it, or set KERNELSEARCH_RECORDS to a "
                         "file path (or tune with --no-record)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the directory of the records file {path}: {e.strerror or e} "
                         "(set KERNELSEARCH_HOME or KERNELSEARCH_RECORDS, or tune with --no-record)") from None
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"cannot write the records file {path}: its directory is not writable "
                         "(set KERNELSEARCH_HOME or KERNELSEARCH_RECORDS, or tune with --no-record)")
    return path


def _write_atomically(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".records-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def record(spec_sha256: str, backend: str, device_name: str, shape_bucket: str, dtype: Any, direction: str,
           config: Mapping[str, Any], *, params_tag: str | None = None, **meta: Any) -> Path:
    """Write (replace) one record atomically, under the lock; returns the records file.
    ``params_tag`` as in `record_key`; ``meta`` (times, the params in words...) is stored
    alongside. A corrupt file is set aside first (see the module docstring), never overwritten."""
    path = check_writable()
    key = record_key(spec_sha256, backend, device_name, shape_bucket, dtype, direction, params_tag)
    entry = {"config": dict(config), "spec_sha256": spec_sha256, "backend": backend, "device": device_name,
             "bucket": shape_bucket, "dtype": dtype_name(dtype), "direction": direction,
             "params_tag": params_tag or _no_params_tag(),
             "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta}
    with _locked(path):
        data, problem = read_records(path)
        if problem is not None:
            _set_aside(path, problem)
        data = {**data, "format": _FORMAT, "records": {**data.get("records", {}), key: entry}}
        _write_atomically(path, data)
    clear_cache()
    return path


def neighbours(spec_sha256: str, backend: str, device_name: str, shape_bucket: str, dtype: Any,
               direction: str, k: int = 3, params_tag: str | None = None) -> list[tuple[str, list[dict]]]:
    """Records (with the same params tag) of the ``k`` nearest other buckets:
    [(bucket, [winner, next-best...])]."""
    found = []
    want = (spec_sha256, backend, device_name, dtype_name(dtype), direction, params_tag or _no_params_tag())
    for r in _CACHE.get().values():
        if (r.get("spec_sha256"), r.get("backend"), r.get("device"), r.get("dtype"), r.get("direction"),
                r.get("params_tag")) != want:
            continue
        b = r.get("bucket", "")
        if b == shape_bucket:
            continue
        try:
            d = bucket_distance(shape_bucket, b)
        except (ValueError, KeyError):   # a bucket this version cannot parse: not a neighbour
            continue
        if math.isfinite(d):
            found.append((d, b, [r["config"]] + [c for c in r.get("top", []) if c != r["config"]]))
    found.sort(key=lambda x: (x[0], x[1]))
    return [(b, cs) for _, b, cs in found[:k]]
