"""Incremental copy by transaction id (``xmin``) from a hot-standby replica.

The case this provider was born from: read only rows written since the last run, from a replica, with
no ``updated_at`` column to trust. The upper bound comes from the replica's current snapshot
(``pg_snapshot_xmin``), which assigns no transaction id and so works on a standby; nothing in the
window can still commit. Transaction-id wraparound is handled (see the README).
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

OUTPUT = os.environ.get("CXPG_EXAMPLE_OUTPUT", "/tmp/cxpg-examples")

with DAG(
    dag_id="example_xmin_replica",
    schedule="*/15 * * * *",
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["cxpg", "example"],
) as dag:
    orders_since_last_run = PostgresExtractOperator(
        task_id="orders_since_last_run",
        postgres_conn_id="orders_replica",  # points at the standby
        table="public.orders",
        watermark_column="xmin",
        destination=OUTPUT + "/orders_xmin/{{ run_id | replace(':', '') }}",
        chunk_rows=200_000,
        query_timeout=300,
        # on a standby, long reads can be cancelled by recovery conflicts: keep chunks short, and
        # let Airflow retry (the retry resumes from the manifest with the same window)
        retries=3,
    )

if __name__ == "__main__":
    dag.test()
