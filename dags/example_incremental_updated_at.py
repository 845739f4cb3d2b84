"""Hourly incremental copy of changed orders, by an ``updated_at`` watermark.

Each run reads ``previous high_watermark < updated_at <= max(updated_at) at start``. The first run
reads everything; later runs take ``watermark_start`` from the previous successful run's XCom.
Rows are still paged by primary key inside the window.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

OUTPUT = os.environ.get("CXPG_EXAMPLE_OUTPUT", "/tmp/cxpg-examples")

with DAG(
    dag_id="example_incremental_updated_at",
    schedule="@hourly",
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,  # windows must follow each other
    tags=["cxpg", "example"],
) as dag:
    changed_orders = PostgresExtractOperator(
        task_id="changed_orders",
        postgres_conn_id="orders_db",
        table="public.orders",
        watermark_column="updated_at",
        destination=OUTPUT + "/orders_changes/{{ run_id }}",
        chunk_rows=100_000,
        query_timeout=300,
    )

if __name__ == "__main__":
    dag.test()
