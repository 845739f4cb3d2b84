"""The parent's own connections (``control.py``) against a real server and a gateway that stops answering.

Each step of a :class:`ControlConnection` runs on its own helper thread under a deadline; a cancel
request never holds the interpreter; a connection given up is shut down so its thread returns, and
closed by that thread; one made after its deadline is closed when it arrives.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from airflow_provider_cxpg.bounded import CallStopped, CallTimedOut
from airflow_provider_cxpg.conninfo import PostgresEndpoint, connect
from airflow_provider_cxpg.control import ControlConnection
from tests.helpers import PgInfo, wait_until
from tests.netproxy import running_proxy

pytestmark = pytest.mark.integration


def _endpoint(pg: PgInfo, port: int | None = None) -> PostgresEndpoint:
    return PostgresEndpoint(
        host="127.0.0.1" if port else pg.host,
        port=port or pg.port,
        dbname=pg.dbname,
        user=pg.user,
        password=pg.password,
    )


def _open(endpoint: PostgresEndpoint, app: str, timeout: float = 10.0) -> ControlConnection:
    endpoint = endpoint.with_session(application_name=app)
    return ControlConnection.open(
        lambda: connect(endpoint, connect_timeout=2, statement_timeout_ms=60_000), timeout=timeout, name=app
    )


def _helper_threads(app: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"cxpg-io-{app}" and t.is_alive()]


class Ticker:
    """A thread that notes the time every 10 ms: a gap shows the interpreter was held."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ticks.append(time.monotonic())
            time.sleep(0.01)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.ticks, self.ticks[1:], strict=False)), default=0.0)


@pytest.fixture
def app() -> str:
    return f"cxpg-ctl{uuid.uuid4().hex[:8]}"


def _backends(admin: psycopg.Connection, app: str) -> list[tuple[int, str]]:
    rows = admin.execute(
        "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()", (app,)
    ).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def test_behind_a_frozen_gateway_a_statement_is_given_up_and_its_cancel_never_holds_the_interpreter(
    pg: PgInfo, admin: psycopg.Connection, app: str
) -> None:
    with running_proxy((pg.host, pg.port)) as proxy:
        control = _open(_endpoint(pg, proxy.port), app)
        assert control.execute("SELECT 1", timeout=5).fetchone() == (1,)
        proxy.freeze()
        with Ticker() as ticker:
            started = time.monotonic()
            with pytest.raises(CallTimedOut):
                control.execute("SELECT 2", timeout=0.5)
            assert time.monotonic() - started < 0.5 + 1.0
            # libpq's blocking PQcancel, called by psycopg's C code with the GIL held, froze every
            # thread here for as long as the gateway stayed silent.
            started = time.monotonic()
            assert control.cancel(1.0) is False
            assert time.monotonic() - started < 1.0 + 1.0
            control.close(1.0)  # a statement is still in flight: given up, not waited for
        assert ticker.longest_gap() < 0.5, ticker.longest_gap()
        # Its socket shut down, the helper thread's wait returned and it closed the connection.
        assert wait_until(lambda: not _helper_threads(app), 5, 0.05), _helper_threads(app)
    assert wait_until(lambda: not _backends(admin, app), 10, 0.05), _backends(admin, app)


def test_a_stop_ends_the_wait_and_the_cancel_ends_the_query(pg: PgInfo, admin: psycopg.Connection, app: str) -> None:
    with psycopg.connect(pg.dsn) as holder:
        holder.execute("SELECT pg_advisory_lock(4711)")
        control = _open(_endpoint(pg), app)
        reason: list[str | None] = [None]
        threading.Timer(0.3, lambda: reason.__setitem__(0, "on_kill")).start()
        started = time.monotonic()
        with pytest.raises(CallStopped, match="on_kill"):
            control.execute("SELECT pg_advisory_lock(4711)", timeout=None, stop=lambda: reason[0])
        assert time.monotonic() - started < 0.3 + 1.0
        assert control.cancel(3.0) is True
        assert wait_until(lambda: all(state != "active" for _, state in _backends(admin, app)), 5, 0.05)
        control.close(3.0)
        holder.rollback()
    assert wait_until(lambda: not _backends(admin, app), 10, 0.05), _backends(admin, app)


def test_a_connection_that_arrives_after_its_deadline_is_closed(
    pg: PgInfo, admin: psycopg.Connection, app: str
) -> None:
    with running_proxy((pg.host, pg.port)) as proxy:
        proxy.freeze()  # the kernel still accepts the TCP connection; the login waits
        started = time.monotonic()
        with pytest.raises(CallTimedOut):
            _open(_endpoint(pg, proxy.port), app, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 1.0
        proxy.thaw()  # the login completes on the abandoned helper thread
        assert wait_until(lambda: bool(_backends(admin, app)), 5, 0.02) or True  # may come and go at once
        assert wait_until(lambda: not _helper_threads(app), 10, 0.05), _helper_threads(app)
        assert wait_until(lambda: not _backends(admin, app), 10, 0.05), _backends(admin, app)


@pytest.fixture(autouse=True)
def _no_helper_left_behind(app: str) -> Iterator[None]:
    yield
    assert wait_until(lambda: not _helper_threads(app), 10, 0.05), "a helper thread stayed"


def test_the_connect_deadline_allows_each_address_a_name_resolves_to() -> None:
    """libpq gives connect_timeout to each address in turn: a deadline of two of them failed a name
    with three addresses whose first two are black-holed, though the third answers."""
    import socket

    from airflow_provider_cxpg.control import address_count, connect_deadline

    assert address_count("/var/run/postgresql", 5432, 1) == 1  # a socket directory
    assert address_count("127.0.0.1", 5432, 1) == address_count("::1", 5432, 1) == 1
    localhost = {info[4] for info in socket.getaddrinfo("localhost", 5432, type=socket.SOCK_STREAM)}
    assert address_count("localhost", 5432, 5) == len(localhost)
    assert address_count("no-such-host.invalid", 5432, 5) == 1  # the connect fails on its own, naming it
    assert address_count("127.0.0.1,localhost", 5432, 5) == 1 + len(localhost)  # libpq's host list
    assert connect_deadline(1, 10, 5) == 25  # one address: twice control_timeout + grace, as before
    assert connect_deadline(3, 10, 5) == 45  # resolving, then three addresses in turn
    assert connect_deadline(3, 10, 5, names=2) == 55  # a host list: each name resolved in turn


def test_the_monitor_never_swallows_a_timeout_raised_into_its_wait(pg: PgInfo, app: str) -> None:
    """The monitor answers "unknown" when the server fails it, never failing the job by itself; but
    it took Airflow 2's AirflowTaskTimeout (an Exception) for such a failure, and the task ran on
    past execution_timeout."""
    from airflow_provider_cxpg.conninfo import Redactor
    from airflow_provider_cxpg.supervisor.monitor import ServerMonitor
    from tests.helpers import TaskTimeout, alarm_in

    with running_proxy((pg.host, pg.port)) as proxy:
        monitor = ServerMonitor(_endpoint(pg, proxy.port), app, Redactor(), call_timeout=30)
        try:
            assert monitor.check() > 0
            assert monitor.backends() == []
            proxy.freeze()
            started = time.monotonic()
            with alarm_in(0.5), pytest.raises(TaskTimeout):
                monitor.backends()
            assert time.monotonic() - started < 5
        finally:
            proxy.thaw()
            monitor.close()


def test_a_monitor_read_stopped_by_on_kill_leaves_the_monitor_able_to_stop_the_run(
    pg: PgInfo, admin: psycopg.Connection, app: str
) -> None:
    """A stopped read goes on on its thread, which is then marked stuck: the stop's own cancel and
    terminate were refused at once, and the run's query ran on on the server."""
    from airflow_provider_cxpg.conninfo import Redactor
    from airflow_provider_cxpg.supervisor.monitor import ServerMonitor

    victim = psycopg.connect(pg.dsn, autocommit=True, application_name=app)
    runner = threading.Thread(target=lambda: _run_quietly(victim, "SELECT pg_sleep(30)"), daemon=True)
    runner.start()
    monitor = ServerMonitor(_endpoint(pg), app, Redactor(), call_timeout=30)
    try:
        assert wait_until(lambda: any(b.state == "active" for b in monitor.backends() or ()), 10)
        stop_at = time.monotonic() + 0.3
        with pytest.raises(CallStopped):
            monitor.read(
                "a slow catalog read",
                lambda conn: conn.execute("SELECT pg_sleep(3)"),
                stop=lambda: "on_kill" if time.monotonic() > stop_at else None,
            )
        assert monitor.stop_backends(grace=2.0)  # the read's thread is still busy: a new one stops the run
        runner.join(10)
        assert not runner.is_alive()
    finally:
        monitor.close()
        victim.close()


def _run_quietly(conn: psycopg.Connection, sql: str) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute(sql)
