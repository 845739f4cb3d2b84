"""Operator: extract a PostgreSQL table or query to Parquet files, chunk by chunk, supervised."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import BaseOperator

from airflow_provider_cxpg.durations import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_QUERY_TIMEOUT,
    DEFAULT_STORAGE_TIMEOUT,
    as_seconds,
)
from airflow_provider_cxpg.exceptions import InvalidInputError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.operators.assets import asset_uri, record_asset_event, stable_asset
from airflow_provider_cxpg.operators.killing import attach, kill, killable, raise_if_killed
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.output.manifest import dataset_planning
from airflow_provider_cxpg.planning.incremental import WatermarkSpec
from airflow_provider_cxpg.planning.watermark_state import (
    WatermarkState,
    describe_window,
    source_identity,
    spec_for_task,
)
from airflow_provider_cxpg.run.extraction import ExtractResult, new_run_id
from airflow_provider_cxpg.run.options import DEFAULT_CHUNK_ROWS, DEFAULT_STREAM_ROWS, positive_int
from airflow_provider_cxpg.run.tables import check_table_arguments

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = ["PostgresExtractOperator"]

_FILE_FORMATS = ("parquet",)
#: Keys of the XCom summary; a public contract (more may be added, none removed).
SUMMARY_KEYS = (
    "rows",
    "chunks",
    "files",
    "destination",
    "first_key",
    "last_key",
    "high_watermark",
    "seconds",
    "run_id",
)


def _names(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{name} must be a list of column names, got {value!r}")
    return tuple(value)


class PostgresExtractOperator(BaseOperator):
    """Extract a PostgreSQL table or query to Parquet files in keyset chunks, in a supervised worker.

    connectorx never runs in the task process: a spawned worker reads each chunk (``WHERE key > last
    ORDER BY key LIMIT chunk_rows``) and writes it as ``part-NNNNNN.parquet`` beside a
    ``_manifest.json``. Every query has a deadline (also enforced by the server), the worker sends
    heartbeats, and any failure cancels the server query and stops the worker. A retried task
    resumes after the last committed chunk.

    :param postgres_conn_id: Airflow ``postgres`` connection.
    :param table: ``schema.table`` to extract (templated). Give ``table`` or ``sql``.
    :param sql: a query whose output contains ``key_columns`` (templated, ``.sql`` files allowed).
    :param columns: output columns (templated; default all). Key columns are added when missing.
    :param where: SQL condition on the source's columns (templated).
    :param key_columns: keyset key (templated; default: the table's primary key). A non-unique key
        gets the primary key appended as a tie-breaker.
    :param chunk_rows: rows per chunk (and per file).
    :param chunk_bytes: size chunks to about this many in-memory Arrow bytes instead (``chunk_rows``
        is then the maximum).
    :param destination: directory or URL prefix for the files (templated): a local path, any fsspec
        URL such as ``s3://bucket/prefix``, or an ``ObjectStoragePath``.
    :param destination_conn_id: Airflow connection for object storage credentials (resolved through
        ``ObjectStoragePath``).
    :param storage_options: fsspec options for the destination (sent to the worker over its pipe).
    :param file_format: ``parquet``.
    :param table_format: ``parquet`` (default): chunk files plus a manifest at ``destination``;
        ``delta``: ``destination`` is a Delta Lake table and every run commits one version (the
        ``[delta]`` extra); ``iceberg``: ``destination`` is an Iceberg table ``namespace.table`` in
        ``iceberg_catalog`` and every run is one catalog commit (the ``[iceberg]`` extra). See the
        README's "Lakehouse tables".
    :param write_mode: for ``delta``: ``append`` (default), ``overwrite`` (the run replaces the
        table's rows in one commit) or ``merge`` (upsert by the key). Not for ``parquet``.
    :param iceberg_catalog: the Iceberg catalog's name in pyiceberg's configuration (``default``).
    :param iceberg_catalog_properties: more catalog properties (``uri``, ``warehouse``, credentials).
    :param compression: Parquet codec (``zstd`` default).
    :param parquet_dictionary: ``"auto"`` (default) dictionary-encodes only the columns whose first
        row group in each file is repetitive (dictionaries of near-unique values cost more CPU and
        bytes than they save); True or False: every column or none.
    :param query_timeout: limit per query (seconds or a ``timedelta``): each chunk's and each of the
        parent's planning statements, enforced by the parent and as server ``statement_timeout``;
        None for no limit.
    :param job_timeout: limit for the whole extraction, planning included; None for no limit.
    :param storage_timeout: limit for each operation on the destination: a chunk's upload and commit
        in the worker, the manifest writes, listings and removals in the parent (default 300 s).
    :param heartbeat_interval: time between worker heartbeats.
    :param heartbeat_timeout: declare the worker dead after this long without one.
    :param max_worker_restarts: replace a dead worker this many times within one try.
    :param watermark_column: read only the rows whose ``column`` lies in this run's window, exactly
        once across runs; ``"xmin"`` uses transaction ids (see the README, "Incremental runs").
    :param watermark_start: exclusive lower bound (templated), for a one-off window; default: where
        the last successful run ended (state the provider keeps, see
        :mod:`~airflow_provider_cxpg.planning.watermark_state`), or a full copy on the first run.
    :param watermark_end: upper bound (templated); default: ``max(column)`` when the run starts. Rows
        holding it then are read; rows written later with the same value are the next run's. An end
        past the largest value at run start (for ``xmin``: past the oldest running transaction) ends
        the window there, so rows written later below it are the next run's too.
    :param watermark_lag: re-read this much before the start, for writers whose commits arrive late
        (seconds or a ``timedelta`` for date/timestamp columns, a number otherwise): at-least-once.
    :param watermark_window: a window fixed elsewhere, read exactly: the partition planner's
        reference to the window in its dataset manifest (set by ``expand_kwargs``), or a window.
    :param watermark_state_key: the Airflow Variable that keeps this task's windows (default
        ``cxpg_watermark.<dag_id>.<task_id>[.<map_index>]``).
    :param column_casts: ``{column: sql_type}`` to read a column as another type (e.g. ``text``).
    :param lower_key: exclusive lower key bound (templated), e.g. from the partition planner.
    :param upper_key: inclusive upper key bound (templated).
    :param parallelism: workers reading disjoint key ranges at once inside this task; files go to
        ``range=NNNN/`` sub-prefixes with a ``_dataset_manifest.json`` on top.
    :param partition_method: how ``parallelism`` splits the key space: ``auto``, ``histogram``,
        ``sample``, ``ntile`` or ``ctid`` (see the README, "Scale out").
    :param snapshot: read every chunk from one exported snapshot, a point-in-time copy even while
        rows change; default True when ``parallelism > 1`` or ``key_columns=["ctid"]`` (page ranges
        are exact only inside one snapshot, so False is refused there), else False.
    :param read_ahead: with ``stream_rows=0``: read chunk *k+1* while chunk *k* is written.
    :param stream_rows: 0 (default) reads each chunk as one table; N > 0 streams each chunk from
        connectorx in batches of N rows, written as they arrive, so the worker's memory stops
        growing with ``chunk_rows`` (slower: choose it for very large chunks).
    :param resume: continue an unfinished extraction found at the destination (default True).
    :param query_log_path: also write the structured query log as JSON lines to this file (a file
        that takes no line for 10 s is given up for the run; the task log keeps every event).
    :param worker_settings: further :class:`~airflow_provider_cxpg.supervisor.settings.WorkerSettings` fields.
    :param emit_asset: emit the destination's stable asset (its static part; the run's prefix is in
        the event's extra). The partition planner turns it off for its ranges: the validator emits
        the dataset's.

    .. seealso:: :class:`~airflow_provider_cxpg.hooks.connectorx.ConnectorXPostgresHook`
    """

    template_fields: Sequence[str] = (
        "table",
        "sql",
        "columns",
        "where",
        "key_columns",
        "destination",
        "watermark_start",
        "watermark_end",
        "lower_key",
        "upper_key",
        "query_log_path",
        "watermark_state_key",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "where": "sql"}
    ui_color = "#336791"

    def __init__(
        self,
        *,
        destination: Any,
        postgres_conn_id: str = "postgres_default",
        table: str | None = None,
        sql: str | None = None,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        key_columns: Sequence[str] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        chunk_bytes: int | None = None,
        destination_conn_id: str | None = None,
        storage_options: dict[str, Any] | None = None,
        file_format: str = "parquet",
        table_format: str = "parquet",
        write_mode: str | None = None,
        iceberg_catalog: str | None = None,
        iceberg_catalog_properties: Mapping[str, Any] | None = None,
        compression: str = "zstd",
        parquet_dictionary: bool | str = "auto",
        query_timeout: float | dt.timedelta | None = DEFAULT_QUERY_TIMEOUT,
        job_timeout: float | dt.timedelta | None = None,
        storage_timeout: float | dt.timedelta | None = DEFAULT_STORAGE_TIMEOUT,
        heartbeat_interval: float | dt.timedelta = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float | dt.timedelta = DEFAULT_HEARTBEAT_TIMEOUT,
        max_worker_restarts: int = 2,
        watermark_column: str | None = None,
        watermark_start: Any = None,
        watermark_end: Any = None,
        watermark_lag: Any = None,
        watermark_window: Mapping[str, Any] | None = None,
        watermark_state_key: str | None = None,
        column_casts: Mapping[str, str] | None = None,
        lower_key: Sequence[Any] | None = None,
        upper_key: Sequence[Any] | None = None,
        parallelism: int = 1,
        partition_method: str = "auto",
        snapshot: bool | None = None,
        read_ahead: bool = True,
        stream_rows: int = DEFAULT_STREAM_ROWS,
        resume: bool = True,
        query_log_path: str | None = None,
        worker_settings: Mapping[str, Any] | None = None,
        emit_asset: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.postgres_conn_id = postgres_conn_id
        self.table = table
        self.sql = sql
        self.columns = columns
        self.where = where
        self.key_columns = key_columns
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.destination = destination
        self.destination_conn_id = destination_conn_id
        self.storage_options = storage_options
        self.file_format = file_format
        self.table_format = table_format
        self.write_mode = write_mode
        self.iceberg_catalog = iceberg_catalog
        self.iceberg_catalog_properties = iceberg_catalog_properties
        self.compression = compression
        self.parquet_dictionary = parquet_dictionary
        self.query_timeout = query_timeout
        self.job_timeout = job_timeout
        self.storage_timeout = storage_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_worker_restarts = max_worker_restarts
        self.watermark_column = watermark_column
        self.watermark_start = watermark_start
        self.watermark_end = watermark_end
        self.watermark_lag = watermark_lag
        self.watermark_window = watermark_window
        self.watermark_state_key = watermark_state_key
        self._watermark_state: WatermarkState | None = None
        self.column_casts = column_casts
        self.lower_key = lower_key
        self.upper_key = upper_key
        self.parallelism = parallelism
        self.partition_method = partition_method
        self.snapshot = snapshot
        self.read_ahead = read_ahead
        self.stream_rows = stream_rows
        self.resume = resume
        self.query_log_path = query_log_path
        self.worker_settings = dict(worker_settings or {})
        self._extraction: Any = None
        self._result: ExtractResult | None = None
        self._killed: str | None = None  # set by on_kill
        self.emit_asset = emit_asset
        if not kwargs.get("outlets") and emit_asset:
            # One stable asset per target: the destination's static part (see operators/assets.py).
            target = self._asset_target()
            asset = stable_asset(target) if target is not None else None
            if asset is not None:
                self.outlets = [asset]

    # -- helpers -----------------------------------------------------------------------------------

    @cached_property
    def hook(self) -> ConnectorXPostgresHook:
        return ConnectorXPostgresHook(postgres_conn_id=self.postgres_conn_id)

    def _validate(self) -> None:
        if (self.table is None) == (self.sql is None):
            raise InvalidInputError(f"{self.task_id}: give exactly one of `table` or `sql`")
        if self.file_format not in _FILE_FORMATS:
            raise InvalidInputError(f"file_format must be one of {list(_FILE_FORMATS)}, got {self.file_format!r}")
        # Chunking, restarts and Parquet options are checked by ExtractOptions and the deadlines by
        # WorkerSettings, both built before any data moves; here only what the operator itself uses.
        self.storage_timeout = as_seconds("storage_timeout", self.storage_timeout, allow_none=True)
        self.parallelism = positive_int("parallelism", self.parallelism)
        if self.table_format == "iceberg" and self.destination_conn_id:
            raise InvalidInputError(
                "destination_conn_id does not apply to table_format='iceberg' (the destination is a table in "
                "iceberg_catalog): give the warehouse's credentials in iceberg_catalog_properties and storage_options"
            )
        check_table_arguments(
            self.table_format,
            self.write_mode,
            parallelism=self.parallelism,
            key_range=self.lower_key is not None or self.upper_key is not None,
            incremental=self.watermark_column is not None or self.watermark_window is not None,
            planned_window=self.watermark_window is not None,
        )
        self.columns = _names("columns", self.columns)
        self.key_columns = _names("key_columns", self.key_columns)
        if self.key_columns is not None and list(self.key_columns) == ["ctid"] and self.snapshot is False:
            raise InvalidInputError(
                "key_columns=['ctid'] reads heap page ranges, which are exact only inside one snapshot (an "
                "UPDATE moves a row to another page: read twice or missed): leave snapshot at its default "
                "(True for ctid) or page by a key"
            )
        if self.watermark_window is not None:
            if not isinstance(self.watermark_window, Mapping) or "column" not in self.watermark_window:
                raise InvalidInputError(
                    f"watermark_window must be a window from the partition planner, got {self.watermark_window!r}"
                )
            column = self.watermark_window["column"]
            if self.watermark_column not in (None, column):
                raise InvalidInputError(f"watermark_window is for column {column!r}, not {self.watermark_column!r}")
            self.watermark_column = column
        if self.watermark_column is None and any(
            v not in (None, "") for v in (self.watermark_start, self.watermark_end, self.watermark_lag)
        ):
            raise InvalidInputError("watermark_start / watermark_end / watermark_lag need watermark_column")
        if self.destination is None or (isinstance(self.destination, str) and not self.destination.strip()):
            raise InvalidInputError("destination is empty")

    def _watermark(self, context: Context) -> WatermarkSpec | None:
        """This run's window: the planner's, an explicit one, or the one after the last committed."""
        self._watermark_state = None
        if self.watermark_window:
            window = dict(self.watermark_window)
            if "dataset" in window and "end_mode" not in window:  # the planner's reference to its record
                from airflow_provider_cxpg.run.parallel import recorded_window

                dataset = self._location(window["dataset"])
                window = recorded_window(
                    Destination(dataset, self.storage_options, timeout=self.storage_timeout), window
                )
            self.log.info("incremental window fixed by the planner: %s", describe_window(window))
            return WatermarkSpec.again(window)
        if not self.watermark_column:
            return None
        if self.watermark_start in (None, ""):
            self._refuse_windows_of_planned_ranges()
        spec, self._watermark_state = spec_for_task(
            context,
            self.task_id,
            self.watermark_column,
            start=self.watermark_start,
            end=self.watermark_end,
            lag=self.watermark_lag,
            state_key=self.watermark_state_key,
            source=self._source_identity(),
            log=self.log,
        )
        return spec

    def _owner(self, context: Context) -> str:
        """``dag_id.task_id`` (``[map index]`` for a mapped instance): who may replace its own output."""
        ti = context.get("ti")
        map_index = getattr(ti, "map_index", None) if ti is not None else None
        suffix = f"[{map_index}]" if map_index is not None and map_index >= 0 else ""
        return f"{getattr(self, 'dag_id', None) or '_'}.{self.task_id}{suffix}"

    def _asset_target(self) -> Any:
        """What the asset names: the destination, or an Iceberg table as ``iceberg://<catalog>/<table>``."""
        if self.table_format == "iceberg":
            if any(mark in str(self.destination) for mark in ("{{", "{%", "{#")):
                return None  # a templated table name: no one static asset names it
            return f"iceberg://{self.iceberg_catalog or 'default'}/{self.destination}"
        return self.destination

    def _run_key(self, context: Context) -> str:
        """Names this task's run across its tries (a table commit is made once per key).

        A cleared task is the same run: when its commit landed, clearing it commits nothing again
        (an append would add its rows twice); a new DAG run extracts and commits anew.
        """
        dag_run = context.get("dag_run")
        run_id = getattr(dag_run, "run_id", None)
        if not run_id:  # outside a DAG run (a bare execute): every call is a run of its own
            return f"{self._owner(context)}@{new_run_id()}"
        return f"{self._owner(context)}@{run_id}"

    def _source_identity(self) -> str:
        parts: dict[str, Any] = {
            "table": self.table,
            "sql": self.sql,
            "where": self.where,
            "key_columns": self.key_columns,
            "column": self.watermark_column,
        }
        if self.lower_key is not None or self.upper_key is not None:
            # A mapped task's windows are windows of its key range: after its list was reordered, a
            # map index continuing the windows another range's rows ended at missed rows of its own.
            parts["bounds"] = [self.lower_key, self.upper_key]
        return source_identity(**parts)

    def _refuse_windows_of_planned_ranges(self) -> None:
        """A range of a partition plan made without a watermark cannot keep windows of its own.

        The plan's ranges move from one plan to the next (the table grows, the statistics change), and
        a window per range follows its range's bounds: rows between a range's old and new bounds were
        read by neither window. The planner's ``watermark_column`` fixes one window for every range.
        """
        if self.lower_key is None and self.upper_key is None:
            return
        destination = Destination(self._destination(), self.storage_options, timeout=self.storage_timeout)
        planning = dataset_planning(destination)
        if planning is None:
            return
        parent, record = planning
        if record.get("window"):
            raise InvalidInputError(
                f"{destination.url} is a range of the partition plan at {parent.url}, which fixed a window for "
                "every range: map the planner's output (each range gets its watermark_window) instead of "
                "giving the range a watermark_column of its own"
            )
        raise InvalidInputError(
            f"{destination.url} is a range of the partition plan at {parent.url}, which was planned without "
            f"a watermark: give PostgresPartitionPlanOperator watermark_column={self.watermark_column!r} "
            "too, so that every range reads the one window it fixes (a window per range follows that "
            "range's bounds, which the next plan moves, and rows between the old and new bounds were missed)"
        )

    def _destination(self) -> Any:
        return self._location(self.destination)

    def _location(self, url: Any) -> Any:
        """``url`` with ``destination_conn_id``'s credentials, when one is set."""
        if self.destination_conn_id:
            from airflow.providers.common.compat.sdk import ObjectStoragePath

            return ObjectStoragePath(str(url), conn_id=self.destination_conn_id)
        return url

    # -- execution ---------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        with killable(self):
            return self._execute(context)

    def _execute(self, context: Context) -> dict[str, Any]:
        self._validate()
        settings = dict(self.worker_settings)
        common: dict[str, Any] = {
            "destination": self._destination(),
            "table": self.table,
            "sql": self.sql,
            "columns": self.columns,
            "where": self.where,
            "key_columns": self.key_columns,
            "column_casts": self.column_casts,
            "chunk_rows": self.chunk_rows,
            "chunk_bytes": self.chunk_bytes,
            "storage_options": self.storage_options,
            "compression": self.compression,
            "parquet_dictionary": self.parquet_dictionary,
            "query_timeout": self.query_timeout,
            "job_timeout": self.job_timeout,
            "storage_timeout": self.storage_timeout,
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
            "max_worker_restarts": self.max_worker_restarts,
            "watermark": self._watermark(context),
            "lower": self.lower_key,
            "upper": self.upper_key,
            "resume": self.resume,
            "read_ahead": self.read_ahead,
            "stream_rows": self.stream_rows,
            "query_log_path": self.query_log_path,
            "owner": self._owner(context),
            "dag_run_id": getattr(context.get("dag_run"), "run_id", None),
            **settings,
        }
        if self.parallelism > 1:
            from airflow_provider_cxpg.run.parallel import ParallelExtraction

            extraction: Any = ParallelExtraction(
                self.hook,
                parallelism=self.parallelism,
                partition_method=self.partition_method,
                snapshot=True if self.snapshot is None else bool(self.snapshot),
                **common,
            )
        elif self.table_format != "parquet":
            extraction = self.hook.prepare_table_extraction(
                table_format=self.table_format,
                write_mode=self.write_mode,
                run_key=self._run_key(context),
                iceberg_catalog=self.iceberg_catalog,
                iceberg_catalog_properties=self.iceberg_catalog_properties,
                snapshot=bool(self.snapshot),
                **common,
            )
        else:
            extraction = self.hook.prepare_extraction(snapshot=bool(self.snapshot), **common)
        attach(self, extraction)
        result: ExtractResult = extraction.run()
        raise_if_killed(self)  # on_kill landed as the run ended: a killed task must not end as success
        self._result = result
        if self._watermark_state is not None and result.window is not None:
            dag_run = context.get("dag_run")
            self._watermark_state.commit(result.window, getattr(dag_run, "run_id", None), self._source_identity())
        summary = result.summary()
        summary["watermark_column"] = self.watermark_column
        self._emit_asset(context, summary)
        return summary

    def on_kill(self) -> None:
        """Stop the worker: cancel its server query, SIGTERM, SIGKILL after a grace period.

        ``execute`` then raises, wherever the run was: Airflow 3's SIGTERM handler only calls this,
        and a run that finished meanwhile must not end as success.
        """
        kill(self)

    # -- lineage -----------------------------------------------------------------------------------

    def _emit_asset(self, context: Context, summary: dict[str, Any]) -> None:
        extra = {k: summary.get(k) for k in ("rows", "chunks", "run_id", "high_watermark", "table_version")}
        record_asset_event(context, list(self.outlets or []), summary["destination"], extra, self.log)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: input table from the Postgres connection, output files at the destination."""
        try:
            from airflow.providers.common.compat.openlineage.facet import Dataset
            from airflow.providers.openlineage.extractors import OperatorLineage
        except ImportError:
            return None
        if self._result is None:
            return None
        endpoint = self.hook.get_endpoint()
        # The host as the connection names it (a host list whole): the server a run reached is not the
        # dataset's name, or one table would be another dataset whenever a run failed over.
        host = self.hook.configured_host or endpoint.host
        inputs = []
        if self.table:
            from airflow_provider_cxpg.planning.sql import parse_qualified_name

            schema, name = parse_qualified_name(self.table)
            inputs.append(
                Dataset(
                    namespace=f"postgres://{host}:{endpoint.port}",
                    name=f"{endpoint.dbname}.{schema or 'public'}.{name}",
                )
            )
        uri = asset_uri(self._result.destination)
        scheme, _, rest = uri.partition("://")
        if scheme == "file":
            output = Dataset(namespace="file", name="/" + rest.lstrip("/"))
        else:
            bucket, _, path = rest.partition("/")
            output = Dataset(namespace=f"{scheme}://{bucket}", name=path or "/")
        return OperatorLineage(inputs=inputs, outputs=[output])
