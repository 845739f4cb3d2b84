"""Nothing hangs and nothing is left behind: frozen stores, killed task processes, dead networks, tokens.

Each test provokes one fault for real (a frozen S3 gateway, SIGKILL of the task process, SIGTERM of
its process group, SIGALRM, a frozen TCP path to PostgreSQL, a password rotated mid-run) and asserts
the deadline, the error, and that no worker process and no server backend of the run remain.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_provider_cxpg.exceptions import (
    ConnectionConfigError,
    ExtractionAborted,
    JobTimeoutError,
    QueryTimeoutError,
    StorageError,
)
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.output.manifest import Manifest
from tests.helpers import PgInfo, assert_nothing_left, cxpg_backends, read_output, wait_until, worker_pids
from tests.netproxy import running_proxy
from tests.s3_server import S3Server, s3_process

pytestmark = pytest.mark.integration

FAST = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 5.0,
    "monitor_interval": 0.2,
    "report_wait_after": 0.5,
    "report_wait_every": 1.0,
    "cancel_grace": 2.0,
    "kill_grace": 2.0,
    "control_timeout": 2.0,
}
GRACE = 8.0  # slack for a loaded 2-core machine
LOCK_KEY = 424242
WAITS_ON_ADVISORY_LOCK = f"(SELECT pg_advisory_lock_shared({LOCK_KEY})) IS NOT NULL"  # an InitPlan: once per chunk


@pytest.fixture
def table(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(f'CREATE TABLE "{schema}".items AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 600) g')
    admin.execute(f'ALTER TABLE "{schema}".items ADD PRIMARY KEY (id)')
    return f"{schema}.items"


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def backends_of(admin: psycopg.Connection, like: str = "%cxpg-%") -> list[tuple[Any, ...]]:
    return admin.execute(
        "SELECT pid, application_name, state, wait_event_type FROM pg_stat_activity "
        "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
        (like,),
    ).fetchall()


# -- a store that stops answering ------------------------------------------------------------------------


@pytest.fixture
def s3() -> Iterator[S3Server]:
    """moto's S3 server in a process of its own: a test freezes it with SIGSTOP."""
    with s3_process() as server:
        yield server


def _options(s3: S3Server) -> dict[str, Any]:
    return {**s3.storage_options(), "config_kwargs": {"retries": {"max_attempts": 1}}}


def test_a_store_that_freezes_mid_run_ends_it_within_storage_timeout(
    conn_id: str, admin: psycopg.Connection, table: str, s3: S3Server
) -> None:
    """The worker's next chunk upload hangs: its own deadline fails it, the parent stops everything."""
    bucket = s3.create_bucket()
    prefix = f"frozen/{uuid.uuid4().hex[:6]}"

    def freeze_after_first_chunk() -> None:
        if wait_until(lambda: any(k.endswith("part-000000.parquet") for k in s3.keys(bucket, prefix)), 30, 0.05):
            s3.freeze()

    threading.Thread(target=freeze_after_first_chunk, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"s3://{bucket}/{prefix}.*storage_timeout=4") as caught:
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=f"s3://{bucket}/{prefix}",
            storage_options=_options(s3),
            table=table,
            where="(SELECT pg_sleep(0.2)) IS NOT NULL",
            chunk_rows=100,
            storage_timeout=4,
            **FAST,
        )
    elapsed = time.monotonic() - started
    assert elapsed < 4 * 3 + GRACE, elapsed  # a write or two and a manifest write may each wait it out
    assert caught.value.limit == "storage_timeout"
    s3.thaw()
    assert_nothing_left(admin)


def test_a_store_that_freezes_during_a_manifest_write_ends_the_run(
    conn_id: str,
    admin: psycopg.Connection,
    table: str,
    s3: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent's own write hangs (the store froze just before it): its deadline fires."""
    bucket = s3.create_bucket()
    saves: list[int] = []
    original = Manifest.save

    def save_then_freeze(self: Manifest, destination: Destination) -> None:
        saves.append(len(self.chunks))
        if len(self.chunks) == 2:
            s3.freeze()
        original(self, destination)

    monkeypatch.setattr(Manifest, "save", save_then_freeze)
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"writing _manifest\.json at s3://.*storage_timeout=3"):
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=f"s3://{bucket}/manifest-freeze",
            storage_options=_options(s3),
            table=table,
            chunk_rows=100,
            storage_timeout=3,
            **FAST,
        )
    assert time.monotonic() - started < 3 * 2 + GRACE
    s3.thaw()
    assert_nothing_left(admin)


def test_every_destination_operation_on_a_frozen_store_raises_in_time(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    destination = Destination(f"s3://{bucket}/ops", _options(s3), timeout=2)
    destination.write_json("probe.json", {"ok": True})
    s3.freeze()
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"reading probe\.json at s3://.*did not finish within storage_timeout=2"):
        destination.read_json("probe.json")
    assert time.monotonic() - started < 2 + 3
    for operation in (lambda: destination.list_names(), lambda: destination.remove("probe.json")):
        started = time.monotonic()
        with pytest.raises(StorageError, match="not attempted|storage_timeout"):
            operation()
        assert time.monotonic() - started < 1  # behind a stuck call: fails at once, never queues
    s3.thaw()


def test_a_store_that_freezes_under_the_validator_fails_it_naming_the_read_that_hung(
    s3: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The validator's clean-up (withdrawing _SUCCESS) hit the same frozen store: the task's error
    named that listing, "not attempted", instead of the check's read that hung."""
    from airflow_provider_cxpg.operators.partition import PostgresPartitionValidateOperator
    from airflow_provider_cxpg.run.parallel import DATASET_MANIFEST

    bucket = s3.create_bucket()
    dataset = Destination(f"s3://{bucket}/validated", _options(s3), timeout=2)
    dataset.write_json(DATASET_MANIFEST, {"ranges": [{"index": 0, "lower": None, "upper": None}], "source": {}})
    dataset.write_marker("_SUCCESS")
    original = Destination.read_json

    def read_then_freeze(self: Destination, name: str) -> Any:
        record = original(self, name)
        if name == DATASET_MANIFEST:
            s3.freeze()  # the store stops answering right after the validator read the plan
        return record

    monkeypatch.setattr(Destination, "read_json", read_then_freeze)
    op = PostgresPartitionValidateOperator(
        task_id="validate", destination=dataset.url, storage_options=_options(s3), storage_timeout=2
    )
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        op.execute({})
    assert time.monotonic() - started < 2 * 2 + GRACE
    assert "did not finish within storage_timeout=2" in str(caught.value), caught.value
    assert "not attempted" not in str(caught.value)
    logged = capsys.readouterr()  # Airflow 3's task logger writes to stdout; Airflow 2's is a stdlib logger
    assert "could not remove _SUCCESS" in logged.out + logged.err + caplog.text  # said, not raised
    s3.thaw()


def test_a_validator_on_a_store_that_freezes_waits_one_deadline_not_one_per_range(
    conn_id: str, table: str, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each range's destination had a deadline of its own: a validator walking three ranges of a
    frozen store waited three times storage_timeout (eight ranges at the 300 s default: 40 minutes),
    and its error named the last range's manifest, not the footer read that hung."""
    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
    from airflow_provider_cxpg.operators.partition import (
        PostgresPartitionPlanOperator,
        PostgresPartitionValidateOperator,
    )

    url = f"s3://{s3.create_bucket()}/validated"
    common = {"postgres_conn_id": conn_id, "table": table, "storage_options": _options(s3)}
    planner = PostgresPartitionPlanOperator(task_id="plan", partitions=3, destination=url, **common)
    for kwargs in planner.execute({}):
        PostgresExtractOperator(task_id="extract", worker_settings=FAST, **{**common, **kwargs}).execute({})
    original = Destination.read_footer

    def freeze_then_read(self: Destination, name: str) -> Any:
        s3.freeze()  # the store stops answering as the validator reads the first footer
        return original(self, name)

    monkeypatch.setattr(Destination, "read_footer", freeze_then_read)
    validator = PostgresPartitionValidateOperator(
        task_id="validate", destination=url, storage_options=_options(s3), storage_timeout=2
    )
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match=r"reading the footer of part-000000\.parquet at s3://.*range=0000"):
            validator.execute({})
        assert time.monotonic() - started < 2 + GRACE
    finally:
        s3.thaw()


_FROZEN_RANGE = """
import os, signal, sys, threading, time
from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
from airflow_provider_cxpg.output.manifest import Manifest

conn_id, table, url, endpoint, store_pid = sys.argv[1:6]
options = {"key": "AKIAFROZENRANGE01", "secret": "frozen-range-Secret", "client_kwargs": {"endpoint_url": endpoint},
           "config_kwargs": {"retries": {"max_attempts": 1}}}
op = PostgresExtractOperator(
    task_id="t", postgres_conn_id=conn_id, destination=url, table=table, storage_options=options,
    storage_timeout=None, chunk_rows=100, parallelism=2, where="(SELECT pg_sleep(0.2)) IS NOT NULL",
)
frozen = threading.Event()
original = Manifest.save


def save(self, destination, **kwargs):
    if len(self.chunks) == 1 and "range=" in destination.url and not frozen.is_set():
        frozen.set()
        os.kill(int(store_pid), signal.SIGSTOP)  # one range's manifest write waits on a frozen store
        threading.Timer(1.0, op.on_kill).start()  # as Airflow's SIGTERM handler calls it
    return original(self, destination, **kwargs)


Manifest.save = save
started = time.monotonic()
try:
    op.execute({})
except BaseException as exc:
    print("raised", round(time.monotonic() - started, 1), type(exc).__name__, flush=True)
print("done", time.monotonic(), flush=True)
"""


def test_on_kill_ends_a_parallel_run_whose_range_waits_on_a_frozen_store_and_the_process_exits(
    conn_id: str, admin: psycopg.Connection, table: str, s3: S3Server, tmp_path: Path
) -> None:
    """A range's manifest write waited on the frozen store with no deadline (storage_timeout=None):
    on_kill could not end it, the run raised only after 120 s, and the process never exited (the
    ranges ran on a ThreadPoolExecutor, whose threads the interpreter joins at exit)."""
    from tests.helpers import run_until_exit

    script = tmp_path / "frozen_range.py"
    script.write_text(_FROZEN_RANGE)
    try:
        args = [conn_id, table, f"s3://{s3.create_bucket()}/ranges", s3.endpoint, str(s3.process.pid)]
        lines, exiting = run_until_exit(script, args, timeout=90)
    finally:
        s3.thaw()
    raised = next(line for line in lines if line.startswith("raised ")).split()
    assert raised[2] == "ExtractionAborted" and float(raised[1]) < 1 + FAST["cancel_grace"] + FAST["kill_grace"] + GRACE
    assert exiting < 4, f"the process took {exiting:.1f}s to exit after the failure"
    assert_nothing_left(admin)


# -- the task process dies -------------------------------------------------------------------------------


class TaskProcess:
    """The provider's operator in a process of its own, as Airflow's task process runs it."""

    def __init__(self, conn_json: str, log_path: Path, env: dict[str, str] | None = None, **arguments: Any):
        conn_id = f"task_{uuid.uuid4().hex[:8]}"
        arguments = {"postgres_conn_id": conn_id, "query_log_path": str(log_path), "worker_settings": FAST, **arguments}
        environment = {**os.environ, f"AIRFLOW_CONN_{conn_id.upper()}": conn_json, **(env or {})}
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.task_process", json.dumps(arguments)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as the supervisor's child is
        )

    def run_id(self) -> str | None:
        started = [e for e in events(self.log_path) if e["event"] == "job.start"]
        return started[0]["extraction_id"] if started else None

    def output(self, timeout: float = 60) -> str:
        """What the task process printed, once it has ended (waits up to ``timeout``)."""
        out, _ = self.process.communicate(timeout=timeout)
        return out

    def failure_output(self) -> str:
        """For a failure message: a task still running is killed first (waiting for it would turn the
        assertion into a timeout that shows nothing)."""
        if self.process.poll() is None:
            self.process.kill()
        return self.output(timeout=10)


def _run_backends(admin: psycopg.Connection, run_id: str) -> list[tuple[Any, ...]]:
    return backends_of(admin, f"%cxpg-{run_id}%")


@pytest.mark.parametrize(
    ("liveness", "phase"),
    [
        *[(liveness, phase) for liveness in ("server", "fallback") for phase in ("planning", "reading", "streaming")],
        ("fallback-reaper-killed", "reading"),
    ],
)
def test_a_sigkilled_task_process_leaves_no_backend_and_no_worker(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path, phase: str, liveness: str
) -> None:
    """SIGKILL (the OOM killer, the supervisor's last step) while a query of the run waits on a lock.

    ``server``: PostgreSQL 14+'s client_connection_check_interval ends the orphaned backends;
    ``fallback``: as on an older server, the worker's reaper sees the task process gone and ends
    them. ``streaming``: a streamed read holds the GIL while it waits, so no thread of the worker
    runs then: only the reaper can act.
    """
    env = {"CXPG_TEST_NO_LIVENESS": "1"} if liveness.startswith("fallback") else {}
    with psycopg.connect(pg.dsn, autocommit=True) as holder:
        if phase == "planning":
            holder.execute("BEGIN")
            holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            where = None
        else:
            holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            where = WAITS_ON_ADVISORY_LOCK
        task = TaskProcess(
            # connect_timeout in the extra, as many connections have it: the reaper's own login sets
            # one too and once failed on the duplicate (a TypeError it swallowed, ending nothing).
            pg.airflow_conn_json(extra={"connect_timeout": "7"}),
            tmp_path / "log.jsonl",
            env=env,
            table=table,
            destination=str(tmp_path / "out"),
            where=where,
            query_timeout=300,
            stream_rows=100 if phase == "streaming" else 0,
        )
        try:
            assert wait_until(lambda: task.run_id() is not None, 60, 0.05), task.failure_output()
            run_id = task.run_id()
            assert run_id is not None
            assert wait_until(
                lambda: any(b[3] in ("Lock", "advisory") or b[3] == "Lock" for b in _run_backends(admin, run_id)),
                60,
                0.05,
            ), _run_backends(admin, run_id)
            assert wait_until(lambda: bool(worker_pids(0)), 30, 0.05)
            time.sleep(0.5)
            if liveness == "fallback-reaper-killed":  # the reaper is a process like any other
                workers = worker_pids(task.process.pid)
                reapers = [pid for worker in workers for pid in worker_pids(worker)]
                assert reapers, (workers, worker_pids(0))
                os.kill(reapers[0], signal.SIGKILL)
                time.sleep(0.5)
            os.kill(task.process.pid, signal.SIGKILL)
            task.process.wait(timeout=10)
            killed = time.monotonic()
            assert wait_until(lambda: not _run_backends(admin, run_id), 15, 0.1), _run_backends(admin, run_id)
            assert wait_until(lambda: not worker_pids(0), 15, 0.1), worker_pids(0)
            assert time.monotonic() - killed < 15
        finally:
            if task.process.poll() is None:
                task.process.kill()
            holder.execute("ROLLBACK") if phase == "planning" else holder.execute(
                "SELECT pg_advisory_unlock(%s)", (LOCK_KEY,)
            )


def test_the_reaper_ends_the_backends_with_the_password_renewed_last(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path
) -> None:
    """An IAM token rotates mid-run, then the task process is SIGKILLed while a streamed read waits on
    a lock (no thread of the worker runs then, and no server-side liveness check helps): the reaper
    must log in with the renewed token to end the backend; the first one no longer logs in."""
    role = f"reap_{uuid.uuid4().hex[:6]}"
    first, renewed = uuid.uuid4().hex, uuid.uuid4().hex
    admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{first}'")
    admin.execute(f"GRANT USAGE ON SCHEMA {table.split('.')[0]} TO {role}")
    admin.execute(f"GRANT SELECT ON {table} TO {role}")
    tokens = tmp_path / "token"
    tokens.write_text(f"{role} {first} {pg.port}")
    # Once per chunk (InitPlans): wait for the lock while the test holds it, then take 2 s.
    gate_then_slow = (
        f"(SELECT pg_advisory_xact_lock_shared({LOCK_KEY})) IS NOT NULL AND (SELECT pg_sleep(2)) IS NOT NULL"
    )
    with psycopg.connect(pg.dsn, autocommit=True) as holder:
        task = TaskProcess(
            pg.airflow_conn_json(login=role, password="", extra={"iam": True}),
            tmp_path / "log.jsonl",
            env={"CXPG_TEST_NO_LIVENESS": "1", "CXPG_TEST_TOKEN_FILE": str(tokens)},
            table=table,
            destination=str(tmp_path / "out"),
            where=gate_then_slow,
            chunk_rows=100,
            stream_rows=50,
            query_timeout=300,
            worker_settings={**FAST, "credentials_refresh_interval": 0.5},
        )
        try:
            started = lambda: [e for e in events(task.log_path) if e["event"] == "query.start"]  # noqa: E731
            assert wait_until(lambda: len(started()) >= 1, 60, 0.05), task.failure_output()
            assert wait_until(lambda: task.run_id() is not None, 30, 0.05), task.failure_output()
            run_id = task.run_id()
            # Chunk 0's backend holds the shared lock (its login used the first token) before the
            # token turns and the test asks for the lock: otherwise chunk 0 itself would queue behind it.
            shared_held = (
                "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' "
                "AND l.granted AND l.mode = 'ShareLock' AND a.application_name LIKE %s"
            )
            assert wait_until(lambda: bool(admin.execute(shared_held, (f"%cxpg-{run_id}%",)).fetchall()), 60, 0.05)
            admin.execute(f"ALTER ROLE {role} PASSWORD '{renewed}'")  # the first token stops logging in
            tokens.write_text(f"{role} {renewed} {pg.port}")
            holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))  # granted when chunk 0 ends; chunk 1 waits
            assert wait_until(lambda: len(started()) >= 2, 60, 0.05), task.failure_output()  # chunk 1: a new token
            assert wait_until(lambda: any(b[3] == "Lock" for b in _run_backends(admin, run_id)), 60, 0.05)
            time.sleep(0.5)
            os.kill(task.process.pid, signal.SIGKILL)
            task.process.wait(timeout=10)
            assert wait_until(lambda: not _run_backends(admin, run_id), 15, 0.1), _run_backends(admin, run_id)
            assert wait_until(lambda: not worker_pids(0), 15, 0.1), worker_pids(0)
        finally:
            if task.process.poll() is None:
                task.process.kill()
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            for statement in (
                f"REVOKE ALL ON {table} FROM {role}",
                f"REVOKE USAGE ON SCHEMA {table.split('.')[0]} FROM {role}",
            ):
                admin.execute(statement)
    assert wait_until(lambda: not backends_of(admin, f"%cxpg-{run_id}%"), 10, 0.1)
    admin.execute(f"DROP ROLE {role}")


def test_a_task_process_sigkilled_while_its_worker_writes_to_a_frozen_store_leaves_no_worker(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path, s3: S3Server
) -> None:
    bucket = s3.create_bucket()
    task = TaskProcess(
        pg.airflow_conn_json(),
        tmp_path / "log.jsonl",
        table=table,
        destination=f"s3://{bucket}/killed",
        storage_options=_options(s3),
        chunk_rows=100,
        # 0.5 s a chunk, 6 chunks: the run is still going when the store freezes after the first file
        # (at 0.2 s a chunk a slow listing of the store let a CI run finish first)
        where="(SELECT pg_sleep(0.5)) IS NOT NULL",
        worker_settings={**FAST, "storage_timeout": 300},
    )
    try:
        assert wait_until(lambda: any(k.endswith("part-000000.parquet") for k in s3.keys(bucket, "killed")), 60, 0.05)
        s3.freeze()  # the worker's next upload hangs, for up to storage_timeout=300
        time.sleep(1.0)
        run_id = task.run_id()
        assert run_id is not None and worker_pids(0), "the run ended before the store froze: the test proves nothing"
        os.kill(task.process.pid, signal.SIGKILL)
        task.process.wait(timeout=10)
        assert wait_until(lambda: not worker_pids(0), 10, 0.1), worker_pids(0)
        assert wait_until(lambda: not _run_backends(admin, run_id), 10, 0.1), _run_backends(admin, run_id)
    finally:
        s3.thaw()
        if task.process.poll() is None:
            task.process.kill()


def test_sigterm_to_the_task_process_group_ends_cleanly_with_the_query_cancelled(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path
) -> None:
    """What Airflow's proposed execution-timeout work would do: SIGTERM the whole process group."""
    with psycopg.connect(pg.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            task = TaskProcess(
                pg.airflow_conn_json(),
                tmp_path / "log.jsonl",
                table=table,
                destination=str(tmp_path / "out"),
                where=WAITS_ON_ADVISORY_LOCK,
                query_timeout=300,
            )
            assert wait_until(lambda: task.run_id() is not None, 60, 0.05), task.failure_output()
            run_id = task.run_id()
            assert wait_until(lambda: any(b[3] == "Lock" for b in _run_backends(admin, run_id)), 60, 0.05)
            os.killpg(task.process.pid, signal.SIGTERM)
            out = task.output(timeout=30)
            assert "failed ExtractionAborted" in out, out
            assert wait_until(lambda: not _run_backends(admin, run_id), 10, 0.1), _run_backends(admin, run_id)
            assert wait_until(lambda: not worker_pids(0), 10, 0.1)
            failed = [e for e in events(tmp_path / "log.jsonl") if e["event"] == "job.failed"]
            assert failed and failed[0]["reason"] == "on_kill"
            assert not [e for e in events(tmp_path / "log.jsonl") if e["event"] == "worker.crash"]
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


@pytest.mark.parametrize("when", ["before_execute", "connection_lookup"])
def test_a_sigterm_before_there_is_an_extraction_still_fails_the_task_before_any_read(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path, when: str
) -> None:
    """Airflow 3's handler calls ``on_kill`` only; it is installed before templates are rendered and
    ``pre_execute`` runs, and inside ``execute`` a slow secrets backend comes before the extraction.

    Such a kill was forgotten: the run read every chunk and ended green, or read every chunk and
    then failed. It now fails the task before the first query.
    """
    task = TaskProcess(
        pg.airflow_conn_json(),
        tmp_path / "log.jsonl",
        table=table,
        destination=str(tmp_path / "out"),
        chunk_rows=100,
        **{when: 3},
    )
    assert task.process.stdout is not None
    for line in task.process.stdout:  # Airflow 2 prints warnings first
        if line.strip() == "ready":
            break
    time.sleep(0.5)  # inside the slow step
    task.process.send_signal(signal.SIGTERM)
    out = task.output(timeout=60)
    assert "failed ExtractionAborted" in out, out
    assert not [e for e in events(tmp_path / "log.jsonl") if e["event"] == "query.start"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))
    assert wait_until(lambda: not worker_pids(0), 10, 0.1)
    assert_nothing_left(admin)


def test_every_operator_fails_for_a_kill_before_execute_and_a_later_execute_starts_clean(
    conn_id: str, admin: psycopg.Connection, table: str, tmp_path: Path
) -> None:
    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
    from airflow_provider_cxpg.operators.partition import (
        PostgresPartitionPlanOperator,
        PostgresPartitionValidateOperator,
    )

    base = str(tmp_path / "dataset")
    operators = [
        PostgresPartitionPlanOperator(
            task_id="plan", postgres_conn_id=conn_id, table=table, partitions=2, destination=base
        ),
        PostgresExtractOperator(
            task_id="extract", postgres_conn_id=conn_id, table=table, destination=str(tmp_path / "one"), chunk_rows=100
        ),
        PostgresPartitionValidateOperator(
            task_id="validate", postgres_conn_id=conn_id, destination=base, verify_count=True
        ),
    ]
    for op in operators:
        op.on_kill()
        with pytest.raises(ExtractionAborted):
            op.execute({})
    assert not (tmp_path / "one").exists() and not (tmp_path / "dataset").exists()
    ranges = operators[0].execute({})  # the kill is forgotten once execute has ended
    assert operators[1].execute({})["rows"] == 600
    for index, arguments in enumerate(ranges):
        PostgresExtractOperator(
            task_id=f"range{index}", postgres_conn_id=conn_id, table=table, chunk_rows=100, **arguments
        ).execute({})
    assert operators[2].execute({})["rows"] == 600
    assert_nothing_left(admin)


def test_execution_timeout_during_planning_cancels_the_query_stops_the_worker_and_says_why(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path
) -> None:
    """Airflow's SIGALRM lands while the planning query waits on a lock."""
    with psycopg.connect(pg.dsn) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        task = TaskProcess(
            pg.airflow_conn_json(),
            tmp_path / "log.jsonl",
            table=table,
            destination=str(tmp_path / "out"),
            query_timeout=300,
            execution_timeout=3,
        )
        out = task.output(timeout=60)
        ended = time.monotonic()
        assert "failed AirflowTaskTimeout" in out, out
        run_id = task.run_id()
        assert run_id is not None
        assert wait_until(lambda: not _run_backends(admin, run_id), 5, 0.05), _run_backends(admin, run_id)
        assert wait_until(lambda: not worker_pids(0), 5, 0.05)
        assert time.monotonic() - ended < 5
        holder.rollback()
    failed = [e for e in events(tmp_path / "log.jsonl") if e["event"] == "job.failed"]
    assert failed and failed[0]["reason"] == "AirflowTaskTimeout", failed
    killed = [e for e in events(tmp_path / "log.jsonl") if e["event"] == "worker.killed"]
    assert killed and killed[0]["reason"] == "AirflowTaskTimeout"


# -- a network that stops answering ----------------------------------------------------------------------


def test_a_frozen_network_path_still_fires_query_timeout(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection of the run (worker and monitor) crosses a gateway that stops answering."""
    with running_proxy((pg.host, pg.port)) as proxy:
        monkeypatch.setenv("AIRFLOW_CONN_VIA_PROXY", pg.airflow_conn_json(host="127.0.0.1", port=proxy.port))
        hook = ConnectorXPostgresHook(postgres_conn_id="via_proxy")

        def chunk_query_running() -> bool:
            # The worker's chunk query, not one of the parent's planning or control statements
            # (freezing then would test a refused connection, not a stalled query).
            return bool(
                admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'cxpg-%%' "
                    "AND application_name NOT LIKE '%%-plan' AND application_name NOT LIKE '%%-ctl' "
                    "AND state = 'active' AND query LIKE '%%pg_sleep(30)%%' AND pid <> pg_backend_pid()"
                ).fetchall()
            )

        def freeze_when_reading() -> None:
            if wait_until(chunk_query_running, 30, 0.05):
                proxy.freeze()

        threading.Thread(target=freeze_when_reading, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(QueryTimeoutError):
            hook.extract(
                destination=str(tmp_path / "out"),
                table=table,
                where="(SELECT pg_sleep(30)) IS NOT NULL",
                query_timeout=3,
                **FAST,
            )
        elapsed = time.monotonic() - started
        assert elapsed < 3 + 2 + 2 * FAST["control_timeout"] + FAST["kill_grace"] + GRACE, elapsed
        assert wait_until(lambda: not worker_pids(), 10, 0.05)
    # The proxy is gone: the server sees the sockets close and ends the run's backends.
    assert wait_until(lambda: not cxpg_backends(admin), 15, 0.1), cxpg_backends(admin)


def _plan_waits_on_a_lock(admin: psycopg.Connection) -> bool:
    return bool(
        admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'cxpg-%%-plan' "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        ).fetchall()
    )


@pytest.mark.parametrize("ending", ["query_timeout", "on_kill"])
def test_planning_behind_a_gateway_that_stops_answering_ends_on_time(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path, ending: str
) -> None:
    """A planning statement waits on a lock; then the path to the server stops answering.

    The server's statement_timeout error can never arrive, and a cancel request reaches a gateway
    that accepts it and answers nothing. ``query_timeout``: the parent's own deadline on the
    statement ends the run. ``on_kill`` (SIGTERM, no query_timeout to help): the abort ends the wait.
    Either way, the cancel request must not hold the interpreter: libpq's blocking PQcancel, called
    with the GIL held, froze the whole task process (it never printed its failure).
    """
    with running_proxy((pg.host, pg.port)) as proxy, psycopg.connect(pg.dsn) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        task = TaskProcess(
            pg.airflow_conn_json(host="127.0.0.1", port=proxy.port),
            tmp_path / "log.jsonl",
            table=table,
            destination=str(tmp_path / "out"),
            query_timeout=3 if ending == "query_timeout" else None,
        )
        assert wait_until(lambda: _plan_waits_on_a_lock(admin), 30, 0.05), task.failure_output()
        proxy.freeze()
        frozen = time.monotonic()
        if ending == "on_kill":
            time.sleep(0.5)
            task.process.send_signal(signal.SIGTERM)
        try:
            out = task.output(timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the task process did not end behind the frozen gateway: {task.failure_output()}")
        elapsed = time.monotonic() - frozen
        expected = "QueryTimeoutError" if ending == "query_timeout" else "ExtractionAborted"
        assert f"failed {expected}" in out, out
        # query_timeout + deadline_grace, the cancel (cancel_grace, twice at most), the close
        assert elapsed < 3 + 2 + 2 * FAST["cancel_grace"] + FAST["control_timeout"] + GRACE, elapsed
        assert wait_until(lambda: not worker_pids(0), 10, 0.05)
        holder.rollback()
    timed_out = [e for e in events(tmp_path / "log.jsonl") if e["event"] == "query.timeout"]
    if ending == "query_timeout":
        assert timed_out and timed_out[0]["phase"] == "plan" and timed_out[0]["enforced_by"] == "parent", timed_out
    failed = [e for e in events(tmp_path / "log.jsonl") if e["event"] == "job.failed"]
    assert failed and failed[0]["reason"] == ("QueryTimeoutError" if ending == "query_timeout" else "on_kill"), failed
    # The proxy is gone: the server sees the sockets close and ends the run's backends.
    assert wait_until(lambda: not cxpg_backends(admin), 15, 0.1), cxpg_backends(admin)


def test_job_timeout_bounds_planning_without_a_query_timeout(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path
) -> None:
    """``query_timeout=None``: nothing but the job's deadline bounds a planning statement on a lock."""
    with psycopg.connect(pg.dsn) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(JobTimeoutError, match="plan query"):
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(tmp_path / "out"),
                table=table,
                query_timeout=None,
                job_timeout=3,
                **FAST,
            )
        assert time.monotonic() - started < 3 + FAST["cancel_grace"] + GRACE
        # The planning query was cancelled on the server (it had no statement_timeout to end it).
        assert wait_until(lambda: not cxpg_backends(admin), 10, 0.05), cxpg_backends(admin)
        holder.rollback()


def test_a_stop_after_the_server_ended_the_monitor_connection_still_ends_the_run_backends(
    pg: PgInfo, admin: psycopg.Connection
) -> None:
    """The monitor's connection was terminated (a restart, an administrator) before the stop.

    Its first sample fails on the dead connection; the stop once returned there, leaving the run's
    query running. It must look again on a new connection and end it.
    """
    from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor
    from airflow_provider_cxpg.supervisor.monitor import ServerMonitor

    app = f"cxpg-stop{uuid.uuid4().hex[:8]}"
    endpoint = PostgresEndpoint(host=pg.host, port=pg.port, dbname=pg.dbname, user=pg.user, password=pg.password)
    monitor = ServerMonitor(endpoint, app, Redactor(), call_timeout=FAST["control_timeout"])
    with psycopg.connect(pg.dsn, application_name=app, autocommit=True) as run_backend:

        def the_run_query() -> None:
            with contextlib.suppress(psycopg.Error):  # ended by the stop
                run_backend.execute("SELECT pg_sleep(60)")

        threading.Thread(target=the_run_query, daemon=True).start()
        assert wait_until(lambda: any(b.state == "active" for b in monitor.backends() or []), 10, 0.05)
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (f"{app}-ctl",)
        )
        assert wait_until(lambda: not backends_of(admin, f"{app}-ctl"), 5, 0.05)
        monitor.stop_backends(grace=2.0)
        assert wait_until(lambda: not backends_of(admin, app), 5, 0.05), backends_of(admin, app)
    monitor.close()


# -- what the log says -----------------------------------------------------------------------------------


def test_a_lock_wait_names_the_session_that_holds_the_lock(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    with psycopg.connect(pg.dsn, autocommit=True, application_name="nightly-maintenance") as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        holder.execute("SELECT 'secret literal' AS s")
        holder_pid = holder.info.backend_pid
        with pytest.raises(QueryTimeoutError):
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(tmp_path / "out"),
                table=table,
                where=WAITS_ON_ADVISORY_LOCK,
                query_timeout=3,
                query_log_path=str(log),
                **FAST,
            )
        holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    waits = [e for e in events(log) if e["event"] == "server.waiting"]
    assert waits, [e["event"] for e in events(log)]
    blocked_by = " ".join(waits[0]["blocked_by"])
    assert f"pid {holder_pid}" in blocked_by and "nightly-maintenance" in blocked_by and pg.user in blocked_by
    assert "secret literal" not in blocked_by  # another session's string literals stay out of our logs
    assert not [e for e in events(log) if e["event"] == "worker.crash"]
    assert_nothing_left(admin)


# -- credentials that expire ------------------------------------------------------------------------------


def test_a_password_that_rotates_during_the_run_is_renewed_and_the_run_succeeds(
    pg: PgInfo, admin: psycopg.Connection, table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IAM token's life, compressed: the role's password changes every second during the run."""
    role = f"rot_{uuid.uuid4().hex[:6]}"
    current = {"password": uuid.uuid4().hex}
    admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{current['password']}'")
    admin.execute(f"GRANT USAGE ON SCHEMA {table.split('.')[0]} TO {role}")
    admin.execute(f"GRANT SELECT ON {table} TO {role}")
    minted: list[str] = []

    def get_iam_token(self: Any, conn: Any) -> tuple[str, str, int]:
        minted.append(current["password"])
        return role, current["password"], pg.port

    monkeypatch.setattr(ConnectorXPostgresHook, "get_iam_token", get_iam_token)
    monkeypatch.setenv("AIRFLOW_CONN_IAM_DB", pg.airflow_conn_json(login=role, password="", extra={"iam": True}))
    stop = threading.Event()

    def rotate() -> None:
        with psycopg.connect(pg.dsn, autocommit=True) as rotator:
            while not stop.wait(1.5):
                fresh = uuid.uuid4().hex
                rotator.execute(f"ALTER ROLE {role} PASSWORD '{fresh}'")
                current["password"] = fresh

    rotator = threading.Thread(target=rotate, daemon=True)
    rotator.start()
    try:
        result = ConnectorXPostgresHook(postgres_conn_id="iam_db").extract(
            destination=str(tmp_path / "out"),
            table=table,
            chunk_rows=50,
            where="(SELECT pg_sleep(0.4)) IS NOT NULL",
            credentials_refresh_interval=0.5,
            **FAST,
        )
    finally:
        stop.set()
        rotator.join()
        admin.execute(f"REVOKE ALL ON {table} FROM {role}")
        admin.execute(f"REVOKE USAGE ON SCHEMA {table.split('.')[0]} FROM {role}")
    assert result.rows == 600 and sorted(read_output(tmp_path / "out").column("id").to_pylist()) == list(range(1, 601))
    assert len(set(minted)) >= 4, minted  # minted again and again, not once
    assert_nothing_left(admin)
    admin.execute(f"DROP ROLE {role}")


# -- object storage in the worker as in the parent ---------------------------------------------------------


def test_destination_conn_id_for_s3_reaches_the_worker(
    conn_id: str,
    admin: psycopg.Connection,
    table: str,
    s3: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("airflow.providers.amazon")
    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
    from tests.s3_server import ACCESS_KEY, SECRET_KEY

    bucket = s3.create_bucket()
    monkeypatch.setenv(
        "AIRFLOW_CONN_LAKE",
        json.dumps(
            {
                "conn_type": "aws",
                "login": ACCESS_KEY,
                "password": SECRET_KEY,
                "extra": {"endpoint_url": s3.endpoint, "region_name": "us-east-1"},
            }
        ),
    )
    op = PostgresExtractOperator(
        task_id="t",
        postgres_conn_id=conn_id,
        table=table,
        destination=f"s3://{bucket}/viaconn",
        destination_conn_id="lake",
        chunk_rows=200,
        worker_settings=FAST,
    )
    summary = op.execute({})
    assert summary["rows"] == 600 and summary["chunks"] == 3
    assert {k.rsplit("/", 1)[1] for k in s3.keys(bucket, "viaconn")} >= {"part-000000.parquet", "_manifest.json"}
    assert SECRET_KEY not in json.dumps(summary)
    assert_nothing_left(admin)


# -- TLS parity --------------------------------------------------------------------------------------------


def test_verify_full_is_refused_before_any_data_moves(
    conn_id: str, table: str, tmp_path: Path, pg: PgInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_TLS_FULL", pg.airflow_conn_json(extra={"sslmode": "verify-full"}))
    with pytest.raises(ConnectionConfigError, match="verify-full"):
        ConnectorXPostgresHook(postgres_conn_id="tls_full").extract(destination=str(tmp_path / "out"), table=table)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("AIRFLOW_CONN_TLS_PLAIN", pg.airflow_conn_json())
    with monkeypatch.context() as env:  # undone before the fixtures' own connections close
        env.setenv("PGSSLMODE", "verify-full")  # the parent's libpq environment counts too
        with pytest.raises(ConnectionConfigError, match="verify-full"):
            ConnectorXPostgresHook(postgres_conn_id="tls_plain").extract(destination=str(tmp_path / "out"), table=table)


# -- a worker that does not read -------------------------------------------------------------------------


def test_a_frozen_worker_whose_pipe_is_full_cannot_hold_the_parent(pg: PgInfo, tmp_path: Path) -> None:
    """Requests too big for the pipe, to a SIGSTOPped worker: sending returns at once (a thread
    writes), the missing heartbeats end the wait, and the blocked write ends with the worker."""
    import pyarrow as pa

    from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor
    from airflow_provider_cxpg.exceptions import HeartbeatLostError
    from airflow_provider_cxpg.querylog import QueryLog
    from airflow_provider_cxpg.supervisor.session import WorkerSession
    from airflow_provider_cxpg.supervisor.settings import WorkerSettings
    from airflow_provider_cxpg.worker.protocol import IpcSink, ReadChunk

    endpoint = PostgresEndpoint(host=pg.host, port=pg.port, dbname=pg.dbname, user=pg.user, password=pg.password)
    app = f"cxpg-pipe{os.getpid()}"
    settings = WorkerSettings(**{**FAST, "heartbeat_timeout": 3.0})
    session = WorkerSession(
        endpoint.with_session(application_name=app),
        settings,
        QueryLog("pipe"),
        application_name=app,
        redactor=Redactor(endpoint.secrets()),
    )
    with pytest.raises(HeartbeatLostError), session:
        os.kill(session.pid, signal.SIGSTOP)
        started = time.monotonic()
        requests = [
            ReadChunk(
                query_id=session.next_query_id(),
                chunk_index=index,
                sql="SELECT 1 AS x -- " + "x" * 400_000,
                sink=IpcSink(str(tmp_path / f"{index}.arrow")),
                schema=pa.schema([("x", pa.int32())]),
            )
            for index in range(3)
        ]
        for request in requests:  # 1.2 MB: far more than a pipe holds
            session.submit(request)
        assert time.monotonic() - started < 1.0  # nothing waited on the pipe
        session.wait_read(requests[0].query_id)
    assert time.monotonic() - started < 3.0 + GRACE
    assert wait_until(lambda: not worker_pids(), 10, 0.05)
    assert wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("cxpg-sender")], 10, 0.05)
