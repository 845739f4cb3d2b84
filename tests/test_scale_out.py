"""Scale out: key-range planning, parallel workers in one task, fan-out over mapped tasks, consistency."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_cxpg.conninfo import connect
from airflow_provider_cxpg.exceptions import (
    CxpgError,
    DataIntegrityError,
    DestinationConflictError,
    QueryError,
    StorageError,
    WorkerCrashedError,
)
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
from airflow_provider_cxpg.operators.partition import PostgresPartitionPlanOperator, PostgresPartitionValidateOperator
from airflow_provider_cxpg.planning.key_ranges import plan_key_ranges
from airflow_provider_cxpg.planning.plan import SourceSpec, build_plan
from tests.helpers import PgInfo, assert_nothing_left, manifest_of, read_output, wait_until, worker_pids

pytestmark = pytest.mark.integration

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 5.0, "cancel_grace": 2.0, "kill_grace": 2.0}
ROWS = 40_000
# Slows every row a worker reads (pg_sleep waits at least 1 ms a call), but not the parent's key-range
# sample on its "-partition" control connection: with 40k rows that sample reads the whole table, and
# slowed it took ~60 s (a CI run: the fault came after the test had stopped waiting for the workers).
SLOW_READS = (
    "pg_sleep(CASE WHEN current_setting('application_name') LIKE '%-partition' THEN 0 ELSE 0.00005 END) IS NOT NULL"
)


@pytest.fixture
def events_table(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(
        f"""CREATE TABLE "{schema}".events (
              tenant int NOT NULL, seq bigint NOT NULL, kind text NOT NULL, payload text,
              PRIMARY KEY (tenant, seq))"""
    )
    admin.execute(
        f"""INSERT INTO "{schema}".events
            SELECT g % 7, g, (ARRAY['a','b','c'])[1 + g % 3], md5(g::text) FROM generate_series(1, {ROWS}) g"""
    )
    admin.execute(f'ANALYZE "{schema}".events')
    return f"{schema}.events"


def all_rows(admin: psycopg.Connection, table: str) -> list[tuple[Any, ...]]:
    return sorted(admin.execute(f"SELECT tenant, seq, kind, payload FROM {table}").fetchall())


def dataset_rows(base: Path) -> list[tuple[Any, ...]]:
    tables = [pq.read_table(p) for p in sorted(base.glob("range=*/part-*.parquet"))]
    table = pa.concat_tables(tables)
    return sorted(zip(*(table.column(c).to_pylist() for c in ("tenant", "seq", "kind", "payload")), strict=True))


def _plan(pg: PgInfo, conn_id: str, table: str, key: list[str] | None = None) -> Any:
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    conn = connect(hook.get_endpoint().with_session())
    return conn, build_plan(conn, SourceSpec(table=table, key_columns=tuple(key) if key else None))


@pytest.mark.parametrize(
    ("method", "composite"), [("histogram", False), ("sample", True), ("ntile", True), ("sample", False)]
)
def test_planner_ranges_tile_the_key_space(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, events_table: str, method: str, composite: bool
) -> None:
    table = events_table
    if not composite:  # pg_stats keeps a histogram only for a high-cardinality first key column
        admin.execute(f'CREATE TABLE "{schema}".single AS SELECT seq AS id, kind FROM {events_table}')
        admin.execute(f'ALTER TABLE "{schema}".single ADD PRIMARY KEY (id)')
        admin.execute(f'ANALYZE "{schema}".single')
        table = f"{schema}.single"
    conn, plan = _plan(pg, conn_id, table)
    with conn:
        ranges, used, seconds = plan_key_ranges(conn, plan, 4, method)
        assert used == method and seconds >= 0
        assert ranges[0].lower is None and ranges[-1].upper is None
        for previous, current in itertools.pairwise(ranges):
            assert current.lower == previous.upper
        counts = []
        for r in ranges:
            condition = " AND ".join(plan.range_condition(r.lower, r.upper)) or "true"
            counts.append(conn.execute(f"SELECT count(*) FROM {plan.from_clause} WHERE {condition}").fetchone()[0])
    assert sum(counts) == ROWS  # every row in exactly one range
    assert len(ranges) == 4
    if method == "ntile":
        assert max(counts) - min(counts) <= 1, counts
    else:
        assert min(counts) > ROWS / 4 * 0.5, counts  # estimates, but not wildly off


def test_parallel_workers_in_one_task_are_exact(
    conn_id: str, admin: psycopg.Connection, events_table: str, out_dir: Path
) -> None:
    op = PostgresExtractOperator(
        task_id="p",
        postgres_conn_id=conn_id,
        table=events_table,
        destination=str(out_dir),
        parallelism=3,
        chunk_rows=4_000,
        worker_settings=FAST,
    )
    summary = op.execute({})
    assert summary["rows"] == ROWS and summary["parallelism"] == 3 and summary["partitions"] == 3
    assert dataset_rows(out_dir) == all_rows(admin, events_table)
    dataset = manifest_of(out_dir).get("status") if (out_dir / "_manifest.json").exists() else None
    assert dataset is None  # the top level holds the dataset manifest, not an extraction manifest
    import json

    record = json.loads((out_dir / "_dataset_manifest.json").read_text())
    assert record["status"] == "complete" and record["rows"] == ROWS and len(record["partitions"]) == 3
    for entry in record["ranges"]:
        sub = manifest_of(out_dir / entry["path"])
        assert sub["status"] == "complete" and sub["bounds"] == {"lower": entry["lower"], "upper": entry["upper"]}
    assert_nothing_left(admin)


def test_parallel_stops_every_worker_when_one_dies_and_a_retry_resumes(
    conn_id: str, admin: psycopg.Connection, events_table: str, out_dir: Path
) -> None:
    arguments: dict[str, Any] = {
        "task_id": "p",
        "postgres_conn_id": conn_id,
        "table": events_table,
        "destination": str(out_dir),
        "parallelism": 2,
        "chunk_rows": 1_000,
        "where": SLOW_READS,
        "max_worker_restarts": 0,
        "worker_settings": FAST,
    }

    killed: list[int] = []

    def kill_one() -> None:
        if wait_until(lambda: len(worker_pids()) == 2, 120, 0.01):
            time.sleep(0.8)
            with contextlib.suppress(ProcessLookupError, IndexError):
                pid = worker_pids()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    with pytest.raises(CxpgError) as failure:
        try:
            PostgresExtractOperator(**arguments).execute({})
        finally:
            killer.join(timeout=5)
            assert killed, "the test did not kill a worker while both ran (the run ended first)"
    assert isinstance(failure.value, (WorkerCrashedError, CxpgError))
    assert_nothing_left(admin)  # the surviving worker was stopped too

    summary = PostgresExtractOperator(**arguments).execute({})  # the task's retry
    assert summary["rows"] == ROWS
    assert dataset_rows(out_dir) == all_rows(admin, events_table)
    resumed = [manifest_of(p.parent)["attempts"] for p in out_dir.glob("range=*/_manifest.json")]
    assert max(resumed) == 2  # at least one range continued from its manifest
    assert_nothing_left(admin)


def test_snapshot_gives_a_point_in_time_copy_while_rows_change(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, events_table: str, out_dir: Path
) -> None:
    """Documented guarantee: with snapshot=True the dataset equals the table at the run's start."""
    before = all_rows(admin, events_table)
    stop = threading.Event()
    changes = {"n": 0}

    def churn() -> None:
        wait_until(lambda: bool(worker_pids()), 60, 0.01)
        with psycopg.connect(pg.dsn, autocommit=True) as writer:
            while not stop.is_set():
                n = changes["n"]
                writer.execute(
                    f"INSERT INTO {events_table} VALUES (%s, %s, 'new', 'inserted during run')", (n % 7, 10_000_000 + n)
                )
                writer.execute(
                    f"UPDATE {events_table} SET payload = 'updated during run' WHERE seq = %s", (1 + (n * 997) % ROWS,)
                )
                writer.execute(f"DELETE FROM {events_table} WHERE seq = %s", (ROWS - n,))
                changes["n"] = n + 1
                time.sleep(0.005)

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        PostgresExtractOperator(
            task_id="p",
            postgres_conn_id=conn_id,
            table=events_table,
            destination=str(out_dir),
            parallelism=2,
            chunk_rows=2_000,
            where=SLOW_READS,
            worker_settings=FAST,
        ).execute({})
    finally:
        stop.set()
        churner.join(timeout=30)
    assert changes["n"] > 20, "the table did not change during the run"
    assert dataset_rows(out_dir) == before


def test_ctid_page_ranges_for_a_table_without_a_key(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".heap AS SELECT g AS n, md5(g::text) AS s FROM generate_series(1, 30000) g')
    admin.execute(f'INSERT INTO "{schema}".heap SELECT * FROM "{schema}".heap WHERE n <= 100')  # duplicates: no key
    admin.execute(f'ANALYZE "{schema}".heap')
    expected = sorted(admin.execute(f'SELECT n, s FROM "{schema}".heap').fetchall())
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    result = hook.extract(
        destination=str(out_dir / "one"), table=f"{schema}.heap", key_columns=["ctid"], chunk_rows=3_000, **FAST
    )
    got = pq.read_table(out_dir / "one" / "part-000000.parquet").num_rows
    assert result.chunks > 5 and got > 0
    table = pa.concat_tables([pq.read_table(out_dir / "one" / f) for f in manifest_of(out_dir / "one")["files"]])
    assert sorted(zip(table.column("n").to_pylist(), table.column("s").to_pylist(), strict=True)) == expected

    PostgresExtractOperator(
        task_id="p",
        postgres_conn_id=conn_id,
        table=f"{schema}.heap",
        key_columns=["ctid"],
        destination=str(out_dir / "par"),
        parallelism=3,
        chunk_rows=3_000,
        worker_settings=FAST,
    ).execute({})
    tables = [pq.read_table(p) for p in sorted((out_dir / "par").glob("range=*/part-*.parquet"))]
    merged = pa.concat_tables(tables)
    assert sorted(zip(merged.column("n").to_pylist(), merged.column("s").to_pylist(), strict=True)) == expected
    # Page ranges without a live row write no chunk: their numbers are skipped, and that is no gap.
    admin.execute(f'DELETE FROM "{schema}".heap WHERE n BETWEEN 5000 AND 25000')
    admin.execute(f'VACUUM "{schema}".heap')
    PostgresExtractOperator(
        task_id="p",
        postgres_conn_id=conn_id,
        table=f"{schema}.heap",
        key_columns=["ctid"],
        destination=str(out_dir / "holes"),
        parallelism=2,
        chunk_rows=3_000,
        worker_settings=FAST,
    ).execute({})
    holes = [pq.read_table(p).num_rows for p in (out_dir / "holes").glob("range=*/part-*.parquet")]
    assert sum(holes) == len(expected) - 20_001
    assert_nothing_left(admin)


def test_ctid_page_ranges_read_one_snapshot_while_rows_move_between_pages(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """An UPDATE writes the row's new version on another page: without one snapshot, a row read on
    an early page and updated meanwhile is read again on a later one (or missed the other way)."""
    admin.execute(
        f'CREATE TABLE "{schema}".heap WITH (fillfactor = 100) AS '
        "SELECT g AS n, md5(g::text) AS s FROM generate_series(1, 30000) g"
    )
    admin.execute(f'ALTER TABLE "{schema}".heap SET (autovacuum_enabled = false)')
    before = sorted(admin.execute(f'SELECT n, s FROM "{schema}".heap').fetchall())
    stop = threading.Event()
    updates = {"n": 0}

    def committed() -> int:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return len(manifest_of(out_dir)["chunks"])
        return 0

    def move_rows() -> None:
        # Rows of pages already read: their new versions go to the table's end (no room on a full
        # page), which the run reads later. Each batch is rows no earlier UPDATE has moved.
        wait_until(lambda: committed() >= 1, 60, 0.005)
        with psycopg.connect(pg.dsn, autocommit=True) as writer:
            for first in range(1, 1_000, 100):
                if stop.is_set():
                    break
                writer.execute(f'UPDATE "{schema}".heap SET s = s WHERE n BETWEEN %s AND %s', (first, first + 99))
                updates["n"] += 1
                time.sleep(0.02)

    mover = threading.Thread(target=move_rows, daemon=True)
    mover.start()
    try:
        result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir),
            table=f"{schema}.heap",
            key_columns=["ctid"],
            chunk_rows=2_000,
            where="CASE WHEN n % 5 = 0 THEN pg_sleep(0.0002) IS NOT NULL ELSE true END",
            **FAST,
        )
    finally:
        stop.set()
        mover.join(timeout=30)
    assert updates["n"] == 10 and result.chunks > 5, (updates, result.chunks)
    table = pa.concat_tables([pq.read_table(out_dir / f) for f in manifest_of(out_dir)["files"]])
    assert sorted(zip(table.column("n").to_pylist(), table.column("s").to_pylist(), strict=True)) == before


def test_a_page_range_run_retried_after_rows_moved_reads_every_page_again(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """A failed try's committed pages were read in its snapshot, which ended with it.

    Between the tries an UPDATE moves late rows onto early pages (there is room there). The retry
    once continued after the last committed page in a new snapshot: the moved rows sat on pages it
    had read under the old one, and the run ended green without them.
    """
    heap = f'"{schema}".heap'
    admin.execute(f"CREATE TABLE {heap} (id int NOT NULL, pad text) WITH (autovacuum_enabled = false)")
    admin.execute(f"ALTER TABLE {heap} ALTER pad SET STORAGE PLAIN")
    admin.execute(f'CREATE TABLE "{schema}".flag (x int)')
    admin.execute(
        f'CREATE FUNCTION "{schema}".gate(i int) RETURNS bool LANGUAGE plpgsql VOLATILE AS $f$ BEGIN '
        f"IF i > 1200 AND EXISTS (SELECT 1 FROM \"{schema}\".flag) THEN RAISE EXCEPTION 'the first try fails'; "
        "END IF; RETURN true; END $f$"
    )
    admin.execute(f"INSERT INTO {heap} SELECT i, repeat('x', 3100) FROM generate_series(1, 200) i")  # room left
    admin.execute(f"INSERT INTO {heap} SELECT i, repeat('z', 2000) FROM generate_series(1001, 1400) i")  # full
    admin.execute(f"VACUUM ANALYZE {heap}")
    admin.execute(f'INSERT INTO "{schema}".flag VALUES (1)')
    arguments = {
        "destination": str(out_dir),
        "table": f"{schema}.heap",
        "key_columns": ["ctid"],
        "columns": ["id"],
        "where": f'"{schema}".gate(id)',
        "chunk_rows": 40,
        **FAST,
    }
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    with pytest.raises(QueryError):
        hook.extract(**arguments)
    assert manifest_of(out_dir)["chunks"], "the first try committed nothing: the test proves nothing"
    admin.execute(f'DELETE FROM "{schema}".flag')
    admin.execute(f"UPDATE {heap} SET pad = repeat('y', 1500) WHERE id IN (1300, 1301, 1302)")
    moved = admin.execute(f"SELECT (ctid::text::point)[0] FROM {heap} WHERE id IN (1300, 1301, 1302)").fetchall()
    last_page_read = manifest_of(out_dir)["chunks"][-1]["last_key"][0]  # a page range's chunks name their pages
    assert moved and all(page < last_page_read for (page,) in moved), (moved, last_page_read)  # onto read pages
    result = hook.extract(**arguments)
    ids = sorted(read_output(out_dir).column("id").to_pylist())
    assert ids == sorted(r[0] for r in admin.execute(f"SELECT id FROM {heap}").fetchall())
    assert result.resumed_from_chunk is None


def test_ctid_page_ranges_without_a_snapshot_are_refused(conn_id: str, schema: str, out_dir: Path) -> None:
    with pytest.raises(CxpgError, match="snapshot"):
        PostgresExtractOperator(
            task_id="p",
            postgres_conn_id=conn_id,
            table=f"{schema}.heap",
            key_columns=["ctid"],
            snapshot=False,
            destination=str(out_dir),
            worker_settings=FAST,
        ).execute({})
    with pytest.raises(CxpgError, match="snapshot"):
        PostgresExtractOperator(
            task_id="p",
            postgres_conn_id=conn_id,
            table=f"{schema}.heap",
            key_columns=["ctid"],
            snapshot=False,
            parallelism=2,
            destination=str(out_dir),
            worker_settings=FAST,
        ).execute({})
    assert not list(out_dir.rglob("part-*"))


@pytest.fixture
def null_key_view(admin: psycopg.Connection, schema: str) -> str:
    # A unique index allows NULLs; a view (materialized here: TABLESAMPLE needs a heap) has no NOT NULL
    # on its key. Keyset predicates never select a NULL key, so these rows would be lost silently.
    admin.execute(
        f"""CREATE MATERIALIZED VIEW "{schema}".v AS
            SELECT CASE WHEN g % 4 = 0 THEN NULL ELSE g END AS k, md5(g::text) AS s
            FROM generate_series(1, 20000) g"""
    )
    admin.execute(f'CREATE UNIQUE INDEX ON "{schema}".v (k)')
    admin.execute(f'ANALYZE "{schema}".v')
    return f"{schema}.v"


@pytest.mark.parametrize("method", ["sample", "ntile"])
def test_parallel_ranges_over_a_null_key_fail_before_any_loss(
    conn_id: str, null_key_view: str, out_dir: Path, method: str
) -> None:
    with pytest.raises(DataIntegrityError, match="NULL"):
        PostgresExtractOperator(
            task_id="p",
            postgres_conn_id=conn_id,
            table=null_key_view,
            key_columns=["k"],
            parallelism=2,
            partition_method=method,
            destination=str(out_dir),
            worker_settings=FAST,
        ).execute({})
    assert not (out_dir / "_SUCCESS").exists()


def test_fan_out_over_a_null_key_fails_in_the_open_range(conn_id: str, null_key_view: str, out_dir: Path) -> None:
    ranges = PostgresPartitionPlanOperator(
        task_id="plan",
        postgres_conn_id=conn_id,
        table=null_key_view,
        key_columns=["k"],
        partitions=3,
        method="ntile",
        destination=str(out_dir),
    ).execute({})
    assert ranges[-1]["upper_key"] is None

    def extract(kwargs: dict[str, Any]) -> dict[str, Any]:
        return PostgresExtractOperator(
            task_id="e",
            postgres_conn_id=conn_id,
            table=null_key_view,
            key_columns=["k"],
            worker_settings=FAST,
            **kwargs,
        ).execute({})

    # Ranges bounded above cannot hold a NULL key (NULL sorts last), so they run without the probe.
    for bounded in ranges[:-1]:
        assert extract(bounded)["rows"] > 0
    with pytest.raises(DataIntegrityError, match="NULL"):
        extract(ranges[-1])
    with pytest.raises(StorageError, match="not complete"):
        PostgresPartitionValidateOperator(task_id="v", destination=str(out_dir)).execute({})
    assert not (out_dir / "_SUCCESS").exists()


def test_a_range_bounded_above_probes_its_later_key_columns(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """``(a, b) <= (u)`` holds for ``(a < u, NULL)``, yet paging inside the range skips such a row."""
    admin.execute(
        f"""CREATE VIEW "{schema}".pairs AS
            SELECT g / 10 AS a, CASE WHEN g % 10 = 5 THEN NULL ELSE g % 10 END AS b FROM generate_series(1, 2000) g"""
    )
    admin.execute(
        f'CREATE VIEW "{schema}".firsts AS SELECT NULLIF(g % 50, 0) AS a, g AS b FROM generate_series(1, 2000) g'
    )

    def extract(table: str, name: str) -> dict[str, Any]:
        return PostgresExtractOperator(
            task_id="e",
            postgres_conn_id=conn_id,
            table=f"{schema}.{table}",
            key_columns=["a", "b"],
            upper_key=[100],
            chunk_rows=7,
            destination=str(out_dir / name),
            worker_settings=FAST,
        ).execute({})

    with pytest.raises(DataIntegrityError, match="NULL"):
        extract("pairs", "pairs")
    # A NULL first column sorts after the bound: the open last range's rows, not this one's.
    assert extract("firsts", "firsts")["rows"] == 2000 - 40


def test_page_ranges_read_by_iter_chunks_take_a_snapshot_too(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, schema: str
) -> None:
    admin.execute(
        f'CREATE TABLE "{schema}".heap WITH (fillfactor = 100) AS '
        "SELECT g AS n, md5(g::text) AS s FROM generate_series(1, 20000) g"
    )
    admin.execute(f'ALTER TABLE "{schema}".heap SET (autovacuum_enabled = false)')
    seen: list[int] = []
    chunks = ConnectorXPostgresHook(postgres_conn_id=conn_id).iter_chunks(
        table=f"{schema}.heap", key_columns=["ctid"], chunk_rows=2_000, **FAST
    )
    for index, chunk in enumerate(chunks):
        seen.extend(chunk.column("n").to_pylist())
        if index == 0:  # rows already read get new versions at the table's end, not yet read
            with psycopg.connect(pg.dsn, autocommit=True) as writer:
                writer.execute(f'UPDATE "{schema}".heap SET s = s WHERE n <= 1000')
    assert sorted(seen) == list(range(1, 20001))


def test_a_foreign_tables_not_null_is_not_taken_on_trust(
    system_conn_id: str, system_admin: psycopg.Connection, system_pg: Any, out_dir: Path
) -> None:
    """postgres_fdw does not check a declared NOT NULL against the remote rows."""
    admin = system_admin
    admin.execute("DROP SCHEMA IF EXISTS fnull CASCADE")
    admin.execute("DROP SERVER IF EXISTS cxpg_fnull CASCADE")
    admin.execute("CREATE SCHEMA fnull")
    admin.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    admin.execute(
        "CREATE SERVER cxpg_fnull FOREIGN DATA WRAPPER postgres_fdw "
        f"OPTIONS (host '{system_pg.host}', port '{system_pg.port}', dbname '{system_pg.dbname}')"
    )
    admin.execute(
        "CREATE USER MAPPING FOR CURRENT_USER SERVER cxpg_fnull "
        f"OPTIONS (user '{system_pg.user}', password '{system_pg.password}')"
    )
    admin.execute(
        "CREATE TABLE fnull.remote AS "
        "SELECT 0 AS p, CASE WHEN g % 10 = 0 THEN NULL ELSE g END AS k FROM generate_series(1, 300) g"
    )
    admin.execute(
        "CREATE FOREIGN TABLE fnull.far (k int NOT NULL) SERVER cxpg_fnull OPTIONS (schema_name 'fnull', table_name 'remote')"
    )
    # Partitioned by another column than the key: a foreign partition's rows that break their
    # partition constraint are the user's responsibility (PostgreSQL's own caveat), its NOT NULL
    # on the key is not checked by anyone.
    admin.execute("CREATE TABLE fnull.parted (p int NOT NULL, k int NOT NULL) PARTITION BY LIST (p)")
    admin.execute("CREATE TABLE fnull.near PARTITION OF fnull.parted FOR VALUES IN (1)")
    admin.execute("INSERT INTO fnull.near SELECT 1, g FROM generate_series(1000, 1099) g")
    admin.execute(
        "CREATE FOREIGN TABLE fnull.far_part PARTITION OF fnull.parted FOR VALUES IN (0) "
        "SERVER cxpg_fnull OPTIONS (schema_name 'fnull', table_name 'remote')"
    )
    try:
        for table in ("fnull.far", "fnull.parted"):
            with pytest.raises(DataIntegrityError, match="NULL"):
                PostgresExtractOperator(
                    task_id="e",
                    postgres_conn_id=system_conn_id,
                    table=table,
                    key_columns=["k"],
                    chunk_rows=40,
                    destination=str(out_dir / table),
                    worker_settings=FAST,
                ).execute({})
            assert not (out_dir / table / "_SUCCESS").exists()
    finally:
        admin.execute("DROP SCHEMA fnull CASCADE")
        admin.execute("DROP SERVER cxpg_fnull CASCADE")


def test_an_inheritance_child_that_dropped_the_parents_not_null_is_probed(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """The parent's NOT NULL does not cover a child's rows: a child may drop it."""
    admin.execute(f'CREATE TABLE "{schema}".parent (k int NOT NULL, v text)')
    admin.execute(f'CREATE TABLE "{schema}".child () INHERITS ("{schema}".parent)')
    admin.execute(f'ALTER TABLE "{schema}".child ALTER COLUMN k DROP NOT NULL')
    admin.execute(f"INSERT INTO \"{schema}\".parent SELECT g, 'p' FROM generate_series(1, 200) g")
    admin.execute(
        f"INSERT INTO \"{schema}\".child SELECT CASE WHEN g % 10 = 0 THEN NULL ELSE g END, 'c' "
        "FROM generate_series(201, 400) g"
    )
    with pytest.raises(DataIntegrityError, match="NULL"):
        PostgresExtractOperator(
            task_id="e",
            postgres_conn_id=conn_id,
            table=f"{schema}.parent",
            key_columns=["k"],
            chunk_rows=40,
            destination=str(out_dir),
            worker_settings=FAST,
        ).execute({})
    assert not (out_dir / "_SUCCESS").exists()


SLOW_ROWS = "pg_sleep(0.0001) IS NOT NULL"


def test_fan_out_operators_with_a_failed_range_retried_alone(
    conn_id: str, admin: psycopg.Connection, events_table: str, out_dir: Path
) -> None:
    planner = PostgresPartitionPlanOperator(
        task_id="plan",
        postgres_conn_id=conn_id,
        table=events_table,
        partitions=3,
        method="ntile",
        destination=str(out_dir),
        where=SLOW_ROWS,  # every range reads the planner's where, the validator checks that
    )
    ranges = planner.execute({})
    assert len(ranges) == 3 and {"lower_key", "upper_key", "destination"} <= set(ranges[0])
    assert planner.execute({}) == ranges  # re-planning before completion reuses the recorded ranges

    with pytest.raises(StorageError, match="not complete"):
        PostgresPartitionValidateOperator(task_id="v", destination=str(out_dir)).execute({})

    def extract(kwargs: dict[str, Any], **more: Any) -> dict[str, Any]:
        return PostgresExtractOperator(
            task_id="e",
            postgres_conn_id=conn_id,
            table=events_table,
            chunk_rows=1_500,
            worker_settings=FAST,
            where=SLOW_ROWS,  # slow enough to kill the worker between chunks
            **kwargs,
            **more,
        ).execute({})

    extract(ranges[0])
    killer = threading.Thread(
        target=lambda: (
            wait_until(
                lambda: (
                    len(manifest_of(Path(ranges[1]["destination"]))["chunks"]) >= 2
                    if (Path(ranges[1]["destination"]) / "_manifest.json").exists()
                    else False
                ),
                60,
                0.01,
            )
            and os.kill(worker_pids()[0], signal.SIGKILL)
        ),
        daemon=True,
    )
    killer.start()
    with pytest.raises(WorkerCrashedError):
        extract(ranges[1], max_worker_restarts=0)
    retried = extract(ranges[1])  # the mapped task's retry
    assert retried["resumed_from_chunk"] >= 2
    extract(ranges[2])
    summary = PostgresPartitionValidateOperator(
        task_id="v",
        destination=str(out_dir),
        verify_count=True,
        postgres_conn_id=conn_id,
        table=events_table,
        where=SLOW_ROWS,
    ).execute({})
    assert summary["rows"] == ROWS and summary["partitions"] == 3
    assert dataset_rows(out_dir) == all_rows(admin, events_table)
    assert (out_dir / "_SUCCESS").exists()

    # A cleared mapped range runs again: the dataset is not proven complete while it does.
    seen: list[tuple[bool, str]] = []

    first_run = manifest_of(Path(ranges[0]["destination"]))["run_id"]

    def watch() -> None:  # once the range's new run has its manifest (before any chunk of it)
        def started() -> bool:
            try:
                return manifest_of(Path(ranges[0]["destination"]))["run_id"] != first_run
            except (OSError, ValueError):
                return False

        wait_until(started, 60, 0.005)
        record = json.loads((out_dir / "_dataset_manifest.json").read_text())
        seen.append(((out_dir / "_SUCCESS").exists(), record["status"]))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    extract(ranges[0], resume=False)
    watcher.join(30)
    assert seen == [(False, "running")]
    assert not (out_dir / "_SUCCESS").exists()  # until the validator proves it again
    PostgresPartitionValidateOperator(task_id="v", destination=str(out_dir)).execute({})
    assert (out_dir / "_SUCCESS").exists()
    assert json.loads((out_dir / "_dataset_manifest.json").read_text())["status"] == "complete"


def plan_two_ranges(conn_id: str, table: str, out_dir: Path) -> list[dict[str, Any]]:
    return PostgresPartitionPlanOperator(
        task_id="plan", postgres_conn_id=conn_id, table=table, partitions=2, method="ntile", destination=str(out_dir)
    ).execute({})


def extract_range(conn_id: str, source: str, entry: dict[str, Any], /, **more: Any) -> None:
    """Extract one planned range of ``source`` (``more`` may override its arguments, ``table`` too)."""
    PostgresExtractOperator(
        task_id="e", postgres_conn_id=conn_id, worker_settings=FAST, **{"table": source, **entry, **more}
    ).execute({})


def validate(out_dir: Path) -> dict[str, Any]:
    return PostgresPartitionValidateOperator(task_id="v", destination=str(out_dir)).execute({})


def test_the_validator_refuses_a_range_read_from_another_source_filter_or_schema(
    conn_id: str, admin: psycopg.Connection, schema: str, events_table: str, out_dir: Path
) -> None:
    """Bounds, window and files can all be right while a mapped range read the wrong rows."""
    admin.execute(f'CREATE TABLE "{schema}".copy (LIKE {events_table} INCLUDING ALL)')
    admin.execute(f'INSERT INTO "{schema}".copy SELECT * FROM {events_table}')
    ranges = plan_two_ranges(conn_id, events_table, out_dir)
    extract_range(conn_id, events_table, ranges[0])
    second = Path(ranges[1]["destination"])
    for wrong, problem in (
        ({"table": f"{schema}.copy"}, "the plan is of"),
        ({"where": "seq % 2 = 0"}, "where="),
        ({"columns": ["tenant", "seq", "kind"]}, "schema"),
    ):
        extract_range(conn_id, events_table, ranges[1], **wrong)
        with pytest.raises(StorageError, match=problem):
            validate(out_dir)
        assert not (out_dir / "_SUCCESS").exists()
        shutil.rmtree(second)
    extract_range(conn_id, events_table, ranges[1])
    assert validate(out_dir)["rows"] == ROWS
    assert dataset_rows(out_dir) == all_rows(admin, events_table)


def test_the_validator_refuses_a_range_read_from_a_table_of_the_same_name_in_another_database(
    pg: PgInfo,
    conn_id: str,
    admin: psycopg.Connection,
    schema: str,
    events_table: str,
    out_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Source, ``where``, key and schema all match by name: the validator passed a range of another
    database's rows (with ``verify_count`` off), and wrote ``_SUCCESS`` over it."""
    other_db = f"other_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {other_db}")
    try:
        with psycopg.connect(pg.dsn.rsplit("/", 1)[0] + f"/{other_db}", autocommit=True) as other:
            other.execute(f'CREATE SCHEMA "{schema}"')
            other.execute(
                f"CREATE TABLE {events_table} (tenant int NOT NULL, seq bigint NOT NULL, kind text NOT NULL, "
                "payload text, PRIMARY KEY (tenant, seq))"
            )
            other.execute(f"INSERT INTO {events_table} SELECT g % 7, g, 'z', 'other' FROM generate_series(1, 500) g")
        elsewhere = f"cxpg_other_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv(f"AIRFLOW_CONN_{elsewhere.upper()}", pg.airflow_conn_json(schema=other_db))
        ranges = plan_two_ranges(conn_id, events_table, out_dir)
        for entry, connection in zip(ranges, (conn_id, elsewhere), strict=True):
            extract_range(connection, events_table, entry)
        with pytest.raises(StorageError, match="another table of that name"):
            validate(out_dir)
        assert not (out_dir / "_SUCCESS").exists()
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {other_db} WITH (FORCE)")


def test_the_validator_refuses_files_a_reader_would_read_that_no_range_wrote(
    conn_id: str, admin: psycopg.Connection, events_table: str, out_dir: Path
) -> None:
    """It checked the files the manifests list, and wrote ``_SUCCESS`` over folders holding more:
    a chunk copied beside the others was read twice by every dataset reader."""
    ranges = plan_two_ranges(conn_id, events_table, out_dir)
    for entry in ranges:
        extract_range(conn_id, events_table, entry, chunk_rows=200)

    second = Path(ranges[1]["destination"])
    chunk = sorted(second.glob("part-*.parquet"))[1]
    for stray in (second / "part-999999.parquet", second / "nested" / "part-000000.parquet", out_dir / "extra.parquet"):
        stray.parent.mkdir(exist_ok=True)
        shutil.copy(chunk, stray)
        with pytest.raises(StorageError, match="which (no range wrote|its manifest omits)"):
            validate(out_dir)
        assert not (out_dir / "_SUCCESS").exists()
        stray.unlink()
        if stray.parent.name == "nested":
            stray.parent.rmdir()
    (second / ".hidden.tmp").write_bytes(b"x")  # readers skip names starting with . or _
    assert validate(out_dir)["rows"] == ROWS
    manifest = json.loads((second / "_manifest.json").read_text())
    gone = manifest["chunks"].pop(1)  # a chunk's entry and file both gone: every listed file checks out
    (second / gone["file"]).unlink()
    (second / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match="a chunk is missing"):
        validate(out_dir)


def test_a_dag_runs_planner_run_again_with_another_window_plans_again(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """Only the same window of the same DAG run reuses its complete dataset: a one-off window changed
    (the DAG fixed, its run cleared) once got the old dataset and the old window, green."""
    from types import SimpleNamespace

    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, v int NOT NULL)')
    admin.execute(f'INSERT INTO "{schema}".t SELECT g, g FROM generate_series(1, 100) g')
    context = {"dag_run": SimpleNamespace(run_id="manual__1")}

    def plan(start: int, end: int) -> list[dict[str, Any]]:
        return PostgresPartitionPlanOperator(
            task_id="plan",
            postgres_conn_id=conn_id,
            table=f"{schema}.t",
            partitions=2,
            method="ntile",
            destination=str(out_dir),
            watermark_column="v",
            watermark_start=start,
            watermark_end=end,
        ).execute(context)

    for entry in plan(10, 20):
        extract_range(conn_id, f"{schema}.t", entry, watermark_column="v")
    validate(out_dir)
    again = plan(50, 60)
    assert [(e["watermark_start"], e["watermark_end"]) for e in again] == [(50, 60), (50, 60)]


def test_a_file_no_range_would_write_is_refused_before_the_ranges_run(
    conn_id: str, events_table: str, out_dir: Path
) -> None:
    """Taken over from a single extraction, a stray file at the base was left; every range ran, and
    the dataset check then failed on it, on every retry."""
    ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(out_dir), table=events_table, chunk_rows=10_000, **FAST
    )
    shutil.copy(out_dir / "part-000000.parquet", out_dir / "part-000099.parquet")  # its own stray: replaced
    shutil.copy(out_dir / "part-000000.parquet", out_dir / "extra.parquet")
    with pytest.raises(DestinationConflictError, match="holds extra.parquet, which"):
        PostgresExtractOperator(
            task_id="p",
            postgres_conn_id=conn_id,
            table=events_table,
            destination=str(out_dir),
            parallelism=2,
            worker_settings=FAST,
        ).execute({})
    assert not list(out_dir.glob("range=*")) and (out_dir / "_manifest.json").exists()  # nothing removed either


def test_fan_out_example_dag(orders_db_for_fanout: Path, admin: psycopg.Connection) -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "dags" / "example_fan_out_mapped.py"
    spec = importlib.util.spec_from_file_location("example_fan_out_mapped_test", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from tests.helpers import register_dag
    from tests.test_operator_dags import run_dag

    dag_run = run_dag(register_dag(module.dag))  # no logical date on Airflow 3, as a run triggered from the UI
    assert "success" in str(dag_run.state)
    import json

    (dataset,) = list(orders_db_for_fanout.glob("orders_fanout/*/_dataset_manifest.json"))
    record = json.loads(dataset.read_text())
    assert record["status"] == "complete" and record["rows"] == 20_000 and len(record["partitions"]) == 4
    assert (dataset.parent / "_SUCCESS").exists()  # the validated dataset says so to its readers
    assert_nothing_left(admin)


@pytest.fixture
def orders_db_for_fanout(
    pg: PgInfo, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, airflow_db: Path
) -> Iterator[Path]:
    from airflow_provider_cxpg.demo import create_orders

    create_orders(admin, 20_000)
    monkeypatch.setenv("AIRFLOW_CONN_ORDERS_DB", pg.airflow_conn_json())
    monkeypatch.setenv("CXPG_EXAMPLE_OUTPUT", str(tmp_path))
    try:
        yield tmp_path
    finally:
        admin.execute("DROP TABLE IF EXISTS public.orders")


def test_the_validator_refuses_ranges_that_read_an_enum_value_under_two_labels(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """Range 0 read 'red', ``RENAME VALUE 'red' TO 'crimson'``, range 1 read 'crimson': each range's own
    check saw nothing change during its run, and the dataset passed with one value under two labels."""
    table = f'"{schema}".painted'
    admin.execute(f"CREATE TYPE \"{schema}\".colour AS ENUM ('red', 'green')")
    admin.execute(f'CREATE TABLE {table} (id int PRIMARY KEY, c "{schema}".colour NOT NULL)')
    admin.execute(f"INSERT INTO {table} SELECT g, 'red' FROM generate_series(1, 400) g")
    admin.execute(f"ANALYZE {table}")
    ranges = plan_two_ranges(conn_id, table, out_dir)
    extract_range(conn_id, table, ranges[0])
    admin.execute(f"ALTER TYPE \"{schema}\".colour RENAME VALUE 'red' TO 'crimson'")
    extract_range(conn_id, table, ranges[1])
    with pytest.raises(StorageError, match="the value 'red' is now labelled 'crimson'"):
        validate(out_dir)
    assert not (out_dir / "_SUCCESS").exists()
    # The whole DAG run again: the planner plans anew (its recorded labels are renamed), every range reads
    again = plan_two_ranges(conn_id, table, out_dir)
    for entry in again:
        extract_range(conn_id, table, entry)
    assert validate(out_dir)["rows"] == 400
    labels = pa.concat_tables([pq.read_table(p) for p in sorted(out_dir.glob("range=*/part-*.parquet"))])
    assert set(labels.column("c").to_pylist()) == {"crimson"}


def test_a_range_read_on_a_server_behind_the_planners_fails_instead_of_missing_rows(
    conn_id: str, admin: psycopg.Connection, events_table: str, out_dir: Path
) -> None:
    """The planner and each range are tasks of their own, each reaching its own server of a host list
    (or a load balancer): ranges read on a standby behind the planner's server wrote half the rows,
    and the validator, counting on that standby too, passed them. A server behind the WAL position the
    plan was made at is played here by a plan recorded at a position no server has reached."""
    ranges = plan_two_ranges(conn_id, events_table, out_dir)
    record = json.loads((out_dir / "_dataset_manifest.json").read_text())
    assert record["wal_position"]  # recorded where the ranges were planned
    extract_range(conn_id, events_table, ranges[0])  # a server that has replayed it reads as before
    record["wal_position"] = "FFFFFFFF/FFFFFFFF"
    (out_dir / "_dataset_manifest.json").write_text(json.dumps(record))
    with pytest.raises(QueryError, match="has not yet replayed WAL position FFFFFFFF/FFFFFFFF"):
        extract_range(conn_id, events_table, ranges[1])
    assert not list(Path(ranges[1]["destination"]).glob("part-*.parquet"))
    assert_nothing_left(admin)
