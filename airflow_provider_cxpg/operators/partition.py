"""Operators to fan one extraction out over Airflow workers with dynamic task mapping.

::

    ranges = PostgresPartitionPlanOperator(task_id="plan", table="public.orders", partitions=8,
                                           destination=BASE)
    parts = PostgresExtractOperator.partial(task_id="extract", table="public.orders", ...)
                                   .expand_kwargs(ranges.output)
    check = PostgresPartitionValidateOperator(task_id="validate", destination=BASE)
    ranges >> parts >> check

Each mapped task extracts its own key range to ``BASE/range=NNNN/`` with its own manifest, so a
failed range is retried alone and resumes from its manifest. Mapped tasks run in separate processes
at different moments: they share no snapshot.

For incremental runs the planner fixes the window once and hands it to every range whole
(``watermark_window``, with the keys at its edges), so every range reads exactly that window, also
on the first run and on retries; no range looks for a start of its own. The validator checks that
every range read it, and only then commits it as the planner's state (see
:mod:`~airflow_provider_cxpg.planning.watermark_state`): the next run's window starts after a dataset that
was validated complete, never after one that failed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator

from airflow_provider_cxpg.durations import DEFAULT_QUERY_TIMEOUT, DEFAULT_STORAGE_TIMEOUT, as_seconds
from airflow_provider_cxpg.exceptions import DataIntegrityError, InvalidInputError, StorageError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.operators.assets import record_asset_event, stable_asset
from airflow_provider_cxpg.operators.killing import attach, kill, killable, raise_if_killed
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.output.manifest import SUCCESS_MARKER
from airflow_provider_cxpg.planning.incremental import WatermarkSpec
from airflow_provider_cxpg.planning.watermark_state import WatermarkState, source_identity, spec_for_task
from airflow_provider_cxpg.run.parallel import (
    DATASET_MANIFEST,
    changed_ranges,
    plan_or_reuse_ranges,
    validate_dataset,
    window_reference,
)

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = ["PostgresPartitionPlanOperator", "PostgresPartitionValidateOperator"]


class PostgresPartitionPlanOperator(BaseOperator):
    """Split a table's key space into ranges of about equal row counts; return one kwargs dict per range.

    The result feeds ``PostgresExtractOperator.partial(...).expand_kwargs(...)``: each dict holds
    ``lower_key``, ``upper_key`` and ``destination`` (``<destination>/range=NNNN``), plus, when
    ``watermark_column`` is set, the window every range reads (``watermark_window``; its bounds also
    as ``watermark_start`` / ``watermark_end``, for reading). The ranges are recorded in
    ``<destination>/_dataset_manifest.json``; re-running the planner before the dataset is complete
    returns the same ranges and window, so mapped retries keep resuming.

    :param postgres_conn_id: Airflow ``postgres`` connection.
    :param table: ``schema.table`` (templated), or ``sql``.
    :param sql: a query with ``key_columns`` in its output (templated).
    :param where: SQL condition (templated); pass the same one to the extract tasks.
    :param key_columns: the key (default: primary key); ``["ctid"]`` for page ranges.
    :param partitions: number of ranges.
    :param method: ``auto``, ``histogram``, ``sample``, ``ntile`` or ``ctid``.
    :param destination: base URL or path of the dataset (templated).
    :param watermark_column: fix one incremental window for every range (see the extract operator).
    :param watermark_start: exclusive lower bound (templated), for a one-off window; default: where
        the last *validated* dataset's window ended (the validator commits it), or a full copy.
    :param watermark_end: upper bound (templated); default: fixed now.
    :param watermark_lag: re-read this much before the start (see the extract operator).
    :param watermark_state_key: the Airflow Variable that keeps the planner's windows.
    :param storage_options: fsspec options for the destination.
    :param query_timeout: limit for each planning query (server ``statement_timeout`` too).
    :param storage_timeout: limit for each operation on the destination.
    """

    template_fields: Sequence[str] = (
        "table",
        "sql",
        "where",
        "key_columns",
        "destination",
        "watermark_start",
        "watermark_end",
    )
    template_ext: Sequence[str] = (".sql",)
    ui_color = "#336791"

    def __init__(
        self,
        *,
        destination: str,
        partitions: int,
        postgres_conn_id: str = "postgres_default",
        table: str | None = None,
        sql: str | None = None,
        where: str | None = None,
        key_columns: Sequence[str] | None = None,
        method: str = "auto",
        watermark_column: str | None = None,
        watermark_start: Any = None,
        watermark_end: Any = None,
        watermark_lag: Any = None,
        watermark_state_key: str | None = None,
        storage_options: dict[str, Any] | None = None,
        query_timeout: float | dt.timedelta | None = DEFAULT_QUERY_TIMEOUT,
        storage_timeout: float | dt.timedelta | None = DEFAULT_STORAGE_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._extraction: Any = None
        self._killed: str | None = None  # set by on_kill
        self.destination = destination
        self.storage_timeout = storage_timeout
        self.partitions = partitions
        self.postgres_conn_id = postgres_conn_id
        self.table = table
        self.sql = sql
        self.where = where
        self.key_columns = key_columns
        self.method = method
        self.watermark_column = watermark_column
        self.watermark_start = watermark_start
        self.watermark_end = watermark_end
        self.watermark_lag = watermark_lag
        self.watermark_state_key = watermark_state_key
        self.storage_options = storage_options
        self.query_timeout = query_timeout

    @cached_property
    def hook(self) -> ConnectorXPostgresHook:
        return ConnectorXPostgresHook(postgres_conn_id=self.postgres_conn_id)

    def _watermark(self, context: Context) -> tuple[WatermarkSpec | None, WatermarkState | None]:
        if not self.watermark_column:
            return None, None
        return spec_for_task(
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

    def _source_identity(self) -> str:
        return source_identity(
            table=self.table,
            sql=self.sql,
            where=self.where,
            key_columns=self.key_columns,
            column=self.watermark_column,
        )

    def execute(self, context: Context) -> list[dict[str, Any]]:
        with killable(self):
            return self._execute(context)

    def _execute(self, context: Context) -> list[dict[str, Any]]:
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int) or self.partitions < 1:
            raise InvalidInputError(f"partitions must be a positive integer, got {self.partitions!r}")
        spec, state = self._watermark(context)
        coordinator = self.hook.prepare_extraction(
            destination=self.destination,
            table=self.table,
            sql=self.sql,
            where=self.where,
            key_columns=self.key_columns,
            storage_options=self.storage_options,
            query_timeout=self.query_timeout,
            storage_timeout=self.storage_timeout,
            watermark=spec,
            owner=f"{getattr(self, 'dag_id', None) or '_'}.{self.task_id}",
        )
        attach(self, coordinator)  # on_kill cancels its planning queries
        destination = coordinator.destination
        dag_run_id = getattr(context.get("dag_run"), "run_id", None)
        ranges, record = plan_or_reuse_ranges(coordinator, destination, self.partitions, self.method, dag_run_id)
        extra: dict[str, Any] = {}
        if coordinator.watermark is not None:
            coordinator.windowed(coordinator.build_plan(), record.get("window"))
            assert coordinator.window is not None
            window = coordinator.window.to_json()
            record["window"] = window
            record["watermark_state"] = {
                "key": state.key if state is not None else None,
                "dag_run_id": dag_run_id,
                "source": self._source_identity(),
            }
            destination.write_json(DATASET_MANIFEST, record)
            extra = {
                "watermark_window": window_reference(record, destination.url),  # the window lives in the record
                "watermark_start": window["start"],
                "watermark_end": window["end"],
            }
        raise_if_killed(self)
        base = destination.url
        return [
            {
                "lower_key": entry["lower"],
                "upper_key": entry["upper"],
                "destination": f"{base}/{entry['path']}",
                "emit_asset": False,  # the dataset is one asset, the validator's
                **extra,
            }
            for entry in ranges
        ]

    def on_kill(self) -> None:
        """Cancel the planning query (a lock wait may last ``query_timeout``); ``execute`` then raises."""
        kill(self)


#: Seconds the validator tries, at most, to withdraw ``_SUCCESS`` after a failed check.
_WITHDRAW_SECONDS = 30.0


class PostgresPartitionValidateOperator(BaseOperator):
    """Prove a fanned-out dataset complete, write its dataset-level manifest, commit its window.

    Checks, each of which fails the task with an error that names what is wrong:

    * every range's extraction is complete, with the planned bounds and the planned window;
    * the ranges tile the key space (each upper bound is the next lower bound, first and last open),
      and no ``range=NNNN/`` folder outside the plan remains;
    * every file each range's manifest lists exists, has the committed size, its Parquet footer
      holds the committed row count, and it was written by that range's extraction as that chunk;
    * with ``verify_count``, the dataset's rows equal ``count(*)`` of the source *within the window
      the planner fixed* (only meaningful when the source did not change meanwhile).

    Then it writes the totals into ``_dataset_manifest.json`` (``status: complete``) and, for an
    incremental dataset, commits the window as the planner's state: the next run starts after it.
    Returns ``rows``, ``partitions``, ``files`` and ``destination``.

    :param destination: base URL or path of the dataset (templated).
    :param storage_options: fsspec options for the destination.
    :param verify_count: also count the source rows (with ``postgres_conn_id``; the source, ``where``
        and window come from the dataset manifest).
    :param postgres_conn_id: Airflow ``postgres`` connection, for ``verify_count``.
    :param table: the source table, if given, must be the one the planner recorded (templated).
    :param where: likewise for the planner's ``where`` (templated).
    :param storage_timeout: limit for each operation on the destination (footer reads included).
    :param query_timeout: limit for the ``verify_count`` query (server ``statement_timeout`` too; a
        ``count(*)`` of a large source may need more than the default hour, a lock wait should end sooner).
    """

    template_fields: Sequence[str] = ("destination", "table", "where")
    ui_color = "#336791"

    def __init__(
        self,
        *,
        destination: str,
        storage_options: dict[str, Any] | None = None,
        verify_count: bool = False,
        postgres_conn_id: str = "postgres_default",
        table: str | None = None,
        where: str | None = None,
        storage_timeout: float | dt.timedelta | None = DEFAULT_STORAGE_TIMEOUT,
        query_timeout: float | dt.timedelta | None = DEFAULT_QUERY_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._extraction: Any = None
        self._killed: str | None = None  # set by on_kill
        self.storage_timeout = storage_timeout
        self.query_timeout = query_timeout
        if not kwargs.get("outlets"):  # the dataset's stable asset (see operators/assets.py)
            asset = stable_asset(destination)
            if asset is not None:
                self.outlets = [asset]
        self.destination = destination
        self.storage_options = storage_options
        self.verify_count = verify_count
        self.postgres_conn_id = postgres_conn_id
        self.table = table
        self.where = where

    def execute(self, context: Context) -> dict[str, Any]:
        with killable(self):
            return self._execute(context)

    def _execute(self, context: Context) -> dict[str, Any]:
        timeout = as_seconds("storage_timeout", self.storage_timeout, allow_none=True)
        as_seconds("query_timeout", self.query_timeout, allow_none=True)  # bad input fails before any read
        destination = Destination(self.destination, self.storage_options, timeout=timeout)
        record = destination.read_json(DATASET_MANIFEST)
        if record is None:
            raise InvalidInputError(f"no {DATASET_MANIFEST} in {destination.url}: run the planner first")
        source = record.get("source") or {}
        for name, given in (("table", self.table), ("where", self.where)):
            if given not in (None, "") and given != source.get(name):
                raise InvalidInputError(
                    f"{name}={given!r} is not the planner's {name} ({source.get(name)!r}) for {destination.url}"
                )
        window = record.get("window")
        try:
            totals = validate_dataset(destination, record["ranges"], window=window, planned=record)
            if self.verify_count:
                expected = self._count_source(source, window)
                if expected != totals["rows"]:
                    raise DataIntegrityError(
                        f"the dataset holds {totals['rows']} rows, the source {expected}"
                        + (" in the planner's window" if window else ""),
                        rows=totals["rows"],
                        source_rows=expected,
                    )
        except Exception:
            self._withdraw_success_marker(destination)
            raise
        raise_if_killed(self)
        record.update(
            status="complete",
            rows=totals["rows"],
            bytes=totals["bytes"],
            files=totals["files"],
            partitions=totals["partitions"],
        )
        with contextlib.suppress(KeyError):
            record.pop("error")
        destination.write_json(DATASET_MANIFEST, record)
        destination.write_marker(SUCCESS_MARKER)  # the dataset is proven complete: readers may go
        changed = changed_ranges(destination, totals["partitions"])
        if changed:  # a range started again meanwhile (a cleared mapped task): not complete after all
            destination.remove(SUCCESS_MARKER)
            record["status"] = "running"
            destination.write_json(DATASET_MANIFEST, record)
            raise DataIntegrityError(
                f"{', '.join(changed)} started again while the dataset was validated: validate once it is done",
                ranges=changed,
            )
        state = record.get("watermark_state") or {}
        if window is not None and state.get("key"):
            WatermarkState(state["key"]).commit(window, state.get("dag_run_id"), state.get("source"))
            self.log.info("committed the window in Variable %s: the next run starts after it", state["key"])
        summary = {
            "rows": totals["rows"],
            "partitions": len(totals["partitions"]),
            "files": len(totals["files"]),
            "destination": destination.url,
        }
        extra = {"rows": totals["rows"], "partitions": len(totals["partitions"]), "run_id": record.get("run_id")}
        if window is not None:
            extra["high_watermark"] = window.get("high_watermark")
        record_asset_event(context, list(self.outlets or []), destination.url, extra, self.log)
        return summary

    def _withdraw_success_marker(self, destination: Destination) -> None:
        """The dataset is no longer proven complete: readers waiting on ``_SUCCESS`` must not go.

        Best effort: on a store that stopped answering this fails too, and the task's error must stay
        the one that failed the check (the read that hung), not this clean-up's.
        """
        # A destination of its own: the failed check may have tripped the tree's stuck-operation
        # breaker (one GET that stalled), and the marker must still be tried; briefly, as a best effort.
        limit = min(destination.timeout or _WITHDRAW_SECONDS, _WITHDRAW_SECONDS)
        fresh = Destination(destination.url, destination.storage_options, timeout=limit)
        try:
            if SUCCESS_MARKER in fresh.list_entries():
                fresh.remove(SUCCESS_MARKER)
        except StorageError as exc:
            self.log.warning("could not remove %s from %s after the failure: %s", SUCCESS_MARKER, destination.url, exc)

    def _count_source(self, source: dict[str, Any], window: dict[str, Any] | None) -> int:
        """``count(*)`` of the recorded source within the recorded window."""
        if not source.get("table") and not source.get("sql"):
            raise InvalidInputError("verify_count: the dataset manifest records no source")
        hook = ConnectorXPostgresHook(postgres_conn_id=self.postgres_conn_id)
        extraction = hook.prepare_extraction(
            destination=self.destination,
            table=source.get("table"),
            sql=source.get("sql"),
            where=source.get("where"),
            key_columns=source.get("key_columns"),
            watermark=WatermarkSpec.again(window) if window else None,
            query_timeout=self.query_timeout,
        )
        attach(self, extraction)  # on_kill cancels the count
        plan = extraction.windowed(extraction.build_plan(), None)
        with extraction.control_connection("count") as conn:
            return int(conn.execute(plan.count_sql()).fetchone()[0])

    def on_kill(self) -> None:
        """Cancel the ``verify_count`` query; ``execute`` then raises."""
        kill(self)
