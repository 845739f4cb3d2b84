"""Nightly full copy of ``public.orders`` to Parquet, in keyset chunks, by a supervised worker.

The connection ``orders_db`` is an ordinary Airflow ``postgres`` connection. Files land in
``$CXPG_EXAMPLE_OUTPUT/orders/<run id>/part-NNNNNN.parquet`` beside a ``_manifest.json``; a retry of a
failed run continues after the last committed chunk.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

OUTPUT = os.environ.get("CXPG_EXAMPLE_OUTPUT", "/tmp/cxpg-examples")

with DAG(
    dag_id="example_full_table_extract",
    schedule="@daily",
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=5)},
    tags=["cxpg", "example"],
) as dag:
    extract_orders = PostgresExtractOperator(
        task_id="extract_orders",
        postgres_conn_id="orders_db",
        table="public.orders",  # key: the primary key, read from the catalog
        destination=OUTPUT + "/orders/{{ run_id | replace(':', '') }}",
        chunk_rows=250_000,  # one Parquet file per chunk; worker memory stays bounded by it
        query_timeout=600,  # per chunk; also the server's statement_timeout
        execution_timeout=dt.timedelta(hours=2),  # Airflow's limit still applies on top
        query_log_path=os.environ.get("CXPG_QUERY_LOG"),  # optional JSON-lines copy of the query log
    )

if __name__ == "__main__":
    dag.test()
