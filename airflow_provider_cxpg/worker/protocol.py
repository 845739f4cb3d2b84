"""Messages between the parent and the worker, and how they travel.

Each message is a small frozen dataclass, pickled, and sent as one frame: a 4-byte big-endian length
then the payload. The channel is a pair of pipes private to the two processes (the worker's stdin and
a dedicated descriptor), so credentials in :class:`Configure` never touch argv, the environment or
disk.

Parent -> worker: :class:`Configure` once (sent right after the spawn), then :class:`ReadChunk` per
query (a :class:`Credentials` before one when the password was refreshed), then :class:`Shutdown`.
Worker -> parent: :class:`Ready` once, :class:`Heartbeat` every ``heartbeat_interval`` from a thread;
for each :class:`ReadChunk`: :class:`QueryStarted`, then :class:`ChunkRead` when the rows are in
memory (the parent can send the next query: its key is known), then :class:`ChunkDone` when the file
is committed. :class:`Failed` replaces either reply.

The worker reads chunk *k+1* while a writer thread writes chunk *k* (freeing its record batches as
they are encoded), so at most two chunks are in memory and reading overlaps Parquet encoding.

No Airflow import here: the worker must start fast.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from airflow_provider_cxpg.conninfo import PostgresEndpoint

if TYPE_CHECKING:  # a ReadChunk's schema unpickles into pyarrow; the worker boots before pyarrow loads
    import pyarrow as pa

__all__ = [
    "OBJECT_STORES",
    "ChunkDone",
    "ChunkRead",
    "Configure",
    "Credentials",
    "Failed",
    "FrameReader",
    "FrameWriter",
    "Heartbeat",
    "IpcSink",
    "Message",
    "ParquetSink",
    "QueryStarted",
    "QueuedSender",
    "ReadChunk",
    "Ready",
    "Shutdown",
    "encode_frame",
]

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # guards against reading garbage as a huge length


# -- parent -> worker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Configure:
    """Sent once after start: where to read from and how.

    :param endpoint: the server, with session options (statement_timeout, application_name) set.
    :param protocol: connectorx transfer protocol (``binary`` or ``cursor``).
    :param heartbeat_interval: seconds between heartbeats.
    :param secrets: strings the worker must scrub from anything it reports.
    :param pre_execution: statements run on each data connection before the query (connectorx
        ``pre_execution_query``), e.g. importing the run's exported snapshot.
    :param storage_timeout: seconds each storage call may take (None: no limit).
    :param run_application_name: the run's ``application_name``: when the parent dies, the worker
        terminates the run's backends (its own, and the parent's ``<name>-...`` ones) before exiting.
    :param task_pid: the parent's pid, as the parent saw it (a parent that died while the worker
        started is still recognised: ``os.getppid()`` would already be 1).
    :param task_started: the parent's start time (``/proc/<pid>/stat``), telling a reused pid apart.
    """

    endpoint: PostgresEndpoint
    protocol: str = "binary"
    heartbeat_interval: float = 1.0
    secrets: tuple[str, ...] = field(default=(), repr=False)
    pre_execution: tuple[str, ...] = ()
    storage_timeout: float | None = None
    run_application_name: str | None = None
    task_pid: int | None = None
    task_started: str | None = None


@dataclass(frozen=True)
class Credentials:
    """A new password (a refreshed IAM token, a rotated secret) for the connections opened from now on."""

    password: str = field(repr=False)


#: fsspec protocols whose objects appear only when an upload completes (atomic by themselves): the
#: worker uploads chunk files straight to their key there, the parent writes manifests the same way.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2"})


@dataclass(frozen=True)
class ParquetSink:
    """Write the result as one Parquet file that appears only when complete.

    :param url: final location: a local path or an fsspec URL (``s3://bucket/prefix/part-000001.parquet``).
    :param storage_options: fsspec options for remote URLs (credentials travel here, over the pipe).
    :param compression: Parquet codec.
    :param row_group_rows: rows buffered before a row group is written.
    :param dictionary: ``"auto"``: dictionary-encode only the columns whose first row group is
        repetitive; True/False: every column or none.
    :param metadata: key-value pairs for the file's footer (the run id and chunk number, which the
        output check compares with the manifest: a file from another run or chunk is foreign).
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    compression: str = "zstd"
    compression_level: int | None = None
    row_group_rows: int = 65_536
    dictionary: bool | str = "auto"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IpcSink:
    """Write the result as an Arrow IPC file for the parent to memory-map (``iter_chunks``)."""

    path: str


@dataclass(frozen=True)
class ReadChunk:
    """Run one query and write its result to ``sink``.

    :param query_id: unique per job, echoed in every reply.
    :param chunk_index: the chunk's number (for logs and file names).
    :param sql: the complete statement (literals inlined: connectorx takes no parameters).
    :param schema: the Arrow schema read (results are cast to it); written minus ``drop_fields``.
    :param key_fields: output columns of the key, to report the first and last key.
    :param limit: the chunk's row limit (None: unlimited).
    :param peek_row: the query asks for ``limit + 1`` rows; the worker drops the extra one and
        reports whether it existed (no empty trailing query is needed).
    :param tie_field: a boolean field the server sets where a row's key equals the previous row's
        (keys nothing proves unique): true on the peeked row means a key value continues past the
        chunk's end, and the worker raises instead of losing rows.
    :param infinity_columns: timestamp/date columns to check for ±infinity sentinels.
    :param stream_rows: read with connectorx ``arrow_stream`` in batches of this many rows, writing
        as they arrive (memory holds batches, not the chunk); 0 reads the chunk as one table.
    :param drop_fields: fields read but not written (a key's text form, guard flags).
    :param guards: ``(field, message)``: raise ``message`` when the boolean field is true in any row.
    :param write_empty: write a file even when the result is empty (the first chunk of a run, so an
        empty source still yields a typed file); otherwise an empty result writes nothing.
    """

    query_id: int
    chunk_index: int
    sql: str
    sink: ParquetSink | IpcSink
    schema: pa.Schema
    key_fields: tuple[str, ...] = ()
    limit: int | None = None
    peek_row: bool = False
    infinity_columns: tuple[str, ...] = ()
    stream_rows: int = 0
    drop_fields: tuple[str, ...] = ()
    guards: tuple[tuple[str, str], ...] = ()
    write_empty: bool = True
    tie_field: str | None = None


@dataclass(frozen=True)
class Shutdown:
    """Finish: the worker closes its channel and exits 0."""


# -- worker -> parent -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The worker imported connectorx and pyarrow and waits for work.

    :param startup_seconds: from the worker's first line of code to this message: reading
        Configure and forking the reaper included (``worker.ready``'s ``import_seconds``).
    """

    pid: int
    startup_seconds: float
    versions: dict[str, str]


@dataclass(frozen=True)
class Heartbeat:
    """Sent by a thread every ``heartbeat_interval``: proves the process runs (not that a query moves).

    :param seq: counts up from 1.
    :param query_id: the query running now, or None between queries.
    :param storage_op: the storage call running now (e.g. ``writing s3://.../part-000003.parquet``),
        and ``storage_seconds`` how long it has run: the parent's backstop for a wedged write.
    """

    seq: int
    query_id: int | None
    storage_op: str | None = None
    storage_seconds: float | None = None


@dataclass(frozen=True)
class QueryStarted:
    """The worker is about to call connectorx for ``query_id``."""

    query_id: int
    chunk_index: int


@dataclass(frozen=True)
class ChunkRead:
    """The query finished and its rows are in the worker's memory; the file is being written.

    :param rows: rows in the chunk (a peeked extra row is already dropped).
    :param first_key: key values of the first row (None for an empty result).
    :param last_key: key values of the last row.
    :param arrow_bytes: in-memory Arrow size of the rows (for sizing chunks by bytes).
    :param more: with ``peek_row``: whether a row follows this chunk (None without peeking).
    """

    query_id: int
    chunk_index: int
    rows: int
    arrow_bytes: int
    first_key: tuple[Any, ...] | None
    last_key: tuple[Any, ...] | None
    read_seconds: float
    more: bool | None = None


@dataclass(frozen=True)
class ChunkDone:
    """The chunk's file is committed under its final name.

    :param bytes: size of the written file (0 and ``location=""`` when an empty result wrote nothing).
    """

    query_id: int
    chunk_index: int
    rows: int
    bytes: int
    write_seconds: float
    location: str


@dataclass(frozen=True)
class Failed:
    """The request failed; ``error`` is one of the provider's exceptions.

    :param traceback: the worker's formatted traceback (becomes ``__cause__`` in the parent).
    """

    query_id: int | None
    error: BaseException
    traceback: str


Message = (
    Configure | Credentials | ReadChunk | Shutdown | Ready | Heartbeat | QueryStarted | ChunkRead | ChunkDone | Failed
)


# -- framing ----------------------------------------------------------------------------------------


def encode_frame(message: object) -> bytes:
    """A message as one frame: its length, then its pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


class FrameWriter:
    """Write pickled frames to a file descriptor; safe to share between threads.

    :param owns_fd: close the descriptor on :meth:`close`. The parent passes False: its descriptor
        belongs to ``Popen.stdin``, and closing it twice could close a reused descriptor number.
    """

    def __init__(self, fd: int, *, owns_fd: bool = True) -> None:
        self._fd = fd
        self._owns_fd = owns_fd
        self._closed = False
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        """Send one frame (blocks while the pipe is full: the parent sends through :class:`QueuedSender`)."""
        self.write_frame(encode_frame(message))

    def write_frame(self, data: bytes) -> None:
        """Write one frame :func:`encode_frame` made."""
        with self._lock:
            if self._closed:
                raise BrokenPipeError("the channel is closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._owns_fd:
                with contextlib.suppress(OSError):
                    os.close(self._fd)


class QueuedSender:
    """The parent's side of the request pipe: sends never block the caller.

    A worker that stops reading (SIGSTOPped, or stuck) fills its pipe; a blocking write would then
    hold the parent's main thread, outside every deadline and with the frame lock held, so that even
    ``on_kill``'s signal handler could not send its stop. Here one thread does every write, in
    order, and may block; the caller only queues. The frozen worker is found by its missing
    heartbeats, killed, and the blocked write ends with EPIPE. A write that failed makes every later
    :meth:`send` raise its error.

    :param writer: a writer that owns its descriptor (a ``dup`` of the pipe's): the thread closes it.
    """

    _CLOSE = object()

    def __init__(self, writer: FrameWriter, name: str = "cxpg-sender") -> None:
        self._writer = writer
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._error: OSError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def error(self) -> OSError | None:
        """The error the last write ended with (the worker is gone), or None."""
        return self._error

    def send(self, message: object) -> None:
        """Queue ``message``; raises the earlier write's ``OSError`` if the pipe is broken.

        The message is pickled here, on the caller's thread: one that cannot be pickled fails its
        sender, not the writing thread.
        """
        if self._error is not None:
            raise self._error
        if self._closed:
            raise BrokenPipeError("the channel is closed")
        self._queue.put(encode_frame(message))

    def _run(self) -> None:
        try:
            while True:
                data = self._queue.get()
                if data is self._CLOSE:
                    return
                assert isinstance(data, bytes)
                self._writer.write_frame(data)
        except OSError as exc:
            self._error = exc
        except BaseException as exc:  # noqa: BLE001  never a silent death: later sends must fail
            self._error = BrokenPipeError(f"the sender thread failed: {type(exc).__name__}: {exc}")
        finally:
            # Only this thread closes the descriptor: closed under a blocked write, its number
            # could be reused and the write's next part land in another file.
            self._writer.close()

    def close(self, timeout: float = 1.0) -> None:
        """Stop after what is queued: wait ``timeout`` seconds at most (the worker may not read)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(self._CLOSE)
        self._thread.join(timeout)


class FrameReader:
    """Read pickled frames from a binary stream; returns None at end of stream."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def _read_exact(self, size: int) -> bytes | None:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            chunk = self._stream.read(remaining)
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> object | None:
        header = self._read_exact(_HEADER.size)
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
        payload = self._read_exact(size)
        if payload is None:
            return None
        return pickle.loads(payload)  # noqa: S301  our own peer, over a private pipe
