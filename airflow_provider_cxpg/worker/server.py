"""The worker's main loop and heartbeat thread.

Process rules, each for a measured reason:

* SIGINT is ignored: connectorx only sees it after a read returns, and the parent decides when the
  worker stops. SIGTERM keeps its default action, which ends the process at once even inside a read.
* Descriptor 1 becomes the private message channel and ``sys.stdout`` is pointed at stderr, so a
  stray ``print`` in a library can never corrupt a frame.
* A heartbeat thread sends :class:`Heartbeat` every interval. connectorx releases the GIL while it
  reads, so heartbeats keep flowing during a long query; they stop when the process is frozen
  (SIGSTOP, GIL deadlock). The thread also exits the process when the parent is gone (the channel
  breaks or the parent pid changes), so no worker outlives its task.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

_T0 = time.perf_counter()

import pyarrow as pa  # noqa: E402  (imported after _T0 so start-up cost is measured)

from airflow_provider_cxpg.conninfo import Redactor  # noqa: E402
from airflow_provider_cxpg.worker.chunk import ChunkState, classify, read_chunk, stream_chunk, write_chunk  # noqa: E402
from airflow_provider_cxpg.worker.protocol import (  # noqa: E402
    ChunkDone,
    Configure,
    Failed,
    FrameReader,
    FrameWriter,
    Heartbeat,
    QueryStarted,
    ReadChunk,
    Ready,
    Shutdown,
)

__all__ = ["main"]

EXIT_PARENT_GONE = 70
EXIT_CHANNEL_BROKEN = 71
EXIT_PROTOCOL_ERROR = 72


def _heartbeat_loop(writer: FrameWriter, state: ChunkState, interval: float, parent_pid: int) -> None:
    seq = 0
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:
            os._exit(EXIT_PARENT_GONE)
        seq += 1
        try:
            writer.send(Heartbeat(seq=seq, query_id=state.query_id))
        except OSError:
            os._exit(EXIT_CHANNEL_BROKEN)


def _warm_imports() -> None:
    import pyarrow.compute
    import pyarrow.parquet  # noqa: F401


class _BackgroundWriter:
    """Writes one chunk at a time in a thread, so the next chunk's read overlaps this one's write."""

    def __init__(self, channel: FrameWriter, redact: Redactor) -> None:
        self._channel = channel
        self._redact = redact
        self._thread: threading.Thread | None = None

    def run(self, request: ReadChunk, finish: Callable[[], ChunkDone]) -> None:
        self.wait()  # at most one chunk being written: memory stays at two chunks
        self._thread = threading.Thread(target=self._write, args=(request, finish), name="cxpg-writer", daemon=True)
        self._thread.start()

    def _write(self, request: ReadChunk, finish: Callable[[], ChunkDone]) -> None:
        try:
            self._channel.send(finish())
        except BaseException as exc:  # noqa: BLE001
            error = classify(exc, self._redact)
            tb = self._redact(traceback.format_exc())
            self._channel.send(Failed(query_id=request.query_id, error=error, traceback=tb))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def main() -> None:
    """Serve one parent until it sends :class:`Shutdown` or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_pid = os.getppid()
    channel = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    writer = FrameWriter(channel)
    reader = FrameReader(sys.stdin.buffer)

    import connectorx

    writer.send(
        Ready(
            pid=os.getpid(),
            startup_seconds=time.perf_counter() - _T0,
            versions={"connectorx": connectorx.__version__, "pyarrow": pa.__version__},
        )
    )
    # Ready is sent before Parquet and compute kernels load; they load in the background while the
    # parent sends its first request (the first chunk would otherwise pay ~80 ms for them).
    threading.Thread(target=_warm_imports, name="cxpg-warm", daemon=True).start()
    config = reader.receive()
    if not isinstance(config, Configure):
        os._exit(EXIT_PROTOCOL_ERROR)
    redact = Redactor(config.secrets)
    uri = config.endpoint.connectorx_uri()
    state = ChunkState()
    threading.Thread(
        target=_heartbeat_loop,
        args=(writer, state, config.heartbeat_interval, parent_pid),
        name="cxpg-heartbeat",
        daemon=True,
    ).start()
    background = _BackgroundWriter(writer, redact)

    while True:
        try:
            message = reader.receive()
        except OSError:
            message = None
        if message is None or isinstance(message, Shutdown):
            break
        if isinstance(message, ReadChunk):
            _serve(message, uri, config, state, writer, background, redact)
    background.wait()
    writer.close()
    # os._exit: skip interpreter teardown; connectorx's native threads have nothing left to do.
    os._exit(0)


def _serve(
    request: ReadChunk,
    uri: str,
    config: Configure,
    state: ChunkState,
    writer: FrameWriter,
    background: _BackgroundWriter,
    redact: Redactor,
) -> None:
    state.query_id = request.query_id
    writer.send(QueryStarted(query_id=request.query_id, chunk_index=request.chunk_index))
    finish: Callable[[], ChunkDone]
    try:
        if request.stream_rows > 0:
            read, finish = stream_chunk(request, uri, config.protocol, config.pre_execution)
        else:
            table, read = read_chunk(request, uri, config.protocol, config.pre_execution)
            finish = functools.partial(write_chunk, request, table)
    except BaseException as exc:  # noqa: BLE001  PanicException is a BaseException
        error = classify(exc, redact)
        writer.send(Failed(query_id=request.query_id, error=error, traceback=redact(traceback.format_exc())))
        return
    finally:
        state.query_id = None
    writer.send(read)
    background.run(request, finish)
