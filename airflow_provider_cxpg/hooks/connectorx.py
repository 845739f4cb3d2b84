"""Hook: an Airflow Postgres connection as a connectorx source, read by a supervised worker."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
from airflow.providers.postgres.hooks.postgres import PostgresHook

from airflow_provider_cxpg.conninfo import FORWARDED_PARAMS, PostgresEndpoint
from airflow_provider_cxpg.durations import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_QUERY_TIMEOUT
from airflow_provider_cxpg.exceptions import ConnectionConfigError
from airflow_provider_cxpg.libpq_defaults import reached_host, resolve_endpoint
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.planning.incremental import WatermarkSpec
from airflow_provider_cxpg.planning.plan import SourceSpec
from airflow_provider_cxpg.querylog import QueryLog
from airflow_provider_cxpg.run.extraction import Extraction, ExtractResult, new_run_id
from airflow_provider_cxpg.run.options import DEFAULT_CHUNK_ROWS, DEFAULT_STREAM_ROWS, ExtractOptions, ParquetOptions
from airflow_provider_cxpg.run.reads import iter_chunk_tables, read_query_table
from airflow_provider_cxpg.run.tables import TableExtraction, check_table_arguments
from airflow_provider_cxpg.supervisor.settings import WorkerSettings

__all__ = ["ConnectorXPostgresHook"]

_POSTGRES_CONN_TYPES = frozenset({"postgres", "postgresql"})


#: How old an IAM token may get before the parent mints a new one (RDS/Aurora tokens open
#: connections for 15 minutes; Redshift's and Azure AD's last at least as long).
IAM_TOKEN_REFRESH_SECONDS = 600.0


def _mask(secret: str) -> None:
    """Register ``secret`` with Airflow's log masker (outside a task there is nothing to register with)."""
    from airflow.providers.common.compat.sdk import mask_secret  # a missing masker is a broken install: raise

    with contextlib.suppress(Exception):  # masking is defence in depth, never a reason to fail a run
        mask_secret(secret)


class ConnectorXPostgresHook(PostgresHook):
    """Read PostgreSQL through connectorx in a supervised, spawned worker process.

    Everything :class:`~airflow.providers.postgres.hooks.postgres.PostgresHook` does keeps working
    (``get_conn``, ``get_records``, ``get_df``...): this hook only adds the connectorx path. The
    connection is the usual ``postgres`` type; host, port, schema (database), login, password, the
    extras in :data:`~airflow_provider_cxpg.conninfo.FORWARDED_PARAMS` and the AWS / Azure IAM token
    extras apply to connectorx too.

    No I/O happens in ``__init__``; the connection is resolved on first use.

    :param postgres_conn_id: the Airflow connection id.
    :param protocol: connectorx protocol, ``binary`` (default) or ``cursor`` (e.g. behind PgBouncer
        in statement mode). connectorx ignores ``cxprotocol`` in a URI, so it is passed explicitly.

    .. seealso:: :class:`~airflow_provider_cxpg.operators.extract.PostgresExtractOperator`
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "postgres"
    hook_name = "Postgres"

    def __init__(self, *args: Any, protocol: str = "binary", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol = protocol
        self._endpoint: PostgresEndpoint | None = None
        #: The host of a host list libpq reached first: kept when the endpoint is resolved again.
        self._reached: PostgresEndpoint | None = None

    # -- connection --------------------------------------------------------------------------------

    def _resolved_connection(self) -> Any:
        conn_id = self.get_conn_id()
        try:
            conn = self.connection
        except Exception as exc:  # noqa: BLE001  AirflowNotFoundException and friends: say it plainly
            raise ConnectionConfigError(
                f"Airflow connection {conn_id!r} is not defined (or cannot be read): {type(exc).__name__}",
                conn_id=conn_id,
            ) from None
        conn_type = (conn.conn_type or "").lower()
        if conn_type not in _POSTGRES_CONN_TYPES:
            raise ConnectionConfigError(
                f"Airflow connection {conn_id!r} has type {conn.conn_type!r}; this hook needs a 'postgres' connection",
                conn_id=conn_id,
            )
        if not conn.host:
            raise ConnectionConfigError(
                f"Airflow connection {conn_id!r} has no host (use a host name, an IP address, or a Unix-socket "
                "directory such as /var/run/postgresql)",
                conn_id=conn_id,
            )
        return conn

    def get_endpoint(self, *, fresh: bool = False) -> PostgresEndpoint:
        """Resolve the connection (IAM tokens included) into a :class:`PostgresEndpoint`.

        The endpoint holds the password; its ``repr`` and ``str`` never show it. What libpq would take
        from the environment or files where the connection sets nothing (``PGUSER``, ``PGPASSWORD``,
        the password file, ``PGSSL*``...) is resolved into it, so the worker connects as the
        parent's libpq would (:mod:`~airflow_provider_cxpg.libpq_defaults`).

        :param fresh: resolve again (a new IAM token, a password a secrets backend rotated).
        :raises ConnectionConfigError: the connection is missing, not ``postgres`` or has no host, or
            it or the environment asks for something the worker cannot follow.
        """
        if self._endpoint is not None and not fresh:
            return self._endpoint
        if fresh:
            self._connection = None  # DbApiHook caches the connection: read it again from its backend
        conn = self._resolved_connection()
        extra = conn.extra_dejson
        login, password, port = conn.login, conn.password, conn.port
        if extra.get("iam", False):
            login, password, port = self.get_iam_token(conn)
        params: dict[str, str] = {}
        for name in FORWARDED_PARAMS:
            value = extra.get(name)
            if value is not None and value != "":
                params[name] = str(value)
        if self.options:  # PostgresHook(options=...) adds libpq options, as get_conn does
            params["options"] = f"{params['options']} {self.options}" if params.get("options") else self.options
        try:
            endpoint = resolve_endpoint(
                host=conn.host,
                port=int(port) if port else None,
                dbname=self.database or conn.schema or None,
                user=login or None,
                password=password or None,
                params=params,
                extra=extra,
            )
        except ConnectionConfigError as exc:
            conn_id = self.get_conn_id()
            raise ConnectionConfigError(f"Airflow connection {conn_id!r}: {exc}", conn_id=conn_id) from None
        for secret in endpoint.secrets():
            _mask(secret)
        if len(endpoint.hosts) > 1:  # one server for everything this hook reads (libpq_defaults.reached_host)
            if self._reached is None:
                self._reached = reached_host(endpoint)
            endpoint = dataclasses.replace(endpoint, host=self._reached.host, port=self._reached.port)
        self._endpoint = endpoint
        return endpoint

    @property
    def configured_host(self) -> str | None:
        """The host as the Airflow connection names it (a host list whole, before it is narrowed)."""
        return self._resolved_connection().host

    @property
    def uses_iam(self) -> bool:
        return bool(self._resolved_connection().extra_dejson.get("iam", False))

    def fresh_endpoint(self) -> PostgresEndpoint:
        """The connection resolved again: a newly minted IAM token, or the password as stored now."""
        return self.get_endpoint(fresh=True)

    @property
    def connectorx_uri(self) -> str:
        """The connectorx URI with the password replaced by ``***`` (for logs and messages)."""
        return self.get_endpoint().redacted_uri()

    def test_connection(self) -> tuple[bool, str]:
        """Check that a worker can read through connectorx (used by the Airflow UI's Test button)."""
        try:
            table = self.read_arrow("SELECT 1 AS ok", query_timeout=30)
            return bool(table.num_rows == 1), "connectorx read through a supervised worker succeeded"
        except Exception as exc:  # noqa: BLE001
            return False, f"{type(exc).__name__}: {exc}"

    # -- reading -----------------------------------------------------------------------------------

    def worker_settings(
        self,
        *,
        query_timeout: float | None = DEFAULT_QUERY_TIMEOUT,
        job_timeout: float | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        **more: Any,
    ) -> WorkerSettings:
        """Build :class:`WorkerSettings` from keyword arguments (validated).

        IAM connections renew their token every :data:`IAM_TOKEN_REFRESH_SECONDS` unless
        ``credentials_refresh_interval`` says otherwise.
        """
        settings = WorkerSettings(  # validated before the connection is looked up
            query_timeout=query_timeout,
            job_timeout=job_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            protocol=self.protocol,
            **more,
        )
        if "credentials_refresh_interval" not in more and self.uses_iam:
            settings = dataclasses.replace(settings, credentials_refresh_interval=IAM_TOKEN_REFRESH_SECONDS)
        return settings

    def iter_chunks(
        self,
        *,
        table: str | None = None,
        sql: str | None = None,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        key_columns: Sequence[str] | None = None,
        column_casts: Mapping[str, str] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        chunk_bytes: int | None = None,
        query_timeout: float | None = DEFAULT_QUERY_TIMEOUT,
        job_timeout: float | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        max_worker_restarts: int = 2,
        snapshot: bool = False,
        read_ahead: bool = True,
        stream_rows: int = DEFAULT_STREAM_ROWS,
        query_log_path: str | None = None,
        **settings: Any,
    ) -> Iterator[pa.Table]:
        """Yield a table or query in keyset chunks, each a ``pyarrow.Table`` in this process.

        The reads happen in a supervised worker with the same deadlines, heartbeats and query log as
        the operator; chunks arrive as memory-mapped Arrow IPC files.

        :param table: ``schema.table`` to read (or ``sql``).
        :param sql: a query whose output contains ``key_columns``.
        :param columns: output columns (default: all).
        :param where: SQL condition on the source's columns.
        :param key_columns: keyset key (default: the primary key).
        :param column_casts: ``{column: type}`` to read a column as another type, e.g. ``text``.
        :param chunk_rows: rows per chunk.
        :param chunk_bytes: size chunks to about this many Arrow bytes instead.
        :param query_timeout: seconds per query (server ``statement_timeout`` too); None: no limit.
        :param job_timeout: seconds for all chunks; None: no limit.
        :param heartbeat_interval: seconds between worker heartbeats.
        :param heartbeat_timeout: declare the worker dead after this many silent seconds.
        :param max_worker_restarts: replace a dead worker this many times.
        :param snapshot: read every chunk from one exported snapshot (a point-in-time view); page
            ranges (``key_columns=["ctid"]``) always do.
        :param read_ahead: read the next chunk while you process this one (default); False: one
            chunk at a time.
        :param stream_rows: rows per connectorx stream batch inside a chunk; 0: whole-chunk reads.
        :param query_log_path: also write the structured query log as JSON lines here.
        """
        spec = SourceSpec(
            table=table,
            sql=sql,
            columns=tuple(columns) if columns else None,
            where=where,
            key_columns=tuple(key_columns) if key_columns else None,
            column_casts=dict(column_casts or {}),
        )
        worker_settings = self.worker_settings(
            query_timeout=query_timeout,
            job_timeout=job_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            **settings,
        )
        endpoint = self.get_endpoint()
        yield from iter_chunk_tables(
            endpoint=endpoint,
            spec=spec,
            settings=worker_settings,
            chunk_rows=chunk_rows,
            chunk_bytes=chunk_bytes,
            max_worker_restarts=max_worker_restarts,
            snapshot=snapshot,
            read_ahead=read_ahead,
            stream_rows=stream_rows,
            querylog=QueryLog(new_run_id(), logger=self.log, jsonl_path=query_log_path),
            application_name_prefix=endpoint.application_name,
            refresh_credentials=self.fresh_endpoint,
        )

    def read_arrow(
        self,
        sql: str,
        *,
        column_casts: Mapping[str, str] | None = None,
        query_timeout: float | None = DEFAULT_QUERY_TIMEOUT,
        query_log_path: str | None = None,
        **settings: Any,
    ) -> pa.Table:
        """Run one query in a supervised worker and return the whole result as a ``pyarrow.Table``.

        Types are read exactly as the extraction reads them (see the README's type table). For large
        results use :meth:`iter_chunks` or the operator: this holds the whole result in memory.

        :param sql: the query.
        :param column_casts: ``{column: type}`` to read a column as another type.
        :param query_timeout: seconds (server ``statement_timeout`` too); None: no limit.
        :param query_log_path: also write the structured query log as JSON lines here.
        """
        endpoint = self.get_endpoint()
        return read_query_table(
            endpoint=endpoint,
            sql=sql,
            settings=self.worker_settings(query_timeout=query_timeout, **settings),
            column_casts=dict(column_casts or {}),
            querylog=QueryLog(new_run_id(), logger=self.log, jsonl_path=query_log_path),
            application_name_prefix=endpoint.application_name,
            refresh_credentials=self.fresh_endpoint,
        )

    def extract(
        self,
        *,
        table_format: str = "parquet",
        write_mode: str | None = None,
        run_key: str | None = None,
        iceberg_catalog: str | None = None,
        iceberg_catalog_properties: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> ExtractResult:
        """Extract to Parquet files plus a manifest at ``destination`` (or to a table) and return the result.

        Takes the keyword arguments of :meth:`prepare_extraction`; this is the operator's path.

        :param table_format: ``parquet`` (default): files and a manifest; ``delta``: one Delta Lake
            version per run at ``destination`` (the ``[delta]`` extra); ``iceberg``: one Iceberg
            commit per run to the table ``destination`` (``namespace.table``; the ``[iceberg]`` extra).
        :param write_mode: for a table: ``append`` (default), ``overwrite`` or ``merge`` (upsert by the key).
        :param run_key: for a table: names the run across retries, so a retry resumes it and never
            commits twice (the operator passes its DAG run and task); default: a new key per call.
        :param iceberg_catalog: the catalog's name in pyiceberg's configuration (``default``).
        :param iceberg_catalog_properties: more catalog properties (``uri``, ``warehouse``, ...).
        """
        return self.prepare_table_extraction(
            table_format=table_format,
            write_mode=write_mode,
            run_key=run_key,
            iceberg_catalog=iceberg_catalog,
            iceberg_catalog_properties=iceberg_catalog_properties,
            **kwargs,
        ).run()

    def prepare_table_extraction(
        self,
        *,
        table_format: str = "parquet",
        write_mode: str | None = None,
        run_key: str | None = None,
        iceberg_catalog: str | None = None,
        iceberg_catalog_properties: Mapping[str, Any] | None = None,
        destination: Any,
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Extraction | TableExtraction:
        """Build the run :meth:`extract` performs: an :class:`Extraction`, or one committed to a table."""
        mode = check_table_arguments(
            table_format,
            write_mode,
            key_range=kwargs.get("lower") is not None or kwargs.get("upper") is not None,
            incremental=kwargs.get("watermark") is not None,
        )
        if mode is None:
            return self.prepare_extraction(destination=destination, storage_options=storage_options, **kwargs)
        extraction = TableExtraction(
            lambda **where: self.prepare_extraction(**{**kwargs, **where}),
            table=destination,
            table_format=table_format,
            write_mode=mode,
            run_key=run_key or new_run_id(),
            storage_options=storage_options,
            catalog=iceberg_catalog,
            catalog_properties=iceberg_catalog_properties,
        )
        for secret in extraction.extraction.redactor.secrets:  # the catalog's credentials too
            _mask(secret)
        return extraction

    def prepare_extraction(
        self,
        *,
        destination: Any,
        table: str | None = None,
        sql: str | None = None,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        key_columns: Sequence[str] | None = None,
        column_casts: Mapping[str, str] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        chunk_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        compression: str = "zstd",
        parquet_dictionary: bool | str = "auto",
        query_timeout: float | None = DEFAULT_QUERY_TIMEOUT,
        job_timeout: float | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
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
        query_log_path: str | None = None,
        querylog: QueryLog | None = None,
        worker_index: int = 0,
        owner: str | None = None,
        dag_run_id: str | None = None,
        **settings: Any,
    ) -> Extraction:
        """Build (but do not run) an :class:`Extraction`; the operator keeps it to abort on kill.

        :param destination: directory or URL prefix (local, fsspec URL, ``ObjectStoragePath``).
        :param table: ``schema.table`` to read (or ``sql``).
        :param sql: a query whose output contains ``key_columns``.
        :param columns: output columns (default: all).
        :param where: SQL condition on the source's columns.
        :param key_columns: keyset key (default: the primary key); ``["ctid"]`` for page ranges.
        :param column_casts: ``{column: type}`` to read a column as another type.
        :param chunk_rows: rows per chunk and file.
        :param chunk_bytes: size chunks to about this many Arrow bytes instead.
        :param storage_options: fsspec options for the destination.
        :param compression: Parquet codec.
        :param parquet_dictionary: ``"auto"``: dictionary-encode only repetitive columns; True/False.
        :param query_timeout: seconds per query (server ``statement_timeout`` too); None: no limit.
        :param job_timeout: seconds for the whole extraction; None: no limit.
        :param heartbeat_interval: seconds between worker heartbeats.
        :param heartbeat_timeout: declare the worker dead after this many silent seconds.
        :param max_worker_restarts: replace a dead worker this many times.
        :param extra_filters: SQL conditions added to every chunk.
        :param lower: exclusive lower key bound (pages: first page).
        :param upper: inclusive upper key bound (pages: end page, exclusive).
        :param watermark: incremental window (see :mod:`airflow_provider_cxpg.planning.incremental`).
        :param resume: continue an unfinished extraction at the destination.
        :param snapshot: True: read every chunk from one exported snapshot; a string: import that id.
        :param read_ahead: with ``stream_rows=0``: read the next chunk while this one is written.
        :param stream_rows: 0 (default) reads each chunk as one table; N > 0 streams each chunk in
            batches of N rows, written as they arrive (memory independent of ``chunk_rows``).
        :param run_id: the extraction's id (default: random).
        :param query_log_path: also write the query log as JSON lines here.
        :param querylog: use this query log instead of a new one.
        :param worker_index: labels this extraction's events in a parallel run.
        :param owner: who runs it (``dag_id.task_id``): it may replace its own earlier output at the
            destination; another source's output there is never taken over.
        :param dag_run_id: the Airflow DAG run it belongs to: an unfinished extraction at the destination
            is continued only by the same DAG run (the operator passes its own).
        :param settings: further :class:`~airflow_provider_cxpg.supervisor.settings.WorkerSettings` fields.
        """
        spec = SourceSpec(
            table=table,
            sql=sql,
            columns=tuple(columns) if columns else None,
            where=where,
            key_columns=tuple(key_columns) if key_columns else None,
            column_casts=dict(column_casts or {}),
        )
        # Validated before the connection is even looked up (run/options.py is the one place).
        options = ExtractOptions(
            chunk_rows=chunk_rows,
            chunk_bytes=chunk_bytes,
            stream_rows=stream_rows,
            read_ahead=read_ahead,
            max_worker_restarts=max_worker_restarts,
            parquet=ParquetOptions(compression=compression, dictionary=parquet_dictionary),
        )
        worker_settings = self.worker_settings(
            query_timeout=query_timeout,
            job_timeout=job_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            **settings,
        )
        endpoint = self.get_endpoint()
        run_id = run_id or new_run_id()
        log = querylog or QueryLog(run_id, logger=self.log, jsonl_path=query_log_path)
        extraction = Extraction(
            endpoint=endpoint,
            spec=spec,
            destination=Destination(destination, storage_options),
            settings=worker_settings,
            options=options,
            extra_filters=extra_filters,
            lower=lower,
            upper=upper,
            watermark=watermark,
            resume=resume,
            snapshot=snapshot,
            run_id=run_id,
            querylog=log,
            application_name_prefix=endpoint.application_name,
            worker_index=worker_index,
            owner=owner,
            dag_run_id=dag_run_id,
            refresh_credentials=self.fresh_endpoint,
        )
        for secret in extraction.redactor.secrets:  # storage keys too: Airflow's masker hides them in logs
            _mask(secret)
        return extraction
