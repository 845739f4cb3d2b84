"""The parent's own view of the server: who is running what, who blocks it, and how to stop it.

A control connection (psycopg, in the parent; never connectorx) finds the run's backends by the
run's unique ``application_name`` in ``pg_stat_activity``, reports what they wait on and which
session holds the lock, and cancels or terminates them.

Nothing here may stall the parent's deadlines, whatever the network does:

* every connection has ``connect_timeout``, TCP keepalives and ``tcp_user_timeout`` (a blackholed
  route fails in seconds, not after the kernel's ~15 minutes of retries), and a server-side
  ``statement_timeout``;
* every statement runs on a helper thread under a client-side deadline (``call_timeout``), so a
  gateway that accepts packets but answers nothing is given up on too (see :mod:`~airflow_provider_cxpg.bounded`); after
  a timeout the monitor reports "unknown" at once for a while instead of waiting again;
* sampling runs in its own thread (:class:`ActivitySampler`); the deadline loop only reads the
  latest sample.

Every connection the provider opens also asks the server to notice a vanished client
(:func:`~airflow_provider_cxpg.conninfo.liveness_settings`), so a backend never outlives a killed task for long.

A role may always signal and see its own backends, so the worker's login needs no extra privilege.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from airflow_provider_cxpg.bounded import IDLE_SECONDS, CallRaised, CallStopped, CallTimedOut, SerialCalls
from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor, connect
from airflow_provider_cxpg.control import ControlConnection
from airflow_provider_cxpg.exceptions import ServerConnectionError

__all__ = ["ActivitySampler", "BackendInfo", "Blocker", "ControlCancels", "ServerMonitor", "connection_ended"]

_ACTIVITY_SQL = """
SELECT a.pid, a.state, a.wait_event_type, a.wait_event,
       EXTRACT(EPOCH FROM clock_timestamp() - a.query_start)::float8 AS query_seconds,
       EXTRACT(EPOCH FROM clock_timestamp() - a.state_change)::float8 AS state_seconds,
       left(a.query, 500) AS query,
       CASE WHEN a.wait_event_type = 'Lock' THEN (
           SELECT array_agg(ARRAY[b.pid::text, coalesce(b.application_name, ''), coalesce(b.usename::text, ''),
                                  coalesce(b.state, ''), coalesce(b.query_start::text, ''), left(b.query, 200)]
                            ORDER BY b.pid)
           FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(a.pid))
       ) END AS blockers
FROM pg_stat_activity a
WHERE a.application_name = %s AND a.pid <> pg_backend_pid()
ORDER BY a.pid
"""

_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'")


@dataclass(frozen=True)
class Blocker:
    """A session that holds a lock a backend of the run waits for."""

    pid: int
    application_name: str
    user: str
    state: str
    query_start: str
    query: str

    def describe(self) -> str:
        return (
            f"pid {self.pid} ({self.user or '?'}@{self.application_name or '?'}, {self.state or '?'} since "
            f"{self.query_start or '?'}): {self.query!r}"
        )


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
    blockers: tuple[Blocker, ...] = ()

    @property
    def waiting(self) -> bool:
        """Active but waiting on a lock or another backend (not on the client or plain I/O)."""
        return self.state == "active" and self.wait_event_type in {"Lock", "LWLock", "IPC", "BufferPin"}

    def describe(self) -> str:
        wait = f", waiting on {self.wait_event_type}:{self.wait_event}" if self.wait_event_type else ""
        secs = f" for {self.query_seconds:.1f}s" if self.query_seconds is not None else ""
        held = f", blocked by {'; '.join(b.describe() for b in self.blockers)}" if self.blockers else ""
        return f"backend {self.pid} {self.state or 'unknown'}{wait}{secs}{held}"


#: SQLSTATEs of a server that ended the session: shutdown, crash, idle-session timeout (57P05).
_SESSION_ENDED = {"57P01", "57P02", "57P03", "57P05"}


def connection_ended(error: BaseException) -> bool:
    """Whether ``error`` says the connection is gone (not that its statement failed)."""
    state = getattr(error, "sqlstate", None)
    return state is None or state.startswith("08") or state in _SESSION_ENDED


class ServerMonitor:
    """Sample and signal the backends of one ``application_name``, never for longer than a deadline.

    :param endpoint: the server (the same login the worker uses).
    :param application_name: the run's unique name, set on every worker connection.
    :param redactor: scrubs secrets from query text.
    :param call_timeout: client-side deadline of each statement (and of connecting).
    """

    def __init__(
        self, endpoint: PostgresEndpoint, application_name: str, redactor: Redactor, *, call_timeout: float = 10.0
    ) -> None:
        self._endpoint = endpoint.with_session(application_name=f"{application_name}-ctl")
        self.application_name = application_name
        self._redact = redactor
        self.call_timeout = call_timeout
        self._conn: Any = None
        self._calls = SerialCalls("monitor")
        self._lock = threading.Lock()  # guards replacing _calls; never held across I/O
        self._unreachable_until = 0.0
        self.last_error: str | None = None
        self.server_version: int | None = None

    def update_password(self, password: str) -> None:
        """Use ``password`` for the next connection (a refreshed token); the open one stays."""
        self._endpoint = self._endpoint.with_password(password)

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            timeout = max(1.0, self.call_timeout)
            self._conn = connect(self._endpoint, connect_timeout=timeout, statement_timeout_ms=int(timeout * 1000))
            self.server_version = self._conn.info.server_version
        return self._conn

    def _call(
        self,
        what: str,
        fn: Callable[[Any], Any],
        *,
        raise_errors: bool = False,
        stop: Callable[[], str | None] | None = None,
    ) -> Any:
        """Run ``fn(connection)`` on the monitor's thread under ``call_timeout``; None when it fails.

        :raises CallStopped: ``stop`` gave a reason first.
        """
        if time.monotonic() < self._unreachable_until and not raise_errors:
            return None
        with self._lock:
            calls = self._calls
        try:
            return calls.call(what, lambda: fn(self._connection()), self.call_timeout, stop=stop, wrap_errors=True)
        except CallTimedOut as exc:
            # The thread is stuck on a socket nobody answers: abandon it with its connection, and
            # answer "unknown" at once for a while rather than wait again.
            with self._lock:
                if self._calls is calls:
                    self._calls, self._conn = SerialCalls("monitor"), None
            self._unreachable_until = time.monotonic() + self.call_timeout
            self.last_error = f"{what}: the server did not answer within {self.call_timeout}s"
            if raise_errors:
                raise ServerConnectionError(f"{self.last_error} ({exc})") from None
            return None
        except CallStopped:
            # The call goes on, on a thread that is now marked stuck: every later call (the stop's own
            # cancel and terminate) would be refused at once. Abandon both, as after a timeout, but
            # the server is not known to be unreachable.
            with self._lock:
                if self._calls is calls:
                    self._calls, self._conn = SerialCalls("monitor"), None
            raise
        except CallRaised as raised:  # a failing monitor must never fail the job by itself; but an
            # exception raised into this wait (AirflowTaskTimeout, an Exception on Airflow 2) goes on
            self.last_error = self._redact(str(raised.error))
            self._discard()
            if raise_errors:
                raise raised.error from None
            return None

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with self._lock:
                calls = self._calls
            with contextlib.suppress(CallRaised, CallTimedOut):  # on the monitor's own thread, where it is used
                calls.call("closing the monitor connection", conn.close, self.call_timeout, wrap_errors=True)

    def read(self, what: str, fn: Callable[[Any], Any], *, stop: Callable[[], str | None] | None = None) -> Any:
        """``fn(connection)`` on the monitor's connection (autocommit: the latest catalog), under ``call_timeout``.

        A connection the server ended since its last use (``idle_session_timeout``, a proxy's idle
        limit, an administrator) fails the first try; the call is made once more on a new connection.
        Any other error (a statement timeout included) is not tried again.

        :raises ServerConnectionError: the server did not answer within ``call_timeout``.
        :raises CallStopped: ``stop`` gave a reason first (``on_kill``).
        :raises psycopg.Error: the server's own error.
        """
        try:
            return self._call(what, fn, raise_errors=True, stop=stop)
        except psycopg.OperationalError as exc:
            if not connection_ended(exc):
                raise
            return self._call(what, fn, raise_errors=True, stop=stop)

    def check(self) -> int:
        """Connect now and return the server version: a typo in host or password fails here in
        seconds, not in connectorx's 30 s.

        :raises ServerConnectionError: the server cannot be reached, or does not answer in time.
        """
        return int(self._call("checking the server", lambda conn: conn.info.server_version, raise_errors=True))

    def backends(self) -> list[BackendInfo] | None:
        """The run's backends (empty: none), or None when the server cannot be asked right now."""

        def query(conn: Any) -> list[tuple[Any, ...]]:
            return list(conn.execute(_ACTIVITY_SQL, (self.application_name,)).fetchall())

        rows = self._call("sampling pg_stat_activity", query)
        if rows is None:
            return None
        return [
            BackendInfo(
                pid=row[0],
                state=row[1],
                wait_event_type=row[2],
                wait_event=row[3],
                query_seconds=row[4],
                state_seconds=row[5],
                query=self._redact(row[6]) if row[6] else None,
                blockers=tuple(self._blocker(b) for b in row[7] or ()),
            )
            for row in rows
        ]

    def _blocker(self, fields: list[str]) -> Blocker:
        # Another session's query text: our secrets redacted, and its string literals hidden (they
        # could hold somebody else's, e.g. ALTER ROLE ... PASSWORD '...').
        query = _STRING_LITERAL.sub("'…'", self._redact(fields[5] or ""))
        return Blocker(int(fields[0]), fields[1], fields[2], fields[3], fields[4], query)

    def signal(self, function: str) -> list[int]:
        """Call ``pg_cancel_backend`` or ``pg_terminate_backend`` on every backend of the run."""
        if function not in {"pg_cancel_backend", "pg_terminate_backend"}:
            raise ValueError(function)

        def query(conn: Any) -> list[tuple[Any, ...]]:
            return list(
                conn.execute(
                    f"SELECT pid, {function}(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (self.application_name,),
                ).fetchall()
            )

        rows = self._call(f"calling {function}", query)
        return [row[0] for row in rows or [] if row[1]]

    def stop_backends(self, grace: float) -> list[int]:
        """Cancel every active backend, wait up to ``grace``, terminate what remains; return those terminated.

        Bounded even when the server does not answer: each call has ``call_timeout``, and an
        unreachable server ends the wait at once. A sample that failed otherwise (the server ended
        the monitor's connection: a restart, an administrator) is taken again on a new connection,
        and when the backends still cannot be seen they are terminated unseen: at a stop every
        backend of the run is to go.
        """
        first = self.backends()
        if first is None and time.monotonic() >= self._unreachable_until:
            first = self.backends()
        if first is None:
            return self.signal("pg_terminate_backend")
        if any(b.state == "active" for b in first):
            self.signal("pg_cancel_backend")
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                now = self.backends()
                if now is None or not any(b.state == "active" for b in now):
                    break
                time.sleep(0.05)
        terminated: list[int] = []
        remaining = self.backends()
        if remaining is None or remaining:
            terminated = self.signal("pg_terminate_backend")
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.backends():
                time.sleep(0.05)
        return terminated

    def close(self) -> None:
        """Close the connection (on the monitor's thread, bounded) and let the thread end."""
        self._discard()
        with self._lock:
            self._calls.close()


class ActivitySampler:
    """Sample the run's backends from a thread; keep the latest sample; report lock waits as they last.

    The deadline loop must never wait on the server, so it reads :meth:`latest` instead of querying.
    The parent's own planning queries block in psycopg meanwhile, and this thread reports their lock
    waits too.

    :param report: called with each waiting backend, after ``after`` seconds of waiting and then at
        most every ``every`` seconds per backend (from this thread).
    """

    def __init__(
        self,
        monitor: ServerMonitor,
        report: Callable[[BackendInfo], None] | None = None,
        *,
        interval: float = 1.0,
        after: float = 5.0,
        every: float = 10.0,
    ) -> None:
        self.monitor = monitor
        self._report = report
        self._interval, self._after, self._every = interval, after, every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: dict[int, float] = {}
        self._latest: tuple[float, list[BackendInfo]] | None = None
        self._last_active: list[BackendInfo] = []
        self.active_pids: dict[int, float] = {}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> list[BackendInfo] | None:
        backends = self.monitor.backends()
        if backends is None:
            return None
        now = time.monotonic()
        self._latest = (now, backends)
        active = [b for b in backends if b.state == "active"]
        if active:
            self._last_active = backends
        for backend in active:
            self.active_pids.setdefault(backend.pid, now)
        if self._report is not None:
            for backend in backends:
                if not backend.waiting or (backend.query_seconds or 0) < self._after:
                    continue
                last = self._reported.get(backend.pid)
                if last is None or now - last >= self._every:
                    self._reported[backend.pid] = now
                    self._report(backend)
        return backends

    def latest(self, max_age: float | None = None) -> list[BackendInfo] | None:
        """The latest sample, or None when there is none as recent as ``max_age`` seconds."""
        latest = self._latest
        if latest is None or (max_age is not None and time.monotonic() - latest[0] > max_age):
            return None
        return latest[1]

    def last_active(self) -> list[BackendInfo]:
        """The last sample that showed a backend at work (what a timeout message should describe)."""
        return self._last_active

    def reset(self) -> None:
        """Forget what was reported (a new query starts)."""
        self._reported.clear()
        self._last_active = []

    def start(self) -> ActivitySampler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cxpg-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.monitor.call_timeout + self._interval + 1)

    def __enter__(self) -> ActivitySampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.monitor.close()


class ControlCancels:
    """Cancel the parent's running control queries (planning, a window's ``max()``), from anywhere.

    A planning query may wait on a lock for up to ``query_timeout``. Whatever ends the parent's wait
    early (``on_kill`` from Airflow's SIGTERM handler, ``AirflowTaskTimeout`` from its SIGALRM, any
    error) must cancel it on the server too, or the backend waits on and then runs the query. A
    cancel request opens a new connection to the server and may wait on a dead network, so it never
    runs in a signal handler: :meth:`cancel_all_soon` (signal-safe: it only sets an event) wakes a
    helper thread that sends them; :meth:`cancel` sends one from the caller's thread. Each waits at
    most ``timeout`` seconds, in a wait that holds no lock of the interpreter
    (:meth:`~airflow_provider_cxpg.control.ControlConnection.cancel`). The helper ends once nothing
    is registered for :data:`IDLE_SECONDS` (a process running many extractions keeps no parked
    thread per run); the next registration starts another.

    :param timeout: how long one cancel request may take to go out.
    """

    def __init__(self, timeout: float = 3.0) -> None:
        self.timeout = timeout
        self._controls: dict[int, ControlConnection] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # never taken by cancel_all_soon (signal handlers)

    def register(self, control: ControlConnection) -> int:
        """Remember ``control`` (anything with ``cancel(timeout)``); return the key to cancel or forget it by."""
        key = id(control)
        with self._lock:  # the helper ends only under this lock, with nothing registered
            self._controls[key] = control
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cxpg-canceller", daemon=True)
                self._thread.start()
        return key

    def unregister(self, key: int) -> None:
        self._controls.pop(key, None)

    def _run(self) -> None:
        while True:
            if not self._wake.wait(IDLE_SECONDS):
                with self._lock:
                    if not self._controls and not self._wake.is_set():
                        self._thread = None
                        return
                continue
            self._wake.clear()
            for control in list(self._controls.values()):
                with contextlib.suppress(Exception):
                    control.cancel(self.timeout)

    def cancel_all_soon(self) -> None:
        """Ask for every registered query to be cancelled; returns at once (signal-safe)."""
        self._wake.set()

    def cancel(self, key: int, timeout: float) -> None:
        """Cancel one query, waiting at most ``timeout`` seconds for the request to go out."""
        control = self._controls.get(key)
        if control is not None:  # no suppress(Exception) here: AirflowTaskTimeout is one on Airflow 2
            control.cancel(timeout)
