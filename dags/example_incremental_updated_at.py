"""Hourly incremental copy of changed orders, by an ``updated_at`` watermark.

The first run is a full copy (rows whose ``updated_at`` is NULL included). Each later run reads
the rows after the window the last successful run committed, up to ``max(updated_at)`` when it
starts: rows holding that end value then are read, and the keys of those rows are remembered
(with their row versions), so a row written later with the same value is the next run's, and none
is read twice. The windows live in the Airflow Variable
``cxpg_watermark.example_incremental_updated_at.changed_orders``; a re-run of a DAG run reads its
own window again. Rows are still paged by primary key inside the window. See the README,
"Incremental runs".
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
        destination=OUTPUT + "/orders_changes/{{ run_id | replace(':', '') }}",
        chunk_rows=100_000,
        query_timeout=300,
    )

if __name__ == "__main__":
    dag.test()
