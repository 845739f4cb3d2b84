"""The parent side of a worker: spawn it, talk to it, watch it, and stop it cleanly.

::

    parent (Airflow task process)                         worker (python -P -m airflow_provider_cxpg.worker)
    ───────────────────────────────────────                ─────────────────────────────────────────────
    WorkerSession.start()  ── spawn, allowlisted env ──▶   imports connectorx + pyarrow (no Airflow)
         ◀──────────────────────── Ready ───────────────   heartbeat thread ── Heartbeat every interval ──▶
         ── Configure(endpoint with password) ─────────▶
    WorkerSession.run(ReadChunk) ── ReadChunk ─────────▶   connectorx arrow_stream ─▶ cast ─▶ Parquet/IPC
         ◀── QueryStarted, ChunkRead, ChunkDone | Failed    (rows in memory; file renamed into place)
    pump loop: deadlines (query, job, heartbeat),
    crash (channel EOF), pg_stat_activity samples
    ServerMonitor (psycopg control connection) ── pg_cancel_backend / pg_terminate_backend ──▶ server

Every wait in this module has a deadline. :meth:`WorkerSession.stop` is the one way a worker ends
abnormally: cancel its server queries, terminate what does not stop, SIGTERM (with SIGCONT, so a
stopped process can act on it), SIGKILL after a grace period, reap, and sweep leftover backends.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor, liveness_settings
from airflow_provider_cxpg.exceptions import (
    ExtractionAborted,
    HeartbeatLostError,
    JobTimeoutError,
    QueryCancelledError,
    QueryTimeoutError,
    RemoteTraceback,
    ServerConnectionError,
    StorageError,
    WorkerCrashedError,
    WorkerStartError,
)
from airflow_provider_cxpg.querylog import QueryLog
from airflow_provider_cxpg.supervisor.credentials import CredentialSource, is_authentication_failure
from airflow_provider_cxpg.supervisor.monitor import ActivitySampler, BackendInfo, ServerMonitor
from airflow_provider_cxpg.supervisor.settings import WorkerSettings
from airflow_provider_cxpg.worker.protocol import (
    ChunkDone,
    ChunkRead,
    Configure,
    Credentials,
    Failed,
    FrameReader,
    FrameWriter,
    Heartbeat,
    QueryStarted,
    QueuedSender,
    ReadChunk,
    Ready,
    Shutdown,
)
from airflow_provider_cxpg.worker.reaper import process_identity

__all__ = ["ENV_ALLOWLIST", "WorkerSession", "worker_environment"]

#: Environment variables a worker inherits (plus any ``LC_*``). Everything else, notably
#: ``AIRFLOW_CONN_*``, ``AIRFLOW__*`` and cloud credentials, stays in the parent.
ENV_ALLOWLIST: tuple[str, ...] = (
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    # Proxies, as object-store clients behind a corporate proxy or in a cluster need them (a proxy URL
    # with a password in it is the operator's choice; it is redacted from everything we log).
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "LD_LIBRARY_PATH",
    "VIRTUAL_ENV",
    "SYSTEMROOT",
)

_EOF = object()


def _module_root(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return None
    origin = Path(spec.origin)
    # package: .../site-packages/name/__init__.py -> .../site-packages
    return str(origin.parent.parent if origin.name == "__init__.py" else origin.parent)


def worker_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the worker's environment: the allowlist, the import path it needs, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWLIST or k.startswith("LC_")}
    roots: list[str] = []
    # psycopg: the worker ends the run's backends with it when the parent dies.
    for module in ("airflow_provider_cxpg", "connectorx", "pyarrow", "fsspec", "psycopg", "psycopg_binary"):
        root = _module_root(module)
        if root and root not in roots:
            roots.append(root)
    env["PYTHONPATH"] = os.pathsep.join(roots)
    env["PYTHONUNBUFFERED"] = "1"
    env["RUST_BACKTRACE"] = "0"
    # jemalloc returns freed pages to the OS; pyarrow's default (mimalloc) keeps them, and every
    # chunk allocates the same sizes again (5M rows, 250k-row chunks: worker peak ~226 -> ~185 MiB,
    # no slower; docs/architecture.md). Set before start-up: choosing it later in the worker left
    # the default pool initialised and saved only half as much. A build without jemalloc warns once
    # and keeps its default.
    env["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
    env.update(extra or {})
    return env


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
        self.job_deadline = job_deadline
        self.pre_execution = tuple(pre_execution)
        self.credentials = credentials
        self._abort_check = abort_check or (lambda: None)
        self.monitor = ServerMonitor(endpoint, application_name, redactor, call_timeout=settings.control_timeout)
        self.sampler = ActivitySampler(
            self.monitor,
            self._report_wait,
            interval=settings.monitor_interval,
            after=settings.report_wait_after,
            every=settings.report_wait_every,
        )
        self._storage: tuple[str, float, float] | None = None  # op, seconds, received_at
        self._refused_login: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.ready: Ready | None = None
        self.startup_seconds: float | None = None
        self._writer: QueuedSender | None = None
        self._queue: queue.Queue[tuple[float, object]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._reads: dict[int, ChunkRead | Failed] = {}
        self._dones: dict[int, ChunkDone | Failed] = {}
        self._query_ids = itertools.count(1)
        self._read_seen: set[int] = set()
        self._requests: dict[int, ReadChunk] = {}
        self._current: tuple[int, int, float] | None = None  # query_id, chunk, started_at
        self._last_heard = 0.0
        self._query_backends: dict[int, int] = {}
        self._stopped = False
        self._released = False
        self._interrupted: str | None = None
        self._closing = False
        self._spawned_at = 0.0
        self._waiting_reported = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> WorkerSession:
        if self.proc is None:
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
        return next(self._query_ids)

    def start(self) -> None:
        """Check the server, spawn the worker, wait for Ready, send Configure."""
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
        env = worker_environment(self.settings.worker_env)
        cmd = [sys.executable, "-P", "-m", "airflow_provider_cxpg.worker"]
        self._spawned_at = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd="/",
                start_new_session=True,  # a terminal's Ctrl+C reaches the parent, which stops the worker
                close_fds=True,
            )
        except OSError as exc:
            raise WorkerStartError(f"cannot start the worker ({sys.executable}): {exc}") from exc
        self.pid = self.proc.pid
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        # Its own descriptor (a dup): the sender thread may still be blocked on it when stdin closes.
        self._writer = QueuedSender(FrameWriter(os.dup(self.proc.stdin.fileno())), f"cxpg-sender-{self.pid}")
        self._last_heard = time.monotonic()
        self._spawn_thread(self._read_channel, self.proc.stdout, "cxpg-channel")
        self._spawn_thread(self._read_stderr, self.proc.stderr, "cxpg-stderr")
        self.log.emit("worker.start", worker=self.worker_index, worker_pid=self.pid)
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
        """Wait (under ``start_timeout``) for the spawned worker's Ready, then send Configure."""
        assert self.proc is not None, "spawn() first"
        t0 = self._spawned_at
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
        self.log.emit(
            "worker.ready",
            worker=self.worker_index,
            worker_pid=self.pid,
            seconds=self.startup_seconds,
            import_seconds=round(self.ready.startup_seconds, 4),
            connectorx=self.ready.versions.get("connectorx"),
        )

    def _spawn_thread(self, target: Callable[[Any], None], stream: Any, name: str) -> None:
        thread = threading.Thread(target=target, args=(stream,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read_channel(self, stream: Any) -> None:
        reader = FrameReader(stream)
        while True:
            try:
                message = reader.receive()
            except Exception:  # noqa: BLE001  a torn frame means the worker died mid-write
                message = None
            self._queue.put((time.monotonic(), _EOF if message is None else message))
            if message is None:
                return

    def _read_stderr(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = self.redact(raw.decode("utf-8", errors="replace").rstrip())[:2000]
            if line:
                self._stderr_tail.append(line)
                self.log.emit("worker.stderr", worker=self.worker_index, worker_pid=self.pid, line=line)
                if self._refused_login is None and is_authentication_failure(Exception(line)):
                    # connectorx's pool retries a refused login for 30 s before it reports it; its
                    # log line comes at once, and so does the pump's verdict (see _check_deadlines)
                    self._refused_login = line

    def close(self) -> None:
        """Ask the worker to exit and reap it; stop it by force if it does not exit in time."""
        if self.proc is None:
            return
        if self._stopped or self._interrupted:
            self.stop(reason=self._interrupted or "closed after stop")
            return
        self._closing = True
        with contextlib.suppress(OSError, HeartbeatLostError):
            self._send(Shutdown())
        try:
            code = self.proc.wait(timeout=self.settings.kill_grace)
        except subprocess.TimeoutExpired:
            self.stop(reason="did not exit after Shutdown")
            return
        self._stopped = True
        self.log.emit("worker.exit", worker=self.worker_index, worker_pid=self.pid, exitcode=code)
        self._sweep_backends()
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
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)  # a SIGSTOPped worker acts on SIGTERM only once continued

    def stop(self, reason: str) -> None:
        """Stop abnormally: cancel server queries, terminate backends, SIGTERM, SIGKILL, reap.

        Runs on the thread that drives the session (signal handlers use :meth:`interrupt`).
        """
        if self.proc is None:
            return
        if self._stopped:
            self._release()
            return
        self._stopped = True
        monitor = self.monitor
        self.sampler.stop()
        try:
            terminated = monitor.stop_backends(self.settings.cancel_grace)
            if terminated:
                self.log.emit("server.terminate", worker=self.worker_index, backend_pids=terminated, reason=reason)
            signalled = self.proc.poll() is None or self._interrupted is not None
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                    os.kill(self.proc.pid, signal.SIGCONT)  # a SIGSTOPped worker acts on SIGTERM only once continued
                try:
                    self.proc.wait(timeout=self.settings.kill_grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    self.proc.wait(timeout=10)
            if signalled:
                self.log.emit(
                    "worker.killed",
                    worker=self.worker_index,
                    worker_pid=self.pid,
                    exitcode=self.proc.returncode,
                    reason=reason,
                )
            # Backends of a killed client can linger (e.g. inside pg_sleep or a lock wait).
            leftovers = monitor.stop_backends(self.settings.cancel_grace)
            if leftovers:
                self.log.emit("server.terminate", worker=self.worker_index, backend_pids=leftovers, reason=reason)
        finally:
            self._release()

    def _sweep_backends(self) -> None:
        leftovers = self.monitor.stop_backends(self.settings.cancel_grace)
        if leftovers:
            self.log.emit("server.terminate", worker=self.worker_index, backend_pids=leftovers, reason="sweep")

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._writer is not None:
            self._writer.close()
        for thread in self._threads:
            thread.join(timeout=2.0)
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                with contextlib.suppress(Exception):
                    if stream is not None:
                        stream.close()
        self.sampler.stop()
        self.monitor.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self._stopped

    # -- requests ----------------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        """Queue ``message`` for the worker; this never waits on the pipe (see :class:`QueuedSender`)."""
        assert self._writer is not None
        try:
            self._writer.send(message)
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
        self._requests[request.query_id] = request
        self._send(request)

    def send_password(self, password: str) -> None:
        """Hand a renewed password to the worker and to this session's monitor."""
        self.endpoint = self.endpoint.with_password(password)
        self.monitor.update_password(password)
        self.redact.add(password)
        self._send(Credentials(password=password))

    def wait_read(self, query_id: int) -> ChunkRead:
        """Wait, under every deadline, until the query's rows are in the worker; raise its error."""
        self._pump(lambda: query_id in self._reads)
        outcome = self._reads.pop(query_id)
        request = self._requests[query_id]
        backend_pid = self._query_backends.pop(query_id, None) or self._active_backend()
        if isinstance(outcome, Failed):
            self._requests.pop(query_id, None)
            raise self._query_failure(request, outcome, backend_pid)
        self.log.emit(
            "query.done",
            worker=self.worker_index,
            worker_pid=self.pid,
            backend_pid=backend_pid,
            chunk=request.chunk_index,
            query_id=query_id,
            rows=outcome.rows,
            bytes=outcome.arrow_bytes,
            seconds=outcome.read_seconds,
            key_from=_jsonable(outcome.first_key),
            key_to=_jsonable(outcome.last_key),
        )
        return outcome

    def wait_done(self, query_id: int) -> ChunkDone:
        """Wait until the chunk's file is committed; raise the writer's error."""
        self._pump(lambda: query_id in self._dones)
        outcome = self._dones.pop(query_id)
        request = self._requests.pop(query_id)
        if isinstance(outcome, Failed):
            raise self._query_failure(request, outcome, None)
        return outcome

    def run(self, request: ReadChunk) -> tuple[ChunkRead, ChunkDone]:
        """Submit ``request`` and wait for both replies."""
        self.submit(request)
        return self.wait_read(request.query_id), self.wait_done(request.query_id)

    def _query_failure(self, request: ReadChunk, failed: Failed, backend_pid: int | None) -> BaseException:
        error = failed.error
        if isinstance(error, QueryCancelledError) and error.reason == "statement_timeout":
            activity = "; ".join(b.describe() for b in self.sampler.last_active()) or "no backend activity sampled"
            error = QueryTimeoutError(
                f"chunk {request.chunk_index}: query ran past query_timeout={self.settings.query_timeout}s "
                f"and the server cancelled it (statement_timeout); server was doing: {activity}",
                limit="query_timeout",
                chunk=request.chunk_index,
                server_activity=activity,
            )
            self.log.emit(
                "query.timeout",
                worker=self.worker_index,
                worker_pid=self.pid,
                chunk=request.chunk_index,
                limit="query_timeout",
                enforced_by="server",
                server_activity=activity,
            )
        else:
            self.log.emit(
                "query.failed",
                worker=self.worker_index,
                worker_pid=self.pid,
                backend_pid=backend_pid,
                chunk=request.chunk_index,
                error=f"{type(error).__name__}: {error}",
            )
        error.__cause__ = RemoteTraceback(failed.traceback)
        return error

    # -- the pump ----------------------------------------------------------------------------------

    def _pump(self, done: Callable[[], bool], *, start_deadline: float | None = None) -> None:
        """Handle worker messages until ``done()``; raise when a deadline fires or the worker dies.

        On any exception out of here (ours, KeyboardInterrupt, AirflowTaskTimeout) the caller's
        ``with`` block or :meth:`stop` cleans up.
        """
        tick = min(0.25, self.settings.heartbeat_interval)
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
            self._check_deadlines(now, heartbeats=start_deadline is None)
            try:
                received_at, message = self._queue.get(timeout=tick)
            except queue.Empty:
                continue
            self._handle(received_at, message)
            if done():
                return

    def _drain(self, done: Callable[[], bool]) -> bool:
        """Handle queued messages one by one until ``done()``; a crash queued behind stays queued."""
        while not done():
            try:
                received_at, message = self._queue.get_nowait()
            except queue.Empty:
                return False
            self._handle(received_at, message)
        return True

    def _handle(self, received_at: float, message: object) -> None:
        if message is _EOF:
            self._on_channel_closed()
            return
        self._last_heard = max(self._last_heard, received_at)
        if isinstance(message, Heartbeat):
            busy = message.storage_op is not None and message.storage_seconds is not None
            self._storage = (message.storage_op, message.storage_seconds, received_at) if busy else None  # type: ignore[assignment]
            return
        if isinstance(message, Ready):
            self.ready = message
        elif isinstance(message, QueryStarted):
            self._current = (message.query_id, message.chunk_index, received_at)
            self.sampler.reset()
            request = self._requests.get(message.query_id)
            self.log.emit(
                "query.start",
                worker=self.worker_index,
                worker_pid=self.pid,
                chunk=message.chunk_index,
                query_id=message.query_id,
                sql=request.sql if request and self.log.first("sql") else None,  # once per run
            )
        elif isinstance(message, ChunkRead):
            self._reads[message.query_id] = message
            self._read_seen.add(message.query_id)
            self._end_query(message.query_id)
        elif isinstance(message, ChunkDone):
            self._dones[message.query_id] = message
        elif isinstance(message, Failed):
            if message.query_id is None:  # a failure outside any request: treat as fatal
                raise message.error
            if message.query_id in self._read_seen:  # the write failed
                self._dones[message.query_id] = message
            else:
                self._reads[message.query_id] = message
                self._end_query(message.query_id)

    def _active_backend(self) -> int | None:
        active = [b.pid for b in self.sampler.last_active() if b.state == "active"]
        return active[0] if active else None

    def _end_query(self, query_id: int) -> None:
        if self._current and self._current[0] == query_id:
            self._current = None

    def _on_channel_closed(self) -> None:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # channel closed but process alive: treat as broken
            code = None
        if self._closing and code == 0:
            return
        reason = self._interrupted or self._abort_check()
        if reason or self._stopped:  # we ended it ourselves: an abort, not a crash
            self.stop(reason=reason or "stopped")
            raise ExtractionAborted.because(reason or "stopped")
        chunk = self._current[1] if self._current else None
        status = _describe_exit(code)
        tail = " | ".join(list(self._stderr_tail)[-5:])
        self.log.emit(
            "worker.crash", worker=self.worker_index, worker_pid=self.pid, exitcode=code, chunk=chunk, status=status
        )
        where = f" while reading chunk {chunk}" if chunk is not None else ""
        self._stopped_by_crash()
        raise WorkerCrashedError(
            f"worker pid {self.pid} {status}{where}" + (f"; last stderr: {tail}" if tail else ""),
            pid=self.pid,
            exitcode=code,
            chunk=chunk,
        )

    def _stopped_by_crash(self) -> None:
        # The process is gone; its backends may not be (a query in a lock wait runs on).
        self._current = None
        self.stop(reason="worker crashed")

    def _check_deadlines(self, now: float, *, heartbeats: bool = True) -> None:
        s = self.settings
        if self._refused_login is not None and self._current is not None:
            chunk = self._current[1]
            self.log.emit(
                "query.failed", worker=self.worker_index, worker_pid=self.pid, chunk=chunk, error=self._refused_login
            )
            raise ServerConnectionError(
                f"chunk {chunk}: the server refused the worker's login: {self._refused_login}",
                reason="authentication",
                chunk=chunk,
            )
        if self.job_deadline is not None and now > self.job_deadline:
            activity = self._describe_activity()
            self.log.emit(
                "query.timeout",
                worker=self.worker_index,
                worker_pid=self.pid,
                limit="job_timeout",
                server_activity=activity,
            )
            raise JobTimeoutError(
                f"the job ran past job_timeout={s.job_timeout}s; server was doing: {activity}",
                limit="job_timeout",
                server_activity=activity,
            )
        storage = self._storage
        if storage is not None and s.storage_timeout is not None:
            operation, seconds, received_at = storage
            elapsed = seconds + (now - received_at)
            if elapsed > s.storage_timeout + s.deadline_grace:  # the worker's own deadline did not fire
                self.log.emit(
                    "query.timeout",
                    worker=self.worker_index,
                    worker_pid=self.pid,
                    limit="storage_timeout",
                    enforced_by="parent",
                    seconds=elapsed,
                    operation=operation,
                )
                raise StorageError(
                    f"{operation} has not returned after {elapsed:.1f}s (storage_timeout={s.storage_timeout}s): "
                    "the store is not answering",
                    operation=operation,
                    limit="storage_timeout",
                )
        silent = now - self._last_heard
        if heartbeats and silent > s.heartbeat_timeout and not self._silence_is_a_server_wait(now):
            chunk = self._current[1] if self._current else None
            self.log.emit(
                "worker.heartbeat_missed",
                worker=self.worker_index,
                worker_pid=self.pid,
                chunk=chunk,
                seconds=silent,
                limit="heartbeat_timeout",
            )
            raise HeartbeatLostError(
                f"worker pid {self.pid} sent no heartbeat for {silent:.1f}s "
                f"(heartbeat_timeout={s.heartbeat_timeout}s): frozen or stopped",
                pid=self.pid,
                limit="heartbeat_timeout",
                chunk=chunk,
            )
        if self._current is not None and s.query_timeout is not None:
            _, chunk, started = self._current
            elapsed = now - started
            if elapsed > s.query_timeout + s.deadline_grace:
                activity = self._describe_activity()
                self.log.emit(
                    "query.timeout",
                    worker=self.worker_index,
                    worker_pid=self.pid,
                    chunk=chunk,
                    seconds=elapsed,
                    limit="query_timeout",
                    enforced_by="parent",
                    server_activity=activity,
                )
                raise QueryTimeoutError(
                    f"chunk {chunk}: query ran {elapsed:.1f}s, past query_timeout={s.query_timeout}s; "
                    f"server was doing: {activity}",
                    limit="query_timeout",
                    chunk=chunk,
                    server_activity=activity,
                )

    def _silence_is_a_server_wait(self, now: float) -> bool:
        """True when a silent worker is waiting on its running query, not frozen.

        A streamed read holds the GIL while it waits for its first batch (measured), so heartbeats
        pause during a long server-side wait (a lock, a slow plan). That silence is tolerated while
        the worker process is not stopped (``/proc`` state) and the run's backend is active on
        something other than sending to the worker (``Client:ClientWrite`` would mean the worker no
        longer reads), as the sampler's latest sample shows; a sample too old to trust (the server
        does not answer) excuses nothing. ``query_timeout`` still bounds the wait.
        """
        if self._current is None or self._worker_stopped():
            return False
        fresh = self.sampler.latest(max_age=3 * self.settings.monitor_interval + self.settings.control_timeout)
        waiting = [
            b
            for b in fresh or ()
            if b.state == "active" and (b.wait_event_type, b.wait_event) != ("Client", "ClientWrite")
        ]
        if waiting and not self._waiting_reported:
            self.log.emit(
                "worker.waiting",
                worker=self.worker_index,
                worker_pid=self.pid,
                chunk=self._current[1],
                note="heartbeats paused while the worker waits on its query; query_timeout applies",
                server_activity="; ".join(b.describe() for b in waiting),
            )
        self._waiting_reported = bool(waiting)
        return self._waiting_reported

    def _worker_stopped(self) -> bool:
        """The worker is stopped or traced (SIGSTOP), per ``/proc/<pid>/stat``."""
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii", errors="replace") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state in {"T", "t"}

    def _describe_activity(self) -> str:
        """What the server showed last, from the sampler (never a query here: the server may not answer)."""
        backends = self.sampler.latest() or self.sampler.last_active()
        if not backends and self.monitor.last_error:
            return f"the server could not be asked ({self.monitor.last_error})"
        return "; ".join(b.describe() for b in backends) or "no backend of this run found"

    def _report_wait(self, backend: BackendInfo) -> None:
        """From the sampler: a backend of the run has waited on a lock for a while (who holds it, too)."""
        current = self._current
        if current is not None:
            self._query_backends.setdefault(current[0], backend.pid)
        self.log.emit(
            "server.waiting",
            worker=self.worker_index,
            worker_pid=self.pid,
            backend_pid=backend.pid,
            chunk=current[1] if current else None,
            state=backend.state,
            wait_event=f"{backend.wait_event_type}:{backend.wait_event}",
            seconds=backend.query_seconds,
            blocked_by=[b.describe() for b in backend.blockers] or None,
        )


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "closed its channel but is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit status {code})"
    return f"exited with status {code}"


def _jsonable(key: tuple[Any, ...] | None) -> list[Any] | None:
    if key is None:
        return None
    return [v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in key]
