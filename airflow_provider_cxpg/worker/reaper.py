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
import signal
import sys
import threading
import time

from airflow_provider_cxpg.worker.protocol import Configure

__all__ = ["start_reaper", "terminate_run_backends"]

_POLL_SECONDS = 0.5


def terminate_run_backends(config: Configure, timeout: float = 10.0) -> None:
    """Terminate the run's backends (bounded by ``timeout``); errors are reported, never raised."""
    name = config.run_application_name
    if not name:
        return
    done = threading.Event()

    def terminate() -> None:
        try:
            import psycopg

            kwargs = config.endpoint.with_session(application_name=f"{name}-reaper").libpq_kwargs()
            with psycopg.connect(autocommit=True, connect_timeout=5, **kwargs) as conn:
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


def _started(pid: int) -> str | None:
    """The process's start time (``/proc/<pid>/stat`` field 22), or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in {"Z", "X"} else fields[19]


def start_reaper(config: Configure, task_pid: int, channel_fds: tuple[int, ...]) -> bool:
    """Fork the reaper (see the module docstring); return whether it runs."""
    if not config.run_application_name:
        return False
    task_started = _started(task_pid)
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid:
        return True
    try:  # the reaper from here on: never return into the worker's code
        _watch(config, task_pid, task_started, channel_fds)
    finally:
        os._exit(0)


def _watch(config: Configure, task_pid: int, task_started: str | None, channel_fds: tuple[int, ...]) -> None:
    worker = os.getppid()
    for fd in channel_fds:  # the parent's pipes: EOF must follow the worker, not the reaper
        with contextlib.suppress(OSError):
            os.close(fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        time.sleep(_POLL_SECONDS)
        if _started(task_pid) != task_started:  # the task process is gone (or its pid reused)
            terminate_run_backends(config)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
            return
        if os.getppid() != worker:  # the worker ended while its parent lives: nothing to do
            return
