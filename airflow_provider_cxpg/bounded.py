"""Blocking calls with a deadline: storage I/O that may never return.

An object store that stops answering (a partitioned network, a frozen gateway) leaves a socket
open with nothing on it: fsspec, botocore and the kernel may wait for many minutes, and a local
write to a hung NFS mount waits forever. Neither can be interrupted from Python. So every such call
runs on a helper thread and the caller waits for it with a deadline; past it, the caller raises and
moves on (stop the worker, fail the run), and the helper is left behind as a daemon thread, dying
with the process.

Calls through one :class:`SerialCalls` run one at a time, in order, on one thread: a manifest write
that timed out can never land after a later one. Once a call has timed out, the ones after it fail at
once instead of queueing behind it. An idle thread ends after a few seconds (a new one starts with
the next call), so a process that runs many extractions (``dag.test()``, a test suite, a long-lived
worker) does not collect one parked thread per destination.

Shared by the parent (destination operations) and the worker (chunk writes); imports nothing else.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["CallRaised", "CallStopped", "CallTimedOut", "SerialCalls"]

T = TypeVar("T")

#: Seconds an idle helper thread waits for another call before it ends.
IDLE_SECONDS = 5.0
#: How often a caller waiting with ``stop`` asks it.
STOP_POLL_SECONDS = 0.1


class CallTimedOut(TimeoutError):
    """A call did not return within its deadline (or an earlier one on the same thread has not)."""

    def __init__(self, operation: str, limit: float | None, *, earlier: str | None = None) -> None:
        self.operation, self.limit, self.earlier = operation, limit, earlier
        if earlier is not None:
            text = f"{operation} was not attempted: {earlier} has not returned after its deadline"
        else:
            text = f"{operation} did not return within {limit}s"
        super().__init__(text)


class CallStopped(Exception):
    """The caller stopped waiting for a call (its ``stop`` gave a reason); the call may still run."""

    def __init__(self, operation: str, reason: str) -> None:
        self.operation, self.reason = operation, reason
        super().__init__(f"{operation} was abandoned: {reason}")


class CallRaised(Exception):
    """What the call itself raised on the helper thread (``error``), with ``wrap_errors=True``.

    Told apart from an exception raised into the caller's wait: on Airflow 2 ``AirflowTaskTimeout``
    (SIGALRM, ``execution_timeout``) is an ``Exception``, and a caller that turned every
    ``Exception`` into its own error (a ``StorageError``, or "unknown" from a monitor that must never
    fail the job) swallowed the task's timeout or blamed the store for it.
    """

    def __init__(self, error: Exception) -> None:
        self.error = error
        super().__init__(f"{type(error).__name__}: {error}")


class SerialCalls:
    """Run calls one at a time on a daemon thread, each under a deadline.

    :param name: names the thread (``cxpg-io-<name>``).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any], str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stuck: str | None = None
        self._busy: tuple[str, float] | None = None

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:  # call() puts under this lock: nothing can arrive unseen
                    if self._queue.empty():
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                continue
            if item is None:
                return
            fn, future, operation = item
            if not future.set_running_or_notify_cancel():
                continue
            self._busy = (operation, time.monotonic())
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001  handed to the caller
                future.set_exception(exc)
            finally:
                self._busy = None

    def busy(self) -> tuple[str, float] | None:
        """The call running now and for how many seconds, or None."""
        busy = self._busy
        return None if busy is None else (busy[0], time.monotonic() - busy[1])

    def call(
        self,
        operation: str,
        fn: Callable[[], T],
        timeout: float | None,
        *,
        stop: Callable[[], str | None] | None = None,
        wrap_errors: bool = False,
    ) -> T:
        """Return ``fn()``; raise :class:`CallTimedOut` when it takes longer than ``timeout`` seconds.

        ``timeout=None`` waits as long as it takes (still on the helper thread, so a later call with
        a deadline is not stuck behind an unbounded one). ``stop``, asked every
        :data:`STOP_POLL_SECONDS`, ends the wait early with :class:`CallStopped` when it returns a
        reason (an abort that cannot interrupt the caller's wait itself). ``wrap_errors``: an
        ``Exception`` that ``fn`` raises arrives as :class:`CallRaised`.
        """
        if wrap_errors:
            fn = _wrapped(fn)
        future: Future[T] = Future()
        with self._lock:
            if self._stuck is not None:
                raise CallTimedOut(operation, timeout, earlier=self._stuck)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"cxpg-io-{self._name}", daemon=True)
                self._thread.start()
            self._queue.put((fn, future, operation))  # under the lock: an idle thread cannot end past it
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if stop is not None:
                wait = STOP_POLL_SECONDS if wait is None else min(wait, STOP_POLL_SECONDS)
            try:
                return future.result(timeout=wait)
            except TimeoutError:
                if future.done():  # finished in the instant the wait gave up
                    return future.result()
                reason = stop() if stop is not None else None
                if reason is None and (deadline is None or time.monotonic() < deadline):
                    continue
                future.cancel()
                self._stuck = operation
                if reason is not None:
                    raise CallStopped(operation, reason) from None
                raise CallTimedOut(operation, timeout) from None

    def after(self, operation: str, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on the thread once every call queued before it has returned; do not wait.

        Also after a call that passed its deadline (it runs when that call finally returns): how a
        caller that gave up on a call still closes what the call opened. Its errors are dropped.
        """
        future: Future[Any] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"cxpg-io-{self._name}", daemon=True)
                self._thread.start()
            self._queue.put((fn, future, operation))

    def close(self) -> None:
        """Let the thread end after what is queued (it is a daemon: a stuck one dies with the process)."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread = None


def _wrapped(fn: Callable[[], T]) -> Callable[[], T]:
    def call() -> T:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001  handed to the caller, marked as the call's own
            raise CallRaised(exc) from None

    return call
