"""The parent's own view of the server: who is running what, and how to stop it.

A control connection (psycopg, in the parent; never connectorx) finds the worker's backends by the
run's unique ``application_name`` in ``pg_stat_activity``, reports what they wait on, and cancels or
terminates them. Every statement on it has a short ``statement_timeout``, and connecting has a
``connect_timeout``: the monitor itself can never hang the task.

A role may always signal and see its own backends, so the worker's login needs no extra privilege.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor
from airflow_provider_cxpg.exceptions import ServerConnectionError

__all__ = ["BackendInfo", "ServerMonitor", "WaitWatcher", "connect"]

_ACTIVITY_SQL = """
SELECT pid, state, wait_event_type, wait_event,
       EXTRACT(EPOCH FROM clock_timestamp() - query_start)::float8 AS query_seconds,
       EXTRACT(EPOCH FROM clock_timestamp() - state_change)::float8 AS state_seconds,
       left(query, 500) AS query,
       backend_type
FROM pg_stat_activity
WHERE application_name = %s AND pid <> pg_backend_pid()
ORDER BY pid
"""


@dataclass(frozen=True)
class BackendInfo:
    """One server backend of the run, as ``pg_stat_activity`` shows it."""

    pid: int
    state: str | None
    wait_event_type: str | None
    wait_event: str | None
    query_seconds: float | None
    state_seconds: float | None
    query: str | None

    @property
    def waiting(self) -> bool:
        """Active but waiting on a lock or another backend (not on the client or plain I/O)."""
        return self.state == "active" and self.wait_event_type in {"Lock", "LWLock", "IPC", "BufferPin"}

    def describe(self) -> str:
        wait = f", waiting on {self.wait_event_type}:{self.wait_event}" if self.wait_event_type else ""
        secs = f" for {self.query_seconds:.1f}s" if self.query_seconds is not None else ""
        return f"backend {self.pid} {self.state or 'unknown'}{wait}{secs}"


def connect(endpoint: PostgresEndpoint, *, connect_timeout: float = 10.0, statement_timeout_ms: int = 10_000) -> Any:
    """Open an autocommit psycopg connection with deadlines on connecting and on every statement.

    :raises ServerConnectionError: the server cannot be reached or refuses the login (no secret in
        the message).
    """
    import psycopg

    kwargs: dict[str, Any] = endpoint.libpq_kwargs()
    kwargs["connect_timeout"] = max(1, round(connect_timeout))
    own = f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout={int(statement_timeout_ms)}"
    kwargs["options"] = f"{kwargs['options']} {own}" if kwargs.get("options") else own
    try:
        return psycopg.connect(autocommit=True, **kwargs)
    except psycopg.Error as exc:
        redact = Redactor(endpoint.secrets())
        detail = redact(str(exc).strip()) or type(exc).__name__
        raise ServerConnectionError(
            f"cannot connect to {endpoint.redacted_uri()}: {detail}", endpoint=endpoint.redacted_uri()
        ) from None


class ServerMonitor:
    """Sample and signal the backends of one ``application_name``.

    :param endpoint: the server (the same login the worker uses).
    :param application_name: the run's unique name, set on every worker connection.
    :param redactor: scrubs secrets from query text.
    """

    def __init__(self, endpoint: PostgresEndpoint, application_name: str, redactor: Redactor) -> None:
        self._endpoint = endpoint.with_session(application_name=f"{application_name}-ctl")
        self.application_name = application_name
        self._redact = redactor
        self._conn: Any = None
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self._endpoint, connect_timeout=5.0, statement_timeout_ms=5_000)
        return self._conn

    def check(self) -> None:
        """Connect now: a typo in host or password fails here in seconds, not in connectorx's 30 s."""
        with self._lock:
            self._connection().execute("SELECT 1")

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]] | None:
        # A failing monitor must never fail the job: the server-side statement_timeout remains.
        with self._lock:
            try:
                return list(self._connection().execute(sql, params).fetchall())
            except Exception as exc:  # noqa: BLE001
                self.last_error = self._redact(str(exc))
                with contextlib.suppress(Exception):
                    if self._conn is not None:
                        self._conn.close()
                self._conn = None
                return None

    def backends(self) -> list[BackendInfo]:
        """Return the run's backends (empty when none, or when the server cannot be asked)."""
        rows = self._query(_ACTIVITY_SQL, (self.application_name,)) or []
        return [
            BackendInfo(
                pid=row[0],
                state=row[1],
                wait_event_type=row[2],
                wait_event=row[3],
                query_seconds=row[4],
                state_seconds=row[5],
                query=self._redact(row[6]) if row[6] else None,
            )
            for row in rows
        ]

    def signal(self, function: str) -> list[int]:
        """Call ``pg_cancel_backend`` or ``pg_terminate_backend`` on every backend of the run."""
        if function not in {"pg_cancel_backend", "pg_terminate_backend"}:
            raise ValueError(function)
        rows = self._query(
            f"SELECT pid, {function}(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (self.application_name,),
        )
        return [row[0] for row in rows or [] if row[1]]

    def stop_backends(self, grace: float) -> list[int]:
        """Cancel every active backend, wait up to ``grace``, terminate what remains; return those terminated."""
        if any(b.state == "active" for b in self.backends()):
            self.signal("pg_cancel_backend")
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not any(b.state == "active" for b in self.backends()):
                    break
                time.sleep(0.05)
        terminated: list[int] = []
        if self.backends():
            terminated = self.signal("pg_terminate_backend")
            deadline = time.monotonic() + grace
            while self.backends() and time.monotonic() < deadline:
                time.sleep(0.05)
        return terminated

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None


class WaitWatcher:
    """Report, from a thread, while the backends of ``monitor`` wait on a lock.

    The parent's own catalog queries (planning, a watermark's ``max()``) block in psycopg; this
    thread keeps sampling ``pg_stat_activity`` meanwhile, so a lock wait is logged while it lasts.

    :param report: called with each waiting backend, at most every ``every`` seconds per backend.
    """

    def __init__(
        self,
        monitor: ServerMonitor,
        report: Any,
        *,
        interval: float = 1.0,
        after: float = 5.0,
        every: float = 10.0,
    ) -> None:
        self._monitor = monitor
        self._report = report
        self._interval, self._after, self._every = interval, after, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cxpg-wait-watcher", daemon=True)
        self._reported: dict[int, float] = {}

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            for backend in self._monitor.backends():
                if not backend.waiting or (backend.query_seconds or 0) < self._after:
                    continue
                last = self._reported.get(backend.pid)
                if last is None or now - last >= self._every:
                    self._reported[backend.pid] = now
                    self._report(backend)

    def __enter__(self) -> WaitWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._monitor.close()
