"""The parent's own statements on the server, each step under a client-side deadline.

The parent runs its own statements on psycopg connections: planning (the catalog, a describe, the
row estimate), a window's ``max()``, key ranges, the snapshot export, a validator's count. The
server's ``statement_timeout`` ends a slow one, but only a server that can still answer: behind a
gateway that accepts packets and returns nothing, psycopg waits on its socket forever, and a thread
waiting there is deaf to Airflow's SIGALRM and SIGTERM as long as it waits. So a
:class:`ControlConnection` runs every step (connecting, each statement, closing) on a helper thread
of its own (:class:`~airflow_provider_cxpg.bounded.SerialCalls`), and the caller waits on it for at most a deadline,
in a wait that a signal handler interrupts. Past the deadline the caller cancels the query and
closes the connection, which gives it up (:meth:`ControlConnection.give_up`): its socket is shut
down so the helper's wait returns at once, and the helper closes the connection itself once it
does; nothing ever closes a connection under a thread still using it. Host names are resolved on the helper thread too.

**Cancel requests never hold the interpreter.** psycopg's C implementation calls libpq's blocking
``PQcancel`` with the GIL held: a cancel request to a server that accepts the connection and never
answers froze the whole task process, signal handlers and ``on_kill`` included. With libpq 17 or
later (psycopg-binary 3.2.9 and later bundle it) :meth:`ControlConnection.cancel` drives libpq's
non-blocking cancel connection from Python instead, waiting in ``poll`` under a deadline. With an
older libpq the blocking request runs on a daemon thread that the caller waits for at most the
deadline; that is enough with psycopg's pure-Python implementation (ctypes releases the GIL), not
with a C implementation built against an old libpq.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from airflow_provider_cxpg.bounded import CallTimedOut, SerialCalls

__all__ = ["ControlConnection", "address_count", "connect_deadline", "send_cancel"]

#: What a failed close, cancel or socket call raises. Never ``Exception``: on Airflow 2,
#: ``AirflowTaskTimeout`` (raised by SIGALRM wherever the task's thread is) is one, and the alarm
#: fires once: swallowed here, the task would run past ``execution_timeout``.
_FAILED = (psycopg.Error, OSError, ValueError, CallTimedOut)


class ControlConnection:
    """A psycopg connection whose every step runs on its own helper thread, each under a deadline.

    Open with :meth:`open`; :meth:`execute` takes psycopg's arguments and a ``timeout`` (seconds,
    None for none); :meth:`cancel` cancels the running one from any thread; :meth:`close` closes it.
    A step past its deadline raises :class:`~airflow_provider_cxpg.bounded.CallTimedOut`, and every
    later step fails at once; :meth:`close` then gives the connection up (:meth:`give_up`).
    """

    def __init__(self, conn: Any, calls: SerialCalls, cancel_handle: Any, sock: socket.socket | None) -> None:
        self._conn = conn
        self._calls = calls
        self._cancel_handle = cancel_handle
        # A descriptor of our own for the connection's socket, taken on the helper thread right
        # after connecting: libpq closes its own descriptor when the connection breaks, and the
        # number may then be reused by any new socket; ours stays this socket's until we close it.
        self._socket = sock
        self._cancel_lock = threading.Lock()  # one cancel request at a time on the handle
        self._closed = False

    @classmethod
    def open(
        cls,
        connect: Callable[[], Any],
        *,
        timeout: float | None,
        name: str,
        stop: Callable[[], str | None] | None = None,
    ) -> ControlConnection:
        """Call ``connect()`` (returns a psycopg connection) on a new helper thread, under ``timeout``.

        :param stop: as in :meth:`execute`: a reason ends the wait.
        :raises CallTimedOut: past ``timeout``; a connection made later is closed when it arrives
            (also after :class:`~airflow_provider_cxpg.bounded.CallStopped` or an interrupt).
        """
        calls = SerialCalls(name)
        made: list[Any] = []

        def opened() -> tuple[Any, Any, socket.socket | None]:
            conn = connect()
            made.append(conn)
            sock = None
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
            made.append(sock)
            return conn, _cancel_handle(conn), sock

        try:
            conn, handle, sock = calls.call("connecting", opened, timeout, stop=stop)
        except BaseException:
            calls.after("closing a connection made too late", lambda: _close_all(made))
            calls.close()
            raise
        return cls(conn, calls, handle, sock)

    @property
    def info(self) -> Any:
        """The connection's ``info`` (no server round trip)."""
        return self._conn.info

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        timeout: float | None,
        what: str = "a statement",
        stop: Callable[[], str | None] | None = None,
    ) -> Any:
        """``connection.execute(query, params)`` on the helper thread; its cursor (rows already fetched).

        :param stop: asked while waiting; a reason ends the wait (``on_kill`` runs in a signal
            handler that cannot interrupt it, and its cancel may never reach the server).
        :raises CallTimedOut: it did not return within ``timeout`` seconds.
        :raises CallStopped: ``stop`` gave a reason first.

        After either, cancel the statement and :meth:`close` the connection (which gives it up).
        """
        return self._calls.call(what, lambda: self._conn.execute(query, params), timeout, stop=stop)

    def cancel(self, timeout: float) -> bool:
        """Ask the server to cancel the running statement; wait at most ``timeout`` seconds.

        Safe from any thread. True when the request was delivered.
        """
        with self._cancel_lock:
            return send_cancel(self._cancel_handle, timeout)

    def give_up(self) -> None:
        """Abandon the connection: shut its socket down, so a statement waiting on it returns at once.

        The helper thread closes the connection once its call returns. The server sees the socket
        close (and PostgreSQL 14+ checks for it while a query runs).
        """
        if self._closed:
            return
        self._closed = True
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        self._calls.after("closing a connection given up", lambda: _close_all([self._conn, self._socket]))
        self._calls.close()

    def close(self, timeout: float | None = None) -> None:
        """Close the connection on its helper thread, waiting at most ``timeout`` seconds.

        A statement still running (its caller gave up on it, or a signal interrupted the wait) or a
        close past ``timeout`` gives the connection up instead (:meth:`give_up`).
        """
        if self._closed:
            return
        if self._calls.busy() is not None:
            self.give_up()
            return
        try:
            self._calls.call("closing the connection", lambda: _close_all([self._conn, self._socket]), timeout)
        except CallTimedOut:
            self.give_up()
        except _FAILED:  # closing a broken connection: nothing left to do
            pass
        finally:
            if not self._closed:
                self._closed = True
                self._calls.close()


def address_count(host: str, port: int, timeout: float) -> int:
    """How many addresses libpq will try for ``host`` (each under its ``connect_timeout``).

    A socket directory or an IP address is one. A name is resolved as libpq resolves it (any
    family, stream sockets), on a helper thread under ``timeout``; a name that does not resolve in
    time, or at all, counts as one (the connect then fails on its own, naming it).
    """
    if "," in host:  # libpq's list of hosts: it tries each one's addresses in turn
        return sum(address_count(one.strip(), port, timeout) for one in host.split(","))
    if not host or host.startswith("/") or host.startswith("@"):
        return 1
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return 1
    except OSError:
        pass
    calls = SerialCalls("resolve")
    try:
        found = calls.call(
            f"resolving {host}", lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
        )
    except (CallTimedOut, OSError, UnicodeError):
        return 1
    finally:
        calls.close()
    return max(1, len({info[4] for info in found}))


def connect_deadline(addresses: int, connect_timeout: float, grace: float, *, names: int = 1) -> float:
    """The client-side deadline of connecting: resolving each name, then each address in turn.

    libpq applies ``connect_timeout`` to each address it tries; a name with an IPv6 and an IPv4
    address whose first is black-holed needs two of them, one with three addresses three. A host
    list (``names``) is resolved one name at a time, as libpq reaches it.
    """
    return (max(1, addresses) + max(1, names)) * connect_timeout + grace


def _close_all(things: list[Any]) -> None:
    """Close each of ``things`` (connections, sockets; None skipped), whatever the others do."""
    for thing in things:
        if thing is not None:
            with contextlib.suppress(*_FAILED):
                thing.close()


def _cancel_handle(conn: Any) -> Any:
    """What :func:`send_cancel` needs to cancel ``conn``'s query later, made on the thread that owns it.

    libpq 17's non-blocking cancel connection when psycopg has it, else the legacy ``PGcancel``.
    """
    from psycopg import capabilities

    if capabilities.has_cancel_safe():
        return conn.pgconn.cancel_conn()
    return conn.pgconn.get_cancel()


def send_cancel(handle: Any, timeout: float) -> bool:
    """Send a cancel request through ``handle`` (see :func:`_cancel_handle`), waiting at most ``timeout``.

    Never blocks the interpreter: the non-blocking handle is polled here, in ``poll``; the legacy
    one runs on a daemon thread. True when the server took the request.
    """
    if handle is None:
        return False
    if not hasattr(handle, "poll"):  # a legacy PGcancel (libpq < 17)
        done = threading.Event()

        def send() -> None:
            with contextlib.suppress(*_FAILED):
                handle.cancel()
                done.set()

        threading.Thread(target=send, name="cxpg-cancel", daemon=True).start()
        return done.wait(timeout)
    from psycopg import pq

    deadline = time.monotonic() + timeout
    try:
        handle.reset()  # reusable: a connection may be cancelled more than once
        handle.start()
        while True:
            status = handle.poll()
            if status == pq.PollingStatus.OK:
                return True
            if status not in (pq.PollingStatus.READING, pq.PollingStatus.WRITING):
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller = select.poll()  # not select(): a task process may hold descriptors past FD_SETSIZE
            poller.register(handle.socket, select.POLLIN if status == pq.PollingStatus.READING else select.POLLOUT)
            poller.poll(remaining * 1000)
    except _FAILED:  # a cancel that cannot be sent is reported as not delivered
        return False
    finally:
        with contextlib.suppress(*_FAILED):
            handle.reset()  # close its socket now, whatever happened
