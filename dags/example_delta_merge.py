"""Hourly changes of ``public.orders`` merged into a Delta Lake table, one table version per run.

The first run copies the whole table; each later run reads the rows changed since the last window
(an ``updated_at`` watermark, as in ``example_incremental_updated_at``) and merges them by the
primary key, so the table equals the source row for row after every run (rows deleted at the
source stay). The worker stages the run's chunk files inside the table; one commit adds them, or
one MERGE folds them in. A retry resumes the staged chunks and never commits a run twice. Needs
the ``[delta]`` extra. See the README, "Lakehouse tables".
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

OUTPUT = os.environ.get("CXPG_EXAMPLE_OUTPUT", "/tmp/cxpg-examples")

with DAG(
    dag_id="example_delta_merge",
    schedule="@hourly",
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,  # windows, and merges, follow each other
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=5)},
    tags=["cxpg", "example", "delta"],
) as dag:
    orders_table = PostgresExtractOperator(
        task_id="orders_table",
        postgres_conn_id="orders_db",
        table="public.orders",
        watermark_column="updated_at",
        destination=OUTPUT + "/lake/orders",  # the Delta table's root (an s3:// URL works the same)
        table_format="delta",
        write_mode="merge",
        chunk_rows=100_000,
        query_timeout=300,
    )

if __name__ == "__main__":
    dag.test()
