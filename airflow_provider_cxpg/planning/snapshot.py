"""One exported snapshot for every chunk of a run: a point-in-time copy across chunks and workers.

The parent opens a ``REPEATABLE READ READ ONLY`` transaction on its own connection and exports its
snapshot (``pg_export_snapshot()``); each worker connection imports it before reading
(``SET TRANSACTION SNAPSHOT``, sent by connectorx as ``pre_execution_query``). Every chunk, in every
worker, then sees the database exactly as it was at that moment, whatever commits meanwhile.
Measured with connectorx 0.4.6: the import reaches its data connections (also for ``partition_on``),
and exporting works on a hot standby too.

The holding transaction stays open for the run: it keeps VACUUM from removing rows it can still see,
and on a standby a long one can be cancelled by a recovery conflict. A retried Airflow task cannot
reuse the snapshot of the attempt that died; its resumed chunks see a newer moment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import psycopg

from airflow_provider_cxpg.bounded import CallStopped, CallTimedOut
from airflow_provider_cxpg.control import ControlConnection
from airflow_provider_cxpg.exceptions import ExtractionAborted, ServerConnectionError
from airflow_provider_cxpg.planning.sql import quote_string

__all__ = ["ExportedSnapshot", "import_statements"]


def import_statements(snapshot_id: str) -> tuple[str, str]:
    """Statements that make a new connection's next query read from ``snapshot_id``."""
    return (
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        f"SET TRANSACTION SNAPSHOT {quote_string(snapshot_id)}",
    )


class ExportedSnapshot:
    """Hold a snapshot open for the duration of a ``with`` block; ``id`` names it.

    :param open_connection: opens the holder's connection (its session must allow an idle
        transaction for the whole run: ``idle_in_transaction_session_timeout=0``).
    :param timeout: client-side deadline of each of its statements (``BEGIN``, the export, the
        ``ROLLBACK`` and the close), in seconds: none of them waits on a lock, and a server that does
        not answer must not hold the run.
    :param stop: asked while a statement waits; a reason (an abort) ends the wait.
    """

    def __init__(
        self,
        open_connection: Callable[[], ControlConnection],
        *,
        timeout: float,
        stop: Callable[[], str | None] | None = None,
    ) -> None:
        self._open = open_connection
        self._timeout = timeout
        self._stop = stop
        self._control: ControlConnection | None = None
        self.id: str | None = None

    def __enter__(self) -> ExportedSnapshot:
        self._control = control = self._open()
        try:
            for statement in ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", "SELECT pg_export_snapshot()"):
                cursor = control.execute(statement, timeout=self._timeout, what="exporting a snapshot", stop=self._stop)
            self.id = str(cursor.fetchone()[0])
        except BaseException as exc:
            control.close(self._timeout)
            self._control = None
            if isinstance(exc, CallStopped):
                raise ExtractionAborted.because(exc.reason) from None
            if isinstance(exc, CallTimedOut):
                raise ServerConnectionError(f"cannot export a snapshot: {exc}", reason="timeout") from None
            if isinstance(exc, psycopg.Error):
                raise ServerConnectionError(f"cannot export a snapshot: {str(exc).strip()}") from None
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        control, self._control = self._control, None
        if control is None:
            return
        # Not suppress(Exception): on Airflow 2 that would swallow AirflowTaskTimeout too.
        with contextlib.suppress(psycopg.Error, CallTimedOut):
            control.execute("ROLLBACK", timeout=self._timeout, what="ending the snapshot's transaction")
        control.close(self._timeout)
