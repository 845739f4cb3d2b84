"""The request book of one worker: which queries were sent, which is running, what came back.

The worker serves its requests one after another and answers each with ``QueryStarted``, then
``ChunkRead`` (rows in memory) and ``ChunkDone`` (file committed), or ``Failed`` in place of
either. The book files those replies by query id; the session's pump waits until the reply it needs
is filed. A ``Failed`` becomes the provider's error here, with the server's activity in the message
of a server-side timeout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airflow_provider_cxpg.exceptions import QueryCancelledError, QueryTimeoutError, RemoteTraceback
from airflow_provider_cxpg.worker.protocol import ChunkDone, ChunkRead, Failed, QueryStarted, ReadChunk

__all__ = ["RequestBook", "RunningQuery"]


@dataclass(frozen=True)
class RunningQuery:
    """The query the worker reported started and has not finished reading."""

    query_id: int
    chunk: int
    started_at: float  # time.monotonic() when QueryStarted arrived


class RequestBook:
    """Requests sent to one worker and the replies filed for them.

    :param emit: logs an event about this worker (the session adds the worker's index and pid).
    :param query_timeout: named in the message of a timeout the server enforced.
    """

    def __init__(self, emit: Callable[..., Any], *, query_timeout: float | None) -> None:
        self._emit = emit
        self._query_timeout = query_timeout
        self._ids = itertools.count(1)
        self._requests: dict[int, ReadChunk] = {}
        self._reads: dict[int, ChunkRead | Failed] = {}
        self._dones: dict[int, ChunkDone | Failed] = {}
        self._read_seen: set[int] = set()
        self._backends: dict[int, int] = {}
        self.running: RunningQuery | None = None

    def next_query_id(self) -> int:
        return next(self._ids)

    def add(self, request: ReadChunk) -> None:
        self._requests[request.query_id] = request

    def request(self, query_id: int) -> ReadChunk | None:
        return self._requests.get(query_id)

    @property
    def running_chunk(self) -> int | None:
        running = self.running  # read once: another thread may clear it
        return running.chunk if running is not None else None

    def forget_running(self) -> None:
        """The worker is gone: no query of it is running any more."""
        self.running = None

    def note_backend(self, query_id: int, backend_pid: int) -> None:
        """A backend seen at work for ``query_id`` (from a lock-wait report, on the sampler's thread)."""
        self._backends.setdefault(query_id, backend_pid)

    # -- replies -----------------------------------------------------------------------------------

    def started(self, message: QueryStarted, received_at: float) -> None:
        self.running = RunningQuery(message.query_id, message.chunk_index, received_at)

    def file(self, message: ChunkRead | ChunkDone | Failed) -> None:
        """File a reply under its query; a ``Failed`` after ``ChunkRead`` is the write's failure."""
        query_id = message.query_id
        assert query_id is not None, "a failure outside any request is the pump's to raise"
        if isinstance(message, ChunkDone) or (isinstance(message, Failed) and query_id in self._read_seen):
            self._dones[query_id] = message
            return
        self._reads[query_id] = message
        if isinstance(message, ChunkRead):
            self._read_seen.add(query_id)
        if self.running is not None and self.running.query_id == query_id:
            self.running = None

    def has_read(self, query_id: int) -> bool:
        return query_id in self._reads

    def has_done(self, query_id: int) -> bool:
        return query_id in self._dones

    def take_read(self, query_id: int, *, active_backend: int | None, activity: Callable[[], str]) -> ChunkRead:
        """The query's rows are in the worker: log ``query.done`` and return them, or raise its error.

        :param active_backend: the backend the latest sample showed at work, when no lock-wait
            report named the query's own.
        :param activity: what the server was doing, for the message of a server-side timeout.
        """
        outcome = self._reads.pop(query_id)
        request = self._requests[query_id]
        backend_pid = self._backends.pop(query_id, None) or active_backend
        if isinstance(outcome, Failed):
            self._requests.pop(query_id, None)
            raise self._failure(request, outcome, backend_pid, activity)
        self._emit(
            "query.done",
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

    def take_done(self, query_id: int, *, activity: Callable[[], str]) -> ChunkDone:
        """The chunk's file is committed: return its reply, or raise the writer's error."""
        outcome = self._dones.pop(query_id)
        request = self._requests.pop(query_id)
        if isinstance(outcome, Failed):
            raise self._failure(request, outcome, None, activity)
        return outcome

    def _failure(
        self, request: ReadChunk, failed: Failed, backend_pid: int | None, activity: Callable[[], str]
    ) -> BaseException:
        error = failed.error
        if isinstance(error, QueryCancelledError) and error.reason == "statement_timeout":
            doing = activity()
            error = QueryTimeoutError(
                f"chunk {request.chunk_index}: query ran past query_timeout={self._query_timeout}s "
                f"and the server cancelled it (statement_timeout); server was doing: {doing}",
                limit="query_timeout",
                chunk=request.chunk_index,
                server_activity=doing,
            )
            self._emit(
                "query.timeout",
                chunk=request.chunk_index,
                limit="query_timeout",
                enforced_by="server",
                server_activity=doing,
            )
        else:
            self._emit(
                "query.failed",
                backend_pid=backend_pid,
                chunk=request.chunk_index,
                error=f"{type(error).__name__}: {error}",
            )
        error.__cause__ = RemoteTraceback(failed.traceback)
        return error


def _jsonable(key: tuple[Any, ...] | None) -> list[Any] | None:
    if key is None:
        return None
    return [v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in key]
