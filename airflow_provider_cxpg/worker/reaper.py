"""The worker's reaper: a forked process that ends the run's backends when the task process dies.

A task process killed by SIGKILL (the OOM killer, the supervisor's last step) cannot stop anything.
Its worker notices from its heartbeat thread, but not always: a streamed read (``stream_rows``)
holds the GIL while connectorx waits for the first batch, so during a lock wait no Python thread of
the worker runs. And the server cannot notice either, because the worker, its client, is alive.

So right after :class:`Configure` arrives, before any other thread starts and before any
connectorx read (forking after one is the hazard this provider exists for), the worker forks this
reaper. It holds no pipe of the parent's, does nothing but watch, and when the task process is
gone it terminates every backend of the run (the worker's and the parent's ``<run>-*`` ones, from
the planning queries to the snapshot holder), kills the worker and exits. It exits quietly when the
worker ends first (the living task process cleans up then).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import sys
import threading
import time

from airflow_provider_cxpg.worker.protocol import Configure

__all__ = ["Reaper", "process_identity", "start_reaper", "terminate_run_backends"]

_POLL_SECONDS = 0.5


def terminate_run_backends(config: Configure, timeout: float = 10.0) -> None:
    """Terminate the run's backends (bounded by ``timeout``); errors are reported, never raised."""
    name = config.run_application_name
    if not name:
        return
    done = threading.Event()

    def terminate() -> None:
        try:
            # conninfo.connect, not psycopg.connect(connect_timeout=5, **kwargs): a connection whose
            # extra sets connect_timeout would make that a TypeError, and no backend would be ended.
            from airflow_provider_cxpg.conninfo import connect

            endpoint = config.endpoint.with_session(application_name=f"{name}-reaper")
            with connect(endpoint, connect_timeout=5, statement_timeout_ms=int(timeout * 1000)) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE (application_name = %s OR starts_with(application_name, %s)) "
                    "AND pid <> pg_backend_pid()",
                    (name, f"{name}-"),
                )
        except Exception as exc:  # noqa: BLE001  the server's own timeouts remain
            with contextlib.suppress(Exception):
                sys.stderr.write(f"cxpg worker: could not end the run's backends: {type(exc).__name__}\n")
        finally:
            done.set()

    threading.Thread(target=terminate, name="cxpg-reaper", daemon=True).start()
    done.wait(timeout)


_PROCFS = os.path.exists("/proc/self/stat")


def process_identity(pid: int) -> str | None:
    """Who runs as ``pid``: its start time (``/proc/<pid>/stat`` field 22), None when it is gone.

    The start time tells a reused pid apart. Without a procfs (not Linux) it is only whether the
    pid exists: "cannot read /proc" must never read as "the task process is gone".
    """
    if not _PROCFS:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "alive"
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:  # unreadable but there (a hardened procfs): alive, as far as we can tell
        return "alive"
    return None if fields[0] in {"Z", "X"} else fields[19]


class Reaper:
    """The worker's handle on its reaper: :meth:`renewed` passes on a renewed password.

    An IAM token expires: a reaper holding only the first one could not log in to end the backends
    by the time the task process dies. The worker writes each renewed password into a pipe the
    reaper reads (non-blocking on the worker's side: the reaper must never hold it up).
    """

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd: int | None = fd

    def renewed(self, password: str) -> None:
        if self._fd is None:
            return
        data = password.encode("utf-8")
        frame = memoryview(_LENGTH.pack(len(data)) + data)
        deadline = time.monotonic() + 1.0
        try:
            while frame:  # a token beyond PIPE_BUF may go in parts; the reaper reads every 0.5 s
                try:
                    frame = frame[os.write(self._fd, frame) :]
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise
                    select.select([], [self._fd], [], 0.1)
        except OSError:  # a gone reaper (EPIPE), or one not reading: close, never half a frame
            os.close(self._fd)
            self._fd = None

    def alive(self) -> bool:
        """Whether the reaper still runs (one killed meanwhile is reaped here, and is not)."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def stop(self) -> None:
        """End the reaper on a clean shutdown: the run's reads are over, nothing is left to guard.

        Left alone it would notice the worker's exit only at its next poll; a task that has just
        finished should leave no process behind, not even for half a second.
        """
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


_LENGTH = struct.Struct("!I")


def start_reaper(config: Configure, task_pid: int, channel_fds: tuple[int, ...]) -> Reaper | None:
    """Fork the reaper (see the module docstring); return its handle, or None when it does not run."""
    if not config.run_application_name:
        return None
    task_started = config.task_started if config.task_pid == task_pid else process_identity(task_pid)
    try:
        read_fd, write_fd = os.pipe()
    except OSError:
        return None
    # Taken before the fork: a worker killed right after it (a run that fails in planning stops
    # its worker at once) leaves the reaper's os.getppid() naming init, which must not pass for it.
    worker = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return None
    if pid:
        os.close(read_fd)
        os.set_blocking(write_fd, False)
        return Reaper(pid, write_fd)
    try:  # the reaper from here on: never return into the worker's code
        os.close(write_fd)
        _watch(config, task_pid, task_started, (*channel_fds,), read_fd, worker)
    finally:
        os._exit(0)


class _Passwords:
    """Reads the renewed passwords the worker sends; keeps the last."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        self.buffer = b""
        self.latest: str | None = None

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, taking in whatever the worker sends meanwhile."""
        if self.fd is None:
            time.sleep(seconds)
            return
        readable, _, _ = select.select([self.fd], [], [], seconds)
        if not readable:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        if not data:  # the worker closed its end: nothing more will come (a partial frame is dropped)
            os.close(self.fd)
            self.fd = None
            self.buffer = b""
            return
        self.buffer += data
        while len(self.buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < _LENGTH.size + size:
                break
            self.latest = self.buffer[_LENGTH.size : _LENGTH.size + size].decode("utf-8", errors="replace")
            self.buffer = self.buffer[_LENGTH.size + size :]


def _watch(
    config: Configure,
    task_pid: int,
    task_started: str | None,
    channel_fds: tuple[int, ...],
    passwords_fd: int,
    worker: int,
) -> None:
    for fd in channel_fds:  # the parent's pipes: EOF must follow the worker, not the reaper
        with contextlib.suppress(OSError):
            os.close(fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    passwords = _Passwords(passwords_fd)
    # A task process already gone when the reaper started (task_started None) is acted on at once.
    while task_started is not None and process_identity(task_pid) in (task_started, "alive"):
        if os.getppid() != worker:  # the worker ended while its parent lives: nothing to do
            return
        passwords.wait(_POLL_SECONDS)
    # The task process is gone (or its pid reused).
    if passwords.latest is not None:
        config = Configure(**{**config.__dict__, "endpoint": config.endpoint.with_password(passwords.latest)})
    terminate_run_backends(config)
    if os.getppid() == worker:  # still our worker: a pid that ended meanwhile may be someone else's now
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
