"""Which query reads the next chunk, and the pipeline that keeps the worker busy.

Two ways to cut a source into chunks:

* :class:`KeysetChunks` (the default): ``WHERE key > <last key> ORDER BY key LIMIT n``. Chunk *k+1*
  is known as soon as chunk *k*'s last key is, never by ``OFFSET``.
* :class:`PageChunks` (``key_columns=["ctid"]``, for tables with no usable key): heap page ranges,
  ``ctid >= '(a,0)' AND ctid < '(b,0)'``, read by TID range scans (PostgreSQL 14+). Exact only
  inside one snapshot (an UPDATE moves a row to another page), so a page-range run always reads
  from one (:class:`~airflow_provider_cxpg.run.extraction.Extraction` exports it).

:func:`pipelined` submits chunk *k+1* to the worker as soon as chunk *k*'s rows are in (its key is
then known), so the server reads the next page while the worker encodes the previous one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from airflow_provider_cxpg.exceptions import DataIntegrityError
from airflow_provider_cxpg.planning.plan import ExtractPlan
from airflow_provider_cxpg.supervisor.session import WorkerSession
from airflow_provider_cxpg.worker.protocol import ChunkDone, ChunkRead, IpcSink, ParquetSink, ReadChunk

__all__ = ["ChunkQuery", "ChunkSizer", "KeysetChunks", "PageChunks", "chunks_for", "pipelined"]

_BYTES_PROBE_ROWS = 10_000
_MIN_BYTES_CHUNK_ROWS = 1_000


@dataclass
class ChunkSizer:
    """Rows for the next chunk: ``chunk_rows``, or sized from measured row width to ``chunk_bytes``.

    :param chunk_rows: rows per chunk (the maximum when ``chunk_bytes`` is set).
    :param chunk_bytes: target in-memory Arrow bytes per chunk; the first chunk probes the width.

    Both come validated from :class:`~airflow_provider_cxpg.run.options.ExtractOptions`.
    """

    chunk_rows: int
    chunk_bytes: int | None = None
    _rows: int = 0
    _bytes: int = 0

    def observe(self, rows: int, arrow_bytes: int) -> None:
        self._rows += rows
        self._bytes += arrow_bytes

    def next_rows(self) -> int:
        if self.chunk_bytes is None:
            return self.chunk_rows
        if not self._rows:
            return min(self.chunk_rows, _BYTES_PROBE_ROWS)
        width = max(1.0, self._bytes / self._rows)
        # chunk_rows stays the maximum, also under the floor (tiny rows would make chunks of a few rows)
        return min(self.chunk_rows, max(_MIN_BYTES_CHUNK_ROWS, int(self.chunk_bytes / width)))


@dataclass(frozen=True)
class ChunkQuery:
    """One chunk's statement and where it starts and ends (for the manifest and resume)."""

    sql: str
    limit: int | None
    peek: bool
    start: list[Any] | None = None
    end: list[Any] | None = None


class Chunks(Protocol):
    def first(self) -> ChunkQuery: ...

    def next(self, query: ChunkQuery, read: ChunkRead) -> ChunkQuery | None:
        """The query after ``query`` (which returned ``read``), or None when the source is done."""
        ...


class KeysetChunks:
    """``WHERE key > last ORDER BY key LIMIT n``, after key ``after`` (key range bounds are filters)."""

    def __init__(self, plan: ExtractPlan, sizer: ChunkSizer, after: Sequence[Any] | None) -> None:
        self.plan, self.sizer, self.after = plan, sizer, after

    def _query(self, after: Sequence[Any] | None) -> ChunkQuery:
        limit = self.sizer.next_rows()
        # Always one row more than the chunk: it tells whether another chunk follows (no empty
        # trailing query when the table ends on a chunk boundary), and for keys the catalog cannot
        # prove unique it shows a key value that continues past the boundary.
        sql = self.plan.chunk_sql(after, limit + 1)
        return ChunkQuery(sql=sql, limit=limit, peek=True, start=list(after) if after is not None else None)

    def first(self) -> ChunkQuery:
        return self._query(self.after)

    def next(self, query: ChunkQuery, read: ChunkRead) -> ChunkQuery | None:
        if query.limit is None or read.rows < query.limit or read.more is False:
            return None
        assert read.last_key is not None
        if query.start is not None and list(read.last_key) == list(query.start):
            # Keys strictly increase, so a page ending where it started means a key value read back
            # differently than it sorts: paging on would loop forever.
            raise DataIntegrityError(
                f"keyset paging made no progress past key {list(read.last_key)}: a key value does not read back "
                "exactly; choose another key or read the key column as text"
            )
        return self._query(read.last_key)


class PageChunks:
    """Heap page ranges ``[a, b)`` from ``start_page`` to ``end_page`` (None: to the end of the table).

    Pages appended while the run reads are covered: past the pages counted at planning, the last
    chunk is open-ended.
    """

    def __init__(self, plan: ExtractPlan, sizer: ChunkSizer, start_page: int, end_page: int | None) -> None:
        assert plan.pages is not None
        self.plan, self.sizer = plan, sizer
        self.start_page, self.end_page = int(start_page), None if end_page is None else int(end_page)

    def _query(self, first_page: int) -> ChunkQuery:
        per_page = max(self.plan.rows_per_page or 1.0, 1.0)
        span = max(1, int(self.sizer.next_rows() / per_page))
        last = first_page + span
        limit_page = self.end_page if self.end_page is not None else None
        if limit_page is not None:
            last = min(last, limit_page)
        elif first_page >= (self.plan.pages or 0):
            last = None  # past the planned end of the heap: everything that follows
        sql = self.plan.page_sql(first_page, last)
        return ChunkQuery(sql=sql, limit=None, peek=False, start=[first_page], end=[last])

    def first(self) -> ChunkQuery:
        return self._query(self.start_page)

    def next(self, query: ChunkQuery, read: ChunkRead) -> ChunkQuery | None:
        assert query.end is not None
        end = query.end[0]
        if end is None or (self.end_page is not None and end >= self.end_page):
            return None
        return self._query(end)


def chunks_for(
    plan: ExtractPlan, sizer: ChunkSizer, after: Sequence[Any] | None, upper: Sequence[Any] | None
) -> Chunks:
    """The chunking that fits ``plan``: page ranges for ``ctid`` plans, keyset otherwise.

    For page plans ``after`` / ``upper`` are page numbers ``[after, upper)``; for keyset plans
    ``after`` is the last key read and key-range bounds are already in the plan's filters.
    """
    if plan.pages is not None:
        start = int(after[0]) if after else 0
        end = int(upper[0]) if upper and upper[0] is not None else None
        return PageChunks(plan, sizer, start, end)
    return KeysetChunks(plan, sizer, after)


def pipelined(
    session: WorkerSession,
    plan: ExtractPlan,
    chunks: Chunks,
    *,
    first_index: int,
    sizer: ChunkSizer,
    sink_for: Callable[[int], ParquetSink | IpcSink],
    write_empty_first: bool,
    read_ahead: bool = True,
    stream_rows: int = 0,
) -> Iterator[tuple[ChunkQuery, ChunkRead, ChunkDone]]:
    """Yield each chunk once its file is committed, with the next chunk already being read.

    :param read_ahead: ask for chunk *k+1* as soon as chunk *k*'s rows are in, so reading overlaps
        writing (the worker then holds two chunks); False reads and writes one chunk at a time.
    :param stream_rows: stream each chunk in batches of this many rows (see :class:`ReadChunk`).
    """

    def submit(index: int, query: ChunkQuery, write_empty: bool) -> int:
        request = ReadChunk(
            query_id=session.next_query_id(),
            chunk_index=index,
            sql=query.sql,
            sink=sink_for(index),
            limit=query.limit,
            peek_row=query.peek,
            write_empty=write_empty,
            stream_rows=stream_rows,
            **plan.request_fields(),
        )
        session.submit(request)
        return request.query_id

    null_keys = plan.null_key_sql()
    if null_keys is not None:
        # Rows with a NULL key would never be paged to (see ExtractPlan.null_key_sql): one row of them
        # fails this probe in the worker's checks, before any data moves; none writes nothing.
        session.run(
            ReadChunk(
                query_id=session.next_query_id(),
                chunk_index=first_index,
                sql=null_keys,
                sink=sink_for(first_index),
                write_empty=False,
                **plan.request_fields(),
            )
        )
    index, query = first_index, chunks.first()
    query_id = submit(index, query, write_empty_first)
    while True:
        read = session.wait_read(query_id)
        sizer.observe(read.rows, read.arrow_bytes)
        following = chunks.next(query, read)
        if following is not None and read_ahead:
            next_id = submit(index + 1, following, False)
        done = session.wait_done(query_id)
        if following is not None and not read_ahead:
            next_id = submit(index + 1, following, False)
        yield query, read, done
        if following is None:
            return
        index, query, query_id = index + 1, following, next_id
