"""A hostile host process, run by ``test_worker_faults.py`` as its own interpreter.

It does what an Airflow task process may have done before our operator runs: a connectorx read in
the process itself (rayon's global pool now exists), background threads (like OpenTelemetry or log
shippers), Sentry initialised (its transport thread), and ``multiprocessing`` set to ``fork``.

1. The raw hazard: a forked child's partitioned connectorx read. Measured with connectorx 0.4.6 it
   hangs every time; the child is killed after a timeout.
2. The provider in the same process: N consecutive supervised reads must all succeed.

Prints one JSON line with the findings.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from urllib.parse import unquote, urlparse

RAW_TIMEOUT = 10.0


def main() -> None:
    dsn = os.environ["CXPG_HOSTILE_DSN"]
    reads = int(os.environ.get("CXPG_HOSTILE_READS", "20"))

    import connectorx as cx
    import psycopg
    import sentry_sdk

    sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", traces_sample_rate=1.0)
    stop = threading.Event()
    for _ in range(3):
        threading.Thread(target=lambda: [time.sleep(0.01) for _ in iter(stop.is_set, True)], daemon=True).start()
    multiprocessing.set_start_method("fork", force=True)

    schema = f"hostile_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(
            f"CREATE TABLE {schema}.t AS SELECT g::bigint AS id, md5(g::text) AS v FROM generate_series(1, 20000) g"
        )
        conn.execute(f"ALTER TABLE {schema}.t ADD PRIMARY KEY (id)")
    query = f"SELECT * FROM {schema}.t"
    try:
        cx.read_sql(
            dsn, query, partition_on="id", partition_num=2, return_type="arrow"
        )  # the host itself used connectorx

        # 1. the raw hazard
        child = os.fork()
        if child == 0:
            try:
                cx.read_sql(dsn, query, partition_on="id", partition_num=2, return_type="arrow")
                os._exit(0)
            except BaseException:
                os._exit(1)
        deadline = time.monotonic() + RAW_TIMEOUT
        hung = True
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(child, os.WNOHANG)
            if pid:
                hung = False
                break
            time.sleep(0.05)
        if hung:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)

        # 2. the provider, in the same hostile process
        url = urlparse(dsn)
        os.environ["AIRFLOW_CONN_HOSTILE_PG"] = json.dumps(
            {
                "conn_type": "postgres",
                "host": url.hostname,
                "port": url.port,
                "login": unquote(url.username or ""),
                "password": unquote(url.password or ""),
                "schema": (url.path or "/postgres").lstrip("/"),
            }
        )
        from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

        hook = ConnectorXPostgresHook(postgres_conn_id="hostile_pg")
        ok, slowest = 0, 0.0
        for i in range(reads):
            started = time.monotonic()
            if i % 2:
                rows = sum(t.num_rows for t in hook.iter_chunks(table=f"{schema}.t", chunk_rows=7000, query_timeout=30))
            else:
                rows = hook.read_arrow(query, query_timeout=30).num_rows
            slowest = max(slowest, time.monotonic() - started)
            ok += rows == 20000
        print(json.dumps({"raw_fork_hung": hung, "provider_reads_ok": ok, "provider_max_seconds": slowest}))
    finally:
        stop.set()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
