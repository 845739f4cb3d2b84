"""Run one :class:`ReadChunk` in the worker: connectorx -> cast -> checks, then -> sink.

connectorx reports failures three ways: ``RuntimeError`` (server errors, conversion errors),
``pyo3_runtime.PanicException`` (a ``BaseException``: unsupported types, and errors surfacing while a
stream is drained) and, for a dead connection pool, a ``RuntimeError`` after 30 s. :func:`classify`
turns all of them into the provider's own exceptions by what the message says.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
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

__all__ = ["ChunkState", "classify", "read_chunk", "release_as_written", "stream_chunk", "write_chunk"]

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
    "kind: closed",  # a stream's connection closed under it (pg_terminate_backend, restart)
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
        import pyarrow.compute as pc  # loaded by the first cast anyway; imported here, not at start-up

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


_DESERIALIZE = re.compile(r"error deserializing column (\d+)|kind: FromSql\((\d+)\)")


def _named_column_error(exc: BaseException, request: ReadChunk) -> BaseException:
    """Say which column could not be converted, and what to do about it."""
    match = _DESERIALIZE.search(str(exc))
    index = int(match.group(1) or match.group(2)) if match else -1
    if not 0 <= index < len(request.schema):
        return exc
    name = request.schema.field(index).name
    return DataIntegrityError(
        f"column {name!r} (chunk {request.chunk_index}) holds a value connectorx cannot convert: {exc}. "
        f"Read it as text with column_casts={{{name!r}: 'text'}}, or filter the value out with `where`",
        column=name,
    )


def _conform(table: pa.Table, request: ReadChunk) -> pa.Table:
    """Cast to the planned schema (the stream widens int2/int4/float4; numeric needs its scale) and check."""
    if table.schema != request.schema:
        # connectorx returns no columns at all for some empty results: use the planned schema
        table = request.schema.empty_table() if table.num_columns == 0 else _cast(table, request.schema)
    _check(table, request)
    return table


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast only the columns whose type differs (``Table.cast`` visits every one: measurably slower)."""
    if table.schema.names != schema.names:
        return table.cast(schema, safe=True)  # names differ: let Arrow say which
    columns = []
    for column, field in zip(table.columns, schema, strict=True):
        if not field.nullable and column.null_count:  # as Table.cast refuses it
            raise ValueError(f"column {field.name!r} is declared non-nullable but contains nulls")
        if column.type == field.type:
            columns.append(column)
            continue
        try:
            columns.append(column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # 'NaN' in a numeric read as text
            raise DataIntegrityError(
                f"column {field.name!r} holds a value that cannot be written as {field.type}: {exc}. "
                f"Read it as text with column_casts={{{field.name!r}: 'text'}}, or filter the value out with `where`",
                column=field.name,
            ) from None
    return pa.Table.from_arrays(columns, schema=schema)


def _drop_peeked(table: pa.Table, request: ReadChunk, received: int) -> tuple[pa.Table, bool | None]:
    """Drop the row read past the chunk's end; say whether it existed; refuse a key that continues.

    ``table`` holds the last rows of the chunk. Whether the peeked row's key equals the last kept
    row's is the server's verdict (``request.tie_field``), never a Python comparison: the server's
    equality is the one the next page's ``>`` uses.
    """
    if not request.peek_row:
        return table, None
    if request.limit is None or received <= request.limit or table.num_rows == 0:
        return table, False
    rows = table.num_rows
    if request.tie_field is not None and table.column(request.tie_field)[rows - 1].as_py():
        peeked = _key_at(table, rows - 1, request.key_fields)
        raise DataIntegrityError(
            f"key {list(request.key_fields)} is not unique: value {list(peeked)} continues past the end of "
            f"chunk {request.chunk_index} (the server compares it equal to the chunk's last key); rows would be "
            "lost. Choose a unique key.",
            key=list(request.key_fields),
        )
    return table.slice(0, rows - 1), True


def read_chunk(
    request: ReadChunk, uri: str, protocol: str, pre_execution: tuple[str, ...] = ()
) -> tuple[pa.Table, ChunkRead]:
    """Run the query as one Arrow table (connectorx releases the GIL throughout) and check the rows."""
    import connectorx as cx

    t0 = time.monotonic()
    try:
        table = cx.read_sql(
            uri, request.sql, return_type="arrow", protocol=protocol, pre_execution_query=list(pre_execution) or None
        )
    except RuntimeError as exc:
        raise _named_column_error(exc, request) from exc
    read_seconds = time.monotonic() - t0
    table = _conform(table, request)
    table, more = _drop_peeked(table, request, table.num_rows)
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


class _Written:
    """Running totals of what a streamed chunk has written."""

    def __init__(self, request: ReadChunk, writer: Any) -> None:
        self.request, self.writer = request, writer
        self.rows = self.bytes = 0
        self.first: tuple[Any, ...] | None = None
        self.last: tuple[Any, ...] | None = None
        self.seconds = 0.0

    def emit(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        fields = self.request.key_fields
        if fields:
            if self.first is None:
                self.first = _key_at(table, 0, fields)
            self.last = _key_at(table, table.num_rows - 1, fields)
        if self.request.drop_fields:
            table = table.drop_columns(list(self.request.drop_fields))
        t0 = time.monotonic()
        try:
            self.writer.write(table)
        except Exception as exc:  # a storage failure, not a query failure
            raise StorageError(f"writing chunk {self.request.chunk_index} failed: {exc}") from exc
        self.seconds += time.monotonic() - t0
        self.rows += table.num_rows
        self.bytes += table.nbytes


def stream_chunk(
    request: ReadChunk, uri: str, protocol: str, pre_execution: tuple[str, ...] = ()
) -> tuple[ChunkRead, Callable[[], ChunkDone]]:
    """Stream the query in batches straight into the sink; memory holds batches, not the chunk.

    Returns when the last batch is in (the chunk's last key is known) with a ``finish`` step that
    encodes the last row group and commits the file: the worker runs it in its writer thread while
    the next chunk's query starts.

    connectorx's ``arrow_stream`` decodes in a native thread while this one casts, checks and encodes
    Parquet, so reading and writing overlap inside the chunk. One batch is held back until the next
    arrives, so the row peeked past the chunk's end can be dropped before it is written.

    Caveat (measured): while it waits for the first batch, iterating the stream holds the GIL, so the
    heartbeat thread is silent during a long server-side wait; the parent then checks the server
    (see ``supervisor.watchdog.Watchdog.silence_is_a_server_wait``).
    """
    import connectorx as cx

    t0 = time.monotonic()
    try:
        reader = cx.read_sql(
            uri,
            request.sql,
            return_type="arrow_stream",
            protocol=protocol,
            batch_size=request.stream_rows,
            pre_execution_query=list(pre_execution) or None,
        )
    except RuntimeError as exc:
        raise _named_column_error(exc, request) from exc
    write_schema = pa.schema([f for f in request.schema if f.name not in request.drop_fields])
    writer = open_writer(write_schema, request.sink)
    written = _Written(request, writer)
    try:
        held: pa.Table | None = None
        received = 0
        for batch in reader:
            if batch.num_rows == 0:
                continue
            table = _conform(pa.Table.from_batches([batch]), request)
            received += table.num_rows
            if held is not None:
                written.emit(held)
            held = table
        more: bool | None = False if request.peek_row else None
        if held is not None:
            held, more = _drop_peeked(held, request, received)
            written.emit(held)
    except BaseException as exc:  # PanicException (a BaseException) carries stream errors
        writer.abort()
        named = _named_column_error(exc, request)
        if named is not exc:
            raise named from exc
        raise
    read = ChunkRead(
        query_id=request.query_id,
        chunk_index=request.chunk_index,
        rows=written.rows,
        arrow_bytes=written.bytes,
        first_key=written.first,
        last_key=written.last,
        read_seconds=time.monotonic() - t0 - written.seconds,
        more=more,
    )

    def finish() -> ChunkDone:
        """Encode the last row group and commit; runs in the writer thread, beside the next read."""
        t1 = time.monotonic()
        try:
            if written.rows == 0 and not request.write_empty:
                writer.abort()
                size, location = 0, ""
            else:
                size = writer.commit()
                location = request.sink.path if isinstance(request.sink, IpcSink) else request.sink.url
        except BaseException as exc:
            writer.abort()
            raise StorageError(f"committing chunk {request.chunk_index} failed: {exc}") from exc
        return ChunkDone(
            query_id=request.query_id,
            chunk_index=request.chunk_index,
            rows=written.rows,
            bytes=size,
            write_seconds=written.seconds + time.monotonic() - t1,
            location=location,
        )

    return read, finish


def release_as_written(table: pa.Table) -> list[pa.Table]:
    """``table`` as one table per record batch (zero-copy), for :func:`write_chunk` to drop as it goes.

    connectorx builds a chunk as record batches of 65,536 rows, each with buffers of its own: once
    a batch is encoded, its memory can go back to the allocator while the next chunk is being read,
    instead of the whole chunk staying alive until its file is committed.
    """
    return [pa.Table.from_batches([batch], schema=table.schema) for batch in table.to_batches()] or [table]


def write_chunk(request: ReadChunk, table: pa.Table | list[pa.Table]) -> ChunkDone:
    """Write ``table`` to the request's sink and commit it atomically.

    :param table: the chunk, or its parts from :func:`release_as_written`: the list is emptied as
        each part is written, so the caller should keep no other reference to the chunk.
    """
    t0 = time.monotonic()
    parts = table if isinstance(table, list) else [table]
    del table
    rows = sum(part.num_rows for part in parts)
    if rows == 0 and not request.write_empty:
        return ChunkDone(request.query_id, request.chunk_index, rows=0, bytes=0, write_seconds=0.0, location="")
    writer = open_writer(parts[0].schema, request.sink)
    try:
        while parts:
            writer.write(parts.pop(0))
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
        rows=rows,
        bytes=size,
        write_seconds=time.monotonic() - t0,
        location=location,
    )
