"""One-command demo: ``python -m airflow_provider_cxpg.demo``.

1. starts an embedded PostgreSQL on 127.0.0.1 (or uses ``--dsn`` / ``--conn-id``),
2. creates ``public.orders`` with realistic data (1M rows by default, nine column types),
3. runs the example DAG ``dags/example_full_table_extract.py`` through ``dag.test()`` with a private
   Airflow home (SQLite metadata), printing the structured query log as it goes,
4. prints a summary (rows, files, seconds, rows/s), leaves the Parquet files where it says, and stops
   the server.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["ORDERS_DDL", "create_orders", "main"]

ORDERS_DDL = """
CREATE TABLE IF NOT EXISTS public.orders (
    id          bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    status      text NOT NULL,
    amount      numeric(12, 2) NOT NULL,
    is_priority boolean NOT NULL,
    ref         uuid NOT NULL,
    note        text,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
)
"""

_FILL = """
INSERT INTO public.orders
SELECT g,
       (g * 7919) %% 50000,
       (ARRAY['new', 'paid', 'shipped', 'delivered', 'returned'])[1 + g %% 5],
       round(((g * 37) %% 100000) / 100.0 + 1, 2),
       g %% 11 = 0,
       md5(g::text)::uuid,
       CASE WHEN g %% 13 = 0 THEN NULL ELSE 'order ' || g || ' for customer ' || (g * 7919) %% 50000 END,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '2 seconds',
       timestamptz '2024-01-01 00:00:00+00' + g * interval '2 seconds' + (g %% 97) * interval '1 minute'
FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g
"""


def create_orders(conn: Any, rows: int, *, batch: int = 500_000) -> None:
    """Create and fill ``public.orders`` (psycopg connection, autocommit) with ``rows`` rows."""
    conn.execute("DROP TABLE IF EXISTS public.orders")
    conn.execute(ORDERS_DDL)
    for start in range(1, rows + 1, batch):
        conn.execute(_FILL, {"start": start, "stop": min(rows, start + batch - 1)})
    conn.execute("VACUUM ANALYZE public.orders")


def _dags_folder() -> Path:
    """The example DAGs, shipped in the distribution as ``airflow_provider_cxpg.example_dags``."""
    from importlib.resources import files

    here = Path(str(files("airflow_provider_cxpg.example_dags")))
    if not (here / "example_full_table_extract.py").exists():  # pragma: no cover - a broken install
        raise SystemExit(f"example DAGs not found in {here}: reinstall airflow-provider-cxpg")
    return here


def _conn_json_from_dsn(dsn: str) -> str:
    url = urlparse(dsn)
    return json.dumps(
        {
            "conn_type": "postgres",
            "host": url.hostname or "127.0.0.1",
            "port": url.port or 5432,
            "login": unquote(url.username or ""),
            "password": unquote(url.password or ""),
            "schema": (url.path or "/postgres").lstrip("/") or "postgres",
        }
    )


def _print_event(event: dict[str, Any]) -> None:
    name = event.get("event", "")
    if name in {"worker.stderr", "query.start"}:
        return
    if name == "job.progress":
        total = f"/{event['estimated_rows']:,}" if event.get("estimated_rows") else ""
        percent = f" ({event['percent']:.0f}%)" if event.get("percent") is not None else ""
        eta = f", about {event['eta_seconds']:.0f}s left" if event.get("eta_seconds") is not None else ""
        print(
            f"  [progress]  {event['rows']:,}{total} rows{percent}, {event['rows_per_s']:,.0f} rows/s{eta}", flush=True
        )
        return
    keep = ("chunk", "rows", "bytes", "seconds", "rows_per_s", "key_from", "key_to", "worker_pid", "backend_pid")
    fields = " ".join(f"{k}={event[k]}" for k in keep if k in event)
    extra = event.get("error") or event.get("note") or event.get("wait_event") or ""
    print(f"  [query-log] {name:<22} {fields} {extra}".rstrip(), flush=True)


def _tail(path: Path, stop: threading.Event) -> None:
    """Print JSON-lines events as the task writes them."""
    position = 0
    while not stop.is_set() or (path.exists() and path.stat().st_size > position):
        if path.exists():
            with path.open(encoding="utf-8") as handle:
                handle.seek(position)
                for line in handle:
                    if line.endswith("\n"):
                        with contextlib.suppress(ValueError):
                            _print_event(json.loads(line))
                        position += len(line.encode("utf-8"))
        time.sleep(0.1)


def _prepare_airflow(home: Path, dags: Path) -> None:
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home / 'airflow.db'}"
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = os.environ.get("CXPG_DEMO_AIRFLOW_LOG_LEVEL", "WARNING")
    from airflow.utils import db

    db.initdb() if hasattr(db, "initdb") else db.resetdb()


def _run_dag(dags: Path) -> Any:
    spec = importlib.util.spec_from_file_location("example_full_table_extract", dags / "example_full_table_extract.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag.test()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_provider_cxpg.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to create in public.orders (default 1M)")
    parser.add_argument("--output", default="./demo-output", help="where the Parquet files go (default ./demo-output)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dsn", help="use your own PostgreSQL (postgresql://...) instead of an embedded one")
    source.add_argument("--conn-id", help="use an Airflow connection you already have (AIRFLOW_CONN_<ID> or a backend)")
    parser.add_argument("--no-create", action="store_true", help="with --dsn/--conn-id: public.orders already exists")
    args = parser.parse_args(argv)
    if args.rows <= 0:
        parser.error("--rows must be positive")

    output = Path(args.output).resolve()
    dags = _dags_folder()
    home = Path(tempfile.mkdtemp(prefix="cxpg-demo-airflow-"))
    log_path = home / "query-log.jsonl"
    os.environ["CXPG_EXAMPLE_OUTPUT"] = str(output)
    os.environ["CXPG_QUERY_LOG"] = str(log_path)
    server = None
    stop_tail = threading.Event()
    try:
        if args.conn_id:
            from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

            endpoint = ConnectorXPostgresHook(postgres_conn_id=args.conn_id).get_endpoint()
            os.environ["AIRFLOW_CONN_ORDERS_DB"] = json.dumps(
                {
                    "conn_type": "postgres",
                    "host": endpoint.host,
                    "port": endpoint.port,
                    "login": endpoint.user,
                    "password": endpoint.password,
                    "schema": endpoint.dbname,
                    "extra": dict(endpoint.params),
                }
            )
            dsn_for_setup = None
        else:
            if args.dsn:
                dsn = args.dsn
            else:
                from airflow_provider_cxpg.demo.embedded_postgres import EmbeddedPostgres, interrupt_on_termination

                interrupt_on_termination()  # a plain kill of the demo still stops its server
                print("starting an embedded PostgreSQL ...", flush=True)
                server = EmbeddedPostgres().start()
                dsn = server.dsn()
                print(f"  PostgreSQL on 127.0.0.1:{server.port} (data in {server.datadir})", flush=True)
            os.environ["AIRFLOW_CONN_ORDERS_DB"] = _conn_json_from_dsn(dsn)
            dsn_for_setup = dsn

        if not args.no_create:
            import psycopg

            if dsn_for_setup is None:
                from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

                kwargs = ConnectorXPostgresHook(postgres_conn_id="orders_db").get_endpoint().libpq_kwargs()
                conn = psycopg.connect(autocommit=True, **kwargs)
            else:
                conn = psycopg.connect(dsn_for_setup, autocommit=True)
            with conn:
                started = time.monotonic()
                print(f"creating public.orders with {args.rows:,} rows ...", flush=True)
                create_orders(conn, args.rows)
                print(f"  done in {time.monotonic() - started:.1f}s", flush=True)

        print("preparing a private Airflow home (SQLite metadata) ...", flush=True)
        _prepare_airflow(home, dags)
        print("running example_full_table_extract through dag.test() ...", flush=True)
        threading.Thread(target=_tail, args=(log_path, stop_tail), daemon=True).start()
        started = time.monotonic()
        dag_run = _run_dag(dags)
        elapsed = time.monotonic() - started
        stop_tail.set()
        time.sleep(0.3)
        state = str(getattr(dag_run, "state", "unknown"))
        manifests = sorted(output.glob("orders/*/_manifest.json"), key=lambda p: p.stat().st_mtime)
        if not manifests or "success" not in state:
            print(f"\nthe DAG run ended as {state}; see the log above", flush=True)
            return 1
        manifest = json.loads(manifests[-1].read_text())
        chunk_seconds = sum(c["seconds"] for c in manifest["chunks"]) or 1e-9
        print("\nsummary")
        print(f"  rows      {manifest['rows']:,}")
        print(f"  files     {len(manifest['files'])} Parquet files, {manifest['bytes'] / 1e6:.1f} MB")
        print(f"  where     {manifests[-1].parent}")
        print(f"  seconds   {elapsed:.1f} for the DAG run ({chunk_seconds:.1f} reading + writing chunks)")
        rows = manifest["rows"]
        print(f"  rows/s    {rows / elapsed:,.0f} end to end, {rows / chunk_seconds:,.0f} in chunks")
        print(f"  query log {log_path}")
        return 0
    finally:
        stop_tail.set()
        if server is not None:
            server.stop()
            print("embedded PostgreSQL stopped", flush=True)
        with contextlib.suppress(Exception):
            for item in home.iterdir():
                if item.name != "query-log.jsonl":
                    shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink()
