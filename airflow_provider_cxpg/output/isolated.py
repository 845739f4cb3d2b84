"""An object that lives in a process of its own, each call on it under a deadline we can enforce.

A helper thread (:mod:`airflow_provider_cxpg.bounded`) bounds how long the caller waits, but what the
call holds stays in the task process: an Iceberg SQL catalog frozen mid-statement left its
SQLAlchemy session registered, and Airflow's exit handler (``dispose_orm`` ->
``close_all_sessions``) then waited forever on that session's rollback, so the task process never
exited (measured, pyiceberg 0.12 + SQLAlchemy 2.1). A thread pool worker of the catalog's file IO
stuck on a frozen store would hold the interpreter's exit the same way, and an abandoned commit could
still land while the retry runs. A process can be killed: past its deadline, on ``abort`` and at
``close``, the object's process is SIGKILLed with everything it holds, and nothing of it reaches the
task process's exit.

The parent talks to ``python -P -m airflow_provider_cxpg.output.isolated`` over its stdin/stdout with
the worker's pickled frames. First frame: the object's factory (``module:attribute``) and keyword
arguments (credentials travel here, never in argv or the environment). Then one ``(method, args,
kwargs)`` frame per call. The child answers each call with ``("step", operation, seconds)`` frames
as it starts each operation of the method (each one gets its own deadline, as the thread did), then
``("ok", value)`` or ``("error", ...)``. The child exits at the end of its stdin, and on its own when
its parent is gone (a SIGKILLed task leaves no catalog commit running behind its retry).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from airflow_provider_cxpg.conninfo import Redactor
from airflow_provider_cxpg.exceptions import CxpgError, ExtractionAborted, StorageError
from airflow_provider_cxpg.worker.protocol import FrameReader, FrameWriter, QueuedSender

__all__ = ["START_SECONDS", "IsolatedObject", "Steps", "child_environment"]

#: Seconds the child may take to start, import its libraries and build the object (beyond the
#: first call's own deadline): an interpreter start on a loaded host, pyiceberg's and pyarrow's imports.
START_SECONDS = 60.0
#: How often a waiting caller asks ``stop``, and the child checks that its parent is alive.
POLL_SECONDS = 0.1
PARENT_POLL_SECONDS = 0.5
#: Environment variables the child does not get: Airflow's connections, variables and configuration
#: (secrets backends' credentials among them). The rest is the catalog's own configuration
#: (``PYICEBERG_*``, cloud credentials, proxies), as it was in the task process.
_WITHHELD_PREFIXES = ("AIRFLOW_CONN_", "AIRFLOW_VAR_", "AIRFLOW__")
_CLOSED = object()
_log = logging.getLogger(__name__)


def child_environment() -> dict[str, str]:
    """The parent's environment minus Airflow's secrets; on the import path only this package's root.

    The child's own default path comes first (``-P``: never its working directory); the parent's
    other entries (a DAG folder, a plugin's) are appended in the child (:func:`parent_path`), so
    none of them can shadow the standard library or a dependency there, as entries Airflow
    inserted at the front of the parent's path (a zipped DAG) would.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_WITHHELD_PREFIXES)}
    spec = importlib.util.find_spec("airflow_provider_cxpg")
    assert spec is not None and spec.origin is not None
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(spec.origin))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parent_path() -> list[str]:
    """The parent's import path as strings (a DAG file may append a ``pathlib.Path``; '' is skipped)."""
    return [os.fspath(p) for p in sys.path if isinstance(p, (str, os.PathLike)) and os.fspath(p)]


class IsolatedObject:
    """Calls on one object built in a child process, one at a time, each step under a deadline.

    :param factory: ``"module:attribute"`` returning the object, called with ``kwargs`` in the child.
    :param kwargs: the factory's keyword arguments (pickled over the child's stdin).
    :param target: names the object in messages (``lake.items``).
    :param secrets: returns the strings to scrub from the child's errors and stderr.
    :param unanswered: what a timed-out call means, for its message.
    :param name: the process's purpose in messages (``the Iceberg catalog process``).
    """

    def __init__(
        self,
        factory: str,
        kwargs: dict[str, Any],
        *,
        target: str,
        secrets: Callable[[], Iterable[str]],
        unanswered: str,
        name: str,
    ) -> None:
        self._factory = factory
        self._kwargs = kwargs
        self.target = target
        self._secrets = secrets
        self._unanswered = unanswered
        self._name = name
        self._proc: subprocess.Popen[bytes] | None = None
        self._sender: QueuedSender | None = None
        self._replies: queue.Queue[object] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=10)
        self._lock = threading.Lock()  # one call at a time
        self._aborted: str | None = None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    # -- the process -------------------------------------------------------------------------------

    def _start(self) -> None:
        self._replies = queue.Queue()
        self._stderr.clear()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", __name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=child_environment(),
                start_new_session=True,  # a terminal's Ctrl+C reaches the parent, which ends it
                close_fds=True,
            )
        except Exception as exc:  # noqa: BLE001  OSError, or an environment that cannot be passed
            raise StorageError(f"cannot start {self._name} ({sys.executable}): {exc}") from None
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self._proc = proc
        # Every frame goes through a sender thread: a child that stops reading (frozen, or still
        # importing) fills its pipe, and a blocking write would hold the caller outside every
        # deadline and deaf to abort. Its own descriptor: the thread closes it.
        self._sender = QueuedSender(FrameWriter(os.dup(proc.stdin.fileno())), "cxpg-isolated-sender")
        replies = self._replies
        threading.Thread(target=_read_replies, args=(proc.stdout, replies), name="cxpg-isolated", daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(proc.stderr,), name="cxpg-isolated-err", daemon=True).start()
        self._sender.send((self._factory, self._kwargs, os.getpid(), parent_path()))

    def _read_stderr(self, stream: Any) -> None:
        with contextlib.suppress(Exception):
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                if line:
                    line = self._scrub(line)
                    self._stderr.append(line)
                    _log.info("%s: %s", self._name, line)  # pyiceberg's warnings, a failure's traceback

    def _kill(self) -> None:
        """SIGKILL the child's process group and forget it; reaping happens off the caller's path."""
        proc, sender = self._proc, self._sender
        self._proc = self._sender = None
        if proc is None:
            return
        if proc.poll() is None:  # not reaped yet: its pid cannot belong to another process
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        # A process in uninterruptible sleep (a hung NFS mount) dies only when its I/O returns; a
        # write blocked on its pipe then ends with EPIPE and the sender thread closes its descriptor.
        threading.Thread(target=_reap, args=(proc, sender), name="cxpg-isolated-reap", daemon=True).start()

    def close(self) -> None:
        """End the child: the end of its stdin, a moment to exit, then SIGKILL. Bounded."""
        proc, sender = self._proc, self._sender
        if proc is None:
            return
        if sender is not None:
            sender.close(timeout=1.0)
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=2.0)
            self._proc = self._sender = None
        except subprocess.TimeoutExpired:
            self._kill()

    def abort(self, reason: str) -> None:
        """Stop a call in progress (and every later one): the child is killed, the caller raises."""
        self._aborted = reason

    # -- calls -------------------------------------------------------------------------------------

    def call(self, operation: str, method: str, *args: Any, timeout: float | None, **kwargs: Any) -> Any:
        """``object.method(*args, **kwargs)`` in the child.

        :param operation: what the call does until the child names its first step.
        :param timeout: that first step's deadline (each step the child names brings its own; the
            first call also allows :data:`START_SECONDS` for the child's start).
        :raises StorageError: past a step's deadline (the child is killed), or the call failed (its
            message scrubbed); a :class:`CxpgError` the call raised, with its message scrubbed.
        :raises ExtractionAborted: :meth:`abort` was called while waiting (the child is killed).
        """
        with self._lock:
            if self._aborted is not None:
                raise ExtractionAborted.because(self._aborted)
            answered = False
            try:
                starting = self._proc is None or self._proc.poll() is not None
                if starting:
                    self._kill()
                    self._start()
                assert self._sender is not None
                try:
                    self._sender.send((method, args, kwargs))
                except OSError:
                    self._kill()
                    raise StorageError(f"{operation} {self.target} failed: {self._name} is gone") from None
                operation, reply = self._wait(operation, timeout, START_SECONDS if starting else 0.0)
                answered = True
            finally:
                if not answered:  # a deadline, an abort, or an exception raised into this wait
                    self._kill()  # (SIGALRM, Ctrl+C): the call must not go on, nor its reply linger
        kind, value, description = reply
        if kind == "ok":
            return value
        if isinstance(value, CxpgError):
            details = {k: self._scrub(v) if isinstance(v, str) else v for k, v in value.details.items()}
            raise type(value)(self._scrub(value.message), **details)
        raise StorageError(f"{operation} {self.target} failed: {self._scrub(description)}", operation=operation)

    def _wait(self, operation: str, timeout: float | None, extra: float) -> tuple[str, tuple[Any, Any, str]]:
        """The child's answer to the call in progress, and the step it was on."""
        limit = timeout
        deadline = None if timeout is None else time.monotonic() + timeout + extra
        while True:
            if self._aborted is not None:
                raise ExtractionAborted.because(self._aborted)
            wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))
            try:
                reply = self._replies.get(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    started = f" (and {extra:.0f}s for {self._name} to start)" if extra else ""
                    raise StorageError(
                        f"{operation} {self.target} did not return within {limit}s{started}: {self._unanswered}",
                        operation=operation,
                        limit="storage_timeout",
                    ) from None
                continue
            if reply is _CLOSED:
                code = self._proc.poll() if self._proc is not None else None
                tail = " | ".join(self._stderr)
                raise StorageError(
                    f"{operation} {self.target} failed: {self._name} ended (exit status {code})"
                    + (f": {tail}" if tail else ""),
                    operation=operation,
                )
            kind = reply[0]  # type: ignore[index]
            if kind == "step":
                _, operation, limit = reply  # type: ignore[misc]
                extra = 0.0
                deadline = None if limit is None else time.monotonic() + limit
            elif kind == "ok":
                return operation, ("ok", reply[1], "")  # type: ignore[index]
            else:
                return operation, ("error", reply[1], reply[2])  # type: ignore[index]

    def _scrub(self, text: str) -> str:
        return Redactor([s for s in self._secrets() if s])(text)  # raw and URL-encoded forms


def _read_replies(stream: Any, replies: queue.Queue[object]) -> None:
    reader = FrameReader(stream)
    while True:
        try:
            message = reader.receive()
        except Exception:  # noqa: BLE001  a torn frame: the child died mid-write
            message = None
        replies.put(_CLOSED if message is None else message)
        if message is None:
            return


def _reap(proc: subprocess.Popen[bytes], sender: QueuedSender | None) -> None:
    if sender is not None:
        sender.close(timeout=0)
    with contextlib.suppress(Exception):
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.close()


# -- the child -----------------------------------------------------------------------------------


class Steps:
    """What the child's object calls as it starts each operation: the parent's deadline moves on."""

    def __init__(self, writer: FrameWriter) -> None:
        self._writer = writer

    def __call__(self, operation: str, timeout: float | None) -> None:
        self._writer.send(("step", operation, timeout))


def _watch_parent(parent: int) -> None:
    # A task process killed with SIGKILL cannot end us: nothing of its run may go on without it.
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != parent:
            os._exit(3)


def serve() -> None:
    """The child's loop: build the object, run each call, answer; exit at the end of stdin."""
    # The channel on private descriptors (not inherited by a process the catalog starts, such as a
    # credential_process helper); fd 0 reads nothing, and whatever a library prints, from Python or
    # from C, goes to stderr: nothing can read or tear a frame.
    reader = FrameReader(open(os.dup(0), "rb", buffering=0))  # noqa: SIM115  the channel lives as long as the process
    writer = FrameWriter(os.dup(1))
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)
    os.close(nothing)
    os.dup2(2, 1)
    opened = reader.receive()
    if opened is None:
        return
    factory, kwargs, parent, path = opened  # type: ignore[misc]
    sys.path.extend(p for p in path if p not in sys.path)  # after the child's own: nothing shadows them
    threading.Thread(target=_watch_parent, args=(parent,), name="cxpg-parent-watch", daemon=True).start()
    module, _, attribute = factory.partition(":")
    obj: Any = None
    try:
        obj = getattr(importlib.import_module(module), attribute)(steps=Steps(writer), **kwargs)
        failed: tuple[Any, ...] | None = None
    except BaseException as exc:  # noqa: BLE001  every call answers with it
        failed = _error_reply(exc)
    while (message := reader.receive()) is not None:
        method, args, kw = message  # type: ignore[misc]
        reply = failed
        if reply is None:
            try:
                reply = ("ok", getattr(obj, method)(*args, **kw))
            except BaseException as exc:  # noqa: BLE001  reported to the parent, which scrubs it
                reply = _error_reply(exc)
        try:
            writer.send(reply)
        except Exception as exc:  # noqa: BLE001  an unpicklable result or error
            writer.send(("error", None, f"the result cannot be returned: {type(exc).__name__}: {exc}"))


def _error_reply(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, CxpgError):
        if exc.__cause__ is not None:  # the cause's traceback reaches the task log through stderr
            traceback.print_exception(exc.__cause__)
        exc.__cause__ = exc.__context__ = None  # its message was written for the user; the rest stays here
        exc.__traceback__ = None
        return ("error", exc, str(exc))
    traceback.print_exception(exc)  # to stderr, which the parent scrubs before keeping it
    return ("error", None, f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    serve()
