"""Run one :class:`ReadChunk` in the worker: connectorx -> cast -> checks, then -> sink.

connectorx reports failures three ways: ``RuntimeError`` (server errors, conversion errors),
``pyo3_runtime.PanicException`` (a ``BaseException``: unsupported types, and errors surfacing while a
stream is drained) and, for a dead connection pool, a ``RuntimeError`` after 30 s. :func:`classify`
turns all of them into the provider's own exceptions by what the message says.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from airflow_provider_cxpg.conninfo import Redactor
from airflow_provider_cxpg.exceptions import (
    CxpgError,
    DataIntegrityError,
    QueryCancelledError,
    QueryError,
    ReadPanicError,
    ServerConnectionError,
    StorageError,
)
from airflow_provider_cxpg.worker.protocol import ChunkDone, ChunkRead, IpcSink, ReadChunk
from airflow_provider_cxpg.worker.sinks import open_writer

__all__ = ["ChunkState", "classify", "read_chunk", "write_chunk"]

# connectorx turns PostgreSQL's ±infinity into these sentinel values (measured, 0.4.6).
_TIMESTAMP_INFINITY = {8210266876799999999: "infinity", -8334601228800000000: "-infinity"}
_DATE_INFINITY = {95026236: "infinity", -96465292: "-infinity"}

_CANCEL_REASONS = (
    ("due to statement timeout", "statement_timeout"),
    ("due to lock timeout", "lock_timeout"),
    ("due to user request", "cancel"),
    ("due to conflict with recovery", "recovery_conflict"),
)
_CONNECTION_MARKERS = (
    "terminating connection",
    "timed out waiting for connection",
    "connection closed",
    "connection reset",
    "connection refused",
    "error communicating with the server",
    "server closed the connection",
    "broken pipe",
    "password authentication failed",
    "no pg_hba.conf entry",
    "the database system is shutting down",
    "the database system is starting up",
    "unexpected eof",
    "failed to lookup address",
)


def classify(exc: BaseException, redact: Redactor) -> CxpgError:
    """Return the provider error that says what ``exc`` means."""
    if isinstance(exc, CxpgError):
        return exc
    message = redact(str(exc)) or type(exc).__name__
    lowered = message.lower()
    for marker, reason in _CANCEL_REASONS:
        if marker in lowered:
            return QueryCancelledError(f"the server cancelled the query: {message}", reason=reason)
    if "fatal:" in lowered or any(marker in lowered for marker in _CONNECTION_MARKERS):
        return ServerConnectionError(f"connection to the server failed: {message}")
    if type(exc).__name__ == "PanicException":
        return ReadPanicError(
            f"connectorx panicked while reading: {message} (a column type it cannot decode; "
            "read it as text with column_casts={'<column>': 'text'})"
        )
    return QueryError(f"query failed: {message}")


@dataclass
class ChunkState:
    """What the heartbeat thread reports: the query running now."""

    query_id: int | None = None


def _key_at(table: pa.Table, index: int, fields: tuple[str, ...]) -> tuple[Any, ...]:
    row = table.slice(index, 1).select(list(fields)).to_pylist()[0]
    return tuple(row[f] for f in fields)


def _check(table: pa.Table, request: ReadChunk) -> None:
    for name, message in request.guards:
        flags = table.column(name)
        if flags.null_count < len(flags) and any(chunk.true_count for chunk in flags.chunks):
            raise DataIntegrityError(f"chunk {request.chunk_index}: {message}", guard=name)
    for name in request.key_fields:
        if table.column(name).null_count:
            raise DataIntegrityError(
                f"key column {name!r} is NULL in chunk {request.chunk_index}: keyset paging needs a "
                "NOT NULL key (filter the NULLs out with `where`, or choose another key)",
                column=name,
            )
    for name in request.infinity_columns:
        column = table.column(name)
        if column.null_count == len(column):
            continue
        is_date = pa.types.is_date32(column.type)
        sentinels = _DATE_INFINITY if is_date else _TIMESTAMP_INFINITY
        import pyarrow.compute as pc  # imported here: it costs ~50 ms of worker start-up

        raw = pa.chunked_array([c.view(pa.int32() if is_date else pa.int64()) for c in column.chunks])
        bounds = pc.min_max(raw)
        for value in (bounds["min"].as_py(), bounds["max"].as_py()):
            if value in sentinels:
                raise DataIntegrityError(
                    f"column {name!r} holds '{sentinels[value]}', which connectorx cannot represent "
                    f"(chunk {request.chunk_index}); read it as text with column_casts={{{name!r}: 'text'}} "
                    "or filter it out with `where`",
                    column=name,
                )


_DESERIALIZE = re.compile(r"error deserializing column (\d+)")


def _named_column_error(exc: RuntimeError, request: ReadChunk) -> BaseException:
    """connectorx names a failing column by its 0-based index; say which column and what to do."""
    match = _DESERIALIZE.search(str(exc))
    if not match or int(match.group(1)) >= len(request.schema):
        return exc
    name = request.schema.field(int(match.group(1))).name
    return DataIntegrityError(
        f"column {name!r} (chunk {request.chunk_index}) holds a value connectorx cannot convert: {exc}. "
        f"Read it as text with column_casts={{{name!r}: 'text'}}, or filter the value out with `where`",
        column=name,
    )


def read_chunk(
    request: ReadChunk, uri: str, protocol: str, pre_execution: tuple[str, ...] = ()
) -> tuple[pa.Table, ChunkRead]:
    """Run the query (connectorx releases the GIL throughout) and check the rows.

    ``return_type="arrow"`` rather than ``arrow_stream``: measured, iterating a stream holds the GIL
    while it waits for the first batch (a 2 s gap for ``pg_sleep(2)``), which would silence the
    heartbeat thread for as long as a query waits on a lock.
    """
    import connectorx as cx

    t0 = time.monotonic()
    try:
        table = cx.read_sql(
            uri, request.sql, return_type="arrow", protocol=protocol, pre_execution_query=list(pre_execution) or None
        )
    except RuntimeError as exc:
        raise _named_column_error(exc, request) from exc
    read_seconds = time.monotonic() - t0
    if table.schema != request.schema:
        # connectorx returns no columns at all for some empty results: use the planned schema
        table = request.schema.empty_table() if table.num_columns == 0 else table.cast(request.schema, safe=True)
    _check(table, request)
    rows = table.num_rows
    more = None if not request.peek_row else False
    if request.peek_row and request.limit is not None and rows > request.limit:
        more = True
        if rows >= 2 and _key_at(table, rows - 1, request.key_fields) == _key_at(table, rows - 2, request.key_fields):
            raise DataIntegrityError(
                f"key {list(request.key_fields)} is not unique: value "
                f"{list(_key_at(table, rows - 1, request.key_fields))} continues past the end of chunk "
                f"{request.chunk_index}; rows would be lost. Choose a unique key.",
                key=list(request.key_fields),
            )
        table = table.slice(0, request.limit)
        rows = table.num_rows
    has_key = bool(request.key_fields) and rows > 0
    first = _key_at(table, 0, request.key_fields) if has_key else None
    last = _key_at(table, rows - 1, request.key_fields) if has_key else None
    if request.drop_fields:
        table = table.drop_columns(list(request.drop_fields))
    info = ChunkRead(
        query_id=request.query_id,
        chunk_index=request.chunk_index,
        rows=rows,
        arrow_bytes=table.nbytes,
        first_key=first,
        last_key=last,
        read_seconds=read_seconds,
        more=more,
    )
    return table, info


def write_chunk(request: ReadChunk, table: pa.Table) -> ChunkDone:
    """Write ``table`` to the request's sink and commit it atomically."""
    t0 = time.monotonic()
    if table.num_rows == 0 and not request.write_empty:
        return ChunkDone(request.query_id, request.chunk_index, rows=0, bytes=0, write_seconds=0.0, location="")
    writer = open_writer(table.schema, request.sink)
    try:
        writer.write(table)
        size = writer.commit()
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, CxpgError):
            raise
        raise StorageError(f"writing chunk {request.chunk_index} failed: {exc}") from exc
    location = request.sink.path if isinstance(request.sink, IpcSink) else request.sink.url
    return ChunkDone(
        query_id=request.query_id,
        chunk_index=request.chunk_index,
        rows=table.num_rows,
        bytes=size,
        write_seconds=time.monotonic() - t0,
        location=location,
    )
