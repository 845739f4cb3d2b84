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
at different moments: they share no snapshot. For incremental runs the planner fixes the window once
(``watermark_start`` / ``watermark_end`` in every range's arguments), so all ranges read the same one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator

from airflow_provider_cxpg.destination import Destination
from airflow_provider_cxpg.exceptions import DataIntegrityError, InvalidInputError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.incremental import WatermarkSpec
from airflow_provider_cxpg.parallel import DATASET_MANIFEST, plan_or_reuse_ranges, validate_dataset

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = ["PostgresPartitionPlanOperator", "PostgresPartitionValidateOperator"]


class PostgresPartitionPlanOperator(BaseOperator):
    """Split a table's key space into ranges of about equal row counts; return one kwargs dict per range.

    The result feeds ``PostgresExtractOperator.partial(...).expand_kwargs(...)``: each dict holds
    ``lower_key``, ``upper_key`` and ``destination`` (``<destination>/range=NNNN``), plus the fixed
    ``watermark_start`` / ``watermark_end`` when ``watermark_column`` is set. The ranges are recorded in
    ``<destination>/_dataset_manifest.json``; re-running the planner before the dataset is complete
    returns the same ranges, so mapped retries keep resuming.

    :param postgres_conn_id: Airflow ``postgres`` connection.
    :param table: ``schema.table`` (templated), or ``sql``.
    :param sql: a query with ``key_columns`` in its output (templated).
    :param where: SQL condition (templated); pass the same one to the extract tasks.
    :param key_columns: the key (default: primary key); ``["ctid"]`` for page ranges.
    :param partitions: number of ranges.
    :param method: ``auto``, ``histogram``, ``sample``, ``ntile`` or ``ctid``.
    :param destination: base URL or path of the dataset (templated).
    :param watermark_column: fix one incremental window for every range (see the extract operator).
    :param watermark_start: exclusive lower bound (templated); default: previous ``high_watermark``.
    :param watermark_end: inclusive upper bound (templated); default: fixed now.
    :param storage_options: fsspec options for the destination.
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
        storage_options: dict[str, Any] | None = None,
        query_timeout: float | None = 3600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.destination = destination
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
        self.storage_options = storage_options
        self.query_timeout = query_timeout

    @cached_property
    def hook(self) -> ConnectorXPostgresHook:
        return ConnectorXPostgresHook(postgres_conn_id=self.postgres_conn_id)

    def _previous_window_end(self, context: Context) -> Any:
        """The ``watermark_end`` this planner handed out in its latest successful run, or None."""
        ti = context.get("ti")
        try:
            previous = ti.xcom_pull(task_ids=self.task_id, include_prior_dates=True) if ti else None
        except Exception:  # noqa: BLE001  no history is not an error
            return None
        if isinstance(previous, list) and previous and isinstance(previous[0], dict):
            return previous[0].get("watermark_end")
        return None

    def execute(self, context: Context) -> list[dict[str, Any]]:
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int) or self.partitions < 1:
            raise InvalidInputError(f"partitions must be a positive integer, got {self.partitions!r}")
        start = self.watermark_start
        if self.watermark_column and start in (None, ""):
            start = self._previous_window_end(context)
        coordinator = self.hook.prepare_extraction(
            destination=self.destination,
            table=self.table,
            sql=self.sql,
            where=self.where,
            key_columns=self.key_columns,
            storage_options=self.storage_options,
            query_timeout=self.query_timeout,
            watermark=WatermarkSpec(self.watermark_column, start, self.watermark_end)
            if self.watermark_column
            else None,
        )
        destination = Destination(self.destination, self.storage_options)
        ranges, record = plan_or_reuse_ranges(coordinator, destination, self.partitions, self.method)
        extra: dict[str, Any] = {}
        if coordinator.watermark is not None:
            coordinator.windowed(coordinator.build_plan(), record.get("window"))
            assert coordinator.window is not None
            record["window"] = coordinator.window.to_json()
            destination.write_json(DATASET_MANIFEST, record)
            extra = {"watermark_start": coordinator.window.start, "watermark_end": coordinator.window.end}
        base = destination.url
        return [
            {
                "lower_key": entry["lower"],
                "upper_key": entry["upper"],
                "destination": f"{base}/{entry['path']}",
                **extra,
            }
            for entry in ranges
        ]


class PostgresPartitionValidateOperator(BaseOperator):
    """Check a fanned-out dataset and write its dataset-level manifest.

    Every range's extraction must be complete, the ranges must tile the key space (each upper bound is
    the next lower bound, first and last open), and each range's chunk rows must add up. With
    ``verify_count`` the total is also compared with ``count(*)`` of the source (only meaningful when
    the source did not change meanwhile). Returns ``rows``, ``partitions``, ``files`` and
    ``destination``.

    :param destination: base URL or path of the dataset (templated).
    :param storage_options: fsspec options for the destination.
    :param verify_count: also count the source rows (needs ``postgres_conn_id`` and the source).
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.destination = destination
        self.storage_options = storage_options
        self.verify_count = verify_count
        self.postgres_conn_id = postgres_conn_id
        self.table = table
        self.where = where

    def execute(self, context: Context) -> dict[str, Any]:
        destination = Destination(self.destination, self.storage_options)
        record = destination.read_json(DATASET_MANIFEST)
        if record is None:
            raise InvalidInputError(f"no {DATASET_MANIFEST} in {destination.url}: run the planner first")
        totals = validate_dataset(destination, record["ranges"])
        if self.verify_count:
            if not self.table:
                raise InvalidInputError("verify_count needs `table`")
            hook = ConnectorXPostgresHook(postgres_conn_id=self.postgres_conn_id)
            extraction = hook.prepare_extraction(destination=self.destination, table=self.table, where=self.where)
            plan = extraction.build_plan()
            if record.get("window"):
                plan = extraction.windowed(plan, record["window"]) if extraction.watermark else plan
            with extraction.control_connection("count") as conn:
                expected = conn.execute(plan.count_sql()).fetchone()[0]
            if expected != totals["rows"]:
                raise DataIntegrityError(f"the dataset holds {totals['rows']} rows, the source {expected}")
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
        return {
            "rows": totals["rows"],
            "partitions": len(totals["partitions"]),
            "files": len(totals["files"]),
            "destination": destination.url,
        }
