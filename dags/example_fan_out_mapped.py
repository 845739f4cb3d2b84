"""Fan a large table out over Airflow workers: plan key ranges, extract each in a mapped task, validate.

The planner splits ``public.orders`` into ranges of about equal row counts; each mapped task extracts
one range to its own ``range=NNNN/`` prefix with its own manifest (a failed range is retried alone and
resumes); the last task checks that the ranges tile the key space and writes the dataset manifest.
Works with any executor: each mapped task is an ordinary task instance (Celery, Kubernetes...).
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
from airflow_provider_cxpg.operators.partition import (
    PostgresPartitionPlanOperator,
    PostgresPartitionValidateOperator,
)

OUTPUT = os.environ.get("CXPG_EXAMPLE_OUTPUT", "/tmp/cxpg-examples")
DATASET = OUTPUT + "/orders_fanout/{{ run_id | replace(':', '') }}"

with DAG(
    dag_id="example_fan_out_mapped",
    schedule="@daily",
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    tags=["cxpg", "example"],
) as dag:
    plan_ranges = PostgresPartitionPlanOperator(
        task_id="plan_ranges",
        postgres_conn_id="orders_db",
        table="public.orders",
        partitions=4,
        method="auto",  # pg_stats histogram when analysed, else a TABLESAMPLE of the keys
        destination=DATASET,
    )
    extract_range = PostgresExtractOperator.partial(
        task_id="extract_range",
        postgres_conn_id="orders_db",
        table="public.orders",
        chunk_rows=250_000,
        query_timeout=600,
        retries=2,
    ).expand_kwargs(plan_ranges.output)  # lower_key, upper_key, destination per range
    validate = PostgresPartitionValidateOperator(task_id="validate", destination=DATASET)

    plan_ranges >> extract_range >> validate

if __name__ == "__main__":
    dag.test()
