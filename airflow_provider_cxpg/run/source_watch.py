"""After every chunk a run reads: is its source still what the run planned?

See :mod:`~airflow_provider_cxpg.planning.source_state` for why. The check is one small catalog
query per chunk, on the worker session's monitor connection: no connection of its own (a role's
connection limit, an idle-session timeout between two chunks), autocommit and outside the run's
snapshot (it must see the latest catalog), under the monitor's deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from airflow_provider_cxpg.bounded import CallStopped
from airflow_provider_cxpg.exceptions import (
    DataIntegrityError,
    ExtractionAborted,
    QueryCancelledError,
    QueryError,
    ReadPanicError,
    ServerConnectionError,
    SourceChangedError,
)
from airflow_provider_cxpg.planning.source_state import SourceState, read_source_state, source_changes
from airflow_provider_cxpg.supervisor.monitor import connection_ended

__all__ = ["SourceWatch", "explained_by_changes"]


class SourceWatch:
    """Compares the source with its planned state; raises before a chunk read after a change is kept.

    :param planned: the state recorded when the run planned.
    :param storage: compare the storage too (the run reads inside one exported snapshot).
    :param query: runs ``fn(connection)`` on the monitor's connection (``ServerMonitor.read``).
    :param stop: the run's abort reason, asked while the check waits (``on_kill``).
    """

    def __init__(
        self,
        planned: SourceState,
        *,
        storage: bool,
        query: Callable[..., Any],
        stop: Callable[[], str | None] | None = None,
    ) -> None:
        self.planned, self.storage, self._query, self._stop = planned, storage, query, stop

    def check(self, chunk: int) -> None:
        """:raises SourceChangedError: naming what changed; chunk ``chunk`` (read after it) is not kept."""
        changes = self.changes()
        if changes:
            raise self.changed(changes, chunk)

    def changed(self, changes: list[str], chunk: int | None) -> SourceChangedError:
        which = f"Chunk {chunk}" if chunk is not None else "The chunk"
        return SourceChangedError(
            f"{self.planned.name} changed while the run read it: {'; '.join(changes)}. {which}, read "
            "after the change, is not kept; a retry plans the source again (and starts over when the "
            "columns it reads changed)",
            changes=changes,
        )

    def changes(self) -> list[str]:
        """What changed since the plan (empty: nothing)."""
        columns = [c[0] for c in self.planned.columns]
        try:
            now = self._query(
                "checking the source against the plan",
                lambda conn: read_source_state(conn, self.planned.name, columns),
                stop=self._stop,
            )
        except CallStopped as stopped:
            raise ExtractionAborted.because(stopped.reason) from None
        except psycopg.Error as exc:
            what = f"checking {self.planned.name} against the plan failed: {exc}".strip()
            if isinstance(exc, psycopg.OperationalError) and connection_ended(exc):
                raise ServerConnectionError(what, reason="connection") from None
            raise QueryError(what, sqlstate=exc.sqlstate) from None
        return source_changes(self.planned, now, storage=self.storage)


@contextlib.contextmanager
def explained_by_changes(watch: SourceWatch | None) -> Iterator[None]:
    """A read that fails because the source changed under it says so.

    A column whose type changed between the plan and a chunk's read is decoded by connectorx as the
    new type into the planned one: the read fails (invalid UTF-8, a value it cannot convert, a panic)
    before the check after it could name the change. The check runs then, and a change found is the
    error (:class:`SourceChangedError`, from the read's); otherwise the read's error stands.
    """
    try:
        yield
    except (DataIntegrityError, QueryError, ReadPanicError) as exc:
        if watch is None or isinstance(exc, (SourceChangedError, ServerConnectionError, QueryCancelledError)):
            raise
        try:
            changes = watch.changes()
        except Exception:  # noqa: BLE001 - the check failing too changes nothing: the read's error stands
            changes = []
        if changes:
            raise watch.changed(changes, getattr(exc, "chunk", None)) from exc
        raise
