"""The worker's main loop and heartbeat thread.

Process rules, each for a measured reason:

* Before this module loads, :mod:`.boot` has taken the channel (descriptor 1; ``sys.stdout`` goes
  to stderr, so a stray ``print`` in a library can never corrupt a frame), ignored SIGINT
  (connectorx only sees it after a read returns; the parent decides when the worker stops), read
  :class:`Configure` and forked the reaper. SIGTERM keeps its default action, which ends the
  process at once even inside a read.
* A heartbeat thread sends :class:`Heartbeat` every interval. connectorx releases the GIL while it
  reads, so heartbeats keep flowing during a long query; they stop when the process is frozen
  (SIGSTOP, GIL deadlock). Each heartbeat says which storage call runs and for how long.
* When the parent is gone (a SIGKILLed or OOM-killed task process), the run's backends are
  terminated, the worker's query and the parent's planning queries alike (a backend waiting on a
  lock does not notice a vanished client on servers without ``client_connection_check_interval``),
  and the worker exits, so neither outlives the task: a forked reaper (``reaper.py``) does it even
  while a streamed read holds the GIL; the heartbeat thread exits the worker too when it sees the
  parent gone. The parent sends :class:`Configure` right after the spawn, so this holds while the
  parent is still planning.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import traceback
from collections.abc import Callable

import pyarrow as pa

from airflow_provider_cxpg.conninfo import Redactor

# `python -m airflow_provider_cxpg.worker` runs boot() before this module (and pyarrow) loads.
from airflow_provider_cxpg.worker.boot import EXIT_PROTOCOL_ERROR, Boot, boot, finish_imports, wait_for_imports
from airflow_provider_cxpg.worker.chunk import (
    ChunkState,
    classify,
    read_chunk,
    release_as_written,
    stream_chunk,
    write_chunk,
)
from airflow_provider_cxpg.worker.protocol import (
    ChunkDone,
    Configure,
    Credentials,
    Failed,
    FrameWriter,
    Heartbeat,
    QueryStarted,
    ReadChunk,
    Ready,
    Shutdown,
)
from airflow_provider_cxpg.worker.reaper import Reaper, terminate_run_backends
from airflow_provider_cxpg.worker.sinks import STORAGE, set_storage_timeout

__all__ = ["EXIT_CHANNEL_BROKEN", "EXIT_PARENT_GONE", "EXIT_PROTOCOL_ERROR", "main"]

EXIT_PARENT_GONE = 70
EXIT_CHANNEL_BROKEN = 71


def _heartbeat_loop(writer: FrameWriter, state: ChunkState, config: Configure, parent_pid: int) -> None:
    """Check the parent every tick (at most 0.5 s) and send a heartbeat every ``heartbeat_interval``."""
    tick = min(config.heartbeat_interval, 0.5)
    seq, last = 0, 0.0
    while True:
        time.sleep(tick)
        if os.getppid() != parent_pid:
            _parent_gone(config, EXIT_PARENT_GONE)
        now = time.monotonic()
        if now - last < config.heartbeat_interval - 1e-3:
            continue
        seq, last = seq + 1, now
        busy = STORAGE.busy()
        try:
            writer.send(
                Heartbeat(
                    seq=seq,
                    query_id=state.query_id,
                    storage_op=busy[0] if busy else None,
                    storage_seconds=busy[1] if busy else None,
                )
            )
        except OSError:
            _parent_gone(config, EXIT_CHANNEL_BROKEN)


def _parent_gone(config: Configure, code: int) -> None:
    """Exit: the reaper ends the run's backends (or, when it could not be forked or is dead, do it here).

    ``config`` may be the one the caller started with: the current one (a renewed password) is used.
    A reaper killed meanwhile (by anyone: it is a process like any other) would leave the run's
    backends running after the task process died, until the server noticed.
    """
    if _RUN.reaper is None or not _RUN.reaper.alive():
        terminate_run_backends(_RUN.config or config)
    os._exit(code)


class _Run:
    """What the worker's threads share about its run: the current configuration and the reaper."""

    config: Configure | None = None
    reaper: Reaper | None = None


_RUN = _Run()


class _BackgroundWriter:
    """Writes one chunk at a time in a thread, so the next chunk's read overlaps this one's write."""

    def __init__(self, channel: FrameWriter, redact: Redactor) -> None:
        self._channel = channel
        self.redact = redact
        self._thread: threading.Thread | None = None

    def run(self, request: ReadChunk, finish: Callable[[], ChunkDone]) -> None:
        self.wait()  # at most one chunk being written: memory stays under two chunks
        self._thread = threading.Thread(target=self._write, args=(request, finish), name="cxpg-writer", daemon=True)
        self._thread.start()

    def _write(self, request: ReadChunk, finish: Callable[[], ChunkDone]) -> None:  # the writer thread
        try:
            self._channel.send(finish())
        except BaseException as exc:  # noqa: BLE001
            error = classify(exc, self.redact)
            tb = self.redact(traceback.format_exc())
            self._channel.send(Failed(query_id=request.query_id, error=error, traceback=tb))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def main(started: Boot | None = None) -> None:
    """Serve one parent until it sends :class:`Shutdown` or goes away.

    :param started: what :func:`~airflow_provider_cxpg.worker.boot.boot` set up before this module
        was imported (``python -m airflow_provider_cxpg.worker`` does that); None boots now.
    """
    started = started or boot()
    config, writer, reader, parent_pid = started.config, started.writer, started.reader, started.parent_pid
    _RUN.config = config
    _RUN.reaper = started.reaper
    import connectorx

    writer.send(
        Ready(
            pid=os.getpid(),
            startup_seconds=time.perf_counter() - started.started,
            versions={"connectorx": connectorx.__version__, "pyarrow": pa.__version__},
        )
    )
    # Parquet and compute kernels load in the background while the parent sends its first request.
    threading.Thread(target=finish_imports, name="cxpg-warm", daemon=True).start()
    redact = Redactor(config.secrets)
    set_storage_timeout(config.storage_timeout)
    uri = config.endpoint.connectorx_uri()
    state = ChunkState()
    threading.Thread(
        target=_heartbeat_loop,
        args=(writer, state, config, parent_pid),
        name="cxpg-heartbeat",
        daemon=True,
    ).start()
    background = _BackgroundWriter(writer, redact)

    while True:
        try:
            message = reader.receive()
        except OSError:
            message = None
        if message is None:
            _parent_gone(config, EXIT_CHANNEL_BROKEN)  # the parent closed the pipe without a Shutdown
        if isinstance(message, Shutdown):
            break
        if isinstance(message, Credentials):  # connections opened from now on use the new password
            config = Configure(**{**config.__dict__, "endpoint": config.endpoint.with_password(message.password)})
            _RUN.config = config  # for a clean-up from the heartbeat thread
            if _RUN.reaper is not None:
                _RUN.reaper.renewed(message.password)  # and for the reaper's
            redact = Redactor([*redact.secrets, message.password])
            background.redact = redact
            uri = config.endpoint.connectorx_uri()
        elif isinstance(message, ReadChunk):
            _serve(message, uri, config, state, writer, background, redact)
    background.wait()
    if _RUN.reaper is not None:
        _RUN.reaper.stop()
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
    wait_for_imports()  # NumPy importable again before a chunk's code runs (boot.py); at once after the first
    state.query_id = request.query_id
    writer.send(QueryStarted(query_id=request.query_id, chunk_index=request.chunk_index))
    finish: Callable[[], ChunkDone]
    try:
        if request.stream_rows > 0:
            read, finish = stream_chunk(request, uri, config.protocol, config.pre_execution)
        else:
            table, read = read_chunk(request, uri, config.protocol, config.pre_execution)
            finish = functools.partial(write_chunk, request, release_as_written(table))
            del table  # the writer frees each record batch once it is encoded
    except BaseException as exc:  # noqa: BLE001  PanicException is a BaseException
        error = classify(exc, redact)
        writer.send(Failed(query_id=request.query_id, error=error, traceback=redact(traceback.format_exc())))
        return
    finally:
        state.query_id = None
    writer.send(read)
    background.run(request, finish)
