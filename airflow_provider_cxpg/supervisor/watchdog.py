"""The watchdog of one worker: may it keep going? Deadlines, heartbeats, server waits, lock waits.

The session's pump asks :meth:`Watchdog.check` between messages, at least every quarter second. It
never asks the server: everything it knows about the server comes from the
:class:`~airflow_provider_cxpg.supervisor.monitor.ActivitySampler`'s latest sample, because a
server that does not answer must not stop the deadlines from firing. Each rule raises the
provider's error and logs the event that says which limit fired and who enforced it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow_provider_cxpg.exceptions import (
    STORE_UNANSWERED,
    HeartbeatLostError,
    JobTimeoutError,
    QueryTimeoutError,
    ServerConnectionError,
    StorageError,
)
from airflow_provider_cxpg.supervisor.monitor import ActivitySampler, BackendInfo, ServerMonitor
from airflow_provider_cxpg.supervisor.process import WorkerProcess
from airflow_provider_cxpg.supervisor.requests import RequestBook
from airflow_provider_cxpg.supervisor.settings import WorkerSettings
from airflow_provider_cxpg.worker.protocol import Heartbeat

__all__ = ["Watchdog", "lock_wait_fields", "statement_deadline"]


def lock_wait_fields(backend: BackendInfo) -> dict[str, Any]:
    """The ``server.waiting`` event's facts about a backend waiting on a lock, holders included.

    One rule for the worker's data connections and the parent's control connections alike.
    """
    return {
        "backend_pid": backend.pid,
        "state": backend.state,
        "wait_event": f"{backend.wait_event_type}:{backend.wait_event}",
        "seconds": backend.query_seconds,
        "blocked_by": [b.describe() for b in backend.blockers] or None,
    }


def statement_deadline(settings: WorkerSettings, job_deadline: float | None, now: float) -> tuple[float | None, str]:
    """How long one of the parent's own statements may wait at ``now``, and the setting that bounds it.

    ``query_timeout + deadline_grace`` (the server's ``statement_timeout`` fires first while the
    server can still answer), or what is left of the job (``job_deadline``) when that is sooner;
    None when neither is set. The rule for the parent's control connections, as :meth:`Watchdog.check`
    is the worker's.
    """
    limit = settings.query_timeout
    timeout = None if limit is None else limit + settings.deadline_grace
    if job_deadline is not None:
        left = max(0.0, job_deadline - now)
        if timeout is None or left < timeout:
            return left, "job_timeout"
    return timeout, "query_timeout"


class Watchdog:
    """Decides from what the pump has seen whether the worker may go on; raises when it may not.

    :param emit: logs an event about this worker (the session adds the worker's index and pid).
    :param job_deadline: ``time.monotonic()`` value after which the job has run too long.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        emit: Callable[..., Any],
        *,
        process: WorkerProcess,
        book: RequestBook,
        sampler: ActivitySampler,
        monitor: ServerMonitor,
        job_deadline: float | None = None,
    ) -> None:
        self.settings = settings
        self._emit = emit
        self._process = process
        self._book = book
        self._sampler = sampler
        self._monitor = monitor
        self.job_deadline = job_deadline
        self._last_heard = 0.0
        self._storage: tuple[str, float, float] | None = None  # operation, seconds so far, received_at
        self._waiting_reported = False

    # -- what the pump tells it --------------------------------------------------------------------

    def heard(self, received_at: float) -> None:
        """Any message from the worker: it is alive at ``received_at``."""
        self._last_heard = max(self._last_heard, received_at)

    def heartbeat(self, message: Heartbeat, received_at: float) -> None:
        """A heartbeat also says whether the worker is inside a storage call, and for how long."""
        operation, seconds = message.storage_op, message.storage_seconds
        self._storage = (operation, seconds, received_at) if operation is not None and seconds is not None else None

    def query_started(self) -> None:
        self._sampler.reset()

    def report_wait(self, backend: BackendInfo) -> None:
        """From the sampler's thread: a backend of the run has waited on a lock for a while."""
        running = self._book.running  # read once: the pump may end the query meanwhile
        if running is not None:
            self._book.note_backend(running.query_id, backend.pid)
        self._emit("server.waiting", chunk=running.chunk if running else None, **lock_wait_fields(backend))

    # -- the rules ---------------------------------------------------------------------------------

    def check(self, now: float, *, heartbeats: bool = True) -> None:
        """Raise the error of the first limit passed at ``now``; heartbeats only once the worker is ready."""
        self._check_login()
        self._check_job(now)
        self._check_storage(now)
        if heartbeats:
            self._check_heartbeat(now)
        self._check_query(now)

    def _check_login(self) -> None:
        refused, chunk = self._process.refused_login, self._book.running_chunk
        if refused is None or chunk is None:
            return
        self._emit("query.failed", chunk=chunk, error=refused)
        raise ServerConnectionError(
            f"chunk {chunk}: the server refused the worker's login: {refused}", reason="authentication", chunk=chunk
        )

    def _check_job(self, now: float) -> None:
        if self.job_deadline is None or now <= self.job_deadline:
            return
        activity = self.describe_activity()
        self._emit("query.timeout", limit="job_timeout", server_activity=activity)
        raise JobTimeoutError(
            f"the job ran past job_timeout={self.settings.job_timeout}s; server was doing: {activity}",
            limit="job_timeout",
            server_activity=activity,
        )

    def _check_storage(self, now: float) -> None:
        limit = self.settings.storage_timeout
        if self._storage is None or limit is None:
            return
        operation, seconds, received_at = self._storage
        elapsed = seconds + (now - received_at)
        if elapsed <= limit + self.settings.deadline_grace:  # the worker's own deadline fires first
            return
        self._emit(
            "query.timeout",
            limit="storage_timeout",
            enforced_by="parent",
            seconds=elapsed,
            operation=operation,
        )
        raise StorageError(
            f"{operation} has not returned after {elapsed:.1f}s (storage_timeout={limit}s): {STORE_UNANSWERED}",
            operation=operation,
            limit="storage_timeout",
        )

    def _check_heartbeat(self, now: float) -> None:
        silent = now - self._last_heard
        if silent <= self.settings.heartbeat_timeout or self.silence_is_a_server_wait():
            return
        chunk = self._book.running_chunk
        self._emit("worker.heartbeat_missed", chunk=chunk, seconds=silent, limit="heartbeat_timeout")
        raise HeartbeatLostError(
            f"worker pid {self._process.pid} sent no heartbeat for {silent:.1f}s "
            f"(heartbeat_timeout={self.settings.heartbeat_timeout}s): frozen or stopped",
            pid=self._process.pid,
            limit="heartbeat_timeout",
            chunk=chunk,
        )

    def _check_query(self, now: float) -> None:
        running, limit = self._book.running, self.settings.query_timeout
        if running is None or limit is None:
            return
        elapsed = now - running.started_at
        if elapsed <= limit + self.settings.deadline_grace:  # the server's statement_timeout fires first
            return
        activity = self.describe_activity()
        self._emit(
            "query.timeout",
            chunk=running.chunk,
            seconds=elapsed,
            limit="query_timeout",
            enforced_by="parent",
            server_activity=activity,
        )
        raise QueryTimeoutError(
            f"chunk {running.chunk}: query ran {elapsed:.1f}s, past query_timeout={limit}s; "
            f"server was doing: {activity}",
            limit="query_timeout",
            chunk=running.chunk,
            server_activity=activity,
        )

    def silence_is_a_server_wait(self) -> bool:
        """True when a silent worker is waiting on its running query, not frozen.

        A streamed read holds the GIL while it waits for its first batch (measured), so heartbeats
        pause during a long server-side wait (a lock, a slow plan). That silence is tolerated while
        the worker process is not stopped (``/proc`` state) and the run's backend is active on
        something other than sending to the worker (``Client:ClientWrite`` would mean the worker no
        longer reads), as the sampler's latest sample shows; a sample too old to trust (the server
        does not answer) excuses nothing. ``query_timeout`` still bounds the wait.
        """
        running = self._book.running
        if running is None or self._process.is_stopped():
            return False
        fresh = self._sampler.latest(max_age=3 * self.settings.monitor_interval + self.settings.control_timeout)
        waiting = [
            b
            for b in fresh or ()
            if b.state == "active" and (b.wait_event_type, b.wait_event) != ("Client", "ClientWrite")
        ]
        if waiting and not self._waiting_reported:
            self._emit(
                "worker.waiting",
                chunk=running.chunk,
                note="heartbeats paused while the worker waits on its query; query_timeout applies",
                server_activity="; ".join(b.describe() for b in waiting),
            )
        self._waiting_reported = bool(waiting)
        return self._waiting_reported

    def describe_activity(self) -> str:
        """What the server showed last, from the sampler (never a query here: the server may not answer)."""
        backends = self._sampler.latest() or self._sampler.last_active()
        if not backends and self._monitor.last_error:
            return f"the server could not be asked ({self._monitor.last_error})"
        return "; ".join(b.describe() for b in backends) or "no backend of this run found"

    def describe_last_active(self) -> str:
        """The last sample that showed a backend at work (for a timeout the server enforced)."""
        return "; ".join(b.describe() for b in self._sampler.last_active()) or "no backend activity sampled"

    def active_backend(self) -> int | None:
        """A backend the latest sample showed at work, when no report named the query's own."""
        active = [b.pid for b in self._sampler.last_active() if b.state == "active"]
        return active[0] if active else None
