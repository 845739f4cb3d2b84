"""Apache Iceberg output: one catalog commit per run, exactly once across failures, upserted by key, schema checked.

Against the real PostgreSQL and a SQL catalog on SQLite with a local warehouse (the catalog the
issue names as enough for tests); every table is read back with pyiceberg's own scan.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_provider_cxpg.exceptions import CxpgError, InvalidInputError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
from tests.helpers import assert_nothing_left, worker_killed_mid_run

pytest.importorskip("pyiceberg")
sqlalchemy = pytest.importorskip("sqlalchemy")
if int(sqlalchemy.__version__.split(".")[0]) < 2:  # Airflow 2.11 pins SQLAlchemy 1.4
    pytest.skip("pyiceberg's SQL catalog needs SQLAlchemy 2 (Airflow 3 has it)", allow_module_level=True)
from pyiceberg.catalog import load_catalog  # noqa: E402

pytestmark = pytest.mark.integration

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 5.0, "cancel_grace": 2.0, "kill_grace": 2.0}
ROWS = 3_000


@pytest.fixture
def hook(conn_id: str) -> ConnectorXPostgresHook:
    return ConnectorXPostgresHook(postgres_conn_id=conn_id)


@pytest.fixture
def catalog(tmp_path: Path) -> dict[str, Any]:
    """The operator's catalog arguments: a SQL catalog on SQLite, a local warehouse."""
    (tmp_path / "warehouse").mkdir()
    return {
        "iceberg_catalog": "cxpg_test",
        "iceberg_catalog_properties": {
            "type": "sql",
            "uri": f"sqlite:///{tmp_path}/catalog.db",
            "warehouse": f"file://{tmp_path}/warehouse",
        },
    }


@pytest.fixture
def items(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(
        f'CREATE TABLE "{schema}".items (id bigint PRIMARY KEY, name text, amount numeric(12,2), '
        "changed_at timestamptz NOT NULL, at time)"
    )
    admin.execute(
        f"""INSERT INTO "{schema}".items SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'item ' || g END,
            g * 1.25, '2024-01-01'::timestamptz + g * interval '1 minute', '12:00'::time + g * interval '1 second'
            FROM generate_series(1, {ROWS}) g"""
    )
    return f"{schema}.items"


def source_rows(admin: psycopg.Connection, table: str, columns: str = "id, name, amount") -> list[tuple[Any, ...]]:
    return [tuple(r) for r in admin.execute(f"SELECT {columns} FROM {table} ORDER BY id").fetchall()]


def iceberg_table(catalog: dict[str, Any], identifier: str) -> Any:
    return load_catalog(catalog["iceberg_catalog"], **catalog["iceberg_catalog_properties"]).load_table(identifier)


def table_rows(
    catalog: dict[str, Any], identifier: str, columns: tuple[str, ...] = ("id", "name", "amount")
) -> list[tuple[Any, ...]]:
    data = iceberg_table(catalog, identifier).scan(selected_fields=columns).to_arrow().to_pylist()
    return sorted(tuple(r[c] for c in columns) for r in data)


def test_append_overwrite_and_merge_each_commit_once_and_the_table_equals_the_source(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, catalog: dict[str, Any]
) -> None:
    first = hook.extract(
        destination="lake.items", table=items, table_format="iceberg", chunk_rows=700, **catalog, **FAST
    )
    table = iceberg_table(catalog, "lake.items")
    assert first.extra["table_version"] == table.current_snapshot().snapshot_id and first.rows == ROWS
    assert table_rows(catalog, "lake.items") == source_rows(admin, items)
    assert len(table.inspect.files()) == 5  # the staged files, added as they are
    assert table_rows(catalog, "lake.items", ("id", "at"))[:1] == source_rows(admin, items, "id, at")[:1]

    admin.execute(f"UPDATE {items} SET name = 'renamed', changed_at = '2030-01-01' WHERE id % 100 = 0")
    admin.execute(f"INSERT INTO {items} SELECT g, 'new', 1, '2030-01-01', NULL FROM generate_series(3001, 3020) g")
    merged = hook.extract(
        destination="lake.items",
        table=items,
        where="changed_at >= '2030-01-01'",
        table_format="iceberg",
        write_mode="merge",
        **catalog,
        **FAST,
    )
    assert merged.rows == 30 + 20 and merged.extra["table_version"] != first.extra["table_version"]
    assert table_rows(catalog, "lake.items") == source_rows(admin, items)  # row for row

    admin.execute(f"DELETE FROM {items} WHERE id > 1000")
    before = len(iceberg_table(catalog, "lake.items").snapshots())
    hook.extract(
        destination="lake.items", table=items, table_format="iceberg", write_mode="overwrite", **catalog, **FAST
    )
    assert table_rows(catalog, "lake.items") == source_rows(admin, items)
    snapshots = iceberg_table(catalog, "lake.items").snapshots()
    assert len(snapshots) - before in (1, 2)  # one commit: a delete and an append snapshot at most
    assert_nothing_left(admin)


def test_a_merge_paged_by_a_column_that_is_not_unique_upserts_by_the_primary_key(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, catalog: dict[str, Any]
) -> None:
    """Paged by (changed_at, id), the upsert once matched by that pair: a moved row was inserted twice."""
    admin.execute(f"CREATE INDEX ON {items} (changed_at)")
    arguments = {"table": items, "table_format": "iceberg", "write_mode": "merge", "key_columns": ["changed_at"]}
    hook.extract(destination="lake.items", chunk_rows=700, **arguments, **catalog, **FAST)
    admin.execute(f"UPDATE {items} SET changed_at = '2030-01-01', name = 'moved' WHERE id IN (5, 500)")
    hook.extract(destination="lake.items", where="changed_at >= '2030-01-01'", **arguments, **catalog, **FAST)
    assert table_rows(catalog, "lake.items") == source_rows(admin, items)
    assert_nothing_left(admin)


def test_a_killed_worker_and_retries_give_one_commit_without_duplicates(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, catalog: dict[str, Any]
) -> None:
    arguments: dict[str, Any] = {
        "destination": "lake.retried",
        "table": items,
        "table_format": "iceberg",
        "run_key": "dag.task@scheduled__2026-12-02",
        "chunk_rows": 300,
        "where": "pg_sleep(0.0005) IS NOT NULL",
        "max_worker_restarts": 0,
        **catalog,
        **FAST,
    }
    with worker_killed_mid_run(), pytest.raises(CxpgError):
        hook.extract(**arguments)
    assert iceberg_table(catalog, "lake.retried").current_snapshot() is None  # created, nothing committed

    retried = hook.extract(**arguments)
    assert retried.resumed_from_chunk is not None and retried.resumed_from_chunk > 0
    again = hook.extract(**arguments)  # after the commit landed: nothing committed twice
    assert again.extra["table_version"] == retried.extra["table_version"]
    assert len(iceberg_table(catalog, "lake.retried").snapshots()) == 1
    assert table_rows(catalog, "lake.retried") == source_rows(admin, items)
    assert_nothing_left(admin)


def test_schema_changes_evolve_or_fail_before_data_moves(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, catalog: dict[str, Any]
) -> None:
    hook.extract(destination="lake.evolving", table=items, table_format="iceberg", **catalog, **FAST)
    admin.execute(f"ALTER TABLE {items} ADD COLUMN note text")
    admin.execute(f"UPDATE {items} SET note = 'n' || id WHERE id <= 3")
    hook.extract(
        destination="lake.evolving", table=items, table_format="iceberg", write_mode="overwrite", **catalog, **FAST
    )
    assert table_rows(catalog, "lake.evolving", ("id", "note"))[:4] == [(1, "n1"), (2, "n2"), (3, "n3"), (4, None)]
    snapshots = len(iceberg_table(catalog, "lake.evolving").snapshots())
    admin.execute(f"ALTER TABLE {items} DROP COLUMN amount")
    with pytest.raises(InvalidInputError, match="amount"):
        hook.extract(destination="lake.evolving", table=items, table_format="iceberg", **catalog, **FAST)
    admin.execute(f"ALTER TABLE {items} ADD COLUMN amount text")
    with pytest.raises(InvalidInputError, match=r"amount \(decimal"):
        hook.extract(destination="lake.evolving", table=items, table_format="iceberg", **catalog, **FAST)
    assert len(iceberg_table(catalog, "lake.evolving").snapshots()) == snapshots
    with pytest.raises(InvalidInputError, match="namespace.table"):
        hook.extract(destination="no_namespace", table=items, table_format="iceberg", **catalog, **FAST)
    assert_nothing_left(admin)


def test_a_partitioned_table_made_elsewhere_is_refused_before_any_data_moves(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, catalog: dict[str, Any]
) -> None:
    """Files added to a table partitioned by ``k`` got their partition from column statistics, which
    skip NULLs: a file of ``k`` 1 and NULL was partition ``k = 1``, and ``k IS NULL`` read 0 of 10 rows."""
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import Schema
    from pyiceberg.transforms import IdentityTransform
    from pyiceberg.types import IntegerType, LongType, NestedField

    table = f'"{schema}".parts'
    admin.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, k int)")
    admin.execute(
        f"INSERT INTO {table} SELECT g, CASE WHEN g % 3 = 0 THEN NULL ELSE 1 END FROM generate_series(1, 30) g"
    )
    made = load_catalog(catalog["iceberg_catalog"], **catalog["iceberg_catalog_properties"])
    made.create_namespace_if_not_exists("pre")
    made.create_table(
        "pre.parts",
        schema=Schema(
            NestedField(1, "id", LongType(), required=False), NestedField(2, "k", IntegerType(), required=False)
        ),
        partition_spec=PartitionSpec(
            PartitionField(source_id=2, field_id=1000, transform=IdentityTransform(), name="k")
        ),
    )
    with pytest.raises(InvalidInputError, match="is partitioned"):
        hook.extract(destination="pre.parts", table=table, table_format="iceberg", **catalog, **FAST)
    assert iceberg_table(catalog, "pre.parts").current_snapshot() is None
    assert_nothing_left(admin)


def test_the_operator_commits_once_per_dag_run(
    conn_id: str, admin: psycopg.Connection, items: str, catalog: dict[str, Any]
) -> None:
    class _DagRun:
        run_id = "manual__2026-12-02T10:00:00"

    operator = PostgresExtractOperator(
        task_id="to_iceberg",
        postgres_conn_id=conn_id,
        table=items,
        destination="lake.by_operator",
        table_format="iceberg",
        write_mode="merge",
        worker_settings=FAST,
        **catalog,
    )
    summary = operator.execute({"dag_run": _DagRun()})
    assert summary["rows"] == ROWS and summary["table_format"] == "iceberg"
    assert summary["destination"] == "iceberg://cxpg_test/lake.by_operator"
    assert operator.execute({"dag_run": _DagRun()})["table_version"] == summary["table_version"]
    assert len(iceberg_table(catalog, "lake.by_operator").snapshots()) == 1
    assert table_rows(catalog, "lake.by_operator") == source_rows(admin, items)
    assert [o.uri for o in operator.outlets] == ["iceberg://cxpg_test/lake.by_operator"]  # the asset names the table
    lineage = operator.get_openlineage_facets_on_complete(None)
    if lineage is not None:  # the OpenLineage provider is installed
        assert [(d.namespace, d.name) for d in lineage.outputs] == [("iceberg://cxpg_test", "lake.by_operator")]


def test_catalog_credentials_never_reach_an_error_message() -> None:
    from airflow_provider_cxpg.exceptions import StorageError
    from airflow_provider_cxpg.output.iceberg import IcebergTarget

    target = IcebergTarget(
        "lake.t",
        catalog="unreachable",
        catalog_properties={
            "type": "sql",
            "uri": "postgresql+psycopg://cxpg:Pa55w0rd-in-uri@127.0.0.1:1/catalog",
            "s3.secret-access-key": "Sekr1t-key-value",
        },
        timeout=30,
    )
    assert set(target.secrets()) == {"Pa55w0rd-in-uri", "Sekr1t-key-value"}
    with pytest.raises(StorageError) as failure:
        target.committed("cxpg:any")
    assert failure.value.__cause__ is None and failure.value.__context__ is None
    text = str(failure.value)
    assert "Pa55w0rd-in-uri" not in text and "Sekr1t-key-value" not in text


def test_runs_that_change_nothing_are_still_one_snapshot_and_done_once(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, catalog: dict[str, Any]
) -> None:
    empty = {"table": items, "where": "false", "table_format": "iceberg", **catalog, **FAST}
    first = hook.extract(destination="lake.quiet", write_mode="overwrite", run_key="k@empty", **empty)
    again = hook.extract(destination="lake.quiet", write_mode="overwrite", run_key="k@empty", **empty)
    assert first.rows == 0 and first.extra["table_version"] == again.extra["table_version"] is not None
    assert len(iceberg_table(catalog, "lake.quiet").snapshots()) == 1

    hook.extract(destination="lake.quiet", table=items, table_format="iceberg", write_mode="merge", **catalog, **FAST)
    before = len(iceberg_table(catalog, "lake.quiet").snapshots())
    same = hook.extract(  # every row of the window is in the table unchanged: upsert writes nothing
        destination="lake.quiet",
        table=items,
        where="id <= 10",
        table_format="iceberg",
        write_mode="merge",
        run_key="k@unchanged",
        **catalog,
        **FAST,
    )
    assert len(iceberg_table(catalog, "lake.quiet").snapshots()) == before + 1  # the run's marker
    assert (
        hook.extract(
            destination="lake.quiet",
            table=items,
            where="id <= 10",
            table_format="iceberg",
            write_mode="merge",
            run_key="k@unchanged",
            **catalog,
            **FAST,
        ).extra["table_version"]
        == same.extra["table_version"]
    )
    assert table_rows(catalog, "lake.quiet") == source_rows(admin, items)

    # A new column, read mid-row, merged into a table that has it last.
    admin.execute(f"ALTER TABLE {items} ADD COLUMN note text")
    admin.execute(f"UPDATE {items} SET note = 'n' || id, changed_at = '2030-01-01' WHERE id <= 5")
    hook.extract(
        destination="lake.quiet",
        table=items,
        columns=["id", "note", "name", "amount", "changed_at", "at"],
        where="changed_at >= '2030-01-01'",
        table_format="iceberg",
        write_mode="merge",
        **catalog,
        **FAST,
    )
    assert table_rows(catalog, "lake.quiet", ("id", "note"))[:6] == [(i, f"n{i}") for i in range(1, 6)] + [(6, None)]
    assert table_rows(catalog, "lake.quiet") == source_rows(admin, items)
    assert_nothing_left(admin)


def test_incremental_windows_merged_by_key_keep_the_table_equal_to_the_source(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, catalog: dict[str, Any]
) -> None:
    from airflow_provider_cxpg.planning.incremental import WatermarkSpec

    arguments: dict[str, Any] = {
        "destination": "lake.incremental",
        "table": items,
        "table_format": "iceberg",
        "write_mode": "merge",
        **catalog,
        **FAST,
    }
    first = hook.extract(watermark=WatermarkSpec("changed_at"), **arguments)  # the first window: everything
    assert first.rows == ROWS and table_rows(catalog, "lake.incremental") == source_rows(admin, items)
    admin.execute(f"UPDATE {items} SET name = 'late', changed_at = now() WHERE id % 250 = 0")
    admin.execute(f"UPDATE {items} SET name = NULL, amount = NULL, changed_at = now() WHERE id = 2")
    admin.execute(f"INSERT INTO {items} SELECT g, 'new', 9, now(), NULL FROM generate_series(5001, 5007) g")
    second = hook.extract(watermark=WatermarkSpec("changed_at", start=first.high_watermark), **arguments)
    assert second.rows == 12 + 1 + 7  # the window holds the changed rows only
    assert table_rows(catalog, "lake.incremental") == source_rows(admin, items)  # row for row
    third = hook.extract(watermark=WatermarkSpec("changed_at", start=second.high_watermark), **arguments)
    assert third.rows == 0 and table_rows(catalog, "lake.incremental") == source_rows(admin, items)
    assert_nothing_left(admin)


# -- a catalog that stops answering ---------------------------------------------------------------

_FROZEN_COMMIT = """
import os, signal, sys
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.output import iceberg

conn_id, table, uri, warehouse, proxy_pid, storage_timeout = sys.argv[1:7]
original = iceberg.IcebergTarget.commit


def commit(self, *args, **kwargs):
    os.kill(int(proxy_pid), signal.SIGSTOP)  # the catalog's network freezes just before the commit
    print("catalog", self.catalog_pid, flush=True)
    return original(self, *args, **kwargs)


iceberg.IcebergTarget.commit = commit
try:
    ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination="lake.frozen", table=table, table_format="iceberg", iceberg_catalog="frozen",
        iceberg_catalog_properties={"type": "sql", "uri": uri, "warehouse": warehouse},
        storage_timeout=float(storage_timeout),
    )
except Exception as exc:
    print("raised", type(exc).__name__, exc, flush=True)
print("done", flush=True)
"""


@pytest.fixture
def frozen_catalog(pg: Any, admin: psycopg.Connection, tmp_path: Path) -> Any:
    """A SQL catalog on PostgreSQL behind a proxy, and the script that freezes it at the commit."""
    from tests.netproxy import running_proxy

    database = f"cxpg_catalog_{tmp_path.name[-12:].replace('-', '_').lower()}"
    admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
    admin.execute(f'CREATE DATABASE "{database}"')
    script = tmp_path / "frozen_commit.py"
    script.write_text(_FROZEN_COMMIT)
    try:
        with running_proxy((pg.host, pg.port)) as proxy:
            uri = f"postgresql+psycopg://{pg.user}:{pg.password}@127.0.0.1:{proxy.port}/{database}"
            yield script, uri, (tmp_path / "warehouse").as_uri(), proxy
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_frozen_catalog_fails_the_run_on_time_and_the_task_process_still_exits(
    conn_id: str, items: str, frozen_catalog: Any
) -> None:
    """The commit's catalog statements hang on a frozen network: StorageError within storage_timeout,
    the catalog's process killed, and the task process exits (in a thread of its own, the catalog's
    SQLAlchemy session held Airflow's exit handler, dispose_orm, forever)."""
    import subprocess
    import sys

    script, uri, warehouse, proxy = frozen_catalog
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script), conn_id, items, uri, warehouse, str(proxy.process.pid), "3"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    elapsed = time.monotonic() - started
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(line.startswith("raised StorageError") and "did not return within 3.0s" in line for line in lines), lines
    assert lines[-1] == "done" and elapsed < 60, (elapsed, lines)
    catalog_pid = int(next(line for line in lines if line.startswith("catalog ")).split()[1])
    assert not _alive(catalog_pid)  # killed at the deadline, not left behind


def test_the_catalogs_process_ends_when_the_task_process_is_killed(
    conn_id: str, items: str, frozen_catalog: Any
) -> None:
    """SIGKILL of the task process while its commit waits on a frozen catalog: the catalog's process
    exits by itself (a commit still running there could land while the retry runs)."""
    import signal
    import subprocess
    import sys

    script, uri, warehouse, proxy = frozen_catalog
    task = subprocess.Popen(
        [sys.executable, str(script), conn_id, items, uri, warehouse, str(proxy.process.pid), "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    try:
        assert task.stdout is not None
        line = ""
        deadline = time.monotonic() + 90
        while not line.startswith("catalog ") and time.monotonic() < deadline:
            line = task.stdout.readline()
            assert line or task.poll() is None, "the script ended before its commit"
        catalog_pid = int(line.split()[1])
        time.sleep(1.0)  # the commit's first statement is on the frozen connection
        assert _alive(catalog_pid)
        task.send_signal(signal.SIGKILL)
        task.wait(timeout=10)
        gone_by = time.monotonic() + 5
        while _alive(catalog_pid) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not _alive(catalog_pid)
    finally:
        if task.poll() is None:
            task.kill()


def test_on_kill_ends_a_catalog_call_that_waits_on_a_frozen_catalog(frozen_catalog: Any) -> None:
    """abort() (the operator's on_kill) ends the wait at once and kills the catalog's process."""
    import threading

    from airflow_provider_cxpg.exceptions import ExtractionAborted
    from airflow_provider_cxpg.output.iceberg import IcebergTarget

    _, uri, warehouse, proxy = frozen_catalog
    target = IcebergTarget(
        "lake.t", catalog="frozen", catalog_properties={"type": "sql", "uri": uri, "warehouse": warehouse}, timeout=600
    )
    try:
        assert target.committed("cxpg:any") is None  # the catalog opens; the table does not exist
        catalog_pid = target.catalog_pid
        assert catalog_pid is not None
        proxy.freeze()
        threading.Timer(1.0, target.abort, args=("on_kill",)).start()
        started = time.monotonic()
        with pytest.raises(ExtractionAborted):
            target.committed("cxpg:any")
        assert time.monotonic() - started < 3
        gone_by = time.monotonic() + 5
        while _alive(catalog_pid) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not _alive(catalog_pid)
    finally:
        target.close()


def test_a_merge_whose_schema_change_was_cut_between_its_two_commits_still_lands(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, catalog: dict[str, Any]
) -> None:
    """Adding a column is two catalog commits (the schema, then an empty snapshot in it, which the
    upsert needs). A try killed between them (a deadline or on_kill now kill the catalog's process
    mid-step) left every later merge failing: its retry saw no new column and skipped both."""
    import pyarrow as pa

    merge = {"destination": "lake.cut", "table": items, "table_format": "iceberg", "write_mode": "merge"}
    hook.extract(**merge, **catalog, **FAST)
    admin.execute(f"ALTER TABLE {items} ADD COLUMN note text")
    admin.execute(f"UPDATE {items} SET note = 'n' || id WHERE id <= 3")
    with iceberg_table(catalog, "lake.cut").update_schema() as update:  # the first commit, then the kill
        update.union_by_name(pa.schema([pa.field("note", pa.large_string())]))
    hook.extract(**merge, **catalog, **FAST)
    assert table_rows(catalog, "lake.cut", ("id", "note")) == source_rows(admin, items, "id, note")


def test_a_pathlib_entry_on_the_import_path_does_not_break_the_catalogs_process(
    items: str, catalog: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DAG file's sys.path.append(Path(...)): the import system skips such entries, the catalog's
    process must too (every Iceberg call raised TypeError)."""
    from airflow_provider_cxpg.output.iceberg import IcebergTarget

    monkeypatch.setattr("sys.path", [*__import__("sys").path, tmp_path])
    target = IcebergTarget(
        "lake.none", catalog=catalog["iceberg_catalog"], catalog_properties=catalog["iceberg_catalog_properties"],
        timeout=60,
    )  # fmt: skip
    try:
        assert target.committed("cxpg:any") is None
    finally:
        target.close()


@pytest.mark.parametrize("column", ["timestamptz", "timestamp", "date"])
def test_dates_outside_years_1_to_9999_are_refused_naming_the_column_before_the_commit(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, catalog: dict[str, Any], column: str
) -> None:
    """pyiceberg records each file's bounds as Python values: the commit failed with a StorageError
    ("date value out of range") that named neither the column nor the remedy, every retry alike."""
    from airflow_provider_cxpg.exceptions import DataIntegrityError

    table = f'"{schema}".ancient'
    admin.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, at {column})")
    admin.execute(f"INSERT INTO {table} VALUES (1, '2024-01-01'), (2, '0044-03-15 BC'), (3, NULL)")
    for _ in range(2):  # the retry reads the source again: the same clear error
        with pytest.raises(DataIntegrityError, match=r"column 'at' holds values pyiceberg cannot record") as raised:
            hook.extract(destination="lake.ancient", table=table, table_format="iceberg", **catalog, **FAST)
        assert raised.value.column == "at"
    admin.execute(f"UPDATE {table} SET at = '2024-01-02' WHERE id = 2")
    hook.extract(destination="lake.ancient", table=table, table_format="iceberg", **catalog, **FAST)
    assert table_rows(catalog, "lake.ancient", ("id",)) == [(1,), (2,), (3,)]
    assert_nothing_left(admin)
