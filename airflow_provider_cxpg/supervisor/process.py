"""The worker's operating-system process: spawn it, carry its frames, signal it, reap it.

Nothing here knows about queries or deadlines (:mod:`.requests` and :mod:`.watchdog` do). What is
here: the allowlisted environment, the ``Popen`` call, a thread that turns the worker's stdout into
``(received_at, message)`` pairs on a queue, a thread that redacts and logs its stderr, a sender that
never blocks the caller on a full pipe, and the signals that end the process.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
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

from airflow_provider_cxpg.conninfo import Redactor
from airflow_provider_cxpg.exceptions import WorkerStartError
from airflow_provider_cxpg.querylog import QueryLog
from airflow_provider_cxpg.supervisor.credentials import is_authentication_failure
from airflow_provider_cxpg.worker.protocol import FrameReader, FrameWriter, QueuedSender

__all__ = ["CHANNEL_CLOSED", "ENV_ALLOWLIST", "WorkerProcess", "describe_exit", "worker_environment"]

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

#: Put on the message queue when the worker's stdout ends (or a frame is torn).
CHANNEL_CLOSED = object()


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


def describe_exit(code: int | None) -> str:
    """How a worker ended, for a message: its status, or the signal that killed it."""
    if code is None:
        return "closed its channel but is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit status {code})"
    return f"exited with status {code}"


class WorkerProcess:
    """One spawned worker interpreter (``python -P -m airflow_provider_cxpg.worker``).

    :param log: where ``worker.start`` and ``worker.stderr`` go.
    :param redactor: scrubs secrets from every stderr line before it is kept or logged.
    :param worker_index: labels events when several workers run at once.
    :param env_extra: more environment for the worker (``WorkerSettings.worker_env``).
    """

    def __init__(
        self, log: QueryLog, redactor: Redactor, *, worker_index: int = 0, env_extra: Mapping[str, str] | None = None
    ) -> None:
        self.log = log
        self.redact = redactor
        self.worker_index = worker_index
        self.env_extra = dict(env_extra or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.spawned_at = 0.0
        #: ``(received_at, message)`` from the worker's stdout, then :data:`CHANNEL_CLOSED`.
        self.messages: queue.Queue[tuple[float, object]] = queue.Queue()
        #: The first stderr line that reads as a refused login (see :meth:`_read_stderr`).
        self.refused_login: str | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._sender: QueuedSender | None = None
        self._threads: list[threading.Thread] = []
        self._released = False

    def spawn(self) -> None:
        """Start the process and its reader threads; return without waiting for it to import."""
        cmd = [sys.executable, "-P", "-m", "airflow_provider_cxpg.worker"]
        env = worker_environment(self.env_extra)
        self.spawned_at = time.monotonic()
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
        self._sender = QueuedSender(FrameWriter(os.dup(self.proc.stdin.fileno())), f"cxpg-sender-{self.pid}")
        self._start_thread(self._read_channel, self.proc.stdout, "cxpg-channel")
        self._start_thread(self._read_stderr, self.proc.stderr, "cxpg-stderr")
        self.log.emit("worker.start", worker=self.worker_index, worker_pid=self.pid)

    def send(self, message: object) -> None:
        """Queue ``message`` for the worker; never waits on the pipe (see :class:`QueuedSender`).

        :raises OSError: the worker's end of the pipe is gone.
        """
        assert self._sender is not None, "spawn() first"
        self._sender.send(message)

    # -- the process's state -----------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Reap the process within ``timeout`` seconds; :class:`subprocess.TimeoutExpired` if it runs on."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def is_stopped(self) -> bool:
        """The worker is stopped or traced (SIGSTOP), per ``/proc/<pid>/stat``."""
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii", errors="replace") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state in {"T", "t"}

    def stderr_tail(self, lines: int = 5) -> str:
        """The worker's last stderr lines (redacted), joined for a message."""
        return " | ".join(list(self._stderr_tail)[-lines:])

    # -- ending it ---------------------------------------------------------------------------------

    def signal_term(self) -> None:
        """SIGTERM, then SIGCONT (a SIGSTOPped worker acts on SIGTERM only once continued).

        Lock-free, so a signal handler may call it (see ``WorkerSession.interrupt``).
        """
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)

    def terminate(self, grace: float) -> None:
        """SIGTERM (and SIGCONT), SIGKILL after ``grace`` seconds, and reap."""
        if not self.running:
            return
        assert self.proc is not None
        self.signal_term()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)

    def release(self) -> None:
        """Close the sender and the pipes and join the reader threads (each join is bounded)."""
        if self._released:
            return
        self._released = True
        if self._sender is not None:
            self._sender.close()
        for thread in self._threads:
            thread.join(timeout=2.0)
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                with contextlib.suppress(Exception):
                    if stream is not None:
                        stream.close()

    # -- reader threads ----------------------------------------------------------------------------

    def _start_thread(self, target: Callable[[Any], None], stream: Any, name: str) -> None:
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
            self.messages.put((time.monotonic(), CHANNEL_CLOSED if message is None else message))
            if message is None:
                return

    def _read_stderr(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = self.redact(raw.decode("utf-8", errors="replace").rstrip())[:2000]
            if line:
                self._stderr_tail.append(line)
                self.log.emit("worker.stderr", worker=self.worker_index, worker_pid=self.pid, line=line)
                if self.refused_login is None and is_authentication_failure(Exception(line)):
                    # connectorx's pool retries a refused login for 30 s before it reports it; its
                    # log line comes at once, and so does the watchdog's verdict
                    self.refused_login = line
