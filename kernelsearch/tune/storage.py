"""Where studies live, how several workers share one, and how a study survives kill -9.

Storage URLs (``--storage``):

- default: SQLite at ``$KERNELSEARCH_HOME/tune.db``, where ``KERNELSEARCH_HOME`` defaults to
  ``~/.cache/kernelsearch`` (``$XDG_CACHE_HOME/kernelsearch`` when that is set). One machine;
  any number of worker threads (``--workers N``) in one tuner process.
- ``sqlite:///path/to/file.db`` or a path ending in ``.db``/``.sqlite``/``.sqlite3``.
- ``postgresql://user@host:port/db`` (psycopg2): several machines share one study.
- ``journal:/path/to/file.journal`` or a path ending in ``.journal``/``.jsonl``: Optuna's
  append-only journal file (`JournalStorage` + `JournalFileBackend`), for several processes
  on one machine or on a shared file system, no server needed.

Trial budget: ``--trials N`` is the number of *counted* trials the study should hold in total
(configs actually evaluated: timed, or failed for a reason of their own), so that running the
same command again resumes and several workers together stop at exactly N. Workers take a
*budget lock* while they count and ask for the next trial (`budget_lock`): an ``flock`` on a
file beside SQLite/journal storage, a PostgreSQL advisory lock for ``postgresql://``.

Dead workers: each RUNNING trial carries its worker's identity (host, boot id, pid, process
start time; user attr ``ks_run["worker"]``) and a heartbeat (user attr ``ks_heartbeat``, refreshed every
``HEARTBEAT_INTERVAL_S`` by `Heartbeat`). `reap_stale` fails the RUNNING trials whose worker
is provably dead (same host, pid gone or reused) or whose heartbeat is older than the grace
period (other hosts), and re-enqueues their configs so that they are run again: nothing that
was in flight is lost, and nothing finished is touched.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import UsageError
from ..runtime.config_store import home

__all__ = [
    "home", "default_storage_path", "StorageConfig", "parse_storage", "open_storage", "budget_lock",
    "worker_identity", "worker_dead", "Heartbeat", "reap_stale", "HEARTBEAT_INTERVAL_S", "GRACE_S",
]

HEARTBEAT_INTERVAL_S = 10.0
GRACE_S = 60.0


def default_storage_path() -> Path:
    return home() / "tune.db"


@dataclass(frozen=True)
class StorageConfig:
    kind: str            # "sqlite" | "postgresql" | "journal"
    url: str             # what Optuna gets (for journal: the file path)
    path: Path | None    # the file, for file-based storages
    display: str         # for messages (password hidden)


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def parse_storage(url: str | None) -> StorageConfig:
    """Parse ``--storage``; raise UsageError for anything unusable."""
    if url is None or url == "":
        p = default_storage_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        return StorageConfig("sqlite", f"sqlite:///{p}", p, str(p))
    u = url.strip()
    if u.startswith("sqlite:///"):
        p = Path(u[len("sqlite:///"):]).expanduser()
        if not p.is_absolute():
            p = Path.cwd() / p
        if not p.parent.is_dir():
            raise UsageError(f"--storage {url}: directory {p.parent} does not exist")
        return StorageConfig("sqlite", f"sqlite:///{p}", p, str(p))
    if u.startswith(("postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://", "postgres://")):
        if u.startswith("postgres://"):
            u = "postgresql://" + u[len("postgres://"):]
        try:
            from sqlalchemy.engine import make_url

            make_url(u)
        except Exception as e:
            raise UsageError(f"--storage {url}: not a valid PostgreSQL URL ({e})") from None
        if u.startswith("postgresql://"):
            # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3); use whichever driver is here.
            import importlib.util

            if importlib.util.find_spec("psycopg2") is not None:
                u = "postgresql+psycopg2://" + u[len("postgresql://"):]
            elif importlib.util.find_spec("psycopg") is not None:
                u = "postgresql+psycopg://" + u[len("postgresql://"):]
            else:
                raise UsageError("--storage postgresql://... needs a driver: pip install psycopg2-binary")
        return StorageConfig("postgresql", u, None, _hide_password(u))
    if u.startswith("journal:"):
        rest = u[len("journal:"):]
        if rest.startswith("//"):
            rest = rest[2:]
        if not rest:
            raise UsageError(f"--storage {url}: journal: needs a file path, e.g. journal:/tmp/tune.journal")
        p = Path(rest).expanduser()
        if not p.is_absolute():
            p = Path.cwd() / p
        if not p.parent.is_dir():
            raise UsageError(f"--storage {url}: directory {p.parent} does not exist")
        return StorageConfig("journal", str(p), p, f"journal:{p}")
    if "://" in u:
        scheme = u.split("://", 1)[0]
        raise UsageError(f"--storage {url}: unsupported scheme {scheme!r}; use a SQLite path, "
                         "sqlite:///FILE, postgresql://USER@HOST/DB or journal:FILE")
    p = Path(u).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    if p.suffix in (".db", ".sqlite", ".sqlite3"):
        if not p.parent.is_dir():
            raise UsageError(f"--storage {url}: directory {p.parent} does not exist")
        return StorageConfig("sqlite", f"sqlite:///{p}", p, str(p))
    if p.suffix in (".journal", ".jsonl", ".log"):
        if not p.parent.is_dir():
            raise UsageError(f"--storage {url}: directory {p.parent} does not exist")
        return StorageConfig("journal", str(p), p, f"journal:{p}")
    raise UsageError(f"--storage {url}: not a storage URL; use FILE.db (SQLite), FILE.journal (journal), "
                     "sqlite:///FILE, journal:FILE or postgresql://USER@HOST/DB")


_OPEN_LOCK = threading.Lock()


def open_storage(cfg: StorageConfig) -> Any:
    """An Optuna storage for ``cfg``; UsageError when it cannot be reached."""
    import optuna

    with _OPEN_LOCK:
        if cfg.kind == "journal":
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            try:
                return JournalStorage(JournalFileBackend(cfg.url))
            except Exception as e:
                raise UsageError(f"--storage {cfg.display}: cannot open journal file: {e}") from None
        engine_kwargs: dict = {}
        if cfg.kind == "sqlite":
            engine_kwargs = {"connect_args": {"timeout": 120}}
        else:
            engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
        last: Exception | None = None
        for attempt in range(5):
            try:
                st = optuna.storages.RDBStorage(cfg.url, engine_kwargs=engine_kwargs)
                if cfg.kind == "sqlite":
                    _sqlite_wal(st)
                return st
            except Exception as e:  # noqa: BLE001
                last = e
                text = str(e)
                # Two workers creating the tables of a fresh database at once: retry.
                if any(s in text for s in ("already exists", "duplicate key", "UniqueViolation", "database is locked")):
                    time.sleep(0.2 * (attempt + 1))
                    continue
                break
        msg = str(last).strip().splitlines()[0] if last else "unknown error"
        raise UsageError(f"--storage {cfg.display}: cannot open storage: {msg}") from None


def _sqlite_wal(st: Any) -> None:
    """WAL journal, synchronous=NORMAL: 4x cheaper commits, still atomic and kill -9 safe
    (only an OS crash or power loss can drop the last commits)."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(st.engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    st.engine.dispose()


# ---------------------------------------------------------------------------------------
# The budget lock
# ---------------------------------------------------------------------------------------

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    key = str(path)
    with _THREAD_LOCKS_GUARD:
        tl = _THREAD_LOCKS.setdefault(key, threading.Lock())
    with tl:
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class _PgLock:
    """A session-level advisory lock on one dedicated connection (one per worker thread)."""

    def __init__(self, url: str):
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.local = threading.local()

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is None or c.closed:
            c = self.engine.connect()
            self.local.conn = c
        return c

    @contextlib.contextmanager
    def hold(self, key: int) -> Iterator[None]:
        import sqlalchemy

        c = self._conn()
        c.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        c.commit()
        try:
            yield
        finally:
            c.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            c.commit()


_PG_LOCKS: dict[str, _PgLock] = {}


def budget_lock(cfg: StorageConfig, study_name: str):
    """Context manager serialising "count the budget, then ask" across all workers of a study."""
    if cfg.kind == "postgresql":
        with _THREAD_LOCKS_GUARD:
            lk = _PG_LOCKS.get(cfg.url)
            if lk is None:
                lk = _PG_LOCKS[cfg.url] = _PgLock(cfg.url)
        key = zlib.crc32(study_name.encode()) - (1 << 31)
        return lk.hold(key)
    assert cfg.path is not None
    # not "<file>.lock": that is the name of Optuna's own journal-file lock
    return _file_lock(cfg.path.with_name(cfg.path.name + ".budget-lock"))


# ---------------------------------------------------------------------------------------
# Worker liveness
# ---------------------------------------------------------------------------------------

def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()  # fields 3.. of proc(5)
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    st = _proc_stat(pid)
    return st[19] if st and len(st) > 19 else None  # field 22: start time in clock ticks


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def worker_identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": _proc_start(pid)}


def worker_dead(w: dict | None) -> bool | None:
    """True: provably dead; False: provably alive; None: cannot tell (another host)."""
    if not w:
        return None
    if w.get("host") != socket.gethostname() or w.get("boot", "") != _boot_id():
        return None
    pid = int(w.get("pid", -1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    st = _proc_stat(pid)
    if st is None:
        return None if not os.path.isdir("/proc") else True
    if st[0] in ("Z", "X"):  # a zombie: killed, not yet reaped by its parent
        return True
    return (st[19] if len(st) > 19 else None) != w.get("start")


class Heartbeat:
    """Refresh ``ks_heartbeat`` on a RUNNING trial every ``interval`` seconds, in a thread."""

    def __init__(self, storage: Any, trial_id: int, interval: float = HEARTBEAT_INTERVAL_S):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "ks_heartbeat", time.time())
            except Exception:
                return  # finished or storage gone: nothing left to keep alive

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def reap_stale(study: Any, *, grace_s: float = GRACE_S, max_retries: int = 2) -> list[int]:
    """Fail RUNNING trials of dead workers and re-enqueue their configs; returns their numbers.

    Call with the budget lock held. A re-enqueued config carries ``ks_retry_of`` (the first
    trial's number) and ``ks_retries``; after ``max_retries`` stale deaths of the same config
    (a config that takes its worker down with it) the last one counts as a failure instead.
    """
    from optuna.trial import TrialState

    now = time.time()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        run = ua.get("ks_run") or {}
        dead = worker_dead(run.get("worker"))
        if dead is None:
            hb = ua.get("ks_heartbeat")
            last = hb if hb is not None else (t.datetime_start.timestamp() if t.datetime_start else now)
            dead = now - float(last) > grace_s
        if not dead:
            continue
        retries = int(ua.get("ks_retries", 0))
        give_up = retries >= max_retries or not t.params
        why = "process gone" if worker_dead(run.get("worker")) else "no heartbeat"
        storage = study._storage
        try:
            storage.set_trial_user_attr(t._trial_id, "ks", {
                "counted": bool(give_up and t.params), "status": "fail", "kind": "stale",
                "config": run.get("config", dict(t.params)),
                "reason": f"its worker died ({why})" + (
                    " and the config was retried too often" if give_up else "; the config was re-queued")})
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except Exception:  # another worker reaped it first
            continue
        reaped.append(t.number)
        if not give_up:
            study.enqueue_trial(dict(t.params), user_attrs={
                "ks_retry_of": int(ua.get("ks_retry_of", t.number)), "ks_retries": retries + 1},
                skip_if_exists=False)
    return reaped
