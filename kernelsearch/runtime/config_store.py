"""Tuned winners, written where the runtime finds them.

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
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "records_path", "shape_bucket", "parse_bucket", "bucket_distance", "device_name", "dtype_name",
    "params_tag", "record_key", "lookup", "lookup_for_call", "record", "neighbours", "all_records", "config_for_call",
    "clear_cache",
]

STAT_INTERVAL_S = 1.0
_FORMAT = 2  # 2: keys end with the params tag


def records_path() -> Path:
    env = os.environ.get("KERNELSEARCH_RECORDS")
    if env:
        return Path(env).expanduser()
    from .storage import home

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
# Cache
# ---------------------------------------------------------------------------------------

class _Cache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.sig: tuple | None = None
        self.checked = -math.inf
        self.env: tuple | None = None
        self.data: dict = {}
        self.memo: dict = {}

    def get(self) -> dict:
        now = time.monotonic()
        if now - self.checked < STAT_INTERVAL_S:
            return self.data  # the fast path: no syscalls, no lock, no environment lookups
        env = (os.environ.get("KERNELSEARCH_RECORDS"), os.environ.get("KERNELSEARCH_HOME"),
               os.environ.get("XDG_CACHE_HOME"))
        path = records_path()
        with self.lock:
            self.env = env
            try:
                st = path.stat()
                sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                sig = None
            self.checked = now
            if path == self.path and sig == self.sig:
                return self.data
            data: dict = {}
            if sig is not None:
                try:
                    with open(path) as f:
                        data = json.load(f).get("records", {})
                except (OSError, ValueError):
                    data = {}
            self.path, self.sig, self.data, self.memo = path, sig, data, {}
            return data

    def invalidate(self) -> None:
        with self.lock:
            self.path, self.sig, self.env, self.data, self.memo = None, None, None, {}, {}
            self.checked = -math.inf


_CACHE = _Cache()


def clear_cache() -> None:
    _CACHE.invalidate()


def all_records() -> dict:
    return dict(_CACHE.get())


def lookup(spec_sha256: str, backend: str, device_name: str, shape_bucket: str, dtype: Any,
           direction: str | None = None, params_tag: str | None = None) -> dict | None:
    """The recorded winning config, or None.

    ``direction=None`` prefers the forward-only record and falls back to the fwd+bwd one
    (whose forward knobs were tuned too); ``"fwd+bwd"`` prefers the training record.
    ``params_tag`` as in `record_key`.
    """
    data = _CACHE.get()
    memo_key = (spec_sha256, backend, device_name, shape_bucket, dtype_name(dtype), direction, params_tag)
    memo = _CACHE.memo
    if memo_key in memo:
        c = memo[memo_key]
        return dict(c) if c is not None else None
    order = ("fwd+bwd", "fwd") if direction == "fwd+bwd" else ("fwd", "fwd+bwd")
    found = None
    for d in order:
        r = data.get(record_key(spec_sha256, backend, device_name, shape_bucket, dtype, d, params_tag))
        if r is not None:
            found = dict(r["config"])
            break
    memo[memo_key] = found
    return dict(found) if found is not None else None


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
        found = lookup(spec.sha256, backend, _device_name_cached(device), bucket, dtype, direction, tag)
        if found is not None:
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


def record(spec_sha256: str, backend: str, device_name: str, shape_bucket: str, dtype: Any, direction: str,
           config: Mapping[str, Any], *, params_tag: str | None = None, **meta: Any) -> Path:
    """Write (replace) one record atomically; returns the records file. ``params_tag`` as in
    `record_key`; ``meta`` (times, the params in words...) is stored alongside."""
    path = records_path()
    key = record_key(spec_sha256, backend, device_name, shape_bucket, dtype, direction, params_tag)
    entry = {"config": dict(config), "spec_sha256": spec_sha256, "backend": backend, "device": device_name,
             "bucket": shape_bucket, "dtype": dtype_name(dtype), "direction": direction,
             "params_tag": params_tag or _no_params_tag(),
             "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta}
    with _locked(path):
        data = {"format": _FORMAT, "records": {}}
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            pass
        data.setdefault("records", {})[key] = entry
        data["format"] = _FORMAT
        fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".records-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
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
        except Exception:
            continue
        if math.isfinite(d):
            found.append((d, b, [r["config"]] + [c for c in r.get("top", []) if c != r["config"]]))
    found.sort(key=lambda x: (x[0], x[1]))
    return [(b, cs) for _, b, cs in found[:k]]
