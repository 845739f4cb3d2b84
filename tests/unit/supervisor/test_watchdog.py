"""The watchdog's rules on their own: each limit fires past its deadline and not before.

The fault tests (tests/test_supervision.py, tests/test_worker_faults.py) drive the same rules with
real frozen workers, held locks and stalled stores; these pin the arithmetic and the exceptions.
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_cxpg.exceptions import (
    HeartbeatLostError,
    JobTimeoutError,
    QueryTimeoutError,
    ServerConnectionError,
    StorageError,
)
from airflow_provider_cxpg.supervisor.monitor import BackendInfo
from airflow_provider_cxpg.supervisor.requests import RequestBook
from airflow_provider_cxpg.supervisor.settings import WorkerSettings
from airflow_provider_cxpg.supervisor.watchdog import Watchdog
from airflow_provider_cxpg.worker.protocol import Heartbeat, QueryStarted

SETTINGS = WorkerSettings(heartbeat_interval=0.5, heartbeat_timeout=5.0, query_timeout=30.0, storage_timeout=10.0)
GRACE = SETTINGS.deadline_grace


class _Process:
    pid = 4242
    refused_login: str | None = None
    stopped = False

    def is_stopped(self) -> bool:
        return self.stopped


class _Sampler:
    def __init__(self) -> None:
        self.sample: list[BackendInfo] | None = None

    def latest(self, max_age: float | None = None) -> list[BackendInfo] | None:
        return self.sample

    def last_active(self) -> list[BackendInfo]:
        return [b for b in self.sample or () if b.state == "active"]

    def reset(self) -> None:
        pass


class _Monitor:
    last_error: str | None = None


def _backend(wait: tuple[str | None, str | None] = ("Lock", "relation")) -> BackendInfo:
    return BackendInfo(77, "active", wait[0], wait[1], 12.0, 12.0, "SELECT ...")


@pytest.fixture
def parts() -> tuple[Watchdog, _Process, RequestBook, _Sampler, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []

    def emit(event: str, **fields: Any) -> None:
        events.append((event, fields))

    process, sampler, book = _Process(), _Sampler(), RequestBook(emit, query_timeout=SETTINGS.query_timeout)
    dog = Watchdog(SETTINGS, emit, process=process, book=book, sampler=sampler, monitor=_Monitor())  # type: ignore[arg-type]
    dog.heard(100.0)
    return dog, process, book, sampler, events


def test_missing_heartbeats_end_the_wait_past_the_timeout_and_not_before(parts: Any) -> None:
    dog, *_ = parts
    dog.check(100.0 + SETTINGS.heartbeat_timeout - 0.1)
    dog.check(100.0 + 60, heartbeats=False)  # during start-up only start_timeout applies
    with pytest.raises(HeartbeatLostError) as lost:
        dog.check(100.0 + SETTINGS.heartbeat_timeout + 0.1)
    assert lost.value.pid == 4242 and lost.value.limit == "heartbeat_timeout"


def test_silence_during_a_server_wait_is_excused_unless_the_worker_is_stopped(parts: Any) -> None:
    dog, process, book, sampler, events = parts
    book.started(QueryStarted(query_id=1, chunk_index=3), 100.0)
    sampler.sample = [_backend()]
    late = 100.0 + SETTINGS.heartbeat_timeout + 1
    dog.check(late)  # the worker waits on its query's lock: not frozen
    assert [e for e, _ in events] == ["worker.waiting"]
    process.stopped = True  # SIGSTOP: the same silence is a frozen worker
    with pytest.raises(HeartbeatLostError):
        dog.check(late)


def test_a_backend_writing_to_a_worker_that_does_not_read_excuses_nothing(parts: Any) -> None:
    dog, _, book, sampler, _ = parts
    book.started(QueryStarted(query_id=1, chunk_index=0), 100.0)
    sampler.sample = [_backend(("Client", "ClientWrite"))]
    with pytest.raises(HeartbeatLostError):
        dog.check(100.0 + SETTINGS.heartbeat_timeout + 1)
    sampler.sample = None  # no fresh sample (the server does not answer): nothing excused either
    with pytest.raises(HeartbeatLostError):
        dog.check(100.0 + SETTINGS.heartbeat_timeout + 1)


def test_the_query_deadline_is_the_parents_backstop_after_the_servers(parts: Any) -> None:
    dog, _, book, sampler, events = parts
    book.started(QueryStarted(query_id=1, chunk_index=5), 100.0)
    sampler.sample = [_backend()]
    dog.heard(100.0 + 31)
    dog.check(100.0 + SETTINGS.query_timeout + GRACE - 0.1)  # statement_timeout fires first
    dog.heard(100.0 + 33)
    with pytest.raises(QueryTimeoutError) as timeout:
        dog.check(100.0 + SETTINGS.query_timeout + GRACE + 0.1)
    assert timeout.value.chunk == 5 and "backend 77" in str(timeout.value.server_activity)
    assert events[-1][1]["enforced_by"] == "parent"


def test_a_storage_call_past_its_timeout_fails_even_while_heartbeats_arrive(parts: Any) -> None:
    dog, *_ = parts
    dog.heard(200.0)
    dog.heartbeat(
        Heartbeat(seq=9, query_id=None, storage_op="writing s3://b/part-000001.parquet", storage_seconds=8.0), 200.0
    )
    dog.check(200.0 + 3.9)  # 11.9 s: inside storage_timeout + grace
    with pytest.raises(StorageError) as stalled:
        dog.check(200.0 + 4.1)
    assert stalled.value.operation.startswith("writing s3://") and stalled.value.limit == "storage_timeout"
    dog.heartbeat(Heartbeat(seq=10, query_id=None), 204.2)  # the call returned
    dog.check(204.2)


def test_the_job_deadline_and_a_refused_login(parts: Any) -> None:
    dog, process, book, _, _ = parts
    dog.job_deadline = 101.0
    with pytest.raises(JobTimeoutError):
        dog.check(101.5)
    dog.job_deadline = None
    process.refused_login = "FATAL: password authentication failed for user x"
    dog.check(101.5)  # no query running: the login belongs to no chunk yet
    book.started(QueryStarted(query_id=1, chunk_index=2), 101.0)
    with pytest.raises(ServerConnectionError) as refused:
        dog.check(101.5)
    assert refused.value.reason == "authentication" and refused.value.chunk == 2


# -- the parent's own statements (control connections) -------------------------------------------------


@pytest.mark.parametrize(
    ("query_timeout", "job_left", "expected"),
    [
        (30.0, None, (30.0 + GRACE, "query_timeout")),  # the server's statement_timeout fires first
        (30.0, 100.0, (30.0 + GRACE, "query_timeout")),
        (30.0, 5.0, (5.0, "job_timeout")),  # the job ends sooner
        (None, 5.0, (5.0, "job_timeout")),  # no query_timeout: the job still bounds planning
        (None, None, (None, "query_timeout")),
        (30.0, -3.0, (0.0, "job_timeout")),  # already past: fail at once, never a negative wait
    ],
)
def test_a_control_statement_waits_for_the_sooner_of_query_and_job_deadline(
    query_timeout: float | None, job_left: float | None, expected: tuple[float | None, str]
) -> None:
    from airflow_provider_cxpg.supervisor.watchdog import statement_deadline

    settings = WorkerSettings(query_timeout=query_timeout)
    now = 1000.0
    job_deadline = None if job_left is None else now + job_left
    assert statement_deadline(settings, job_deadline, now) == expected
