"""Chunked extraction under supervision: plan, read, commit, resume.

:class:`Extraction` copies a source (or one key range of it) to Parquet files with a manifest. The
chunking itself lives in :mod:`~airflow_provider_cxpg.run.chunking`; in-process reads
(``iter_chunks``, ``read_arrow``) in :mod:`~airflow_provider_cxpg.run.reads`.

A dead worker (crash, kill, heartbeat loss) is replaced up to ``max_worker_restarts`` times; the new
worker continues after the last committed chunk. Query errors and deadlines are not retried here:
they fail the task, and Airflow's retry resumes from the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from airflow_provider_cxpg.bounded import CallStopped, CallTimedOut, SerialCalls
from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor, connect
from airflow_provider_cxpg.control import ControlConnection, address_count, connect_deadline
from airflow_provider_cxpg.exceptions import (
    CxpgError,
    DestinationConflictError,
    ExtractionAborted,
    InvalidInputError,
    JobTimeoutError,
    QueryTimeoutError,
    ServerConnectionError,
    StorageError,
    WorkerError,
)
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.output.manifest import (
    DATASET_MANIFEST,
    SUCCESS_MARKER,
    ChunkEntry,
    Manifest,
    chunk_file_name,
    dataset_planning,
    fingerprint,
    read_by_readers,
    source_id,
)
from airflow_provider_cxpg.output.storage_env import WorkerStorage
from airflow_provider_cxpg.output.verify import FOOTER_CHUNK, FOOTER_RUN_ID, check_output, output_problems
from airflow_provider_cxpg.planning.catalog import classify_control_error, describe_query, relation_identity
from airflow_provider_cxpg.planning.incremental import (
    WatermarkSpec,
    Window,
    check_watermark,
    replay_guard,
    resolve_window,
)
from airflow_provider_cxpg.planning.plan import CTID, ExtractPlan, SourceSpec, build_plan, key_to_json
from airflow_provider_cxpg.planning.snapshot import ExportedSnapshot, import_statements
from airflow_provider_cxpg.planning.source_state import SourceState, read_source_state, relabelled
from airflow_provider_cxpg.querylog import QueryLog
from airflow_provider_cxpg.run.chunking import ChunkSizer, chunks_for, pipelined
from airflow_provider_cxpg.run.options import DEFAULT_CHUNK_ROWS, DEFAULT_STREAM_ROWS, ExtractOptions, ParquetOptions
from airflow_provider_cxpg.run.progress import Progress, estimate_rows
from airflow_provider_cxpg.run.source_watch import SourceWatch, explained_by_changes
from airflow_provider_cxpg.supervisor.credentials import CredentialSource, is_authentication_failure
from airflow_provider_cxpg.supervisor.monitor import ActivitySampler, ControlCancels, ServerMonitor
from airflow_provider_cxpg.supervisor.session import WorkerSession
from airflow_provider_cxpg.supervisor.settings import WorkerSettings
from airflow_provider_cxpg.supervisor.watchdog import lock_wait_fields, statement_deadline
from airflow_provider_cxpg.worker.protocol import ParquetSink

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_STREAM_ROWS",
    "SUMMARY_FILES_MAX",
    "ExtractResult",
    "Extraction",
    "key_bound",
    "new_run_id",
    "run_application_name",
]

_T = TypeVar("_T")

#: The XCom summary names every file up to this many; past it, ``files`` is None and
#: ``file_count`` and ``manifest`` (which lists them all) say where they are.
SUMMARY_FILES_MAX = 100
#: How long recording a failure in the manifest may take (the store may be what failed).
_FAILURE_WRITE_SECONDS = 5.0


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


#: Room kept for the suffixes of the run's other connections (``-partition``, ``-ctl``, ``-w12``...).
_SUFFIX_BYTES = 16


class _ControlStatements:
    """A control connection as planning code sees it: ``execute`` and ``info``, nothing else.

    A statement refuses to start once the run was aborted: ``on_kill`` cancels the statement
    running at that instant, and without this the planning step's *next* statement (a ``max()``
    scan, a describe waiting on a lock) would start and run on. Each statement waits at most the
    run's statement deadline (:meth:`Extraction.statement_deadline`) on the client side: the server's
    ``statement_timeout`` answer may never arrive (a gateway that accepts packets and returns nothing).
    """

    def __init__(self, control: ControlConnection, extraction: Extraction, purpose: str, sampler: ActivitySampler):
        self._control, self._extraction, self._purpose, self._sampler = control, extraction, purpose, sampler

    def _aborted(self) -> str | None:
        return self._extraction._aborted

    def execute(self, query: Any, params: Any = None) -> Any:
        reason = self._aborted()
        if reason:
            raise ExtractionAborted.because(reason)
        timeout, limit = self._extraction.statement_deadline()
        started = time.monotonic()
        try:
            return self._control.execute(
                query, params, timeout=timeout, what=f"the {self._purpose} query", stop=self._aborted
            )
        except CallStopped as stopped:
            raise ExtractionAborted.because(stopped.reason) from None
        except CallTimedOut:
            raise self._extraction.control_timed_out(
                self._purpose, limit, time.monotonic() - started, self._sampler
            ) from None

    @property
    def info(self) -> Any:
        return self._control.info


def key_bound(value: Any) -> list[Any] | None:
    """A key bound as a list of key values: ``None``, a list or tuple, or one value for the first column.

    One value is one column's value: a string is never taken apart into characters (a templated
    ``upper_key="{{ params.hi }}"`` renders to a string; read as a sequence, ``"12"`` bounded a
    composite key at ``(1, 2)`` instead of ``(12)``, and the run ended green without the rows past it).
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def run_application_name(run_id: str, prefix: str | None = None, worker: int | None = None) -> str:
    """A unique ``application_name`` for a run's connections (found again in ``pg_stat_activity``).

    The server keeps 63 *bytes* of it, and shows a byte outside printable ASCII as ``?`` (up to
    PostgreSQL 15) or as ``\\xNN`` (16 and later, which can push the run's part past the cut). So the
    user's prefix is made printable ASCII (other characters become ``_``) and cut so that the unique
    part and every suffix the run adds always fit: otherwise the run's connections would not be told
    apart and its monitor would look for a name the server never shows.
    """
    suffix = f"cxpg-{run_id}" + (f"-w{worker}" if worker is not None else "")
    if not prefix:
        return suffix
    printable = "".join(c if " " <= c <= "~" else "_" for c in prefix)
    room = 63 - _SUFFIX_BYTES - len(suffix) - 1
    kept = printable[: max(room, 0)]
    return f"{kept}-{suffix}" if kept else suffix


@dataclass
class ExtractResult:
    """What an extraction produced; :meth:`summary` is the XCom-sized form."""

    run_id: str
    destination: str
    rows: int
    chunks: int
    files: list[str]
    bytes: int
    first_key: list[Any] | None
    last_key: list[Any] | None
    seconds: float
    manifest: str
    resumed_from_chunk: int | None = None
    worker_restarts: int = 0
    high_watermark: Any = None
    window: dict[str, Any] | None = None
    window_summary: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The XCom summary: small whatever the table's size (see :data:`SUMMARY_FILES_MAX`)."""
        data = {
            "rows": self.rows,
            "chunks": self.chunks,
            "files": self.files if len(self.files) <= SUMMARY_FILES_MAX else None,
            "file_count": len(self.files),
            "destination": self.destination,
            "first_key": self.first_key,
            "last_key": self.last_key,
            "high_watermark": self.high_watermark,
            "seconds": round(self.seconds, 3),
            "run_id": self.run_id,
            "bytes": self.bytes,
            "manifest": self.manifest,
            "resumed_from_chunk": self.resumed_from_chunk,
            "worker_restarts": self.worker_restarts,
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds else None,
        }
        if self.window is not None:
            data["window"] = self.window_summary or self.window
            data["watermark_contract"] = self.window.get("contract")
        data.update(self.extra)
        return data


def _refuse_log_among_output(querylog: QueryLog | None, destination: Destination) -> None:
    """A query log written inside the destination is a file every dataset reader reads as data."""
    path = querylog.jsonl_path if querylog is not None else None
    if path is None or not destination.is_local:
        return
    relative = os.path.relpath(os.path.abspath(path), destination.root)
    first = relative.split(os.sep, 1)[0]
    if first != ".." and not first.startswith(("_", ".")):
        raise InvalidInputError(
            f"query_log_path {path} lies inside the destination {destination.url}, where every dataset reader "
            "would read it as data: write it elsewhere, or name it (or its folder there) starting with '_'",
            destination=destination.url,
        )


class Extraction:
    """Copy one source (or one key range of it) to Parquet files plus a manifest.

    :param endpoint: the server (credentials included); session options are added per run.
    :param spec: the source.
    :param destination: where files go.
    :param settings: worker deadlines and intervals.
    :param chunk_rows: rows per chunk (maximum, when ``chunk_bytes`` is set).
    :param chunk_bytes: target Arrow bytes per chunk; sizes chunks from the measured row width.
    :param compression: Parquet codec (``zstd`` default).
    :param row_group_rows: Parquet row-group size.
    :param parquet_dictionary: ``"auto"`` (default): dictionary-encode only the columns whose first
        row group of each file is repetitive (at most half distinct values); True/False: all or none.
    :param max_worker_restarts: replace a dead worker this many times before failing.
    :param extra_filters: SQL conditions added to every chunk (incremental windows).
    :param lower: exclusive lower key bound; ``upper``: inclusive upper key bound (partitions).
    :param watermark: read only an incremental window (see
        :mod:`~airflow_provider_cxpg.planning.incremental`); a resumed run
        reuses the window its manifest recorded.
    :param resume: continue a matching unfinished manifest at the destination (default True).
    :param snapshot: read every chunk from one exported snapshot (a point-in-time copy, see
        :mod:`~airflow_provider_cxpg.planning.snapshot`): True exports one for this run; a string
        imports an existing snapshot id
        (parallel workers share their parent's). Page ranges (``key_columns=["ctid"]``) always read
        from one: they are exact only inside a snapshot.
    :param read_ahead: with ``stream_rows=0``: read chunk *k+1* while chunk *k* is written (the
        worker holds two chunks); False holds one.
    :param stream_rows: 0 (default) reads each chunk as one table; N > 0 streams each chunk from
        connectorx in batches of N rows and writes them as they arrive (memory bounded by batches
        and one row group whatever ``chunk_rows``; measured slower, see docs/architecture.md).
    :param querylog: event sink; a default one is created.
    :param application_name_prefix: kept in front of the run's unique application name.
    :param owner: who runs this extraction (``dag_id.task_id``): it may replace its own earlier output
        at the destination even when the source differs (see :mod:`~airflow_provider_cxpg.output.manifest`).
    :param dag_run_id: the Airflow DAG run this extraction belongs to (None: none). An unfinished
        extraction at the destination is continued only by its own DAG run (a retry, a cleared task):
        another DAG run's was read at another time, and is replaced by a whole new read.
    :param refresh_credentials: returns a freshly resolved endpoint (a new IAM token); used when the
        password is older than ``settings.credentials_refresh_interval`` and once after a refused login.
    :param options: the chunking, restart and Parquet arguments above as one validated object; when
        given, those keyword arguments are not read.
    """

    def __init__(
        self,
        *,
        endpoint: PostgresEndpoint,
        spec: SourceSpec,
        destination: Destination,
        settings: WorkerSettings | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        chunk_bytes: int | None = None,
        compression: str = "zstd",
        row_group_rows: int = 65_536,
        parquet_dictionary: bool | str = "auto",
        max_worker_restarts: int = 2,
        extra_filters: Sequence[str] = (),
        lower: Sequence[Any] | None = None,
        upper: Sequence[Any] | None = None,
        watermark: WatermarkSpec | None = None,
        resume: bool = True,
        snapshot: bool | str = False,
        read_ahead: bool = True,
        stream_rows: int = DEFAULT_STREAM_ROWS,
        run_id: str | None = None,
        querylog: QueryLog | None = None,
        application_name_prefix: str | None = None,
        worker_index: int = 0,
        owner: str | None = None,
        dag_run_id: str | None = None,
        refresh_credentials: Callable[[], PostgresEndpoint] | None = None,
        options: ExtractOptions | None = None,
    ) -> None:
        endpoint.check_worker_tls()  # before any data moves: the worker must verify what libpq verifies
        _refuse_log_among_output(querylog, destination)
        self.endpoint = endpoint
        self.owner = owner
        self.dag_run_id = dag_run_id
        self.spec = spec
        self.destination = destination
        self.settings = settings or WorkerSettings()
        destination.timeout = self.settings.storage_timeout
        self._aborted: str | None = None
        destination.stop = lambda: self._aborted  # on_kill ends a wait on the store at once
        self._storage: WorkerStorage | None = None
        self._storage_calls = SerialCalls("storage-credentials")
        if not destination.is_local:
            # The first resolution may ask STS or a credentials endpoint too (web identity credentials
            # are fetched on first use): botocore's own retries over a silent endpoint take minutes.
            self._storage = self._resolve_credentials(
                lambda: WorkerStorage(destination.url, destination.storage_options)
            )
            env = {**self._storage.env, **self.settings.worker_env}
            self.settings = dataclasses.replace(self.settings, worker_env=env)
        #: Validated once, here (run/options.py): every door into an extraction passes through it.
        self.options = options or ExtractOptions(
            chunk_rows=chunk_rows,
            chunk_bytes=chunk_bytes,
            stream_rows=stream_rows,
            read_ahead=read_ahead,
            max_worker_restarts=max_worker_restarts,
            parquet=ParquetOptions(compression, row_group_rows, parquet_dictionary),
        )
        self.sizer = ChunkSizer(self.options.chunk_rows, self.options.chunk_bytes)
        self.extra_filters = tuple(extra_filters)
        self.lower = key_bound(lower)
        self.upper = key_bound(upper)
        self.watermark = watermark
        self.window: Window | None = None
        self.resume = resume
        self.snapshot = snapshot
        self.snapshot_id: str | None = snapshot if isinstance(snapshot, str) else None
        self.run_id = run_id or new_run_id()
        self.redactor = Redactor([*endpoint.secrets(), *self._storage_secrets(self.sink_options())])
        self.credentials = CredentialSource(
            endpoint, refresh_credentials, self.settings.credentials_refresh_interval, self.redactor
        )
        self.log = querylog or QueryLog(self.run_id, redactor=self.redactor)
        self.log.with_redactor(self.redactor)
        self.application_name = run_application_name(self.run_id, application_name_prefix, None)
        self.worker_index = worker_index
        self._session: WorkerSession | None = None
        self._cancels = ControlCancels(self.settings.cancel_grace)  # the control connections' running queries
        #: When the whole run must end (``job_timeout``), set when it starts; planning honours it too.
        self.job_deadline: float | None = None
        self.plan: ExtractPlan | None = None
        #: The table source as the plan saw it, compared after every chunk read (None: a query source).
        self.planned_source: SourceState | None = None
        #: The relation a table source resolved to, recorded in the manifest (see ``relation_identity``).
        self.relation: dict[str, Any] | None = None
        self.estimated_rows: int | None = None

    # -- storage -----------------------------------------------------------------------------------

    def sink_options(self) -> dict[str, Any]:
        """The fsspec options for the next chunk file (object-store credentials renewed as they expire).

        A renewal (botocore asking STS or a credentials endpoint) runs under ``control_timeout``.
        """
        if self._storage is None:
            return dict(self.destination.storage_options)
        return self._resolve_credentials(self._storage.options)

    def _resolve_credentials(self, resolve: Callable[[], _T]) -> _T:
        """``resolve()`` under ``control_timeout`` (on a helper thread: botocore's calls cannot be interrupted)."""
        try:
            return self._storage_calls.call(
                "resolving the object store's credentials", resolve, self.settings.control_timeout
            )
        except CallTimedOut as exc:
            raise StorageError(f"{exc}: the credentials service does not answer", limit="control_timeout") from None

    @staticmethod
    def _storage_secrets(options: dict[str, Any]) -> list[str]:
        return WorkerStorage.secrets_of(options)

    def _sink(self, manifest: Manifest, index: int) -> ParquetSink:
        options = self.sink_options()
        self.redactor.add(*self._storage_secrets(options))  # renewed keys are secrets too
        return ParquetSink(
            url=self.destination.child_url(chunk_file_name(index)),
            storage_options=options,
            compression=self.options.parquet.compression,
            row_group_rows=self.options.parquet.row_group_rows,
            dictionary=self.options.parquet.dictionary,
            metadata={FOOTER_RUN_ID: manifest.run_id, FOOTER_CHUNK: str(index)},
        )

    # -- control -----------------------------------------------------------------------------------

    def session_endpoint(self) -> PostgresEndpoint:
        timeout = self.settings.query_timeout
        return self.credentials.current().with_session(
            application_name=self.application_name,
            statement_timeout_ms=int(timeout * 1000) if timeout is not None else 0,
        )

    def abort(self, reason: str) -> None:
        """Stop now (``on_kill``): safe to call from a signal handler in the thread running :meth:`run`.

        Only lock-free steps happen here (the flag, SIGTERM to the worker, see
        :meth:`WorkerSession.interrupt`); the thread running :meth:`run` cancels the server query,
        reaps the worker and raises :class:`ExtractionAborted` as soon as the handler returns.
        """
        self._aborted = reason
        session = self._session
        if session is not None:
            session.interrupt(reason)
        # A planning query may be waiting on a lock for up to query_timeout: have it cancelled (on a
        # helper thread: a cancel request can block on a dead network, a signal handler must not).
        self._cancels.cancel_all_soon()

    def statement_deadline(self) -> tuple[float | None, str]:
        """How long the parent's next statement may wait, and the setting that bounds it (see
        :func:`~airflow_provider_cxpg.supervisor.watchdog.statement_deadline`)."""
        return statement_deadline(self.settings, self.job_deadline, time.monotonic())

    def control_timed_out(
        self, purpose: str, limit: str, seconds: float, sampler: ActivitySampler | None = None
    ) -> CxpgError:
        """The error (and the ``query.timeout`` event) for a control statement that did not return in time."""
        backends = sampler.last_active() or sampler.latest() if sampler is not None else None
        activity = "; ".join(b.describe() for b in backends) if backends else "unknown (the server did not answer)"
        self.log.emit(
            "query.timeout", phase=purpose, seconds=seconds, limit=limit, enforced_by="parent", server_activity=activity
        )
        setting = self.settings.job_timeout if limit == "job_timeout" else self.settings.query_timeout
        message = f"the {purpose} query did not return within {seconds:.1f}s ({limit}={setting}s); server: {activity}"
        error = JobTimeoutError if limit == "job_timeout" else QueryTimeoutError
        return error(message, limit=limit, server_activity=activity)

    @contextlib.contextmanager
    def control_connection(self, purpose: str) -> Iterator[Any]:
        """A control connection for the parent's own queries, each under :meth:`statement_deadline`.

        While it is open a thread reports lock waits of its backend (and who holds the lock);
        server errors on it become provider errors (timeouts as :class:`QueryTimeoutError`, bad SQL
        as invalid input). Whatever ends the block abnormally (an error, a deadline,
        ``AirflowTaskTimeout``, ``KeyboardInterrupt``) cancels the query on the server before the
        connection closes; a statement still running then is given up (see :mod:`~airflow_provider_cxpg.control`).
        """
        app = f"{self.application_name}-{purpose}"
        timeout = self.settings.query_timeout
        limit_ms = int(timeout * 1000) if timeout is not None else 0
        control = self._connect_control(app, limit_ms)
        key = self._cancels.register(control)
        sampler = ActivitySampler(
            ServerMonitor(self.credentials.current(), app, self.redactor, call_timeout=self.settings.control_timeout),
            lambda b: self.log.emit("server.waiting", phase=purpose, sql=b.query, **lock_wait_fields(b)),
            interval=self.settings.monitor_interval,
            after=self.settings.report_wait_after,
            every=self.settings.report_wait_every,
        )
        statements = _ControlStatements(control, self, purpose, sampler)
        try:
            if self._aborted:
                raise ExtractionAborted.because(self._aborted)
            with sampler:
                try:
                    if self.snapshot_id:  # the window's end and the plan see what every chunk will see
                        for statement in import_statements(self.snapshot_id):
                            statements.execute(statement)
                    yield statements
                except BaseException as exc:
                    self._cancels.cancel(key, self.settings.cancel_grace)  # the query may still run
                    if not isinstance(exc, Exception):
                        raise
                    if self._aborted and not isinstance(exc, ExtractionAborted):
                        # abort() cancelled the query: what failed is the echo of that, report the abort
                        raise ExtractionAborted.because(self._aborted) from exc
                    if isinstance(exc, CxpgError):
                        raise
                    if type(exc).__module__.startswith("psycopg"):
                        raise classify_control_error(exc, f"{purpose} query") from None
                    raise
        finally:
            self._cancels.unregister(key)
            control.close(self.settings.control_timeout)  # gives the connection up if a statement still runs

    def _connect_control(self, application_name: str, limit_ms: int) -> ControlConnection:
        """Connect; a refused login renews the credentials once (an expired token) and tries again."""
        try:
            return self._open_control(application_name, limit_ms)
        except ServerConnectionError as exc:
            if not (is_authentication_failure(exc) and self.credentials.renewable and self.credentials.renew()):
                raise
            self.log.emit("job.plan", note="the server refused the login: credentials renewed, connecting again")
            return self._open_control(application_name, limit_ms)

    def _open_control(
        self, application_name: str, limit_ms: int, settings: dict[str, str] | None = None
    ) -> ControlConnection:
        """A :class:`ControlConnection` to the server, connected under a client-side deadline.

        libpq's ``connect_timeout`` (``control_timeout``) bounds each address it tries; the name's
        resolution is not bounded by it. The deadline allows one ``control_timeout`` for resolving
        the name, one for each address it resolves to, and ``deadline_grace``.
        """
        endpoint = self.credentials.current().with_session(application_name=application_name)
        timeout = self.settings.control_timeout
        addresses = address_count(endpoint.host, endpoint.port, timeout)
        names = endpoint.host.count(",") + 1  # a host list: libpq resolves each name as it reaches it
        limit = connect_deadline(addresses, timeout, self.settings.deadline_grace, names=names)
        try:
            return ControlConnection.open(
                lambda: connect(
                    endpoint,
                    statement_timeout_ms=limit_ms,
                    connect_timeout=self.settings.control_timeout,
                    settings=settings,
                ),
                timeout=limit,
                name=f"control-{application_name.rsplit('-', 1)[-1]}",
                stop=lambda: self._aborted,
            )
        except CallStopped as stopped:
            raise ExtractionAborted.because(stopped.reason) from None
        except CallTimedOut:
            raise ServerConnectionError(
                f"connecting to {endpoint.redacted_uri()} did not finish within {limit:.0f}s "
                "(a name that does not resolve, a gateway that does not answer)",
                endpoint=endpoint.redacted_uri(),
                reason="connect_timeout",
            ) from None

    def exported_snapshot(self) -> ExportedSnapshot:
        """The run's snapshot holder: its connection opened and its statements run under deadlines."""
        app = f"{self.application_name}-snap"
        limit = self.settings.control_timeout
        return ExportedSnapshot(
            # The transaction stays open for the run: no idle-in-transaction timeout may end it.
            lambda: self._open_control(app, int(limit * 1000), settings={"idle_in_transaction_session_timeout": "0"}),
            timeout=limit + self.settings.deadline_grace,
            stop=lambda: self._aborted,
        )

    def build_plan(self) -> ExtractPlan:
        """Validate the source against the server; raise before any data moves."""
        with self.control_connection("plan") as conn:
            plan = build_plan(conn, self.spec).with_filters(*self.extra_filters, *self._planned_replay())
            if plan.pages is None and (self.lower is not None or self.upper is not None):
                plan = plan.with_key_range(self.lower, self.upper)
            if plan.table is not None:  # inside the run's snapshot, when it has one: what its reads will see
                watched = [c.name for c in plan.columns] + [k.name for k in plan.key]
                if self.watermark is not None and self.watermark.column != "xmin":
                    watched.append(self.watermark.column)
                self.planned_source = read_source_state(conn, plan.table.qualified_name, sorted(set(watched)))
                self.relation = relation_identity(conn, plan.table)
        for note in plan.notes:
            self.log.emit("job.plan", note=note)
        self.plan = plan
        return plan

    def _planned_replay(self) -> tuple[str, ...]:
        """A range of a fan-out reads only on a server that has replayed the WAL position it was planned
        at. The planner and each range are tasks of their own, each reaching its own server (a host
        list, a load balancer): a range read on a standby behind the planner's server missed rows the
        plan counted on, and the validator, counting on it too, agreed."""
        planning = dataset_planning(self.destination)
        position = planning[1].get("wal_position") if planning is not None else None
        return (replay_guard(position, "its key ranges were planned"),) if position else ()

    def windowed(self, plan: ExtractPlan, recorded: dict[str, Any] | None) -> ExtractPlan:
        """Fix the incremental window (or reuse ``recorded``) and check one full chunk statement."""
        with self.control_connection("plan") as conn:
            if self.watermark is not None:
                spec = self.watermark if recorded is None else WatermarkSpec.again(recorded)
                self.window = resolve_window(conn, plan, spec)
                plan = plan.with_filters(*self.window.filters)
                self.log.emit(
                    "job.plan",
                    watermark=self.window.column,
                    window_start=self.window.start,
                    window_end=self.window.end,
                    start_inclusive=self.window.start_inclusive,
                    end_mode=self.window.end_mode,
                    contract=self.window.contract,
                    note=self.window.note,
                )
            # Describe (never run) one complete chunk statement: window filters and key bounds are
            # checked by the server here, before any worker starts.
            probe = plan.page_sql(0, 0) if plan.pages is not None else plan.chunk_sql(None, 0)
            describe_query(conn, probe)
            self.estimated_rows = estimate_rows(conn, plan)
        return plan

    def fingerprint(self, plan: ExtractPlan) -> str:
        parts = {
            "source": plan.source.describe(),
            "key": list(plan.key_names),
            "schema": plan.describe_schema(),
            "lower": key_to_json(self.lower),
            "upper": key_to_json(self.upper),
            "compression": self.options.parquet.compression,
            "filters": list(self.extra_filters),
            "watermark": self.watermark.identity() if self.watermark else None,
        }
        if plan.table is not None:
            parts["relation"] = self.relation_parts(plan)
        if self.planned_source is not None:
            # Nor after its columns or a view's definition changed in a way the names and types do not
            # show: a key renamed into another column's place pages by other values (source_state.py).
            parts["source_state"] = self.planned_source.identity()
        order = plan.key_order()
        if order is not None:  # a text key resumes only in the order it was paged in
            parts["key_order"] = order
        return fingerprint(parts)

    def enum_labels(self) -> list[list[str]] | None:
        """The labels of the enum values the planned columns can hold (None: none, or a query source)."""
        labels = self.planned_source.labels if self.planned_source is not None else ()
        return [list(label) for label in labels] or None

    def _read_again(self, unfinished: Manifest, plan: ExtractPlan) -> str | None:
        """Why an unfinished extraction of this fingerprint is read again rather than continued (None: it
        is continued, if its committed files are still as committed)."""
        if plan.pages is not None:
            # Page ranges are exact only inside the one snapshot they were read in, and that ended with
            # the attempt that held it: an UPDATE since may have moved a row onto a page already read
            # (lost) or off one (read twice). A new attempt reads every page again, in its own snapshot.
            return "page ranges (ctid) cannot continue in a new snapshot: reading every page again"
        if unfinished.dag_run_id != self.dag_run_id:
            # A failed run of another DAG run (yesterday's, into a destination every run reuses): its
            # chunks hold the source as it was then, rows since deleted or changed among them.
            return (
                f"the unfinished extraction here belongs to DAG run {unfinished.dag_run_id!r}, this is "
                f"{self.dag_run_id!r}: reading everything again"
            )
        renamed = relabelled(unfinished.enum_labels or [], self.enum_labels() or [])
        if renamed:
            return "its chunks hold enum values under labels renamed since: reading everything again; " + (
                "; ".join(renamed)
            )
        return None

    def relation_parts(self, plan: ExtractPlan) -> list[Any]:
        """The relation a table source's name resolved to, as a fingerprint holds it.

        Not the name as given: a retry must not continue in another table (the same name found first
        on the search_path, or dropped and created again), nor in the same OID of another database
        (``CREATE DATABASE ... TEMPLATE``, or two databases built by the same migrations) or cluster.
        """
        assert plan.table is not None
        where = self.relation or {}
        return [plan.table.schema, plan.table.name, plan.table.oid, where.get("database"), where.get("cluster")]

    # -- run ---------------------------------------------------------------------------------------

    def run(self) -> ExtractResult:
        """Extract everything (resuming when possible) and return the result.

        However the run ends abnormally (an error, a deadline, ``on_kill``, ``AirflowTaskTimeout``,
        ``KeyboardInterrupt``), the server queries are cancelled, the worker is stopped, the manifest
        says ``failed`` and ``job.failed`` names the real reason.
        """
        started = time.monotonic()
        job_deadline = started + self.settings.job_timeout if self.settings.job_timeout else None
        self.job_deadline = job_deadline
        self.log.emit(
            "job.start",
            source=self.spec.table or "sql",
            destination=self.destination.url,
            chunk_rows=self.sizer.chunk_rows,
        )
        self._manifest: Manifest | None = None
        try:
            with contextlib.ExitStack() as stack:
                # Page ranges are exact only inside one snapshot: an UPDATE moves a row to another
                # page, onto one not yet read (read twice) or one already read (missed).
                if self.snapshot is True or (self.snapshot is False and self.spec.key_columns == (CTID,)):
                    holder = stack.enter_context(self.exported_snapshot())
                    self.snapshot_id = holder.id
                    self.log.emit("job.plan", snapshot=holder.id, note="all chunks read from one exported snapshot")
                return self._run(started, job_deadline)
        except BaseException as exc:
            self._fail(self._manifest, exc)
            if self._aborted and not isinstance(exc, ExtractionAborted):
                # on_kill cancelled the query: what failed is the echo of that, report the abort
                raise ExtractionAborted.because(self._aborted) from exc
            raise

    def _run(self, started: float, job_deadline: float | None) -> ExtractResult:
        # The worker imports connectorx while the parent plans: ~0.2 s less per run.
        prespawned: WorkerSession | None = self._spawned_session(job_deadline)
        assert prespawned is not None
        try:
            plan = self.plan or self.build_plan()
            if self.watermark is not None:
                check_watermark(plan, self.watermark)  # bad input: refused before anything is written
            manifest, resumed_from = self._open_manifest(plan)
            self._manifest = manifest
            plan = self.windowed(plan, manifest.window if resumed_from is not None else None)
            if self.window is not None and manifest.window is None:
                manifest.window = self.window.to_json()
                manifest.save(self.destination)
        except BaseException as exc:
            prespawned.stop(reason=self._aborted or type(exc).__name__)
            raise
        self._progress = Progress(
            self.log, self.estimated_rows, rows_before=manifest.rows, worker=self.worker_index or None
        )
        restarts = 0
        renewed_after: int | None = None  # committed chunks when the login was last refused
        while True:
            if self._aborted:
                if prespawned is not None:
                    prespawned.stop(reason=self._aborted)
                raise ExtractionAborted.because(self._aborted)
            try:
                session, prespawned = prespawned or self._spawned_session(job_deadline), None
                self._run_session(session, plan, manifest)
                break
            except WorkerError as exc:
                if self._aborted:
                    raise ExtractionAborted.because(self._aborted) from exc
                if restarts >= self.options.max_worker_restarts:
                    raise
                restarts += 1
                self.log.emit(
                    "worker.restart",
                    attempt=restarts,
                    max_worker_restarts=self.options.max_worker_restarts,
                    after_chunk=manifest.chunks[-1].index if manifest.chunks else None,
                    error=f"{type(exc).__name__}: {exc}",
                )
            except ServerConnectionError as exc:
                # A refused login mid-run is an expired token: renew it once per progress, go on.
                progress = len(manifest.chunks)
                if self._aborted or not is_authentication_failure(exc) or renewed_after == progress:
                    raise
                if not self.credentials.renewable or self.credentials.renew() is None:
                    raise
                renewed_after = progress
                self.log.emit(
                    "job.plan",
                    note=f"the server refused the login: credentials renewed; continuing after {progress} chunks",
                )
        if self._aborted:  # on_kill during the last chunk: the task must fail, not end green (a retry resumes)
            raise ExtractionAborted.because(self._aborted)
        self._progress.chunk(manifest.rows, final=True)
        for name in manifest.stray_files(self.destination.list_names()):  # a killed try's, unlisted
            self.destination.remove(name)
        # a complete manifest promises its files: check them, not its own sums; and nothing else a reader reads
        check_output(self.destination, manifest)
        manifest.status = "complete"
        manifest.completed_at = manifest.updated_at
        manifest.error = None
        manifest.save(self.destination)
        self.destination.write_marker(SUCCESS_MARKER)  # last: readers see it only over a complete output
        seconds = time.monotonic() - started
        result = ExtractResult(
            run_id=manifest.run_id,
            destination=self.destination.url,
            rows=manifest.rows,
            chunks=len(manifest.chunks),
            files=[self.destination.child_url(f) for f in manifest.files],
            bytes=manifest.bytes,
            first_key=manifest.first_key,
            last_key=manifest.last_key,
            seconds=seconds,
            manifest=self.destination.child_url("_manifest.json"),
            resumed_from_chunk=resumed_from,
            worker_restarts=restarts,
            window=self.window.to_json() if self.window else None,
            window_summary=self.window.summary() if self.window else None,
            high_watermark=self.window.high_watermark if self.window else None,
        )
        self.log.emit(
            "job.done",
            rows=result.rows,
            chunks=result.chunks,
            bytes=result.bytes,
            seconds=seconds,
            worker_restarts=restarts,
            destination=self.destination.url,
        )
        return result

    def _spawned_session(self, job_deadline: float | None) -> WorkerSession:
        """A new session with its worker spawned; a refused login renews the credentials once."""
        session = self.new_session(job_deadline)
        try:
            session.spawn()
        except ServerConnectionError as exc:
            if not (is_authentication_failure(exc) and self.credentials.renewable and self.credentials.renew()):
                raise
            self.log.emit("job.plan", note="the server refused the login: credentials renewed, connecting again")
            session = self.new_session(job_deadline)
            session.spawn()
        return session

    def _fail(self, manifest: Manifest | None, exc: BaseException) -> None:
        """Record the failure: the manifest says ``failed`` (best effort), ``job.failed`` says why."""
        reason = self._aborted or type(exc).__name__
        error = self.redactor(f"{type(exc).__name__}: {exc}")[:2000]
        if manifest is not None and manifest.status != "complete":
            with contextlib.suppress(Exception):
                # best effort, briefly: the store may be what failed, and a retry resumes from
                # "running" as from "failed"; written after the abort
                limit = min(self.destination.timeout or _FAILURE_WRITE_SECONDS, _FAILURE_WRITE_SECONDS)
                if manifest.overtaken_by(Manifest.load(self.destination, timeout=limit, abortable=False)):
                    self.log.emit("job.plan", note="another attempt wrote this destination since: its manifest stays")
                else:
                    manifest.status = "failed"
                    manifest.error = error
                    manifest.save(self.destination, timeout=limit, abortable=False)
        self.log.emit("job.failed", reason=reason, error=error)

    def source_id(self, plan: ExtractPlan) -> str:
        table = (plan.table.schema, plan.table.name) if plan.table is not None else None
        return source_id(table, plan.source.sql)

    def _open_manifest(self, plan: ExtractPlan) -> tuple[Manifest, int | None]:
        """Resume the destination's unfinished extraction, or replace what is there by a new one.

        :raises DestinationConflictError: the destination holds another source's output, files no
            manifest accounts for, or a fanned-out dataset.
        """
        self.destination.ensure()
        fp = self.fingerprint(plan)
        sid = self.source_id(plan)
        existing = Manifest.load(self.destination)
        entries = self.destination.list_entries()
        if existing is None and "_dataset_manifest.json" in entries:
            raise DestinationConflictError(
                f"{self.destination.url} holds a fanned-out dataset (_dataset_manifest.json): extract to another "
                "destination, or remove it first",
                destination=self.destination.url,
            )
        names = list(entries)
        own = {*existing.files, *existing.stray_files(names)} if existing is not None else set()
        foreign = read_by_readers(
            [n for n in names if n not in own], [d for d in self.destination.list_dirs() if d not in own]
        )
        if foreign:
            # Every dataset reader would read them beside this run's files (another tool's output, a
            # chunk copied beside its original): rows of another run, or rows twice, under _SUCCESS.
            raise DestinationConflictError(
                f"{self.destination.url} holds files no manifest accounts for ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}), which every dataset reader would read: not taking it "
                "over; remove them or choose another destination",
                destination=self.destination.url,
            )
        unfinished = existing if existing is not None and self.resume and existing.resumable_by(fp) else None
        read_again = self._read_again(unfinished, plan) if unfinished is not None else None
        if unfinished is not None and read_again:
            self.log.emit("job.resume", resumed_extraction_id=unfinished.run_id, note=read_again)
        elif unfinished is not None:
            problems = output_problems(self.destination, unfinished)
            if not problems:
                self._unmark(entries)
                unfinished.attempts += 1
                unfinished.status = "running"
                unfinished.save(self.destination)
                self.log.emit(
                    "job.resume",
                    resumed_extraction_id=unfinished.run_id,
                    chunks=len(unfinished.chunks),
                    rows=unfinished.rows,
                    key_from=unfinished.last_key,
                )
                return unfinished, unfinished.next_index
            self.log.emit(
                "job.resume",
                resumed_extraction_id=unfinished.run_id,
                note="committed chunks were damaged since: starting over; " + "; ".join(problems[:5]),
            )
        # a finished or different extraction of the same source is replaced; another source's is not
        if existing is not None and not existing.same_source(sid, self.owner):
            other = existing.source_id or existing.source
            raise DestinationConflictError(
                f"{self.destination.url} holds the output of another source ({other}, written by "
                f"{existing.owner or 'an extraction'}, run {existing.run_id}): not replacing it; "
                "choose another destination or remove it first",
                destination=self.destination.url,
                existing_source=existing.source_id,
            )
        self._unmark(entries)  # before any file goes: a reader must never see _SUCCESS over a partial output
        manifest = Manifest(
            run_id=self.run_id,
            fingerprint=fp,
            source=plan.source.describe(),
            key_columns=list(plan.key_names),
            schema=plan.describe_schema(),
            chunk_rows=self.sizer.chunk_rows,
            bounds={"lower": key_to_json(self.lower), "upper": key_to_json(self.upper)}
            if self.lower is not None or self.upper is not None
            else None,
            source_id=sid,
            owner=self.owner,
            relation=self.relation,
            dag_run_id=self.dag_run_id,
            enum_labels=self.enum_labels(),
        )
        # The new record first: a removal that fails (or is interrupted) half-way must leave a manifest
        # that says "running", never the old one still saying "complete" over files that are gone.
        manifest.save(self.destination)
        for name in existing.files if existing is not None else ():
            self.destination.remove(name)
        for name in manifest.stray_files(self.destination.list_names()):
            self.destination.remove(name)
        return manifest, None

    def _unmark(self, entries: dict[str, int]) -> None:
        """A run starts here: the output is not complete any more, and ``_SUCCESS`` must not say it is.

        Neither is the fanned-out dataset this destination may be a range of (a mapped range cleared
        and re-run alone): its ``_SUCCESS`` goes too and its record says ``running`` until the
        validator proves it complete again.
        """
        if SUCCESS_MARKER in entries:
            self.destination.remove(SUCCESS_MARKER)
        planning = dataset_planning(self.destination)
        if planning is None:
            return
        parent, record = planning
        if SUCCESS_MARKER in parent.list_entries():
            parent.remove(SUCCESS_MARKER)
        if record.get("status") != "running":  # in-process fan-out: already running, nothing to write
            again = parent.read_json(DATASET_MANIFEST)  # just before writing: a planner may have re-planned
            if again is None or again.get("run_id") != record.get("run_id"):
                return
            again["status"] = "running"
            parent.write_json(DATASET_MANIFEST, again)
            self.log.emit("job.plan", note=f"{parent.url} is incomplete again while {self.destination.name} runs")

    def source_watch(self, session: WorkerSession) -> SourceWatch | None:
        """The check after every chunk read that the source is still as planned (None: a query source)."""
        if self.planned_source is None:
            return None
        return SourceWatch(
            self.planned_source,
            # Without a snapshot too: a chunk's COPY takes its snapshot before it waits for the table's
            # lock, so one that waited on TRUNCATE or a rewriting ALTER TABLE read the new storage with
            # a snapshot older than it: no rows, and the run ended there, green (CI, floor stage).
            storage=True,
            query=session.monitor.read,
            stop=lambda: self._aborted,
        )

    def new_session(self, job_deadline: float | None) -> WorkerSession:
        """A worker session for this run (its application name, deadlines, snapshot, credentials)."""
        session = WorkerSession(
            self.session_endpoint(),
            self.settings,
            self.log,
            application_name=self.application_name,
            redactor=self.redactor,
            worker_index=self.worker_index,
            job_deadline=job_deadline,
            abort_check=lambda: self._aborted,
            pre_execution=import_statements(self.snapshot_id) if self.snapshot_id else (),
            credentials=self.credentials,
        )
        self._session = session
        return session

    def _run_session(self, session: WorkerSession, plan: ExtractPlan, manifest: Manifest) -> None:
        if manifest.chunks and plan.pages is not None and manifest.chunks[-1].last_key == [None]:
            session.stop(reason="nothing left to read")  # the open-ended last page range is committed
            return
        self._session = session
        watch = self.source_watch(session)
        try:
            with session, explained_by_changes(watch):
                after = manifest.chunks[-1].last_key if manifest.chunks else None
                if plan.pages is not None and not manifest.chunks:
                    after = self.lower  # page plans: bounds are page numbers, not filters
                for query, read, done in pipelined(
                    session,
                    plan,
                    chunks_for(plan, self.sizer, after, self.upper),
                    first_index=manifest.next_index,
                    sizer=self.sizer,
                    sink_for=lambda index: self._sink(manifest, index),
                    write_empty_first=not manifest.chunks,
                    read_ahead=self.options.read_ahead,
                    stream_rows=self.options.stream_rows,
                ):
                    if watch is not None:  # an empty read too: under a snapshot, a truncated table reads empty
                        watch.check(read.chunk_index)
                    if not done.location:
                        continue  # an empty page after a full one: nothing to commit
                    paged = plan.pages is not None
                    entry = ChunkEntry(
                        index=read.chunk_index,
                        file=chunk_file_name(read.chunk_index),
                        rows=done.rows,
                        bytes=done.bytes,
                        first_key=query.start if paged else key_to_json(read.first_key),
                        last_key=query.end if paged else key_to_json(read.last_key),
                        seconds=round(read.read_seconds + done.write_seconds, 4),
                    )
                    manifest.chunks.append(entry)
                    manifest.save(self.destination)
                    self.log.emit(
                        "chunk.commit",
                        worker=self.worker_index,
                        worker_pid=session.pid,
                        chunk=entry.index,
                        file=entry.file,
                        rows=entry.rows,
                        bytes=entry.bytes,
                        seconds=entry.seconds,
                        key_from=entry.first_key,
                        key_to=entry.last_key,
                        total_rows=manifest.rows,
                    )
                    self._progress.chunk(manifest.rows)
        finally:
            self._session = None
