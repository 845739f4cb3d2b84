"""Keyset extraction: exactness, the manifest, resume after a killed worker, sizing, iter_chunks."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_cxpg.exceptions import (
    DataIntegrityError,
    DestinationConflictError,
    InvalidInputError,
    QueryError,
    StorageError,
    WorkerCrashedError,
)
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.planning.incremental import WatermarkSpec
from airflow_provider_cxpg.worker.boot import _pyarrow_requires_numpy
from tests.helpers import PgInfo, assert_nothing_left, manifest_of, read_output, wait_until, worker_pids

pytestmark = pytest.mark.integration

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 5.0, "cancel_grace": 2.0, "kill_grace": 2.0}
ROWS = 20_000


@pytest.fixture
def orders(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(
        f"""CREATE TABLE "{schema}".orders AS
            SELECT g::bigint AS id, (g % 97)::int AS customer, md5(g::text) AS note,
                   (g * 1.25)::numeric(12,2) AS amount, timestamptz '2024-01-01' + g * interval '1 second' AS at
            FROM generate_series(1, {ROWS}) g"""
    )
    admin.execute(f'ALTER TABLE "{schema}".orders ADD PRIMARY KEY (id)')
    for column in ("customer", "note", "amount", "at"):
        admin.execute(f'ALTER TABLE "{schema}".orders ALTER COLUMN {column} SET NOT NULL')
    return f"{schema}.orders"


def source_rows(admin: psycopg.Connection, table: str) -> list[tuple[Any, ...]]:
    return admin.execute(f"SELECT id, customer, note, amount, at FROM {table} ORDER BY id").fetchall()


def output_rows(directory: Path) -> list[tuple[Any, ...]]:
    table = read_output(directory)
    return [tuple(r[c] for c in ("id", "customer", "note", "amount", "at")) for r in table.to_pylist()]


@pytest.mark.parametrize("stream_rows", [0, 1_024], ids=["whole-chunks", "streamed"])
def test_full_extract_is_exact_and_the_manifest_records_every_chunk(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path, stream_rows: int
) -> None:
    before = set(worker_pids(0))
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=orders, chunk_rows=3_000, stream_rows=stream_rows, **FAST
    )
    # At once, not after a poll: neither the worker nor its forked reaper outlives a finished run.
    assert set(worker_pids(0)) - before == set()
    assert output_rows(out_dir) == source_rows(admin, orders)
    manifest = manifest_of(out_dir)
    assert manifest["status"] == "complete" and manifest["rows"] == ROWS == result.rows
    assert manifest["run_id"] == result.run_id and manifest["key_columns"] == ["id"]
    assert manifest["source"]["table"] == orders
    assert [c["name"] for c in manifest["schema"]] == ["id", "customer", "note", "amount", "at"]
    chunks = manifest["chunks"]
    assert len(chunks) == result.chunks == 7
    assert [c["file"] for c in chunks] == [f"part-{i:06d}.parquet" for i in range(7)]
    assert chunks[0]["first_key"] == [1] and chunks[-1]["last_key"] == [ROWS]
    for previous, chunk in itertools.pairwise(chunks):
        assert chunk["first_key"][0] == previous["last_key"][0] + 1
    for chunk in chunks:
        assert chunk["bytes"] == os.path.getsize(out_dir / chunk["file"]) and chunk["seconds"] > 0
        assert pq.read_metadata(out_dir / chunk["file"]).num_rows == chunk["rows"]
    assert pq.read_schema(out_dir / "part-000000.parquet").field("amount").type.scale == 2
    # a complete output: its files, the manifest, and the _SUCCESS marker readers look for
    assert sorted(os.listdir(out_dir)) == ["_SUCCESS", "_manifest.json"] + [c["file"] for c in chunks]
    summary = result.summary()
    assert {"rows", "chunks", "files", "destination", "first_key", "last_key", "seconds", "run_id"} <= set(summary)
    assert_nothing_left(admin)


def test_composite_key_and_where(conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path) -> None:
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir),
        table=orders,
        key_columns=["customer", "id"],
        where="customer < 10",
        chunk_rows=700,
        **FAST,
    )
    expected = admin.execute(f"SELECT id FROM {orders} WHERE customer < 10 ORDER BY customer, id").fetchall()
    assert read_output(out_dir).column("id").to_pylist() == [r[0] for r in expected]
    assert result.rows == len(expected)
    sql = manifest_of(out_dir)
    assert sql["key_columns"] == ["customer", "id"]


@pytest.mark.parametrize("stream_rows", [0, 1_024], ids=["whole-chunks", "streamed"])
def test_sigkill_mid_run_restarts_the_worker_and_output_is_exact(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path, stream_rows: int
) -> None:
    killed: list[int] = []

    def kill_after_two_chunks() -> None:
        manifest = out_dir / "_manifest.json"

        def committed() -> int:
            try:
                return len(json.loads(manifest.read_text())["chunks"])
            except (OSError, ValueError):
                return 0

        if wait_until(lambda: committed() >= 2 and bool(worker_pids()), 60, 0.01):
            pid = worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    threading.Thread(target=kill_after_two_chunks, daemon=True).start()
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir),
        table=orders,
        where="pg_sleep(0.00005) IS NOT NULL",
        chunk_rows=1_500,
        max_worker_restarts=2,
        stream_rows=stream_rows,
        **FAST,
    )
    assert killed, "the worker was never killed"
    assert result.worker_restarts == 1
    assert output_rows(out_dir) == source_rows(admin, orders)  # every row exactly once
    names = os.listdir(out_dir)
    assert not [n for n in names if n.endswith(".tmp")]
    assert_nothing_left(admin)


def test_task_retry_resumes_from_the_manifest(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path
) -> None:
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)

    def kill_after_three_chunks() -> None:
        def committed() -> int:
            try:
                return len(manifest_of(out_dir)["chunks"])
            except (OSError, ValueError):
                return 0

        if wait_until(lambda: committed() >= 3 and bool(worker_pids()), 60, 0.01):
            os.kill(worker_pids()[0], signal.SIGKILL)

    threading.Thread(target=kill_after_three_chunks, daemon=True).start()
    with pytest.raises(WorkerCrashedError):
        hook.extract(
            destination=str(out_dir),
            table=orders,
            where="pg_sleep(0.00005) IS NOT NULL",
            chunk_rows=1_500,
            max_worker_restarts=0,
            **FAST,
        )
    failed = manifest_of(out_dir)
    assert failed["status"] == "failed" and len(failed["chunks"]) >= 3
    committed_files = {c["file"]: os.path.getmtime(out_dir / c["file"]) for c in failed["chunks"]}

    # the retry (same arguments): continues after the last committed chunk
    result = hook.extract(
        destination=str(out_dir), table=orders, where="pg_sleep(0.00005) IS NOT NULL", chunk_rows=1_500, **FAST
    )
    assert result.resumed_from_chunk == len(failed["chunks"])
    assert result.run_id == failed["run_id"]
    assert output_rows(out_dir) == source_rows(admin, orders)
    for name, mtime in committed_files.items():  # committed chunks were not rewritten
        assert os.path.getmtime(out_dir / name) == mtime
    assert manifest_of(out_dir)["attempts"] == 2
    assert_nothing_left(admin)


def test_a_complete_extraction_is_replaced_by_a_rerun(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path
) -> None:
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    first = hook.extract(destination=str(out_dir), table=orders, chunk_rows=5_000, **FAST)
    (out_dir / "part-000042.parquet").write_bytes(b"stray file from some crashed attempt")
    (out_dir / ".part-000001.parquet.abcd.tmp").write_bytes(b"half")
    (out_dir / "_README.txt").write_text("not ours, and readers skip it: left alone")
    admin.execute(f"DELETE FROM {orders} WHERE id > 12000")
    second = hook.extract(destination=str(out_dir), table=orders, chunk_rows=5_000, **FAST)
    assert second.run_id != first.run_id and second.rows == 12_000 and second.resumed_from_chunk is None
    assert sorted(os.listdir(out_dir)) == [
        "_README.txt",
        "_SUCCESS",
        "_manifest.json",
        *[f"part-{i:06d}.parquet" for i in range(3)],
    ]
    assert output_rows(out_dir) == source_rows(admin, orders)


def test_a_rerun_that_cannot_remove_the_old_files_leaves_no_manifest_saying_complete(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path
) -> None:
    """The new record goes first: a removal failing half-way must not leave "complete" over files that are gone."""
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    hook.extract(destination=str(out_dir), table=orders, chunk_rows=5_000, **FAST)
    stuck = out_dir / "part-000001.parquet"
    stuck.unlink()
    stuck.mkdir()  # unlink() of it fails (EISDIR) after part-000000 is gone: a real OS error, half-way
    (stuck / "x").write_text("x")
    with pytest.raises(StorageError, match="removing part-000001.parquet"):
        hook.extract(destination=str(out_dir), table=orders, chunk_rows=5_000, **FAST)
    assert not (out_dir / "part-000000.parquet").exists()
    assert manifest_of(out_dir)["status"] != "complete" and not (out_dir / "_SUCCESS").exists()
    (stuck / "x").unlink()
    stuck.rmdir()
    again = hook.extract(destination=str(out_dir), table=orders, chunk_rows=5_000, **FAST)
    assert again.rows == ROWS and output_rows(out_dir) == source_rows(admin, orders)


def test_a_retry_does_not_continue_in_another_table_of_the_same_name(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """The fingerprint holds the relation the name resolved to: a table dropped and created again is another."""
    table = f'"{schema}".renamed'

    def create(source: str) -> None:
        admin.execute(f"DROP TABLE IF EXISTS {table}")
        admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, t time NOT NULL, src text NOT NULL)")
        admin.execute(f"INSERT INTO {table} SELECT g, '12:00', %s FROM generate_series(1, 20) g", (source,))

    create("old")
    admin.execute(f"UPDATE {table} SET t = '24:00' WHERE id = 15")  # refused by its guard: try 1 fails at chunk 2
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    with pytest.raises(DataIntegrityError):
        hook.extract(destination=str(out_dir), table=table, chunk_rows=5, **FAST)
    assert manifest_of(out_dir)["rows"] == 10
    create("new")
    retried = hook.extract(destination=str(out_dir), table=table, chunk_rows=5, **FAST)
    assert retried.resumed_from_chunk is None
    assert set(read_output(out_dir).column("src").to_pylist()) == {"new"}


def _failing_at_chunk_two(admin: psycopg.Connection, table: str, source: str) -> None:
    """20 rows; the 15th holds time 24:00, which its guard refuses: a run of 5-row chunks fails at chunk 2."""
    admin.execute(f"DROP TABLE IF EXISTS {table}")
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, t time NOT NULL, src text NOT NULL)")
    admin.execute(f"INSERT INTO {table} SELECT g, '12:00', %s FROM generate_series(1, 20) g", (source,))
    admin.execute(f"UPDATE {table} SET t = '24:00' WHERE id = 15")


def _rows(admin: psycopg.Connection, table: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in admin.execute(f"SELECT id, src FROM {table} ORDER BY id").fetchall()]


def _written(out: Path) -> list[tuple[Any, ...]]:
    return sorted((r["id"], r["src"]) for r in read_output(out).to_pylist())


def test_a_new_dag_run_does_not_continue_an_older_dag_runs_failed_extraction(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """A destination every run reuses: yesterday's failed run was continued, green, with yesterday's rows."""
    table = f'"{schema}".daily'
    _failing_at_chunk_two(admin, table, "yesterday")
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    for _ in range(2):  # a retry of the same DAG run continues it (and fails at the same row again)
        with pytest.raises(DataIntegrityError):
            hook.extract(destination=str(out_dir), table=table, chunk_rows=5, dag_run_id="run-1", **FAST)
    assert manifest_of(out_dir)["attempts"] == 2 and manifest_of(out_dir)["rows"] == 10
    admin.execute(f"UPDATE {table} SET t = '12:00', src = 'today'")
    admin.execute(f"DELETE FROM {table} WHERE id = 3")
    result = hook.extract(destination=str(out_dir), table=table, chunk_rows=5, dag_run_id="run-2", **FAST)
    assert result.resumed_from_chunk is None and manifest_of(out_dir)["dag_run_id"] == "run-2"
    assert _written(out_dir) == _rows(admin, table)


def test_a_retry_does_not_continue_in_the_same_table_of_another_database(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CREATE DATABASE b TEMPLATE a`` copies every table with its OID (as two databases built by the same
    migrations can share them): a retry through a connection to b continued a's chunks."""
    first, second = (f"tpl_{uuid.uuid4().hex[:8]}" for _ in range(2))
    url = pg.dsn.rsplit("/", 1)[0]
    admin.execute(f"CREATE DATABASE {first}")
    try:
        with psycopg.connect(f"{url}/{first}", autocommit=True) as source:
            _failing_at_chunk_two(source, "public.copied", "a")
        admin.execute(f"CREATE DATABASE {second} TEMPLATE {first}")
        with psycopg.connect(f"{url}/{second}", autocommit=True) as other:
            other.execute("UPDATE public.copied SET t = '12:00', src = 'b'")
            expected = _rows(other, "public.copied")
        ids = {}
        for database in (first, second):
            ids[database] = f"cxpg_db_{uuid.uuid4().hex[:8]}"
            monkeypatch.setenv(f"AIRFLOW_CONN_{ids[database].upper()}", pg.airflow_conn_json(schema=database))
        with pytest.raises(DataIntegrityError):
            ConnectorXPostgresHook(postgres_conn_id=ids[first]).extract(
                destination=str(out_dir), table="public.copied", chunk_rows=5, **FAST
            )
        assert manifest_of(out_dir)["rows"] == 10
        retried = ConnectorXPostgresHook(postgres_conn_id=ids[second]).extract(
            destination=str(out_dir), table="public.copied", chunk_rows=5, **FAST
        )
        assert retried.resumed_from_chunk is None and _written(out_dir) == expected
        assert manifest_of(out_dir)["relation"]["database"] == second
    finally:
        for database in (second, first):
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.mark.parametrize("when", ["before the first run", "after a complete run", "after a failed run"])
def test_files_a_reader_would_read_beside_the_output_are_refused_before_any_data_moves(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path, when: str
) -> None:
    """pyarrow's datasets, Spark and Hive read every file whose name does not start with ``_`` or ``.``:
    another tool's file, or a chunk copied beside its original, was read with the output, under _SUCCESS."""
    table = f'"{schema}".copied'
    _failing_at_chunk_two(admin, table, "x")
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    if when == "after a failed run":
        with pytest.raises(DataIntegrityError):
            hook.extract(destination=str(out_dir), table=table, chunk_rows=5, **FAST)
    admin.execute(f"UPDATE {table} SET t = '12:00'")
    if when == "after a complete run":
        hook.extract(destination=str(out_dir), table=table, chunk_rows=5, **FAST)
    out_dir.mkdir(exist_ok=True)
    before = sorted(os.listdir(out_dir))
    copy = out_dir / "part-000001 (copy).parquet"
    if (out_dir / "part-000001.parquet").exists():
        copy.write_bytes((out_dir / "part-000001.parquet").read_bytes())
    else:
        pq.write_table(pa.table({"id": [1]}), copy)
    with pytest.raises(DestinationConflictError, match="no manifest accounts for"):
        hook.extract(destination=str(out_dir), table=table, chunk_rows=5, **FAST)
    assert sorted(os.listdir(out_dir)) == sorted([*before, copy.name])  # nothing removed, nothing written
    copy.unlink()
    (out_dir / "nested").mkdir()  # a folder is read too
    with pytest.raises(DestinationConflictError, match="nested/"):
        hook.extract(destination=str(out_dir), table=table, chunk_rows=5, **FAST)
    (out_dir / "nested").rmdir()
    result = hook.extract(destination=str(out_dir), table=table, chunk_rows=5, **FAST)
    assert result.rows == 20 and _written(out_dir) == _rows(admin, table)


def test_a_query_log_among_the_output_files_is_refused_before_anything_is_written(
    conn_id: str, orders: str, out_dir: Path
) -> None:
    """Every dataset reader would read it as data (pyarrow's datasets fail on it, Spark too)."""
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    for inside in ("queries.jsonl", "logs/queries.jsonl"):
        with pytest.raises(InvalidInputError, match="query_log_path .* lies inside the destination"):
            hook.extract(destination=str(out_dir), table=orders, query_log_path=str(out_dir / inside), **FAST)
        assert not out_dir.exists() or not os.listdir(out_dir)
    result = hook.extract(
        destination=str(out_dir), table=orders, query_log_path=str(out_dir / "_queries.jsonl"), **FAST
    )
    assert result.rows == ROWS and (out_dir / "_queries.jsonl").stat().st_size > 0
    assert read_output(out_dir).num_rows == ROWS


def test_a_file_that_appears_during_the_run_fails_it_before_success_is_written(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path
) -> None:
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)

    def copy_a_chunk() -> None:
        first = out_dir / "part-000000.parquet"
        if wait_until(first.exists, 60, 0.01):
            (out_dir / "copy.parquet").write_bytes(b"PAR1 someone's copy")

    threading.Thread(target=copy_a_chunk, daemon=True).start()
    with pytest.raises(StorageError, match="copy.parquet: not in the manifest"):
        hook.extract(
            destination=str(out_dir), table=orders, where="pg_sleep(0.00005) IS NOT NULL", chunk_rows=2_000, **FAST
        )
    assert not (out_dir / "_SUCCESS").exists() and manifest_of(out_dir)["status"] == "failed"


def test_chunk_bytes_sizes_chunks_from_measured_width(conn_id: str, orders: str, out_dir: Path) -> None:
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=orders, chunk_rows=100_000, chunk_bytes=200_000, **FAST
    )
    rows = [c["rows"] for c in manifest_of(out_dir)["chunks"]]
    assert result.rows == ROWS and len(rows) > 3
    # the first chunk probes the width; later ones hold about 200 kB of Arrow data each
    assert all(1_000 <= r <= 5_000 for r in rows[1:-1]), rows


def test_chunk_rows_stays_the_maximum_under_chunk_bytes(conn_id: str, orders: str, out_dir: Path) -> None:
    """chunk_bytes sizes chunks down to at least 1,000 rows, but never past chunk_rows."""
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=orders, where="id <= 600", chunk_rows=50, chunk_bytes=100, **FAST
    )
    rows = [c["rows"] for c in manifest_of(out_dir)["chunks"]]
    assert result.rows == 600 and max(rows) <= 50, rows


@pytest.mark.parametrize("bound", ["12", 12, ["12"], (12,)])
def test_a_key_bound_given_as_one_value_bounds_the_first_key_column(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path, bound: Any
) -> None:
    """A templated ``upper_key`` renders to a string; taken apart as a sequence, ``"12"`` bounded a
    composite key at (1, 2): 13 rows instead of 130, and a green run."""
    table = f'"{schema}".pairs'
    admin.execute(f"CREATE TABLE {table} (a int NOT NULL, b int NOT NULL, v int, PRIMARY KEY (a, b))")
    admin.execute(f"INSERT INTO {table} SELECT i / 10, i % 10, i FROM generate_series(0, 199) i")
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=f"{schema}.pairs", upper=bound, chunk_rows=7, **FAST
    )
    assert sorted(read_output(out_dir).column("v").to_pylist()) == list(range(130))  # a <= 12
    assert result.rows == 130


def test_query_source_with_a_key_that_is_not_unique_fails_instead_of_losing_rows(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path
) -> None:
    with pytest.raises(DataIntegrityError, match="not unique"):
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir),
            sql=f"SELECT customer, note FROM {orders}",
            key_columns=["customer"],
            chunk_rows=50,
            **FAST,
        )
    assert manifest_of(out_dir)["status"] == "failed"
    assert_nothing_left(admin)


def test_query_source_with_unique_key_is_exact(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path
) -> None:
    ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir),
        sql=f"SELECT id * 2 AS k, note FROM {orders} WHERE customer = 3",
        key_columns=["k"],
        chunk_rows=40,
        **FAST,
    )
    expected = [r[0] for r in admin.execute(f"SELECT id * 2 FROM {orders} WHERE customer = 3 ORDER BY 1")]
    assert read_output(out_dir).column("k").to_pylist() == expected


def test_null_key_in_a_query_source_is_a_clear_error(conn_id: str, orders: str, out_dir: Path) -> None:
    with pytest.raises(DataIntegrityError, match="NULL"):
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir),
            sql=f"SELECT CASE WHEN id > 10 THEN id END AS k FROM {orders}",
            key_columns=["k"],
            **FAST,
        )


@pytest.mark.parametrize(
    ("source", "key", "stream_rows"),
    [
        ("query", ["k"], 0),
        ("query", ["k"], 64),
        ("view", ["k"], 0),
        ("matview", ["k"], 0),
        ("left_join", ["cid", "oid"], 0),
    ],
)
def test_null_keys_past_the_first_chunk_are_an_error_before_any_data_moves(
    conn_id: str,
    admin: psycopg.Connection,
    schema: str,
    orders: str,
    out_dir: Path,
    source: str,
    key: list[str],
    stream_rows: int,
) -> None:
    """Sources whose key the catalog cannot prove NOT NULL: ``k > last`` never matches a NULL, and NULLs
    sort last, so after the first chunk no page returns them; the run must not end green without them."""
    nullable = f"SELECT CASE WHEN id % 4 = 0 THEN NULL ELSE id END AS k, note FROM {orders}"
    if source == "view":
        admin.execute(f'CREATE VIEW "{schema}".v AS {nullable}')
    elif source == "matview":
        admin.execute(f'CREATE MATERIALIZED VIEW "{schema}".v AS {nullable}')
        admin.execute(f'CREATE UNIQUE INDEX ON "{schema}".v (k)')  # a unique index allows many NULLs
    elif source == "left_join":
        admin.execute(f'CREATE TABLE "{schema}".customers (cid int PRIMARY KEY)')
        admin.execute(f'INSERT INTO "{schema}".customers SELECT g FROM generate_series(0, 90) g')
    sources = {
        "query": {"sql": nullable},
        "view": {"table": f"{schema}.v"},
        "matview": {"table": f"{schema}.v"},
        "left_join": {
            "sql": f'SELECT c.cid, o.id AS oid FROM {orders} o LEFT JOIN "{schema}".customers c ON c.cid = o.customer'
        },
    }
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    with pytest.raises(DataIntegrityError, match="NULL") as caught:
        hook.extract(
            destination=str(out_dir / "nulls"),
            key_columns=key,
            chunk_rows=500,
            stream_rows=stream_rows,
            **sources[source],
            **FAST,
        )
    assert caught.value.column == key[0]
    assert not (out_dir / "nulls").exists() or not list((out_dir / "nulls").glob("part-*"))
    # The same source without the NULLs is read exactly, in many chunks: the probe refuses only NULLs.
    not_null = " AND ".join(f"{k} IS NOT NULL" for k in key)
    result = hook.extract(
        destination=str(out_dir / "filtered"),
        key_columns=key,
        chunk_rows=500,
        stream_rows=stream_rows,
        where=not_null,
        **sources[source],
        **FAST,
    )
    expected = admin.execute(
        f"SELECT count(*) FROM ({sources[source].get('sql') or 'SELECT * FROM ' + sources[source]['table']}) s "
        f"WHERE {not_null}"
    ).fetchone()[0]
    assert result.rows == expected == read_output(out_dir / "filtered").num_rows and result.chunks > 3
    assert_nothing_left(admin)


@pytest.mark.parametrize("pages", [False, True], ids=["keyset", "page-ranges"])
def test_a_source_without_columns_is_refused_before_any_data_moves(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path, pages: bool
) -> None:
    admin.execute(f"CREATE TABLE {schema}.no_columns (id int PRIMARY KEY)")
    admin.execute(f"INSERT INTO {schema}.no_columns SELECT generate_series(1, 3)")
    admin.execute(f"ALTER TABLE {schema}.no_columns DROP COLUMN id")  # rows stay, columns go
    arguments = {"key_columns": ["ctid"], "snapshot": True} if pages else {"sql": f"SELECT FROM {schema}.no_columns"}
    table = {} if "sql" in arguments else {"table": f"{schema}.no_columns"}
    with pytest.raises(InvalidInputError, match="returns no columns"):
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(destination=str(out_dir), **table, **arguments, **FAST)
    assert not out_dir.exists() or not list(out_dir.glob("part-*"))
    if not pages:  # the whole-result read plans the same way
        with pytest.raises(InvalidInputError, match="returns no columns"):
            ConnectorXPostgresHook(postgres_conn_id=conn_id).read_arrow(arguments["sql"])


def test_source_columns_named_like_the_hidden_fields_are_refused_before_any_data_moves(
    conn_id: str, orders: str, out_dir: Path
) -> None:
    with pytest.raises(InvalidInputError, match="hidden fields"):
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir),
            sql=f"SELECT id AS k, note AS __cxpg_tie FROM {orders}",
            key_columns=["k"],
            **FAST,
        )
    assert not out_dir.exists() or not list(out_dir.glob("part-*"))


def test_an_error_the_server_meets_while_planning_is_a_query_error_not_bad_input(
    conn_id: str, admin: psycopg.Connection, schema: str, orders: str, out_dir: Path
) -> None:
    """The window's end is read with the ``where`` applied: a function it calls raises there."""
    admin.execute(
        f"CREATE FUNCTION {schema}.gate(i bigint) RETURNS boolean LANGUAGE plpgsql AS "
        "$$ BEGIN IF i > 5 THEN RAISE EXCEPTION 'gate closed at %', i; END IF; RETURN true; END $$"
    )
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    arguments: dict[str, Any] = {"table": orders, "watermark": WatermarkSpec("id"), **FAST}
    with pytest.raises(QueryError, match="gate closed") as raised:
        hook.extract(destination=str(out_dir / "raised"), where=f"{schema}.gate(id)", **arguments)
    assert raised.value.sqlstate == "P0001" and not isinstance(raised.value, InvalidInputError)
    with pytest.raises(InvalidInputError, match="not valid"):  # a query that cannot run at all still is
        hook.extract(destination=str(out_dir / "invalid"), where=f"{schema}.gate(no_such_column)", **arguments)


def test_unquoted_non_ascii_table_names_fold_as_postgresql_folds_them(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    # PostgreSQL lowers only A-Z in unquoted UTF-8 names: Émile stays "Émile", never "émile".
    admin.execute(f'CREATE TABLE "{schema}".Émile (id int PRIMARY KEY)')
    admin.execute(f'INSERT INTO "{schema}".Émile SELECT generate_series(1, 3)')
    admin.execute(f'CREATE TABLE "{schema}"."émile" (id int PRIMARY KEY)')
    assert admin.execute(f'SELECT count(*) FROM "{schema}".Émile').fetchone()[0] == 3
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=f"{schema}.ÉMILE", **FAST
    )
    assert result.rows == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": -5}, "chunk_rows"),
        ({"table": "no_such_table"}, "does not exist"),
        ({"columns": ["id", "nope"]}, "nope"),
        ({"key_columns": ["note"]}, "not unique|tie"),
        ({"compression": "bogus"}, "compression"),
        ({"parquet_dictionary": "yes"}, "parquet_dictionary"),
        ({"parquet_dictionary": 1}, "parquet_dictionary"),
        ({"where": "no_such_column > 1"}, "not valid"),
        ({"column_casts": {"note": "no_such_type"}}, "not a known type"),
        ({"table": 'x"; DROP TABLE y; --'}, "cannot parse"),
        ({"table": '"x""; DROP TABLE y; --"'}, "does not exist"),
        ({"key_columns": ["id"], "columns": ["note", "note"]}, "repeats"),
    ],
)
def test_bad_input_fails_before_any_file_is_written(
    conn_id: str, orders: str, out_dir: Path, kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"destination": str(out_dir / "dest"), "table": orders, **FAST}
    arguments.update(kwargs)
    try:
        ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(**arguments)
    except InvalidInputError as exc:
        import re

        assert re.search(message, str(exc)), str(exc)
    else:
        # A non-unique user key on a table with a primary key gets the key appended instead.
        assert kwargs == {"key_columns": ["note"]}
        assert manifest_of(out_dir / "dest")["key_columns"] == ["note", "id"]
        return
    assert not (out_dir / "dest").exists() or not [n for n in os.listdir(out_dir / "dest") if n.startswith("part-")]


def test_iter_chunks_yields_exact_tables_and_early_close_stops_the_worker(
    conn_id: str, admin: psycopg.Connection, orders: str
) -> None:
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    tables = list(hook.iter_chunks(table=orders, chunk_rows=6_000, **FAST))
    assert [t.num_rows for t in tables] == [6_000, 6_000, 6_000, 2_000]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert ids == list(range(1, ROWS + 1))

    chunks = hook.iter_chunks(table=orders, chunk_rows=1_000, **FAST)
    first = next(chunks)
    assert first.num_rows == 1_000 and worker_pids()
    chunks.close()  # the consumer stops early
    assert_nothing_left(admin)
    assert first.column("id").to_pylist()[-1] == 1_000  # the mapped table outlives its spool file


@pytest.mark.parametrize("left", ["in-a-global", "in-a-cycle"])
def test_iter_chunks_left_suspended_at_exit_ends_cleanly(conn_id: str, orders: str, tmp_path: Path, left: str) -> None:
    """A program exits with an iteration still suspended (in a global; in a cycle, gc off).

    Python closed it only while tearing the interpreter down: the process died of ``Fatal Python
    error: _enter_buffered_busy`` (SIGABRT) and a read-ahead chunk of table rows stayed in /tmp.
    """
    spool = tmp_path / "tmp"
    spool.mkdir()
    program = f"""
import gc
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

chunks = ConnectorXPostgresHook(postgres_conn_id={conn_id!r}).iter_chunks(table={orders!r}, chunk_rows=500)
assert next(chunks).num_rows == 500
if {left == "in-a-cycle"!r}:
    gc.disable()
    holder = {{"chunks": chunks}}
    holder["self"] = holder
    del chunks, holder
print("exiting", flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", program],
        env={**os.environ, "TMPDIR": str(spool)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr[-2000:]
    assert "Fatal Python error" not in done.stderr, done.stderr[-2000:]
    assert not list(spool.glob("cxpg-spool-*")), list(spool.rglob("*"))
    assert wait_until(lambda: not worker_pids(0), 10, 0.05), worker_pids(0)


def test_iter_chunks_survives_a_killed_worker(conn_id: str, admin: psycopg.Connection, orders: str) -> None:
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    ids: list[int] = []
    for index, table in enumerate(hook.iter_chunks(table=orders, chunk_rows=4_000, max_worker_restarts=1, **FAST)):
        ids.extend(table.column("id").to_pylist())
        if index == 1:
            os.kill(worker_pids()[0], signal.SIGKILL)
            time.sleep(0.2)
    assert ids == list(range(1, ROWS + 1))
    assert_nothing_left(admin)


def test_the_reaper_forks_before_the_data_libraries_load_and_the_worker_loads_no_numpy(
    conn_id: str, orders: str
) -> None:
    """The reaper is forked before pyarrow and connectorx are imported, and NumPy never loads.

    Forked after them, the reaper carried 34 MiB of resident pages (counted again in every RSS sum
    over the task's processes); before them, ~11 MiB. NumPy is 10 MiB and ~0.1 s per worker start
    that the worker never uses (bench/README.md, "The worker's boot"). Looked at by the last chunk,
    when every step of a chunk has run (pyarrow 16 and 17 require NumPy: there it loads).
    """
    maps: dict[str, str] = {}
    for table in ConnectorXPostgresHook(postgres_conn_id=conn_id).iter_chunks(table=orders, chunk_rows=5_000, **FAST):
        assert table.num_rows
        (worker,) = worker_pids()
        (reaper,) = worker_pids(parent=worker)  # forked: the same command line, the worker its parent
        maps = {"worker": Path(f"/proc/{worker}/maps").read_text(), "reaper": Path(f"/proc/{reaper}/maps").read_text()}
    # what the checks look for is visible where it is loaded...
    assert "libarrow" in maps["worker"] and "/connectorx/" in maps["worker"]
    # ...and absent where it must not be
    if not _pyarrow_requires_numpy():
        assert "_multiarray_umath" not in maps["worker"], "the worker loaded NumPy"
    assert "libarrow" not in maps["reaper"] and "/connectorx/" not in maps["reaper"], (
        "the reaper was forked after the data libraries loaded"
    )


def test_empty_table_gives_an_empty_typed_file(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".empty (id int PRIMARY KEY, amount numeric(10,3), at timestamptz)')
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=f"{schema}.empty", **FAST
    )
    assert result.rows == 0 and result.chunks == 1
    table = pq.read_table(out_dir / "part-000000.parquet")
    assert table.num_rows == 0 and str(table.schema.field("amount").type) == "decimal128(10, 3)"
    assert manifest_of(out_dir)["rows"] == 0


@pytest.mark.parametrize("stream_rows", [0, 1_024], ids=["whole-chunks", "streamed"])
def test_exact_multiple_of_chunk_rows_writes_no_empty_trailing_file(
    conn_id: str, orders: str, out_dir: Path, stream_rows: int
) -> None:
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=orders, chunk_rows=5_000, stream_rows=stream_rows, **FAST
    )
    assert result.chunks == 4 and all(c["rows"] == 5_000 for c in manifest_of(out_dir)["chunks"])


def _dictionary_encoded(path: Path) -> dict[str, bool]:
    metadata = pq.ParquetFile(path).metadata
    group = metadata.row_group(0)
    return {
        group.column(i).path_in_schema: any("DICTIONARY" in e for e in group.column(i).encodings)
        for i in range(group.num_columns)
    }


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("auto", {"id": False, "customer": True, "note": False, "amount": False, "at": False}),
        (True, {"id": True, "customer": True, "note": True, "amount": True, "at": True}),
        (False, {"id": False, "customer": False, "note": False, "amount": False, "at": False}),
    ],
)
def test_dictionary_encoding_only_where_values_repeat(
    conn_id: str, admin: psycopg.Connection, orders: str, out_dir: Path, policy: Any, expected: dict[str, bool]
) -> None:
    """``auto``: the unique key, hashes, amounts and times go plain; ``customer`` (97 values) keeps
    its dictionary. The rows are the same whatever the encoding."""
    ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=orders, chunk_rows=10_000, parquet_dictionary=policy, **FAST
    )
    for chunk in manifest_of(out_dir)["chunks"]:
        assert _dictionary_encoded(out_dir / chunk["file"]) == expected
    assert output_rows(out_dir) == source_rows(admin, orders)


def test_the_writer_thread_gets_the_chunk_as_parts_it_can_free(pg: Any, tmp_path: Path) -> None:
    """The worker's read-ahead hands the writer the chunk's record batches, not the chunk itself.

    The writer thread's target used to hold the whole table until its file was committed, so two
    full chunks stayed alive while the next one was read (bench/README.md, issue 13). Read for real
    from PostgreSQL through the worker's own ``_serve``; the writer thread is replaced by a
    recorder, and the chunk must reach it only as a list of parts that nothing else holds.
    """
    import gc
    import sys
    import types

    import pyarrow as pa

    from airflow_provider_cxpg.conninfo import Redactor
    from airflow_provider_cxpg.worker import server
    from airflow_provider_cxpg.worker.boot import finish_imports
    from airflow_provider_cxpg.worker.chunk import ChunkState
    from airflow_provider_cxpg.worker.protocol import ChunkRead, ParquetSink, ReadChunk

    finish_imports()  # what the worker's warm-up thread does before its first read
    sent: list[Any] = []
    handed: list[Any] = []
    request = ReadChunk(
        query_id=1,
        chunk_index=0,
        sql="SELECT g::bigint AS id, repeat('x', 20) AS label FROM generate_series(1, 200000) AS g ORDER BY g",
        sink=ParquetSink(url=str(tmp_path / "part-000000.parquet")),
        schema=pa.schema([("id", pa.int64()), ("label", pa.string())]),
        key_fields=("id",),
    )
    config = types.SimpleNamespace(protocol="binary", pre_execution=())
    channel = types.SimpleNamespace(send=sent.append)
    recorder = types.SimpleNamespace(run=lambda request, finish: handed.append(finish))
    server._serve(request, pg.dsn, config, ChunkState(), channel, recorder, Redactor([]))  # type: ignore[arg-type]

    assert [type(m).__name__ for m in sent] == ["QueryStarted", "ChunkRead"], sent
    assert isinstance(sent[1], ChunkRead) and sent[1].rows == 200_000 and sent[1].last_key == (200_000,)
    (finish,) = handed
    assert not any(isinstance(arg, pa.Table) for arg in finish.args), "the writer holds the whole chunk"
    (parts,) = (arg for arg in finish.args if isinstance(arg, list))
    assert len(parts) > 1 and all(isinstance(p, pa.Table) for p in parts)
    gc.collect()
    others = [r for r in gc.get_referrers(parts) if r is not finish.args]
    assert others == [], "something besides the writer's target holds the parts"
    held = []
    for index in range(len(parts)):  # a loop, not a comprehension: that would close over `parts`
        held.append(sys.getrefcount(parts[index]))  # the list's reference + the call's
    assert held == [2] * len(parts), "a part is held elsewhere"
    done = finish()
    assert parts == [] and done.rows == 200_000
    assert pq.read_table(tmp_path / "part-000000.parquet").column("id").to_pylist() == list(range(1, 200_001))
