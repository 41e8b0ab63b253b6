"""Run trials in a child process with a time limit, so that hangs and crashes are just failures.

`TrialRunner` owns one child process (``python -m kernelsearch.tune.trial``), started once and
reused while trials succeed (torch is imported and the timing inputs are made once). The child
talks to the parent over a socket pair with pickled messages:

    parent -> child   ("init", Problem) | ("eval", config, seed) | ("retime", configs, repeat)
                      | ("validate", config, seed) | ("stop",)
    child -> parent   ("ready", info) | ("fatal", kind, message) | ("phase", name) | ("result", dict)

The parent enforces the per-trial time limit: when it runs out, the child's whole process group
(including e.g. Inductor's compile workers) is killed, the trial fails with kind ``timeout``
and the phase it was in, and the next trial gets a fresh child. A child that dies (segfault,
``os._exit``, OOM killer) fails the trial with kind ``crash``, its signal and the last lines of
its log. The child in turn exits when its parent disappears (kill -9 of the tuner), so no
orphan keeps a GPU busy. The child runs in its own session, so Ctrl-C reaches only the parent,
which decides what to do.

Outcome dicts: ``{"status": "ok", "time_ms", "timing", "compile_s", "check", "used_config"}``
or ``{"status": "fail", "kind", "reason", ...}`` (kinds: `policy.py`).
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any, Mapping

__all__ = ["TrialRunner", "RunnerError", "run_one"]

_LIVE: "weakref.WeakSet[TrialRunner]" = weakref.WeakSet()


def _kill_all() -> None:
    for r in list(_LIVE):
        r.close(kill=True)   # kills and reaps; never raises for a child that is gone


atexit.register(_kill_all)


class RunnerError(Exception):
    """The child could not be started (spec does not load, backend missing): fatal for a study."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class TrialRunner:
    def __init__(self, problem: Any, *, startup_timeout: float = 300.0, log_dir: str | None = None,
                 env: Mapping[str, str] | None = None):
        self.problem = problem
        self.startup_timeout = startup_timeout
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.log_path: str | None = None
        self.ready_info: dict = {}
        self.starts = 0
        _LIVE.add(self)

    # -- child lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.close(kill=True)
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        env = dict(os.environ)
        env.update(self.env)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = tempfile.NamedTemporaryFile(prefix="kernelsearch-trial-", suffix=".log", dir=self.log_dir,
                                          delete=False, mode="wb")
        self.log_path = log.name
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kernelsearch.tune.trial", "--fd", str(fd), "--parent", str(os.getpid())],
                pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, close_fds=True)
        finally:
            log.close()
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.starts += 1
        self.conn.send(("init", self.problem))
        deadline = time.monotonic() + self.startup_timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                why = "timed out" if self.proc.poll() is None else f"died ({_signal_name(self.proc.poll())})"
                tail = self.log_tail()
                self.close(kill=True)
                raise RunnerError("startup", f"the trial process {why} while starting\n{tail}")
            if msg[0] == "ready":
                self.ready_info = msg[1]
                return
            if msg[0] == "fatal":
                self.close(kill=True)
                raise RunnerError(msg[1], msg[2])

    def _recv(self, deadline: float, conn: Connection | None = None,
              proc: subprocess.Popen | None = None) -> tuple | None:
        """Next message, or None on timeout or child death (or the runner closed meanwhile)."""
        conn = conn or self.conn
        proc = proc or self.proc
        if conn is None or proc is None:
            return None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                if conn.poll(min(remaining, 0.25)):
                    return conn.recv()
            except (EOFError, OSError, ValueError, TypeError):
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:   # still exiting: the caller's poll() says so
                    pass
                return None
            if proc.poll() is not None:
                # drain anything sent just before death
                try:
                    if conn.poll(0):
                        return conn.recv()
                except (EOFError, OSError, ValueError, TypeError):
                    pass
                return None

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 8192))
                lines = f.read().decode("utf-8", "replace").splitlines()[-n:]
            return "\n".join(lines)
        except OSError:
            return ""

    def close(self, kill: bool = False) -> None:
        proc, conn = self.proc, self.conn
        self.proc, self.conn = None, None
        if proc is not None and proc.poll() is None:
            if not kill and conn is not None:
                try:
                    conn.send(("stop",))
                    proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):   # gone or stuck: killed below
                    pass
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        if self.log_path:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
            self.log_path = None

    # -- trials ----------------------------------------------------------------------------
    def run(self, config: Mapping[str, Any], *, seed: int, timeout_s: float,
            on_phase: Any = None) -> dict:
        """Evaluate one config; never raises for problems of the config itself."""
        self.start()
        conn, proc = self.conn, self.proc
        assert conn is not None and proc is not None
        t0 = time.monotonic()
        phase = "start"
        try:
            conn.send(("eval", dict(config), int(seed)))
        except OSError:
            pass
        deadline = t0 + timeout_s
        waited_since = None  # time spent waiting for the machine (CpuLock) is not the config's
        while True:
            msg = self._recv(deadline if waited_since is None else math.inf, conn, proc)
            if msg is None:
                code = proc.poll()
                tail = self.log_tail()
                if code is None:
                    self.close(kill=True)
                    return {"status": "fail", "kind": "timeout", "phase": phase,
                            "reason": f"no result after {timeout_s:g} s (during {phase}); the trial process was killed",
                            "wall_s": time.monotonic() - t0}
                self.close(kill=True)
                return {"status": "fail", "kind": "crash", "phase": phase,
                        "reason": f"the trial process died during {phase} ({_signal_name(code)})"
                                  + (f"; last output:\n{tail}" if tail else ""),
                        "wall_s": time.monotonic() - t0}
            if msg[0] == "phase":
                if waited_since is not None:
                    deadline += time.monotonic() - waited_since
                phase = msg[1]
                waited_since = time.monotonic() if phase.startswith("waiting") else None
                if on_phase is not None:
                    on_phase(phase)
                continue
            if msg[0] == "result":
                out = dict(msg[1])
                out["wall_s"] = time.monotonic() - t0
                if out.pop("restart", False):
                    self.close(kill=True)
                return out

    def retime(self, configs: list[Mapping[str, Any]], *, repeat: int, timeout_s: float) -> list[dict]:
        self.start()
        conn, proc = self.conn, self.proc
        assert conn is not None and proc is not None
        conn.send(("retime", [dict(c) for c in configs], int(repeat)))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._recv(deadline, conn, proc)
            if msg is None:
                self.close(kill=True)
                return [{"error": "re-timing timed out or crashed"} for _ in configs]
            if msg[0] == "result":
                return list(msg[1])


    def validate(self, config: Mapping[str, Any], *, seed: int, timeout_s: float) -> dict:
        """The final check of a would-be winner (see `Evaluator.validate`)."""
        self.start()
        conn, proc = self.conn, self.proc
        assert conn is not None and proc is not None
        conn.send(("validate", dict(config), int(seed)))
        msg = self._recv(time.monotonic() + timeout_s, conn, proc)
        if msg is None or msg[0] != "result":
            timed_out = proc.poll() is None
            self.close(kill=True)
            return {"ok": False, "kind": "timeout" if timed_out else "crash",
                    "error": "the final check " + ("timed out" if timed_out else "crashed")}
        return dict(msg[1])


def run_one(problem: Any, config: Mapping[str, Any], *, seed: int = 0, timeout_s: float = 60.0) -> dict:
    """Evaluate a single config in a fresh child (convenience for scripts and tests)."""
    r = TrialRunner(problem)
    try:
        return r.run(config, seed=seed, timeout_s=timeout_s)
    finally:
        r.close()


# ---------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------

def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def _child_main(fd: int, parent: int) -> int:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    conn = Connection(fd)
    msg = conn.recv()
    assert msg[0] == "init"
    problem = msg[1]
    try:
        from .target import Evaluator

        ev = Evaluator(problem)
    except Exception as e:  # noqa: BLE001
        import traceback

        kind = type(e).__name__
        conn.send(("fatal", kind, f"{e}\n{traceback.format_exc(limit=8)}" if kind not in ("SpecError", "UsageError") else str(e)))
        return 1
    conn.send(("ready", {"pid": os.getpid()}))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return 0
        if msg[0] == "stop":
            return 0
        if msg[0] == "eval":
            _, config, seed = msg
            res = ev.evaluate(config, seed, phase=lambda s: conn.send(("phase", s)))
            conn.send(("result", res))
        elif msg[0] == "validate":
            _, config, seed = msg
            conn.send(("result", ev.validate(config, seed)))
        elif msg[0] == "retime":
            _, configs, repeat = msg
            conn.send(("result", ev.retime(configs, repeat)))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    a = ap.parse_args()
    sys.exit(_child_main(a.fd, a.parent))
