"""A throwaway PostgreSQL server on loopback for tests (Debian's binaries), or a skip.

`postgres_url` (a pytest fixture, session-scoped) yields a ``postgresql://`` URL of an empty
database:

- if ``KERNELSEARCH_TEST_PG_URL`` is set, that server is used as is (CI may start its own);
- else, when ``initdb`` and ``pg_ctl`` exist (``/usr/lib/postgresql/*/bin`` or on PATH), a
  cluster is created in a temporary directory, listening on 127.0.0.1 at a free port with
  trust authentication and its socket in that directory, and stopped and removed afterwards.
  PostgreSQL refuses to run as root; as root the cluster runs as the ``postgres`` user (or
  ``nobody``) through ``runuser``;
- otherwise the tests that need it are skipped.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import pytest


def _pg_bin() -> str | None:
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(cand, "initdb")) and os.path.exists(os.path.join(cand, "pg_ctl")):
            return cand
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(initdb))
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as(user: str | None, argv: list[str], **kw) -> subprocess.CompletedProcess:
    if user is not None:
        runuser = shutil.which("runuser")
        if runuser:
            argv = [runuser, "-u", user, "--"] + argv
        else:
            argv = ["su", user, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]
    return subprocess.run(argv, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def postgres_url():
    url = os.environ.get("KERNELSEARCH_TEST_PG_URL")
    if url:
        yield url
        return
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    user = None
    if os.geteuid() == 0:
        for cand in ("postgres", "nobody"):
            try:
                pwd.getpwnam(cand)
                user = cand
                break
            except KeyError:
                continue
        if user is None:
            pytest.skip("running as root and no unprivileged user to run PostgreSQL as")
    tmp = tempfile.mkdtemp(prefix="ks-pg-")
    data = os.path.join(tmp, "data")
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    os.chmod(tmp, 0o755)
    port = _free_port()
    r = _run_as(user, [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                       "--no-sync", "-E", "UTF8"], timeout=120)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr.strip()[-500:]}")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} -c fsync=off -c max_connections=100"
    r = _run_as(user, [os.path.join(bindir, "pg_ctl"), "-D", data, "-o", opts, "-l", os.path.join(tmp, "log"),
                       "-w", "-t", "60", "start"], timeout=120)
    if r.returncode != 0:
        log = ""
        try:
            log = open(os.path.join(tmp, "log")).read()[-800:]
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {r.stderr.strip()[-300:]} {log}")
    try:
        import psycopg2

        deadline = time.time() + 30
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE kstest")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/kstest"
    finally:
        _run_as(user, [os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"], timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
