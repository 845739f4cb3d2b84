"""Nightly copy of ``public.orders`` as one Apache Iceberg commit, replacing the table's rows.

The table ``lake.orders`` lives in a SQL catalog on SQLite with a local warehouse under
``$CXPG_EXAMPLE_OUTPUT`` (a directory that must exist); in production name a catalog from
pyiceberg's own configuration (``iceberg_catalog="prod"`` and ``.pyiceberg.yaml`` or
``PYICEBERG_CATALOG__PROD__*``: REST, Glue, Hive, SQL on PostgreSQL). ``write_mode="overwrite"``
deletes the old rows and adds the run's files in one catalog commit, so readers see last night's
table or tonight's, never a mix; a retry of a failed night resumes its staged chunks and commits
once. Needs the ``[iceberg]`` extra. See the README, "Lakehouse tables".
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

OUTPUT = os.environ.get("CXPG_EXAMPLE_OUTPUT", "/tmp/cxpg-examples")

with DAG(
    dag_id="example_iceberg_snapshot",
    schedule="@daily",
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=5)},
    tags=["cxpg", "example", "iceberg"],
) as dag:
    orders_snapshot = PostgresExtractOperator(
        task_id="orders_snapshot",
        postgres_conn_id="orders_db",
        table="public.orders",
        destination="lake.orders",  # namespace.table in the catalog
        table_format="iceberg",
        write_mode="overwrite",
        iceberg_catalog="examples",
        iceberg_catalog_properties={
            "type": "sql",
            "uri": f"sqlite:///{OUTPUT}/iceberg_catalog.db",
            "warehouse": f"file://{OUTPUT}/warehouse",
        },
        chunk_rows=250_000,
        query_timeout=600,
    )

if __name__ == "__main__":
    dag.test()
