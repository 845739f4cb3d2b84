"""Helpers shared by tests: connection info, leftovers checks, reading outputs back."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from airflow_provider_cxpg.demo.embedded_postgres import EmbeddedPostgres
from airflow_provider_cxpg.version_compat import AIRFLOW_V_3_0_PLUS

WORKER_MODULE = "airflow_provider_cxpg.worker"


@dataclass
class PgInfo:
    dsn: str
    host: str
    port: int
    user: str
    password: str
    dbname: str
    server: EmbeddedPostgres | None

    @classmethod
    def of(cls, server: EmbeddedPostgres) -> PgInfo:
        return cls(server.dsn(), server.host, server.port, server.user, server.password, server.database, server)

    def airflow_conn_json(
        self,
        *,
        login: str | None = None,
        password: str | None = None,
        host: str | None = None,
        extra: dict[str, Any] | None = None,
        conn_type: str = "postgres",
        schema: str | None = None,
        port: int | None = None,
    ) -> str:
        return json.dumps(
            {
                "conn_type": conn_type,
                "host": self.host if host is None else host,
                "port": self.port if port is None else port,
                "login": login or self.user,
                "password": self.password if password is None else password,
                "schema": schema or self.dbname,
                "extra": extra or {},
            }
        )


def worker_pids(parent: int | None = None) -> list[int]:
    """PIDs of live provider workers started by ``parent`` (default: this process; 0: anyone)."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if WORKER_MODULE.encode() in cmdline and state != "Z" and (parent == 0 or ppid == parent):
            pids.append(int(entry))
    return pids


def cxpg_backends(admin: psycopg.Connection) -> list[tuple[int, str, str | None]]:
    """Server backends opened by the provider (application_name contains 'cxpg-'), except control ones."""
    rows = admin.execute(
        "SELECT pid, application_name, state FROM pg_stat_activity "
        "WHERE application_name LIKE '%%cxpg-%%' AND application_name NOT LIKE '%%-ctl' "
        "AND pid <> pg_backend_pid()"
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def assert_nothing_left(admin: psycopg.Connection, timeout: float = 10.0) -> None:
    """No worker process and no provider backend remain (allowing a short time to wind down)."""
    assert wait_until(lambda: not worker_pids(), timeout), f"worker processes left: {worker_pids()}"
    assert wait_until(lambda: not cxpg_backends(admin), timeout), f"backends left: {cxpg_backends(admin)}"


def read_output(directory: str | Path) -> pa.Table:
    """Read every chunk file listed in the manifest, in chunk order."""
    manifest = json.loads((Path(directory) / "_manifest.json").read_text())
    tables = [pq.read_table(Path(directory) / c["file"]) for c in manifest["chunks"]]
    return pa.concat_tables(tables) if tables else pa.table({})


def manifest_of(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "_manifest.json").read_text())


def system_bindir() -> Path | None:
    """The bin directory of a system PostgreSQL server built with ICU and OpenSSL, or None."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (subprocess.SubprocessError, OSError):
            pass
    candidates.extend(Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    for bindir in candidates:
        if not all((bindir / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
            continue
        try:
            flags = subprocess.run(
                [str(bindir / "pg_config"), "--configure"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (subprocess.SubprocessError, OSError):
            continue
        if "--with-icu" in flags and "--with-openssl" in flags:
            return bindir
    return None


def register_dag(dag: Any) -> Any:
    """Make a DAG built in a test runnable by ``dag.test()``; return it.

    Airflow 3.3's ``dag.test()`` runs only DAGs its bundles hold in the metadata database, so a DAG
    defined in a test module is written there first (Airflow 2 runs any DAG object as it is).
    """
    if not AIRFLOW_V_3_0_PLUS:
        return dag
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    try:
        from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    except ImportError:  # Airflow 3.0 / 3.1 keep them in models
        from airflow.models.dagbag import DagBag, sync_bag_to_db  # type: ignore[no-redef,attr-defined]
    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=os.devnull, collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    return dag


@contextlib.contextmanager
def worker_killed_mid_run(after: float = 1.5, timeout: float = 60.0) -> Iterator[list[int]]:
    """SIGKILL the run's first worker ``after`` seconds into its life, from a thread.

    Yields the list the killed pid is added to; on leaving, waits for the thread and fails the test
    when no worker was killed (the run ended first: the test would prove nothing).
    """
    killed: list[int] = []

    def kill() -> None:
        if wait_until(lambda: bool(worker_pids()), timeout, 0.01):
            time.sleep(after)
            with contextlib.suppress(ProcessLookupError, IndexError):
                pid = worker_pids()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        killer.join(timeout=timeout + after + 5)
    assert killed, "the worker finished before it could be killed"


class TaskTimeout(Exception):
    """What Airflow 2's SIGALRM handler raises (``execution_timeout``): an ``Exception``, not a ``BaseException``."""


@contextlib.contextmanager
def alarm_in(seconds: float) -> Iterator[None]:
    """Raise :class:`TaskTimeout` in this (the main) thread after ``seconds``, as ``execution_timeout`` does."""
    import signal

    def alarm(signum: int, frame: Any) -> None:
        raise TaskTimeout("Timeout, PID: test")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_until_exit(
    script: Path, args: list[str], *, timeout: float, env: dict[str, str] | None = None
) -> tuple[list[str], float]:
    """Run ``script`` (a task process's stand-in) with ``args``; return its stdout lines and the
    seconds from its last line, ``done <time.monotonic()>``, to its exit (what its exit handlers took)."""
    import os
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, str(script), *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    try:
        out, _ = process.communicate(timeout=timeout)
        ended = time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
    lines = out.splitlines()
    done = [line for line in lines if line.startswith("done ")]
    assert done, f"the script did not finish: {lines[-3:]}"
    return lines, ended - float(done[-1].split()[1])
