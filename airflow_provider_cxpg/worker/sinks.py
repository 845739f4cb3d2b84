"""Where a chunk goes, committed atomically.

A chunk file appears under its final name only when complete:

* local paths: write ``.<name>.<random>.tmp`` beside the target, then ``os.replace`` (atomic rename);
* object stores (S3, GCS, Azure): write straight to the key; the object becomes visible only when the
  upload completes on close, and a failed upload is discarded (multipart aborted), never committed;
* other fsspec filesystems: write a temporary name, then move it.

Every storage call (open, each write, commit, abort) runs on the worker's storage thread under the
run's ``storage_timeout`` (see :mod:`~airflow_provider_cxpg.bounded`): a store that stops answering, or a hung mount,
fails the chunk with a :class:`StorageError` that names the file and the operation, instead of
holding the worker. The thread reports what it is doing in every heartbeat, so the parent can also
tell a wedged write from a slow one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import pyarrow as pa

from airflow_provider_cxpg.bounded import CallTimedOut, SerialCalls
from airflow_provider_cxpg.exceptions import STORE_UNANSWERED, StorageError
from airflow_provider_cxpg.worker.protocol import OBJECT_STORES, IpcSink, ParquetSink

__all__ = ["STORAGE", "ChunkWriter", "open_writer", "set_storage_timeout"]

#: The worker's storage thread: chunk files are written one call at a time, each under a deadline.
STORAGE = SerialCalls("storage")
_timeout: list[float | None] = [None]


def set_storage_timeout(seconds: float | None) -> None:
    """The deadline of each storage call in this worker (from :class:`Configure`)."""
    _timeout[0] = seconds


class ChunkWriter(Protocol):
    def write(self, table: pa.Table) -> None: ...

    def commit(self) -> int:
        """Make the file visible under its final name; return its size in bytes."""
        ...

    def abort(self) -> None:
        """Remove every trace of the partial file."""
        ...


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


#: A column is dictionary-encoded when its sample holds at most this share of distinct values.
DICTIONARY_MAX_DISTINCT_SHARE = 0.5
#: Rows of a file's first row group that decide (hashing them costs ~1 ms per column; a whole
#: 65,536-row group costs five times that per column, more than its dictionary would save).
DICTIONARY_SAMPLE_ROWS = 16_384


def dictionary_columns(table: pa.Table, sample_rows: int = DICTIONARY_SAMPLE_ROWS) -> list[str]:
    """The column paths worth dictionary-encoding, judged on the first ``sample_rows`` rows.

    Paths as ``ParquetWriter(use_dictionary=[...])`` takes them: a top-level column by its name, an
    array column (list) by its values' path ``name.list.element``, judged on its values. Other
    nested columns (the provider plans none) go plain.

    Parquet keeps one dictionary per column chunk (row group). For a column of mostly distinct
    values (keys, uuids, measurements, free text) the dictionary is as large as the data, the
    indices come on top and, past the dictionary page limit, the writer falls back to plain
    encoding anyway: building it is the most expensive part of encoding such a column (measured in
    bench/README.md). Repetitive columns (codes, states, padding) keep it: there it pays. A sample
    shows fewer repeats than the whole row group, so a column that repeats only moderately may go
    without one: a slightly larger file (zstd takes back most of it), never a slower one.
    """
    import pyarrow.compute as pc

    sample = table.slice(0, sample_rows)
    chosen = []
    for field, column in zip(sample.schema, sample.columns, strict=True):
        path = field.name
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            column, path = pc.list_flatten(column), f"{field.name}.list.element"  # compliant nested names
        values = len(column) - column.null_count
        try:
            distinct = pc.count_distinct(column, mode="only_valid").as_py()
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError):  # other nested types: plain
            continue
        if distinct <= DICTIONARY_MAX_DISTINCT_SHARE * values:
            chosen.append(path)
    return chosen


class _ParquetWriter:
    """Write tables to a Parquet file object or path in row groups of ``row_group_rows``.

    The file is opened with the first row group, whose rows decide which columns are
    dictionary-encoded (``dictionary="auto"``, see :func:`dictionary_columns`).
    """

    def __init__(self, schema: pa.Schema, sink: ParquetSink, target: Any, *, owns_target: bool = False) -> None:
        self._sink = sink
        self._target = target
        self._owns_target = owns_target
        if sink.metadata:  # the footer's key-value metadata: who wrote this file, for the output check
            schema = schema.with_metadata({**(schema.metadata or {}), **sink.metadata})
        self._schema = schema
        self._writer: Any = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def _open(self, first: pa.Table | None) -> Any:
        import pyarrow.parquet as pq

        dictionary: bool | list[str] = self._sink.dictionary if isinstance(self._sink.dictionary, bool) else True
        if self._sink.dictionary == "auto" and first is not None:
            dictionary = dictionary_columns(first)
        options: dict[str, Any] = {"compression": self._sink.compression, "use_dictionary": dictionary}
        if self._sink.compression_level is not None:
            options["compression_level"] = self._sink.compression_level
        return pq.ParquetWriter(self._target, self._schema, **options)

    def write_table(self, table: pa.Table) -> None:
        """Buffer parts (streamed batches, a chunk's record batches) into whole row groups.

        Only whole row groups are written before :meth:`close`; the rows left over wait for the
        next part. So the file has the row groups one ``write_table`` of the whole table would give
        (small row groups make slow Parquet), whatever the parts' sizes, and each part can be freed
        once its rows are encoded.
        """
        if not table.num_rows:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self._sink.row_group_rows:
            self._flush(whole_groups_only=True)

    def _flush(self, *, whole_groups_only: bool = False) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows = [], 0
        rows = self._sink.row_group_rows
        left = table.num_rows % rows if whole_groups_only else 0
        if left:  # a zero-copy slice: it holds only the last part(s) it came from
            self._pending, self._pending_rows = [table.slice(table.num_rows - left)], left
            table = table.slice(0, table.num_rows - left)
        if self._writer is None:
            self._writer = self._open(table)
        self._writer.write_table(table, row_group_size=rows)

    def close(self) -> None:
        try:
            self._flush()
            if self._writer is None:  # no rows: an empty file with the schema
                self._writer = self._open(None)
            self._writer.close()
        finally:
            if self._owns_target and not self._target.closed:
                self._target.close()


class _LocalFile:
    """A local file written under a temporary name beside ``final`` and renamed into place."""

    def __init__(self, final: str, open_file: Callable[[str], Any]) -> None:
        self.final = final
        directory, name = os.path.split(final)
        os.makedirs(directory or ".", exist_ok=True)
        self.tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        self._writer = open_file(self.tmp)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table)

    def commit(self) -> int:
        self._writer.close()
        os.replace(self.tmp, self.final)  # atomic: readers see the old name or the whole file
        return os.path.getsize(self.final)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class LocalParquetChunk(_LocalFile):
    """Parquet to a local temporary file, renamed into place on commit."""

    def __init__(self, schema: pa.Schema, sink: ParquetSink) -> None:
        def open_file(path: str) -> _ParquetWriter:
            # Created now, under "opening" (a read-only mount fails here); a native file, so
            # encoding writes without taking the GIL. The Parquet writer starts on the first rows.
            return _ParquetWriter(schema, sink, pa.OSFile(path, "wb"), owns_target=True)

        super().__init__(_local_path(sink.url), open_file)


class RemoteParquetChunk:
    """Parquet through fsspec: direct upload on object stores, temporary name elsewhere."""

    def __init__(self, schema: pa.Schema, sink: ParquetSink) -> None:
        import fsspec

        self.fs, self.final = fsspec.core.url_to_fs(sink.url, **sink.storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.atomic_upload = bool(set(protocols) & OBJECT_STORES)
        if self.atomic_upload:
            self.path = self.final
        else:
            directory, name = self.final.rsplit("/", 1) if "/" in self.final else ("", self.final)
            self.path = f"{directory}/.{name}.{secrets.token_hex(4)}.tmp" if directory else f".{name}.tmp"
            self.fs.makedirs(directory, exist_ok=True)
        self._file = self.fs.open(self.path, "wb")
        self._writer = _ParquetWriter(schema, sink, self._file)

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def commit(self) -> int:
        self._writer.close()
        self._file.close()  # object stores: completes the upload, the object appears now
        if not self.atomic_upload:
            self.fs.mv(self.path, self.final)
        return int(self.fs.size(self.final))

    def abort(self) -> None:
        discard = getattr(self._file, "discard", None)
        if callable(discard):  # s3fs, gcsfs: abort the multipart upload, nothing appears
            with contextlib.suppress(Exception):
                discard()
        else:
            with contextlib.suppress(Exception):
                self._file.close()
            with contextlib.suppress(Exception):
                self.fs.rm(self.path)


class IpcChunk(_LocalFile):
    """An Arrow IPC file for the parent to memory-map (the ``iter_chunks`` path)."""

    def __init__(self, schema: pa.Schema, sink: IpcSink) -> None:
        super().__init__(sink.path, lambda path: pa.ipc.new_file(path, schema))


def _bounded(operation: str, sink: ParquetSink | IpcSink, fn: Callable[[], Any]) -> Any:
    what = f"{operation} {_describe(sink)}"
    try:
        return STORAGE.call(what, fn, _timeout[0])
    except CallTimedOut as exc:
        detail = (
            f"{what} was not attempted: {exc.earlier} never returned"
            if exc.earlier
            else f"{what} did not finish within storage_timeout={_timeout[0]}s: {STORE_UNANSWERED}"
        )
        raise StorageError(detail, operation=operation, destination=_describe(sink), limit="storage_timeout") from None


class _BoundedWriter:
    """A chunk writer whose every call runs on the storage thread under the deadline."""

    def __init__(self, writer: ChunkWriter, sink: ParquetSink | IpcSink) -> None:
        self._writer, self._sink = writer, sink

    def write(self, table: pa.Table) -> None:
        _bounded("writing", self._sink, lambda: self._writer.write(table))

    def commit(self) -> int:
        return int(_bounded("committing", self._sink, self._writer.commit))

    def abort(self) -> None:
        with contextlib.suppress(StorageError):  # best effort: a stuck store keeps its partial upload
            _bounded("discarding", self._sink, self._writer.abort)


def open_writer(schema: pa.Schema, sink: ParquetSink | IpcSink) -> ChunkWriter:
    """Open the writer for ``sink``; errors become :class:`StorageError`."""

    def opened() -> ChunkWriter:
        if isinstance(sink, IpcSink):
            return IpcChunk(schema, sink)
        if _is_local(sink.url):
            return LocalParquetChunk(schema, sink)
        return RemoteParquetChunk(schema, sink)

    try:
        return _BoundedWriter(_bounded("opening", sink, opened), sink)
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"cannot open {_describe(sink)} for writing: {exc}") from exc


def _describe(sink: ParquetSink | IpcSink) -> str:
    return sink.path if isinstance(sink, IpcSink) else sink.url
