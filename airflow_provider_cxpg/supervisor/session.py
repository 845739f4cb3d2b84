"""The parent side of a worker: spawn it, talk to it, watch it, and stop it cleanly.

::

    parent (Airflow task process)                         worker (python -P -m airflow_provider_cxpg.worker)
    ───────────────────────────────────────                ─────────────────────────────────────────────
    WorkerSession.start()  ── spawn, allowlisted env ──▶   boot.py: channel, reads Configure, forks its reaper
         ── Configure(endpoint with password) ─────────▶   imports connectorx + pyarrow (no Airflow, no NumPy)
         ◀──────────────────────── Ready ───────────────   heartbeat thread ── Heartbeat every interval ──▶
    WorkerSession.run(ReadChunk) ── ReadChunk ─────────▶   connectorx read ─▶ cast ─▶ checks; a writer thread
         ◀── QueryStarted, ChunkRead, ChunkDone | Failed    encodes Parquet/IPC and renames the file into place
                                                            (stream_rows: encoded as batches arrive, committed
                                                            by the writer thread beside the next read)
    pump loop: deadlines (query, job, heartbeat),
    crash (channel EOF), pg_stat_activity samples
    ServerMonitor (psycopg control connection) ── pg_cancel_backend / pg_terminate_backend ──▶ server

The session combines three parts, each in its own module: :class:`~.process.WorkerProcess` (spawn,
environment, reader threads, signals, reap), :class:`~.requests.RequestBook` (requests and their
replies) and :class:`~.watchdog.Watchdog` (deadlines, heartbeats, server waits, lock waits). The
pump here hands each message to the one that owns it and asks the watchdog between messages.

Every wait in this module has a deadline. :meth:`WorkerSession.stop` is the one way a worker ends
abnormally: cancel its server queries, terminate what does not stop, SIGTERM (with SIGCONT, so a
stopped process can act on it), SIGKILL after a grace period, reap, and sweep leftover backends.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import time
from collections.abc import Callable
from typing import Any

from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor, liveness_settings
from airflow_provider_cxpg.exceptions import (
    ExtractionAborted,
    HeartbeatLostError,
    WorkerCrashedError,
    WorkerStartError,
)
from airflow_provider_cxpg.querylog import QueryLog
from airflow_provider_cxpg.supervisor.credentials import CredentialSource
from airflow_provider_cxpg.supervisor.monitor import ActivitySampler, ServerMonitor
from airflow_provider_cxpg.supervisor.process import (
    CHANNEL_CLOSED,
    ENV_ALLOWLIST,
    WorkerProcess,
    describe_exit,
    worker_environment,
)
from airflow_provider_cxpg.supervisor.requests import RequestBook
from airflow_provider_cxpg.supervisor.settings import WorkerSettings
from airflow_provider_cxpg.supervisor.watchdog import Watchdog
from airflow_provider_cxpg.worker.protocol import (
    ChunkDone,
    ChunkRead,
    Configure,
    Credentials,
    Failed,
    Heartbeat,
    QueryStarted,
    ReadChunk,
    Ready,
    Shutdown,
)
from airflow_provider_cxpg.worker.reaper import process_identity

# ENV_ALLOWLIST and worker_environment live in .process; importable from here as before.
__all__ = ["ENV_ALLOWLIST", "WorkerSession", "worker_environment"]


class WorkerSession:
    """One supervised worker serving many queries.

    :param endpoint: the server, with the run's session options already applied.
    :param settings: deadlines and intervals.
    :param querylog: where events go.
    :param application_name: the run's unique name (finds its backends in ``pg_stat_activity``).
    :param redactor: scrubs secrets from worker output.
    :param worker_index: labels events when several workers run at once.
    :param job_deadline: ``time.monotonic()`` value after which the job has run too long.
    :param abort_check: returns a reason when the run was aborted (``on_kill``).
    :param pre_execution: statements each data connection runs before its query.
    :param credentials: renews the password (IAM tokens); the worker learns each new one before
        its next query.
    """

    def __init__(
        self,
        endpoint: PostgresEndpoint,
        settings: WorkerSettings,
        querylog: QueryLog,
        *,
        application_name: str,
        redactor: Redactor,
        worker_index: int = 0,
        job_deadline: float | None = None,
        abort_check: Callable[[], str | None] | None = None,
        pre_execution: tuple[str, ...] = (),
        credentials: CredentialSource | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.log = querylog
        self.application_name = application_name
        self.redact = redactor
        self.worker_index = worker_index
        self.pre_execution = tuple(pre_execution)
        self.credentials = credentials
        self._abort_check = abort_check or (lambda: None)
        self.process = WorkerProcess(querylog, redactor, worker_index=worker_index, env_extra=settings.worker_env)
        self.book = RequestBook(self._emit, query_timeout=settings.query_timeout)
        self.monitor = ServerMonitor(endpoint, application_name, redactor, call_timeout=settings.control_timeout)
        self.sampler = ActivitySampler(
            self.monitor,
            lambda backend: self.watchdog.report_wait(backend),
            interval=settings.monitor_interval,
            after=settings.report_wait_after,
            every=settings.report_wait_every,
        )
        self.watchdog = Watchdog(
            settings,
            self._emit,
            process=self.process,
            book=self.book,
            sampler=self.sampler,
            monitor=self.monitor,
            job_deadline=job_deadline,
        )
        self.ready: Ready | None = None
        self.startup_seconds: float | None = None
        self._stopped = False
        self._released = False
        self._interrupted: str | None = None
        self._closing = False

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def job_deadline(self) -> float | None:
        return self.watchdog.job_deadline

    def _emit(self, event: str, **fields: Any) -> None:
        self.log.emit(event, worker=self.worker_index, worker_pid=self.process.pid, **fields)

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> WorkerSession:
        if self.process.proc is None:
            self.start()
        elif self.ready is None:
            self.finish_start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
        else:
            self.stop(reason=type(exc).__name__)

    def next_query_id(self) -> int:
        return self.book.next_query_id()

    def start(self) -> None:
        """Check the server, spawn the worker, send Configure, wait for Ready."""
        self.spawn()
        self.finish_start()

    def spawn(self) -> None:
        """Check the server and start the worker process without waiting for it.

        The worker imports connectorx and pyarrow meanwhile; the caller can plan in parallel and
        call :meth:`finish_start` (or enter the ``with`` block) when it needs the worker.
        """
        version = self.monitor.check()
        # Every connection of the worker asks the server to notice a vanished client (see conninfo).
        self.endpoint = self.endpoint.with_settings(liveness_settings(version))
        self.process.spawn()
        self.watchdog.heard(time.monotonic())
        # Configure goes at once (the pipe holds it while the worker imports): from its arrival the
        # worker can end the run's backends, the parent's planning queries included, should the
        # parent die.
        configure = Configure(
            endpoint=self.endpoint,
            protocol=self.settings.protocol,
            heartbeat_interval=self.settings.heartbeat_interval,
            secrets=self.redact.secrets,
            pre_execution=self.pre_execution,
            storage_timeout=self.settings.storage_timeout,
            run_application_name=self.application_name,
            task_pid=os.getpid(),
            task_started=process_identity(os.getpid()),
        )
        try:
            self._send(configure)
        except WorkerCrashedError as exc:
            raise WorkerStartError(f"the worker exited during start-up: {exc.message}", pid=self.pid) from exc
        self.sampler.start()

    def finish_start(self) -> None:
        """Wait (under ``start_timeout``) for the spawned worker's Ready."""
        assert self.process.proc is not None, "spawn() first"
        t0 = self.process.spawned_at
        deadline = t0 + self.settings.start_timeout
        try:
            self._pump(lambda: self.ready is not None, start_deadline=deadline)
        except WorkerCrashedError as exc:
            self.stop(reason="start failed")
            raise WorkerStartError(f"the worker exited during start-up: {exc.message}", pid=self.pid) from exc
        except BaseException:
            self.stop(reason="start failed")
            raise
        assert self.ready is not None
        self.startup_seconds = time.monotonic() - t0
        self._emit(
            "worker.ready",
            seconds=self.startup_seconds,
            import_seconds=round(self.ready.startup_seconds, 4),
            connectorx=self.ready.versions.get("connectorx"),
        )

    def close(self) -> None:
        """Ask the worker to exit and reap it; stop it by force if it does not exit in time."""
        if self.process.proc is None:
            return
        if self._stopped or self._interrupted:
            self.stop(reason=self._interrupted or "closed after stop")
            return
        self._closing = True
        with contextlib.suppress(OSError, HeartbeatLostError):
            self._send(Shutdown())
        try:
            code = self.process.wait(timeout=self.settings.kill_grace)
        except subprocess.TimeoutExpired:
            self.stop(reason="did not exit after Shutdown")
            return
        self._stopped = True
        self._emit("worker.exit", exitcode=code)
        self._sweep_backends("sweep")
        self._release()

    def interrupt(self, reason: str) -> None:
        """Begin a stop from a signal handler (``on_kill``): SIGTERM the worker, and nothing else.

        The handler may run on the thread that drives this session, interrupting it inside this
        session's own locks (a psycopg query on the monitor connection, a log write, a frame send);
        taking any of them here would deadlock that thread against itself (measured: ``on_kill``
        from Airflow's SIGTERM handler hung in ``ServerMonitor.close``). So this only records the
        reason and signals the process, both lock-free. The driving thread sees the reason within
        one tick of its loop (at most 0.25 s) and runs :meth:`stop`: server queries cancelled, worker
        reaped, connections closed, events logged.
        """
        self._interrupted = reason
        self.process.signal_term()

    def stop(self, reason: str) -> None:
        """Stop abnormally: cancel server queries, terminate backends, SIGTERM, SIGKILL, reap.

        Runs on the thread that drives the session (signal handlers use :meth:`interrupt`).
        """
        if self.process.proc is None:
            return
        if self._stopped:
            self._release()
            return
        self._stopped = True
        self.sampler.stop()
        try:
            self._sweep_backends(reason)
            signalled = self.process.running or self._interrupted is not None
            self.process.terminate(self.settings.kill_grace)
            if signalled:
                self._emit("worker.killed", exitcode=self.process.returncode, reason=reason)
            # Backends of a killed client can linger (e.g. inside pg_sleep or a lock wait).
            self._sweep_backends(reason)
        finally:
            self._release()

    def _sweep_backends(self, reason: str) -> None:
        terminated = self.monitor.stop_backends(self.settings.cancel_grace)
        if terminated:
            self.log.emit("server.terminate", worker=self.worker_index, backend_pids=terminated, reason=reason)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self.process.release()
        self.sampler.stop()
        self.monitor.close()

    @property
    def alive(self) -> bool:
        return self.process.running and not self._stopped

    # -- requests ----------------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        """Queue ``message`` for the worker; this never waits on the pipe."""
        try:
            self.process.send(message)
        except OSError as exc:  # the worker is gone: report it as the crash it is
            self._pump(lambda: False)  # raises WorkerCrashedError from the channel EOF
            raise WorkerCrashedError(f"cannot reach the worker: {exc}", pid=self.pid) from exc

    def submit(self, request: ReadChunk) -> None:
        """Queue ``request`` in the worker (it reads requests one after another).

        A password due for renewal (an IAM token) is renewed first and sent ahead of the request, so
        the query's new connections use it.
        """
        if self.credentials is not None:
            password = self.credentials.password_if_due()
            if password is not None:
                self.send_password(password)
        self.book.add(request)
        self._send(request)

    def send_password(self, password: str) -> None:
        """Hand a renewed password to the worker and to this session's monitor."""
        self.endpoint = self.endpoint.with_password(password)
        self.monitor.update_password(password)
        self.redact.add(password)
        self._send(Credentials(password=password))

    def wait_read(self, query_id: int) -> ChunkRead:
        """Wait, under every deadline, until the query's rows are in the worker; raise its error."""
        self._pump(lambda: self.book.has_read(query_id))
        return self.book.take_read(
            query_id, active_backend=self.watchdog.active_backend(), activity=self.watchdog.describe_last_active
        )

    def wait_done(self, query_id: int) -> ChunkDone:
        """Wait until the chunk's file is committed; raise the writer's error."""
        self._pump(lambda: self.book.has_done(query_id))
        return self.book.take_done(query_id, activity=self.watchdog.describe_last_active)

    def run(self, request: ReadChunk) -> tuple[ChunkRead, ChunkDone]:
        """Submit ``request`` and wait for both replies."""
        self.submit(request)
        return self.wait_read(request.query_id), self.wait_done(request.query_id)

    # -- the pump ----------------------------------------------------------------------------------

    def _pump(self, done: Callable[[], bool], *, start_deadline: float | None = None) -> None:
        """Handle worker messages until ``done()``; raise when a deadline fires or the worker dies.

        On any exception out of here (ours, KeyboardInterrupt, AirflowTaskTimeout) the caller's
        ``with`` block or :meth:`stop` cleans up.
        """
        tick = min(0.25, self.settings.heartbeat_interval)
        messages = self.process.messages
        while True:
            # Before draining: the EOF of a worker that interrupt() ended is an abort, not a crash.
            reason = self._abort_check() or self._interrupted
            if reason:
                self.stop(reason=reason)
                raise ExtractionAborted.because(reason)
            if self._drain(done):
                return
            now = time.monotonic()
            if start_deadline is not None and now > start_deadline:
                raise WorkerStartError(
                    f"the worker did not report ready within start_timeout={self.settings.start_timeout}s",
                    pid=self.pid,
                )
            self.watchdog.check(now, heartbeats=start_deadline is None)
            try:
                received_at, message = messages.get(timeout=tick)
            except queue.Empty:
                continue
            self._handle(received_at, message)
            if done():
                return

    def _drain(self, done: Callable[[], bool]) -> bool:
        """Handle queued messages one by one until ``done()``; a crash queued behind stays queued."""
        while not done():
            try:
                received_at, message = self.process.messages.get_nowait()
            except queue.Empty:
                return False
            self._handle(received_at, message)
        return True

    def _handle(self, received_at: float, message: object) -> None:
        if message is CHANNEL_CLOSED:
            self._on_channel_closed()
            return
        self.watchdog.heard(received_at)
        if isinstance(message, Heartbeat):
            self.watchdog.heartbeat(message, received_at)
        elif isinstance(message, Ready):
            self.ready = message
        elif isinstance(message, QueryStarted):
            self.book.started(message, received_at)
            self.watchdog.query_started()
            request = self.book.request(message.query_id)
            self._emit(
                "query.start",
                chunk=message.chunk_index,
                query_id=message.query_id,
                sql=request.sql if request and self.log.first("sql") else None,  # once per run
            )
        elif isinstance(message, Failed) and message.query_id is None:
            raise message.error  # a failure outside any request: fatal
        elif isinstance(message, (ChunkRead, ChunkDone, Failed)):
            self.book.file(message)

    def _on_channel_closed(self) -> None:
        try:
            code: int | None = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # channel closed but process alive: treat as broken
            code = None
        if self._closing and code == 0:
            return
        reason = self._interrupted or self._abort_check()
        if reason or self._stopped:  # we ended it ourselves: an abort, not a crash
            self.stop(reason=reason or "stopped")
            raise ExtractionAborted.because(reason or "stopped")
        chunk = self.book.running_chunk
        status = describe_exit(code)
        tail = self.process.stderr_tail()
        self._emit("worker.crash", exitcode=code, chunk=chunk, status=status)
        where = f" while reading chunk {chunk}" if chunk is not None else ""
        # The process is gone; its backends may not be (a query in a lock wait runs on).
        self.book.forget_running()
        self.stop(reason="worker crashed")
        raise WorkerCrashedError(
            f"worker pid {self.pid} {status}{where}" + (f"; last stderr: {tail}" if tail else ""),
            pid=self.pid,
            exitcode=code,
            chunk=chunk,
        )
