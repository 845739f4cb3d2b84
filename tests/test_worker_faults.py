"""Real faults against the supervised worker: each test provokes one and checks the aftermath.

Every test ends with :func:`assert_nothing_left`: no worker process and no server backend of the
run remain, whatever went wrong.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor
from airflow_provider_cxpg.exceptions import (
    CxpgError,
    ExtractionAborted,
    HeartbeatLostError,
    JobTimeoutError,
    QueryTimeoutError,
    ReadPanicError,
    RemoteTraceback,
    ServerConnectionError,
    WorkerCrashedError,
)
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.output.manifest import Manifest
from airflow_provider_cxpg.querylog import QueryLog
from airflow_provider_cxpg.supervisor.session import WorkerSession
from airflow_provider_cxpg.supervisor.settings import WorkerSettings
from airflow_provider_cxpg.worker.protocol import IpcSink, ReadChunk
from tests.helpers import (
    PgInfo,
    assert_nothing_left,
    cxpg_backends,
    manifest_of,
    read_output,
    wait_until,
    worker_pids,
)

pytestmark = pytest.mark.integration

FAST = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 3.0,
    "monitor_interval": 0.2,
    "report_wait_after": 0.5,
    "report_wait_every": 1.0,
    "cancel_grace": 2.0,
    "kill_grace": 2.0,
}
GRACE = 6.0  # slack for a loaded 2-core CI machine on top of each limit


@pytest.fixture
def table(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(
        f'CREATE TABLE "{schema}".items AS SELECT g AS id, md5(g::text) AS payload FROM generate_series(1, 5000) g'
    )
    admin.execute(f'ALTER TABLE "{schema}".items ADD PRIMARY KEY (id)')
    return f"{schema}.items"


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def after_worker_starts(action: Callable[[int], None], timeout: float = 20.0) -> threading.Thread:
    """Run ``action(worker_pid)`` in a thread as soon as a worker process exists."""

    def run() -> None:
        if wait_until(lambda: bool(worker_pids()), timeout, 0.02):
            action(worker_pids()[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


_CONTROL_SUFFIXES = ("-plan", "-snap", "-partition", "-count", "-ctl")


def active_backend(admin: psycopg.Connection, timeout: float = 20.0) -> int | None:
    """The pid of an active backend of a worker (not of the parent's planning or control connections)."""

    def find() -> int | None:
        rows = [b for b in cxpg_backends(admin) if b[2] == "active" and not b[1].endswith(_CONTROL_SUFFIXES)]
        return rows[0][0] if rows else None

    wait_until(lambda: find() is not None, timeout, 0.05)
    return find()


@pytest.fixture(autouse=True)
def _no_leftovers(pg: PgInfo) -> Iterator[None]:
    yield
    with psycopg.connect(pg.dsn, autocommit=True) as fresh:  # `admin` may have died with a restart
        assert_nothing_left(fresh)


# -- deadlines ------------------------------------------------------------------------------------


def test_access_exclusive_lock_on_source_times_out_and_is_reported_while_waiting(
    conn_id: str, pg: PgInfo, table: str, out_dir: Path
) -> None:
    log = out_dir / "log.jsonl"
    with psycopg.connect(pg.dsn) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(QueryTimeoutError) as failure:
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(out_dir / "out"), table=table, query_timeout=2.0, query_log_path=str(log), **FAST
            )
        elapsed = time.monotonic() - started
        holder.rollback()
    assert elapsed < 2.0 + GRACE, elapsed
    waits = [e for e in events(log) if e["event"] == "server.waiting"]
    assert waits and waits[0]["wait_event"].startswith("Lock:")
    assert "lock" in str(failure.value).lower()


def test_lock_met_during_a_chunk_read_is_reported_and_cancelled(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, schema: str, table: str, out_dir: Path
) -> None:
    # A plpgsql function reads another table only when it runs, so planning needs no lock on it.
    admin.execute(f'CREATE TABLE "{schema}".other (x int)')
    admin.execute(
        f'CREATE FUNCTION "{schema}".touch_other() RETURNS bigint LANGUAGE plpgsql AS '
        f'$$ BEGIN RETURN (SELECT count(*) FROM "{schema}".other); END $$'
    )
    log = out_dir / "log.jsonl"
    with psycopg.connect(pg.dsn) as holder:
        holder.execute(f'LOCK TABLE "{schema}".other IN ACCESS EXCLUSIVE MODE')
        started = time.monotonic()
        with pytest.raises(QueryTimeoutError) as failure:
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(out_dir / "out"),
                sql=f'SELECT id, "{schema}".touch_other() AS n FROM {table}',
                key_columns=["id"],
                query_timeout=2.0,
                query_log_path=str(log),
                **FAST,
            )
        elapsed = time.monotonic() - started
        holder.rollback()
    assert elapsed < 2.0 + GRACE, elapsed
    names = [e["event"] for e in events(log)]
    assert names.index("query.start") < names.index("server.waiting") < names.index("query.timeout")
    waiting = next(e for e in events(log) if e["event"] == "server.waiting")
    assert waiting["wait_event"].startswith("Lock:") and waiting["worker_pid"] > 0
    assert "Lock" in str(failure.value) and failure.value.limit == "query_timeout"
    assert isinstance(failure.value.__cause__, RemoteTraceback)


def test_pg_sleep_longer_than_query_timeout(conn_id: str, table: str, out_dir: Path) -> None:
    started = time.monotonic()
    with pytest.raises(QueryTimeoutError, match="query_timeout=1.5"):
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir / "out"),
            table=table,
            where="pg_sleep(0.01) IS NOT NULL AND id < 2000",  # ~20 s of sleeping per chunk
            chunk_rows=2000,
            query_timeout=1.5,
            **FAST,
        )
    assert time.monotonic() - started < 1.5 + GRACE


def test_parent_enforces_query_timeout_when_the_server_cannot(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, table: str, out_dir: Path
) -> None:
    """A SIGSTOPped backend cannot act on statement_timeout; the parent's own deadline fires."""
    if pg.server is None:
        pytest.skip("needs to signal server processes of the embedded server")
    stopped: list[int] = []

    def freeze_backend() -> None:
        pid = active_backend(admin)
        if pid:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    threading.Thread(target=freeze_backend, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(QueryTimeoutError) as failure:
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(out_dir / "out"),
                table=table,
                where="pg_sleep(0.002) IS NOT NULL",
                query_timeout=1.0,
                max_worker_restarts=0,
                **{**FAST, "deadline_grace": 1.0},
            )
        assert time.monotonic() - started < 2.0 + GRACE + 2 * FAST["cancel_grace"]
        assert stopped, "the test did not catch the backend"
        assert "ran" in str(failure.value)
    finally:
        for pid in stopped:  # it acts on the pending terminate once continued
            os.kill(pid, signal.SIGCONT)


def test_job_timeout(conn_id: str, table: str, out_dir: Path) -> None:
    started = time.monotonic()
    with pytest.raises(JobTimeoutError):
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir / "out"),
            table=table,
            where="pg_sleep(0.001) IS NOT NULL",
            chunk_rows=500,
            query_timeout=60,
            job_timeout=1.5,
            **FAST,
        )
    assert time.monotonic() - started < 1.5 + GRACE


# -- the worker process -------------------------------------------------------------------------------


def test_sigstop_on_worker_is_detected_by_heartbeat_loss(conn_id: str, table: str, out_dir: Path) -> None:
    frozen: list[int] = []
    after_worker_starts(lambda pid: (time.sleep(0.5), os.kill(pid, signal.SIGSTOP), frozen.append(pid)))
    started = time.monotonic()
    with pytest.raises(HeartbeatLostError) as failure:
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir / "out"),
            table=table,
            where="pg_sleep(0.002) IS NOT NULL",
            query_timeout=60,
            max_worker_restarts=0,
            **FAST,
        )
    assert frozen
    assert time.monotonic() - started < 0.5 + FAST["heartbeat_timeout"] + GRACE
    assert failure.value.limit == "heartbeat_timeout"


def test_a_zombie_attempt_failing_after_its_retry_completed_leaves_the_retrys_output(
    conn_id: str, table: str, out_dir: Path
) -> None:
    """Two attempts of one task in one destination: the zombie's worker froze, its retry resumed the
    zombie's manifest and completed, then the zombie failed on the lost heartbeat and wrote its older
    manifest over the retry's: ``failed``, a quarter of the chunks, beside ``_SUCCESS``."""
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    destination = Destination(str(out_dir / "out"))
    arguments = {"destination": destination.url, "table": table, "chunk_rows": 500, "query_timeout": 60, **FAST}
    zombie: list[BaseException] = []

    def first_attempt() -> None:
        try:
            hook.extract(where="(SELECT pg_sleep(0.3)) IS NOT NULL", max_worker_restarts=0, **arguments)
        except BaseException as exc:  # kept for the assertion below
            zombie.append(exc)

    thread = threading.Thread(target=first_attempt, daemon=True)
    thread.start()

    def committed() -> int:
        manifest = Manifest.load(destination)
        return len(manifest.chunks) if manifest is not None else 0

    assert wait_until(lambda: committed() >= 2, 30, 0.05)
    frozen = worker_pids()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        retry = hook.extract(where="(SELECT pg_sleep(0.3)) IS NOT NULL", **arguments)
        assert retry.rows == 5000
        thread.join(30)
        assert zombie and isinstance(zombie[0], HeartbeatLostError), zombie
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    final = Manifest.load(destination)
    assert final is not None and final.status == "complete" and final.rows == 5000, final
    assert (out_dir / "out" / "_SUCCESS").exists()
    assert read_output(out_dir / "out").num_rows == 5000


def test_sigkill_on_worker_is_reported_at_once_as_a_crash(conn_id: str, table: str, out_dir: Path) -> None:
    killed_at: list[float] = []

    def kill(pid: int) -> None:
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    after_worker_starts(kill)
    with pytest.raises(WorkerCrashedError) as failure:
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir / "out"),
            table=table,
            where="pg_sleep(0.002) IS NOT NULL",
            query_timeout=60,
            max_worker_restarts=0,
            **{**FAST, "heartbeat_timeout": 60.0},  # a crash must not wait for the heartbeat
        )
    assert killed_at and time.monotonic() - killed_at[0] < 5.0
    assert failure.value.exitcode == -signal.SIGKILL
    assert "SIGKILL" in str(failure.value)


def test_pg_terminate_backend_of_the_worker(conn_id: str, admin: psycopg.Connection, table: str, out_dir: Path) -> None:
    stop = threading.Event()

    def terminate() -> None:
        # Every active worker backend, until the run ends: connectorx may use a short-lived
        # connection for the result's metadata first, and terminating only that one ends nothing.
        while not stop.is_set():
            pid = active_backend(admin, timeout=0.2)
            if pid:
                with contextlib.suppress(psycopg.Error):
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            stop.wait(0.1)

    threading.Thread(target=terminate, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(ServerConnectionError, match="terminat|connection"):
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir / "out"),
            table=table,
            where="pg_sleep(0.002) IS NOT NULL",
            query_timeout=60,
            **FAST,
        )
    stop.set()
    assert time.monotonic() - started < 15


def test_server_restart_mid_run_fails_clearly_and_a_rerun_resumes(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, table: str, out_dir: Path
) -> None:
    if pg.server is None:
        pytest.skip("needs to restart the embedded server")
    destination = out_dir / "out"
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)

    restarted: list[str] = []

    def restart_when_running() -> None:
        try:
            with psycopg.connect(pg.dsn, autocommit=True) as watcher:  # its own connection: a thread
                if active_backend(watcher, timeout=30):
                    pg.server.restart()  # type: ignore[union-attr]
                    restarted.append("yes")
        except Exception as exc:  # the server goes away under the watcher: expected
            restarted.append(f"watcher ended: {exc!r}")

    restarter = threading.Thread(target=restart_when_running, daemon=True)
    restarter.start()
    with pytest.raises(CxpgError) as failure:
        hook.extract(
            destination=str(destination),
            table=table,
            where="pg_sleep(0.002) IS NOT NULL",
            chunk_rows=1000,
            query_timeout=60,
            **FAST,
        )
    assert isinstance(failure.value, (ServerConnectionError, WorkerCrashedError)), repr(failure.value)
    restarter.join(timeout=60)
    assert restarted, "the restart did not happen"
    result = hook.extract(destination=str(destination), table=table, chunk_rows=1000, **FAST)
    out = read_output(destination)
    assert result.rows == out.num_rows == 5000
    assert out.column("id").to_pylist() == list(range(1, 5001))


# -- parent-side interruptions ---------------------------------------------------------------------------


def test_task_timeout_signal_in_parent_stops_worker_and_server_query(conn_id: str, table: str, out_dir: Path) -> None:
    """Airflow's execution_timeout raises AirflowTaskTimeout from SIGALRM inside execute()."""
    from airflow.providers.common.compat.sdk import AirflowTaskTimeout

    def alarm(signum: int, frame: Any) -> None:
        raise AirflowTaskTimeout("Timeout, PID: test")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    started = time.monotonic()
    try:
        with pytest.raises(AirflowTaskTimeout):
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(out_dir / "out"),
                table=table,
                where="pg_sleep(0.002) IS NOT NULL",
                query_timeout=60,
                **FAST,
            )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 1.5 + GRACE


def test_keyboard_interrupt_in_parent(conn_id: str, table: str, out_dir: Path) -> None:
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(out_dir / "out"),
                table=table,
                where="pg_sleep(0.002) IS NOT NULL",
                query_timeout=60,
                **FAST,
            )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _operator(conn_id: str, table: str, out_dir: Path, **kwargs: Any) -> Any:
    """The operator as Airflow would run it, with this module's fast supervision settings."""
    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

    return PostgresExtractOperator(
        task_id="extract",
        postgres_conn_id=conn_id,
        table=table,
        destination=str(out_dir / "out"),
        worker_settings=FAST,
        **kwargs,
    )


def test_on_kill_from_sigterm_handler_aborts_execute(conn_id: str, table: str, out_dir: Path) -> None:
    """Airflow 3 calls on_kill from its SIGTERM handler in the task process, then lets execute go on."""
    op = _operator(conn_id, table, out_dir, where="pg_sleep(0.002) IS NOT NULL", query_timeout=60)
    previous = signal.signal(signal.SIGTERM, lambda s, f: op.on_kill())
    after_worker_starts(lambda pid: (time.sleep(0.5), os.kill(os.getpid(), signal.SIGTERM)))
    started = time.monotonic()
    try:
        with pytest.raises(ExtractionAborted, match="on_kill"):
            op.execute({})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert time.monotonic() - started < 0.5 + GRACE


def test_on_kill_from_a_signal_that_lands_inside_a_bounded_call_does_not_deadlock(
    conn_id: str, admin: psycopg.Connection, table: str, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler interrupts the parent inside a lock of its own (a manifest write's deadline call).

    Seen in CI before: on_kill stopped the worker from the handler, then blocked on a monitor lock the
    interrupted frame held; the task hung for good. The deadline loop no longer queries the server at
    all (a sampler thread does), and on_kill takes no lock; the SIGTERM here is sent from inside the
    lock of a bounded storage call on the main thread, so the handler runs exactly there.
    """
    from airflow_provider_cxpg.bounded import SerialCalls

    op = _operator(conn_id, table, out_dir, where="pg_sleep(0.002) IS NOT NULL", query_timeout=60)
    original = SerialCalls.call
    fired: list[float] = []

    def call_then_signal(self: SerialCalls, operation: str, fn: Any, timeout: Any, **kwargs: Any) -> Any:
        main = threading.current_thread() is threading.main_thread()
        if main and not fired and worker_pids() and "writing _manifest.json" in operation:
            with self._lock:
                fired.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here, on this thread, inside the lock
        return original(self, operation, fn, timeout, **kwargs)

    monkeypatch.setattr(SerialCalls, "call", call_then_signal)
    previous = signal.signal(signal.SIGTERM, lambda s, f: op.on_kill())
    alarm = signal.signal(signal.SIGALRM, lambda s, f: pytest.fail("deadlocked: on_kill never returned"))
    signal.alarm(60)
    try:
        with pytest.raises(ExtractionAborted, match="on_kill"):
            op.execute({})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, alarm)
        signal.signal(signal.SIGTERM, previous)
    assert fired and time.monotonic() - fired[0] < GRACE
    assert wait_until(lambda: not worker_pids(), 10, 0.05), worker_pids()
    assert_nothing_left(admin)


def _killed_while_a_query_waits_on_a_lock(op: Any, pg: PgInfo, table: str) -> float:
    """Run ``op`` with ``table`` locked; SIGTERM this process (its handler calls ``op.on_kill()``, as
    Airflow's does) once a query of the run waits on the lock. ``op`` must raise ExtractionAborted;
    return the seconds it took."""
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'cxpg%' AND wait_event_type = 'Lock'"

    def watch() -> None:
        with psycopg.connect(pg.dsn, autocommit=True) as watcher:
            if wait_until(lambda: watcher.execute(waiting).fetchone()[0] > 0, 30, 0.05):
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda s, f: op.on_kill())
    try:
        with psycopg.connect(pg.dsn) as holder:
            holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            threading.Thread(target=watch, daemon=True).start()
            started = time.monotonic()
            with pytest.raises(ExtractionAborted, match="on_kill"):
                op.execute({})
            elapsed = time.monotonic() - started
            holder.rollback()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return elapsed


def test_on_kill_while_planning_waits_on_a_lock_cancels_the_planning_query(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, table: str, out_dir: Path
) -> None:
    """Before any chunk: the parent's own catalog query waits on a lock, for up to query_timeout."""
    op = _operator(conn_id, table, out_dir, query_timeout=120)
    elapsed = _killed_while_a_query_waits_on_a_lock(op, pg, table)
    assert elapsed < 30 + GRACE, elapsed  # not the 120 s query_timeout
    assert wait_until(lambda: not worker_pids(), 10, 0.05), worker_pids()
    assert_nothing_left(admin)


@pytest.mark.parametrize("operator", ["planner", "validator"])
def test_on_kill_stops_the_partition_planner_and_validator_waiting_on_a_lock(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, table: str, out_dir: Path, operator: str
) -> None:
    """They had no on_kill: SIGTERM left the task and its backend waiting for query_timeout (the
    validator's verify_count: always 3600 s)."""
    from airflow_provider_cxpg.operators.partition import (
        PostgresPartitionPlanOperator,
        PostgresPartitionValidateOperator,
    )

    if operator == "validator":
        op: Any = PostgresPartitionValidateOperator(
            task_id="validate",
            destination=_fanned_out(conn_id, table, out_dir),
            postgres_conn_id=conn_id,
            verify_count=True,
        )
    else:
        op = PostgresPartitionPlanOperator(
            task_id="plan", postgres_conn_id=conn_id, table=table, partitions=2, destination=str(out_dir / "dataset")
        )
    elapsed = _killed_while_a_query_waits_on_a_lock(op, pg, table)
    assert elapsed < 30 + GRACE, elapsed
    assert_nothing_left(admin)


def _fanned_out(conn_id: str, table: str, out_dir: Path) -> str:
    """A dataset planned in two ranges, each extracted (the mapped extracts, one after another)."""
    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
    from airflow_provider_cxpg.operators.partition import PostgresPartitionPlanOperator

    dataset = str(out_dir / "dataset")
    planner = PostgresPartitionPlanOperator(
        task_id="plan", postgres_conn_id=conn_id, table=table, partitions=2, destination=dataset
    )
    for kwargs in planner.execute({}):
        PostgresExtractOperator(
            task_id="extract", postgres_conn_id=conn_id, table=table, worker_settings=FAST, **kwargs
        ).execute({})
    return dataset


def test_the_validators_query_timeout_bounds_verify_count(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, table: str, out_dir: Path
) -> None:
    """verify_count waited up to the default hour behind a lock: the validator had no query_timeout.
    A bad one fails before anything is read."""
    from airflow_provider_cxpg.exceptions import DeadlineExceededError, InvalidInputError
    from airflow_provider_cxpg.operators.partition import PostgresPartitionValidateOperator

    dataset = _fanned_out(conn_id, table, out_dir)
    arguments = {"task_id": "validate", "destination": dataset, "postgres_conn_id": conn_id, "verify_count": True}
    with pytest.raises(InvalidInputError, match="query_timeout"):
        PostgresPartitionValidateOperator(**arguments, query_timeout="soon").execute({})
    op = PostgresPartitionValidateOperator(**arguments, query_timeout=dt.timedelta(seconds=2))
    with psycopg.connect(pg.dsn) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            op.execute({})
        elapsed = time.monotonic() - started
        holder.rollback()
    assert elapsed < 2 + GRACE, elapsed
    assert op.execute({})["rows"] == admin.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    assert_nothing_left(admin)


@pytest.mark.parametrize("table_format", ["parquet", "delta"])
def test_on_kill_as_the_run_ends_fails_the_task_and_commits_nothing_more(
    conn_id: str, table: str, out_dir: Path, monkeypatch: pytest.MonkeyPatch, table_format: str
) -> None:
    """on_kill landed after the last chunk (or before a table commit): the task ended green."""
    from airflow_provider_cxpg.run.extraction import Extraction

    if table_format == "delta":
        pytest.importorskip("deltalake")
    op = _operator(conn_id, table, out_dir, **({"table_format": "delta"} if table_format == "delta" else {}))
    if table_format == "parquet":
        original = Extraction._run_session

        def last_chunk_then_killed(self: Extraction, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            op.on_kill()  # as Airflow's SIGTERM handler would, the instant the last chunk is in
            return result

        monkeypatch.setattr(Extraction, "_run_session", last_chunk_then_killed)
    else:
        original_run = Extraction.run

        def extracted_then_killed(self: Extraction) -> Any:
            result = original_run(self)
            op.on_kill()  # the data is staged; the commit comes next
            return result

        monkeypatch.setattr(Extraction, "run", extracted_then_killed)
    with pytest.raises(ExtractionAborted, match="on_kill"):
        op.execute({})
    if table_format == "delta":  # nothing committed: the table has no version at all
        assert not list((out_dir / "out" / "_delta_log").glob("*.json")), "a version was committed"
    else:
        assert manifest_of(out_dir / "out")["status"] != "complete"


# -- protocol-level faults ---------------------------------------------------------------------------------


def _session(pg: PgInfo, **overrides: Any) -> WorkerSession:
    endpoint = PostgresEndpoint(host=pg.host, port=pg.port, dbname=pg.dbname, user=pg.user, password=pg.password)
    app = f"cxpg-faults{os.getpid()}"
    settings = WorkerSettings(**{**FAST, **overrides})
    redactor = Redactor(endpoint.secrets())
    return WorkerSession(
        endpoint.with_session(application_name=app, statement_timeout_ms=10_000),
        settings,
        QueryLog("faults", redactor=redactor),
        application_name=app,
        redactor=redactor,
    )


def test_rust_panic_becomes_a_proper_error_and_the_worker_survives(pg: PgInfo, tmp_path: Path) -> None:
    """Reading an interval natively panics inside connectorx (a BaseException); the worker reports it."""
    with _session(pg) as session:
        panic = ReadChunk(
            query_id=session.next_query_id(),
            chunk_index=0,
            sql="SELECT interval '1 day' AS x",
            sink=IpcSink(str(tmp_path / "a.arrow")),
            schema=pa.schema([("x", pa.string())]),
        )
        with pytest.raises(ReadPanicError, match="panicked") as failure:
            session.run(panic)
        assert isinstance(failure.value.__cause__, RemoteTraceback)
        ok = ReadChunk(
            query_id=session.next_query_id(),
            chunk_index=1,
            sql="SELECT 1::int AS x",
            sink=IpcSink(str(tmp_path / "b.arrow")),
            schema=pa.schema([("x", pa.int32())]),
        )
        read, _ = session.run(ok)
        assert read.rows == 1


def test_worker_exit_during_start_is_a_start_error(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_cxpg.exceptions import WorkerStartError

    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(WorkerStartError):
        _session(pg).start()


def test_worker_has_no_secret_in_argv_or_environment(
    conn_id: str, pg: PgInfo, table: str, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "fernet-secret-value")
    monkeypatch.setenv("MY_API_TOKEN", "token-secret-value")
    seen: dict[str, bytes] = {}

    def inspect(pid: int) -> None:
        time.sleep(0.3)
        seen["cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes()
        seen["environ"] = Path(f"/proc/{pid}/environ").read_bytes()

    after_worker_starts(inspect)
    ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir / "out"), table=table, where="pg_sleep(0.0003) IS NOT NULL", **FAST
    )
    assert seen, "the worker was not observed"
    blob = seen["cmdline"] + b"\0" + seen["environ"]
    for secret in Redactor.variants([pg.password]) + ["fernet-secret-value", "token-secret-value"]:
        assert secret.encode() not in blob
    names = {kv.split(b"=", 1)[0].decode() for kv in seen["environ"].split(b"\0") if kv}
    assert not any(n.startswith("AIRFLOW") for n in names), names
    assert b"airflow_provider_cxpg.worker" in seen["cmdline"]


def test_worker_modules_do_not_import_airflow() -> None:
    code = (
        "import sys, airflow_provider_cxpg.worker.server, airflow_provider_cxpg.worker.chunk;"
        "bad = [m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_hostile_host_fork_hazard_and_provider_immunity(pg: PgInfo, tmp_path: Path) -> None:
    """A host that read with connectorx, runs threads and Sentry, and set start method 'fork'."""
    script = Path(__file__).with_name("hostile_host.py")
    env = {**os.environ, "CXPG_HOSTILE_DSN": pg.dsn, "CXPG_HOSTILE_READS": "20"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["raw_fork_hung"] is True, report  # the hazard is real here
    assert report["provider_reads_ok"] == 20, report
    assert report["provider_max_seconds"] < 30, report


def _lock_other_table(admin: psycopg.Connection, schema: str) -> str:
    """A plpgsql function that reads another table only when it runs (planning takes no lock on it)."""
    admin.execute(f'CREATE TABLE "{schema}".other (x int)')
    admin.execute(
        f'CREATE FUNCTION "{schema}".touch_other() RETURNS bigint LANGUAGE plpgsql AS '
        f'$$ BEGIN RETURN (SELECT count(*) FROM "{schema}".other); END $$'
    )
    return f'"{schema}".other'


def _streamed_read_waiting_on_a_lock(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, schema: str, table: str, out_dir: Path, **kwargs: Any
) -> None:
    """Extract while each row's query waits on a lock another session holds on a second table.

    Streamed (``stream_rows``): that read holds the GIL while it waits for its first batch, so the
    worker's heartbeats pause — the case the parent must tell apart from a frozen worker.
    """
    other = _lock_other_table(admin, schema)
    with psycopg.connect(pg.dsn) as holder:
        holder.execute(f"LOCK TABLE {other} IN ACCESS EXCLUSIVE MODE")
        try:
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(out_dir / "out"),
                sql=f'SELECT id, "{schema}".touch_other() AS n FROM {table}',
                key_columns=["id"],
                stream_rows=65_536,
                **{**FAST, "heartbeat_timeout": 1.5},
                **kwargs,
            )
        finally:
            holder.rollback()


def test_a_worker_silent_while_its_query_waits_on_a_lock_is_not_declared_dead(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, schema: str, table: str, out_dir: Path
) -> None:
    """A streamed read holds the GIL while it waits for its first batch: heartbeats pause, legitimately."""
    log = out_dir / "log.jsonl"
    with pytest.raises(QueryTimeoutError):
        _streamed_read_waiting_on_a_lock(
            conn_id, pg, admin, schema, table, out_dir, query_timeout=6.0, query_log_path=str(log)
        )
    names = [e["event"] for e in events(log)]
    assert "worker.waiting" in names and "worker.heartbeat_missed" not in names


def test_a_stopped_worker_is_declared_dead_even_while_its_query_waits(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, schema: str, table: str, out_dir: Path
) -> None:
    frozen: list[float] = []

    def freeze_once_waiting(pid: int) -> None:
        # Once its query waits on the lock (the worker is past its start, heartbeats run): a worker
        # frozen before it reports ready is start_timeout's case, not this one.
        with psycopg.connect(pg.dsn, autocommit=True) as watcher:
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'cxpg%%' AND wait_event_type = 'Lock'"
            wait_until(lambda: watcher.execute(waiting).fetchone()[0] > 0, 60, 0.05)
        os.kill(pid, signal.SIGSTOP)
        frozen.append(time.monotonic())

    after_worker_starts(freeze_once_waiting)
    with pytest.raises(HeartbeatLostError):
        _streamed_read_waiting_on_a_lock(
            conn_id, pg, admin, schema, table, out_dir, query_timeout=90.0, max_worker_restarts=0
        )
    assert frozen and time.monotonic() - frozen[0] < 1.5 + GRACE
