"""Reads into the caller's process: chunks as ``pyarrow.Table`` (``iter_chunks``) or one query.

The worker writes each chunk as an Arrow IPC file in a private spool directory (mode 0700); the
parent memory-maps it, so the rows never travel through the pipe and are not copied. Each file is
unlinked as soon as it is mapped; the mapping lives as long as the table's buffers do.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import secrets
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import pyarrow as pa

from airflow_provider_cxpg.conninfo import PostgresEndpoint
from airflow_provider_cxpg.exceptions import ServerConnectionError, WorkerError
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.planning.plan import CTID, SourceSpec, build_read_plan
from airflow_provider_cxpg.querylog import QueryLog
from airflow_provider_cxpg.run.chunking import chunks_for, pipelined
from airflow_provider_cxpg.run.extraction import Extraction
from airflow_provider_cxpg.run.options import DEFAULT_CHUNK_ROWS, DEFAULT_STREAM_ROWS
from airflow_provider_cxpg.run.source_watch import explained_by_changes
from airflow_provider_cxpg.supervisor.credentials import is_authentication_failure
from airflow_provider_cxpg.supervisor.settings import WorkerSettings
from airflow_provider_cxpg.worker.protocol import IpcSink, ReadChunk

__all__ = ["iter_chunk_tables", "map_ipc", "read_query_table"]


def map_ipc(path: str) -> pa.Table:
    """Memory-map an Arrow IPC file as a table and unlink its name."""
    # Not closed here: the table's buffers point into the mapping, which lives as long as they do.
    table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    os.unlink(path)
    return table


def _spool(spool_dir: str | None) -> str:
    spool = tempfile.mkdtemp(prefix="cxpg-spool-", dir=spool_dir)
    os.chmod(spool, 0o700)
    return spool


def _extraction(endpoint: PostgresEndpoint, spec: SourceSpec, **kwargs: Any) -> Extraction:
    # An Extraction gives planning, sessions and logs; its destination is never written.
    return Extraction(endpoint=endpoint, spec=spec, destination=Destination(tempfile.gettempdir()), **kwargs)


#: Iterations not finished yet: closed at interpreter exit (see :func:`_close_live_iterations`).
_LIVE: weakref.WeakSet[Generator[Any, Any, Any]] = weakref.WeakSet()


def _closed_at_exit(fn: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    """Register each generator ``fn`` makes, so that one still suspended at exit is closed in time."""

    @functools.wraps(fn)
    def make(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        generator = fn(*args, **kwargs)
        _LIVE.add(generator)
        return generator

    return make


@atexit.register
def _close_live_iterations() -> None:
    """Close every iteration a program left suspended (a generator in a global, in a cycle).

    Python would close them only while tearing the interpreter down, when the threads that own the
    worker's pipes are frozen: stopping the worker there crashed the process (``Fatal Python error:
    _enter_buffered_busy``) and left the spool directory, a chunk of table rows, in the temporary
    folder. ``atexit`` runs while every thread still can.
    """
    for generator in list(_LIVE):
        with contextlib.suppress(Exception):  # one already running or closed: nothing to do here
            generator.close()


@_closed_at_exit
def iter_chunk_tables(
    *,
    endpoint: PostgresEndpoint,
    spec: SourceSpec,
    settings: WorkerSettings | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    chunk_bytes: int | None = None,
    max_worker_restarts: int = 2,
    lower: Sequence[Any] | None = None,
    upper: Sequence[Any] | None = None,
    snapshot: bool | str = False,
    read_ahead: bool = True,
    stream_rows: int = DEFAULT_STREAM_ROWS,
    querylog: QueryLog | None = None,
    application_name_prefix: str | None = None,
    spool_dir: str | None = None,
    refresh_credentials: Callable[[], PostgresEndpoint] | None = None,
) -> Iterator[pa.Table]:
    """Yield each chunk as a ``pyarrow.Table`` in this process, read by a supervised worker.

    While you process chunk *k*, the worker already reads chunk *k+1*. A dead worker is replaced (up
    to ``max_worker_restarts``) and continues after the last chunk yielded. Closing the generator
    early stops the worker and cancels its query.
    """
    extraction = _extraction(
        endpoint,
        spec,
        settings=settings,
        chunk_rows=chunk_rows,
        chunk_bytes=chunk_bytes,
        max_worker_restarts=max_worker_restarts,
        lower=lower,
        upper=upper,
        snapshot=snapshot,
        read_ahead=read_ahead,
        stream_rows=stream_rows,
        querylog=querylog,
        application_name_prefix=application_name_prefix,
        refresh_credentials=refresh_credentials,
    )
    started = time.monotonic()
    settings = extraction.settings
    job_deadline = started + settings.job_timeout if settings.job_timeout else None
    extraction.job_deadline = job_deadline
    spool = _spool(spool_dir)
    try:
        with contextlib.ExitStack() as stack:
            # As Extraction.run: page ranges are exact only inside one snapshot (an UPDATE moves rows).
            if snapshot is True or (snapshot is False and spec.key_columns == (CTID,)):
                holder = stack.enter_context(extraction.exported_snapshot())
                extraction.snapshot_id = holder.id
            yield from _iterate(
                extraction,
                spec,
                extraction.lower,  # as one list of key values each (a bare value is one column's)
                extraction.upper,
                spool,
                job_deadline,
                extraction.options.max_worker_restarts,
                started,
            )
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _iterate(
    extraction: Extraction,
    spec: SourceSpec,
    lower: Sequence[Any] | None,
    upper: Sequence[Any] | None,
    spool: str,
    job_deadline: float | None,
    max_worker_restarts: int,
    started: float,
) -> Iterator[pa.Table]:
    plan = extraction.build_plan()
    extraction.log.emit(
        "job.start", source=spec.table or "sql", destination="iter_chunks", chunk_rows=extraction.sizer.chunk_rows
    )
    after: Sequence[Any] | None = lower if plan.pages is not None else None
    index = rows = restarts = 0
    renewed_after: int | None = None
    while True:
        try:
            with extraction.new_session(job_deadline) as session:
                watch = extraction.source_watch(session)
                with explained_by_changes(watch):  # a read failing on a changed source says so
                    for query, read, done in pipelined(
                        session,
                        plan,
                        chunks_for(plan, extraction.sizer, after, upper),
                        first_index=index,
                        sizer=extraction.sizer,
                        sink_for=lambda i: IpcSink(os.path.join(spool, f"chunk-{i:06d}-{secrets.token_hex(3)}.arrow")),
                        write_empty_first=index == 0,
                        read_ahead=extraction.options.read_ahead,
                        stream_rows=extraction.options.stream_rows,
                    ):
                        if watch is not None:  # before the chunk is handed out (see Extraction._run_session)
                            watch.check(read.chunk_index)
                        index = read.chunk_index + 1
                        after = query.end if plan.pages is not None else (read.last_key or after)
                        if not done.location:
                            continue
                        table = map_ipc(done.location)
                        rows += table.num_rows
                        yield table
            break
        except WorkerError as exc:
            if restarts >= max_worker_restarts:
                raise
            restarts += 1
            extraction.log.emit(
                "worker.restart",
                attempt=restarts,
                max_worker_restarts=max_worker_restarts,
                after_chunk=index - 1,
                error=f"{type(exc).__name__}: {exc}",
            )
        except ServerConnectionError as exc:  # a refused login: an expired token, renewed once per progress
            if not is_authentication_failure(exc) or renewed_after == index or extraction.credentials.renew() is None:
                raise
            renewed_after = index
            extraction.log.emit(
                "job.plan", note=f"the server refused the login: credentials renewed after {index} chunks"
            )
    extraction.log.emit(
        "job.done",
        rows=rows,
        chunks=index,
        seconds=time.monotonic() - started,
        worker_restarts=restarts,
        destination="iter_chunks",
    )


def read_query_table(
    *,
    endpoint: PostgresEndpoint,
    sql: str,
    settings: WorkerSettings | None = None,
    column_casts: dict[str, str] | None = None,
    querylog: QueryLog | None = None,
    application_name_prefix: str | None = None,
    refresh_credentials: Callable[[], PostgresEndpoint] | None = None,
) -> pa.Table:
    """Run one query in a supervised worker and return the whole result here (no chunking)."""
    extraction = _extraction(
        endpoint,
        SourceSpec(sql=sql, column_casts=dict(column_casts or {})),
        settings=settings,
        querylog=querylog,
        application_name_prefix=application_name_prefix,
        refresh_credentials=refresh_credentials,
    )
    with extraction.control_connection("plan") as conn:
        plan = build_read_plan(conn, sql, column_casts)
    spool = _spool(None)
    try:
        with extraction.new_session(None) as session:
            _, done = session.run(
                ReadChunk(
                    query_id=session.next_query_id(),
                    chunk_index=0,
                    sql=plan.chunk_sql(None, None),
                    sink=IpcSink(os.path.join(spool, "result.arrow")),
                    stream_rows=extraction.options.stream_rows,
                    **plan.request_fields(),
                )
            )
            return map_ipc(done.location)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
