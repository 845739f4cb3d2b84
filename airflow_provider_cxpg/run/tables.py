"""Land one extraction as one lakehouse table version, exactly once across task tries.

The extraction runs as always (keyset chunks, manifest, resume) into a staging directory inside the
table (Delta: ``<table>/cxpg-<run key>/``; Iceberg: ``<table location>/data/cxpg-<run key>/``);
then its files are committed in one transaction (:mod:`airflow_provider_cxpg.output.delta`,
:mod:`airflow_provider_cxpg.output.iceberg`). The run key is stable across the tries of one task run
(the operator derives it from the DAG run and the task), so a retry resumes the same staging
directory and finds a commit that already landed instead of making a second one.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from airflow_provider_cxpg.exceptions import DataIntegrityError, ExtractionAborted, InvalidInputError
from airflow_provider_cxpg.output.delta import (
    APP_PREFIX,
    UNKNOWN_VERSION,
    WRITE_MODES,
    DeltaTarget,
    delta_storage_options,
)
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.output.iceberg import IcebergTarget
from airflow_provider_cxpg.output.manifest import Manifest
from airflow_provider_cxpg.output.table_calls import StagedFile
from airflow_provider_cxpg.output.verify import output_problems
from airflow_provider_cxpg.planning.merge_key import MergeKey, merge_key
from airflow_provider_cxpg.planning.plan import ExtractPlan, key_to_json
from airflow_provider_cxpg.run.extraction import Extraction, ExtractResult

__all__ = ["TABLE_FORMATS", "TableExtraction", "check_table_arguments", "staging_name"]

TABLE_FORMATS = ("parquet", "delta", "iceberg")


def check_table_arguments(
    table_format: str,
    write_mode: str | None,
    *,
    parallelism: int = 1,
    key_range: bool = False,
    incremental: bool = False,
    planned_window: bool = False,
) -> str | None:
    """Refuse a format/mode that cannot be honoured, before anything runs; return the mode to use.

    :param key_range: the run reads one key range (``lower_key``/``upper_key``: a mapped fan-out).
    :param incremental: the run reads an incremental window (``watermark_column``).
    :param planned_window: the window comes from the partition planner (a mapped fan-out).
    """
    if table_format not in TABLE_FORMATS:
        raise InvalidInputError(f"table_format must be one of {list(TABLE_FORMATS)}, got {table_format!r}")
    if table_format == "parquet":
        if write_mode is not None:
            raise InvalidInputError(
                "write_mode applies to table formats (delta, iceberg): Parquet output is one dataset per "
                "destination, which a new run of the same task replaces"
            )
        return None
    mode = write_mode or "append"
    if mode not in WRITE_MODES:
        raise InvalidInputError(f"write_mode must be one of {list(WRITE_MODES)}, got {write_mode!r}")
    if parallelism > 1 or key_range or planned_window:
        raise InvalidInputError(
            f"table_format={table_format!r} commits one extraction per run as one table version: parallelism > 1 "
            "and key ranges of a mapped fan-out (lower_key/upper_key, a planner's window) are not supported yet"
        )
    if mode == "overwrite" and incremental:
        raise InvalidInputError(
            "write_mode='overwrite' with an incremental window would replace the table by the window's rows: "
            "use write_mode='merge' (or 'append') for incremental runs"
        )
    return mode


def _commit_timeout(extraction: Extraction) -> float | None:
    """The commit's own limit: a merge reads the run and rewrites files, more than one storage call.

    ``job_timeout`` when it is longer than ``storage_timeout``, else ``storage_timeout``.
    """
    storage, job = extraction.settings.storage_timeout, extraction.settings.job_timeout
    if storage is None or job is None:
        return storage if job is None else job
    return max(storage, job)


def staging_name(run_key: str) -> str:
    """The staging directory of a run inside the table (not hidden: VACUUM may clean a dead run's files)."""
    return "cxpg-" + hashlib.sha256(run_key.encode()).hexdigest()[:16]


class TableExtraction:
    """An :class:`Extraction` into a table's staging directory, then its one commit.

    :param make: builds the extraction for a destination (the hook's ``prepare_extraction``).
    :param table: Delta: the table's root URL or path; Iceberg: ``namespace.table``.
    :param table_format: ``delta`` or ``iceberg``.
    :param write_mode: ``append``, ``overwrite`` or ``merge`` (by the plan's key).
    :param run_key: names the run across task tries (see the module docstring).
    :param storage_options: fsspec options for the store the files go to.
    :param catalog: Iceberg: the catalog's name in pyiceberg's configuration (default ``default``).
    :param catalog_properties: Iceberg: more catalog properties (``uri``, ``warehouse``, ...).

    Every call on the table runs under the extraction's ``storage_timeout``.
    """

    def __init__(
        self,
        make: Callable[..., Extraction],
        *,
        table: Any,
        table_format: str,
        write_mode: str,
        run_key: str,
        storage_options: dict[str, Any] | None = None,
        catalog: str | None = None,
        catalog_properties: Mapping[str, Any] | None = None,
    ) -> None:
        self._make = make
        self.table_format = table_format
        self.write_mode = write_mode
        self.run_key = run_key
        self.app_id = APP_PREFIX + run_key
        self.staging = staging_name(run_key)
        self._aborted: str | None = None
        self.target: DeltaTarget | IcebergTarget
        if table_format == "delta":
            root = Destination(table, storage_options)  # names only: no call on the store here
            if not root.is_local and not root.url.startswith(("s3://", "s3a://")):
                raise InvalidInputError(
                    f"table_format='delta' writes local paths and S3 (or S3-compatible) stores, not {root.url!r}"
                )
            self._storage_options = root.storage_options or None
            self.table_url = root.url
            self.extraction = make(destination=root.sub(self.staging).url, storage_options=self._storage_options)
            extraction = self.extraction
            self.target = DeltaTarget(
                root.url,
                lambda: delta_storage_options(root.url, extraction.sink_options()),  # renewed credentials
                timeout=extraction.settings.storage_timeout,
                commit_timeout=_commit_timeout(extraction),
                compression=extraction.options.parquet.compression,
                fsspec_options=extraction.sink_options,  # what the worker writes the staged files with
            )
            self._root: str | None = root.url
        else:
            # The staging directory is in the table's location, known once the table exists: this
            # extraction plans (its destination is never written) and run() makes the one that copies.
            self._storage_options = storage_options
            self.extraction = make(destination=tempfile.gettempdir(), storage_options=storage_options)
            self.target = IcebergTarget(
                str(table),
                catalog=catalog,
                catalog_properties=catalog_properties,
                timeout=self.extraction.settings.storage_timeout,
                commit_timeout=_commit_timeout(self.extraction),
            )
            self.extraction.redactor.add(*self.target.secrets())
            self.table_url = self.target.uri
            self._root = None
        self.destination = self.extraction.destination

    def abort(self, reason: str) -> None:
        self._aborted = reason
        self.extraction.abort(reason)
        if isinstance(self.target, IcebergTarget):  # a catalog call in progress ends now
            self.target.abort(reason)

    def _stage(self, schema: Any) -> None:
        """Iceberg: the extraction that copies, into the table's data directory."""
        if self._root is not None:
            return
        root = self.target.staging_root(schema) if isinstance(self.target, IcebergTarget) else ""
        planner = self.extraction
        if self._aborted:
            raise ExtractionAborted.because(self._aborted)
        self.extraction = self._make(
            destination=f"{root}/{self.staging}",
            storage_options=self._storage_options,
            run_id=planner.run_id,
            querylog=planner.log,  # one run, one query log
        )
        self.extraction.plan = planner.plan
        self.extraction.redactor.add(*planner.redactor.secrets)
        self.destination = self.extraction.destination
        self._root = root
        if self._aborted:  # on_kill came while the copying extraction was being built
            self.extraction.abort(self._aborted)
            raise ExtractionAborted.because(self._aborted)

    def run(self) -> ExtractResult:
        try:
            return self._run()
        finally:
            self.target.close()  # the Iceberg catalog's process ends with the run

    def _run(self) -> ExtractResult:
        log = self.extraction.log
        plan = self.extraction.plan or self.extraction.build_plan()
        version = self.target.committed(self.app_id)
        if version is not None:  # an earlier try committed, then died before it could report
            self._stage(plan.schema)
            log.emit("job.plan", note=f"run {self.run_key} is already table version {version}: not committed again")
            return self._result_of_earlier_try(version)
        merging = self._merge_key(plan) if self.write_mode == "merge" else None
        key = merging.names if merging is not None else plan.key_names
        new_columns = self.target.check_schema(plan.schema, write_mode=self.write_mode, key=key)
        self._stage(plan.schema)
        recorded = Manifest.load(self.destination)
        if recorded is not None and recorded.table is not None:
            # The manifest says this run committed, though the table no longer shows it (its log or
            # snapshots expired since): never extract again over files the table may reference.
            version = recorded.table.get("version", UNKNOWN_VERSION)
            log.emit("job.plan", note=f"run {self.run_key} is recorded as table version {version}: not committed again")
            return self._result_of_earlier_try(version)
        manifest = self._staged_run(plan)
        if manifest is not None:
            # Every chunk is staged and checked, the commit never landed (it failed, timed out or the
            # task died first): commit those files instead of reading the source again, and never
            # let a new extraction rewrite files a late commit may reference.
            log.emit("job.plan", note=f"all {manifest.rows} rows of run {self.run_key} are staged: committing them")
            result = self._result_of(manifest)
        else:
            result = self.extraction.run()
            manifest = Manifest.load(self.destination)
            assert manifest is not None and manifest.status == "complete"
        if self.extraction._aborted:  # on_kill before the commit: nothing is committed, the task fails
            raise ExtractionAborted.because(self.extraction._aborted)
        if merging is not None and not merging.unique:
            self._refuse_repeated_keys(list(merging.names), manifest)
        if isinstance(self.target, DeltaTarget):
            self._refuse_nulls([c for c in self.target.required_columns() if c in plan.schema.names], manifest)
        else:
            self._refuse_undescribable(manifest)
        files = [StagedFile(f"{self.staging}/{c.file}", c.bytes, c.rows) for c in manifest.chunks if c.file]
        committing = time.monotonic()
        version = self.target.committed(self.app_id)  # the retry of a commit that timed out
        referenced = True
        if version is None:
            metadata = {"cxpg.run_id": result.run_id, "cxpg.rows": result.rows}
            arguments: dict[str, Any] = {"write_mode": self.write_mode, "key": key, "app_id": self.app_id}
            if isinstance(self.target, IcebergTarget):
                assert self._root is not None
                version, referenced = self.target.commit(
                    files, plan.schema, metadata=metadata, root=self._root, **arguments
                )
            else:
                version, referenced = self.target.commit(files, plan.schema, metadata=metadata, **arguments)
        commit_seconds = time.monotonic() - committing
        log.emit(
            "job.plan",
            note=f"committed {result.rows} rows as {self.table_format} version {version} ({self.write_mode})"
            + (f"; new column(s) {new_columns}" if new_columns else ""),
            seconds=commit_seconds,
        )
        result.extra["commit_seconds"] = round(commit_seconds, 3)
        manifest.table = {
            "format": self.table_format,
            "uri": self.table_url,
            "version": version,
            "write_mode": self.write_mode,
            "files_in_table": referenced,
        }
        manifest.save(self.destination)
        if not referenced:  # merged into files of its own: the staged ones are not part of the table
            for name in manifest.files:
                self.destination.remove(name)
            result.files = []
        return self._with_table(result, version)

    def _merge_key(self, plan: ExtractPlan) -> MergeKey:
        with self.extraction.control_connection("plan") as conn:
            return merge_key(conn, plan)

    def _refuse_nulls(self, columns: list[str], manifest: Manifest) -> None:
        """The table declares ``columns`` NOT NULL, and adding files checks no value: the run's are checked here."""
        for name in manifest.files if columns else ():
            nulls = {c: n for c, n in self._null_counts(name, columns).items() if n}
            if nulls:
                message = (
                    f"the Delta table {self.table_url} declares {sorted(nulls)} NOT NULL, and this run holds "
                    f"NULL there ({nulls} in {name}): nothing is committed. Filter them out with `where`, or "
                    "make the column nullable"
                )
                manifest.status, manifest.error = "refused", message  # a retry reads the source again
                manifest.save(self.destination)
                raise DataIntegrityError(message, column=sorted(nulls)[0])

    def _null_counts(self, name: str, columns: list[str]) -> dict[str, int]:
        """NULLs per column of a staged file: from its footer's statistics, or its values where they say none."""
        metadata = self.destination.read_metadata(name)
        paths = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
        counts: dict[str, int] = {}
        for column in columns:
            index = paths.get(column)  # a nested column has leaves of other paths: its values are read
            if index is None:
                continue
            statistics = [metadata.row_group(g).column(index).statistics for g in range(metadata.num_row_groups)]
            if all(s is not None and s.has_null_count for s in statistics):
                counts[column] = sum(s.null_count for s in statistics)
        unknown = [c for c in columns if c not in counts]
        if unknown:
            values = self.destination.read_columns(name, unknown)
            counts.update({c: values.column(c).null_count for c in unknown})
        return counts

    def _refuse_undescribable(self, manifest: Manifest) -> None:
        """pyiceberg records each file's bounds as Python values: a date or timestamp before year 1 or
        after 9999 (PostgreSQL holds them; Parquet and Iceberg do too) fails its commit with
        "date value out of range", after every row was read. Refused here, naming the column."""
        for name in manifest.files:
            metadata = self.destination.read_metadata(name)
            for g in range(metadata.num_row_groups):
                group = metadata.row_group(g)
                for i in range(group.num_columns):
                    statistics = group.column(i).statistics
                    if statistics is None or not statistics.has_min_max:
                        continue
                    try:
                        statistics.min, statistics.max  # noqa: B018 - decoding them is the check
                    except (OverflowError, ValueError) as exc:
                        column = group.column(i).path_in_schema
                        message = (
                            f"column {column!r} holds values pyiceberg cannot record as the file's bounds ({exc}: a "
                            "date or timestamp before year 1 or after 9999): nothing is committed to "
                            f"{self.table_url}. Read it as text with column_casts={{{column!r}: 'text'}}, or filter "
                            "those rows out with `where`"
                        )
                        manifest.status, manifest.error = "refused", message  # a retry reads the source again
                        manifest.save(self.destination)
                        raise DataIntegrityError(message, column=column) from None

    def _refuse_repeated_keys(self, key: list[str], manifest: Manifest) -> None:
        """A merge matches each key to one row: refuse a run in which a key repeats, before the commit.

        Nothing proves this source's key unique (a query, a view, a key without a unique index).
        Ties at a chunk boundary fail the read already; ties inside one chunk are written as rows
        (an extraction to files keeps what the source holds), and merged they would leave two rows
        for one key in the table, for good, with a green task.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        parts = [self.destination.read_columns(name, key) for name in manifest.files]
        if not parts:
            return
        keys = pa.concat_tables(parts)
        counts = keys.group_by(key).aggregate([(key[0], "count")])
        repeated = counts.filter(pc.greater(counts[f"{key[0]}_count"], 1))
        if repeated.num_rows:
            first = repeated.slice(0, 1).to_pylist()[0]
            values = key_to_json([first[k] for k in key])
            message = (
                f"write_mode='merge' by {key}: key {values} appears {first[f'{key[0]}_count']} times in this run "
                f"({repeated.num_rows} keys repeat); nothing proves the source's key unique, and a merge "
                "would keep every copy. Make the key unique (a primary key, DISTINCT ON) or use append"
            )
            # Not "complete" any more: a retry must read the source again (fixed, perhaps), never
            # commit these staged files.
            manifest.status, manifest.error = "refused", message
            manifest.save(self.destination)
            raise DataIntegrityError(message, key=key, rows=keys.num_rows)

    def _staged_run(self, plan: Any) -> Manifest | None:
        """The staging manifest of this run when it is complete, of this plan, and its files are whole."""
        manifest = Manifest.load(self.destination)
        if manifest is None or manifest.status != "complete" or manifest.table is not None:
            return None
        if manifest.fingerprint != self.extraction.fingerprint(plan) or output_problems(self.destination, manifest):
            return None
        return manifest

    def _with_table(self, result: ExtractResult, version: int | None) -> ExtractResult:
        result.extra.update(
            {"table_format": self.table_format, "table_version": version, "write_mode": self.write_mode}
        )
        result.destination = self.table_url
        return result

    def _result_of(self, manifest: Manifest | None) -> ExtractResult:
        """The result a run reports from its staging manifest (no extraction in this try)."""
        listed = manifest is not None and (manifest.table or {}).get("files_in_table", True)
        return ExtractResult(
            run_id=manifest.run_id if manifest is not None else self.run_key,
            destination=self.table_url,
            rows=manifest.rows if manifest is not None else 0,
            chunks=len(manifest.chunks) if manifest is not None else 0,
            files=[self.destination.child_url(name) for name in manifest.files] if manifest and listed else [],
            bytes=manifest.bytes if manifest is not None else 0,
            first_key=manifest.first_key if manifest is not None else None,
            last_key=manifest.last_key if manifest is not None else None,
            seconds=0.0,
            manifest=self.destination.child_url("_manifest.json"),
            window=manifest.window if manifest is not None else None,
            high_watermark=(manifest.window or {}).get("high_watermark") if manifest is not None else None,
        )

    def _result_of_earlier_try(self, version: int) -> ExtractResult:
        manifest = Manifest.load(self.destination)
        recorded = (manifest.table or {}).get("version") if manifest is not None else None
        if version == UNKNOWN_VERSION:  # the log was cleaned up past the commit: the manifest says which
            version = recorded if recorded is not None else UNKNOWN_VERSION
        if manifest is not None and manifest.table is None:
            manifest.table = {"format": self.table_format, "uri": self.table_url, "version": version}
            manifest.save(self.destination)
        return self._with_table(self._result_of(manifest), version)
