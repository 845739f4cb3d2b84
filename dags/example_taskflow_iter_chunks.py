"""TaskFlow: process a large table chunk by chunk in Python with ``iter_chunks``.

Each chunk arrives as a ``pyarrow.Table`` (memory-mapped from the supervised worker); only a small
summary goes to XCom.
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.common.compat.sdk import dag, task

from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook


@dag(
    dag_id="example_taskflow_iter_chunks",
    schedule="@daily",
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    tags=["cxpg", "example"],
)
def revenue_by_status() -> None:
    @task
    def summarise_orders() -> dict[str, float]:
        hook = ConnectorXPostgresHook(postgres_conn_id="orders_db")
        totals: dict[str, float] = {}
        for chunk in hook.iter_chunks(table="public.orders", columns=["status", "amount"], chunk_rows=200_000):
            grouped = chunk.group_by("status").aggregate([("amount", "sum")])
            for status, amount in zip(grouped["status"].to_pylist(), grouped["amount_sum"].to_pylist(), strict=True):
                totals[status] = totals.get(status, 0.0) + float(amount)
        return {status: round(total, 2) for status, total in sorted(totals.items())}

    summarise_orders()


dag = revenue_by_status()

if __name__ == "__main__":
    dag.test()
