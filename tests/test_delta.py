"""Delta Lake output: one table version per run, exactly once across failures, merged by key, schema checked.

Against the real PostgreSQL and, for object storage, the suite's S3 server; every table is read
back with delta-rs's own reader and compared with the source row for row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from airflow_provider_cxpg.exceptions import CxpgError, DataIntegrityError, InvalidInputError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
from tests.helpers import assert_nothing_left, manifest_of, worker_killed_mid_run
from tests.s3_server import S3Server, start_s3_server

deltalake = pytest.importorskip("deltalake")

pytestmark = pytest.mark.integration

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 5.0, "cancel_grace": 2.0, "kill_grace": 2.0}
ROWS = 3_000


@pytest.fixture
def hook(conn_id: str) -> ConnectorXPostgresHook:
    return ConnectorXPostgresHook(postgres_conn_id=conn_id)


@pytest.fixture
def items(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(
        f'CREATE TABLE "{schema}".items (id bigint PRIMARY KEY, name text, amount numeric(12,2), '
        "changed_at timestamptz NOT NULL)"
    )
    admin.execute(
        f"""INSERT INTO "{schema}".items SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'item ' || g END,
            g * 1.25, '2024-01-01'::timestamptz + g * interval '1 minute' FROM generate_series(1, {ROWS}) g"""
    )
    return f"{schema}.items"


def source_rows(admin: psycopg.Connection, table: str, columns: str = "id, name, amount") -> list[tuple[Any, ...]]:
    return [tuple(r) for r in admin.execute(f"SELECT {columns} FROM {table} ORDER BY id").fetchall()]


def table_rows(uri: str, columns: tuple[str, ...] = ("id", "name", "amount"), **options: Any) -> list[tuple[Any, ...]]:
    data = deltalake.DeltaTable(uri, **options).to_pyarrow_table(columns=list(columns)).to_pylist()
    return sorted(tuple(r[c] for c in columns) for r in data)


def history(uri: str, **options: Any) -> list[dict[str, Any]]:
    return deltalake.DeltaTable(uri, **options).history()


def test_append_and_overwrite_commit_one_version_each_from_the_staged_files(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, out_dir: Path
) -> None:
    uri = str(out_dir / "items_delta")
    first = hook.extract(destination=uri, table=items, table_format="delta", chunk_rows=700, **FAST)
    assert first.extra["table_version"] == 0 and first.rows == ROWS and first.chunks == 5
    assert table_rows(uri) == source_rows(admin, items)
    files = deltalake.DeltaTable(uri).file_uris()
    assert len(files) == 5 and all(Path(f).parent.name.startswith("cxpg-") for f in files)  # added, not rewritten

    second = hook.extract(destination=uri, table=items, table_format="delta", write_mode="append", **FAST)
    assert second.extra["table_version"] == 1
    assert table_rows(uri) == sorted(source_rows(admin, items) * 2)  # append adds the run's rows

    admin.execute(f"DELETE FROM {items} WHERE id > 2000")
    third = hook.extract(destination=uri, table=items, table_format="delta", write_mode="overwrite", **FAST)
    assert third.extra["table_version"] == 2
    assert table_rows(uri) == source_rows(admin, items)  # exactly the source, in one commit
    assert [h["operation"] for h in history(uri)[:3]] == ["WRITE", "WRITE", "CREATE TABLE"]
    assert_nothing_left(admin)


def test_merge_upserts_by_the_key_so_the_table_equals_the_source_after_each_run(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, out_dir: Path
) -> None:
    uri = str(out_dir / "merged")
    hook.extract(destination=uri, table=items, table_format="delta", write_mode="merge", chunk_rows=1_000, **FAST)
    assert table_rows(uri) == source_rows(admin, items)
    # A day of changes: updates (one to NULL), inserts; the incremental run reads only changed rows.
    admin.execute(f"UPDATE {items} SET name = 'renamed', changed_at = '2030-01-01' WHERE id % 100 = 0")
    admin.execute(f"UPDATE {items} SET name = NULL, changed_at = '2030-01-01' WHERE id = 1")
    admin.execute(
        f"INSERT INTO {items} SELECT g, 'new ' || g, g, '2030-01-01' FROM generate_series({ROWS + 1}, {ROWS + 50}) g"
    )
    run = hook.extract(
        destination=uri,
        table=items,
        where="changed_at >= '2030-01-01'",
        table_format="delta",
        write_mode="merge",
        **FAST,
    )
    assert run.rows == 30 + 1 + 50 and run.extra["table_version"] == 1
    assert table_rows(uri) == source_rows(admin, items)
    assert history(uri)[0]["operation"] == "MERGE"
    staged = manifest_of(Path(uri) / run.files[0].rsplit("/", 2)[-2]) if run.files else None
    assert staged is None or staged["table"]["version"] == 1
    assert_nothing_left(admin)


@pytest.mark.parametrize("key", [["changed_at"], ["changed_at", "id"]], ids=["tie-breaker", "given"])
def test_a_merge_paged_by_a_column_that_is_not_unique_upserts_by_the_primary_key(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, out_dir: Path, key: list[str]
) -> None:
    """``key_columns=["changed_at"]`` pages by (changed_at, id): the tie-breaker made it unique.

    The merge matched rows by that paging key, so a row whose ``changed_at`` moved was inserted a
    second time beside its old version, green. A table's rows are merged by its primary key.
    """
    admin.execute(f"CREATE INDEX ON {items} (changed_at)")
    admin.execute(f"UPDATE {items} SET changed_at = '2024-01-01' WHERE id <= 10")  # ties: a real tie-breaker
    uri = str(out_dir / "merged")
    arguments = {"table": items, "table_format": "delta", "write_mode": "merge", "key_columns": key}
    hook.extract(destination=uri, chunk_rows=700, **arguments, **FAST)
    admin.execute(f"UPDATE {items} SET changed_at = '2030-01-01', name = 'moved' WHERE id IN (5, 500)")
    hook.extract(destination=uri, where="changed_at >= '2030-01-01'", **arguments, **FAST)
    assert table_rows(uri) == source_rows(admin, items)
    assert_nothing_left(admin)


def test_a_merge_by_a_key_nothing_proves_unique_upserts_by_the_primary_key(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """Inheritance children: no index proves ``changed_at`` unique, no tie-breaker is appended, and
    the merge matched by ``changed_at``: a moved row was added a second time."""
    parent = f'"{schema}".parent'
    admin.execute(f"CREATE TABLE {parent} (id int PRIMARY KEY, changed_at int NOT NULL, v text)")
    admin.execute(f'CREATE TABLE "{schema}".child (PRIMARY KEY (id)) INHERITS ({parent})')
    admin.execute(f"INSERT INTO {parent} SELECT g, g, 'old' FROM generate_series(1, 5) g")
    admin.execute(f"INSERT INTO \"{schema}\".child SELECT g, g, 'old' FROM generate_series(6, 9) g")
    uri = str(out_dir / "merged")
    arguments = {"table": parent, "table_format": "delta", "write_mode": "merge", "key_columns": ["changed_at"]}
    hook.extract(destination=uri, chunk_rows=3, **arguments, **FAST)
    admin.execute(f"UPDATE {parent} SET changed_at = 100, v = 'new' WHERE id IN (3, 7)")
    hook.extract(destination=uri, chunk_rows=3, **arguments, **FAST)
    assert table_rows(uri, ("id", "v")) == source_rows(admin, parent, "id, v")
    assert_nothing_left(admin)


def test_a_merge_by_a_unique_key_columns_is_by_that_key_whatever_the_primary_key(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """A key the catalog proves unique is merged by as given: the table's primary key here is an
    interval, whose equal values ('1 day', '24 hours') are stored differently."""
    table = f'"{schema}".spans'
    admin.execute(f"CREATE TABLE {table} (k interval PRIMARY KEY, id int NOT NULL UNIQUE, v text)")
    admin.execute(f"INSERT INTO {table} VALUES ('1 day', 1, 'old'), ('2 days', 2, 'two')")
    uri = str(out_dir / "merged")
    arguments = {"table": table, "table_format": "delta", "write_mode": "merge", "key_columns": ["id"]}
    hook.extract(destination=uri, column_casts={"k": "text"}, **arguments, **FAST)
    admin.execute(f"UPDATE {table} SET k = '24 hours', v = 'new' WHERE id = 1")
    hook.extract(destination=uri, column_casts={"k": "text"}, **arguments, **FAST)
    assert table_rows(uri, ("id", "v")) == [(1, "new"), (2, "two")]
    assert_nothing_left(admin)


@pytest.mark.parametrize(
    ("key_type", "old", "new", "message"),
    [
        ("numeric", "1.0", "1.00", "'1.0' and '1.00'"),
        ("float8", "0", "-0", "0 and -0"),
        ("bpchar", "'a'", "'a '", "'a' and 'a '"),
        ("mergekeys.citext", "'A'", "'a'", "citext"),
        ("text COLLATE mergekeys.ci", "'A'", "'a'", "nondeterministic"),
    ],
    ids=["numeric", "float", "bpchar", "citext", "nondeterministic"],
)
def test_a_merge_by_a_key_whose_equal_values_differ_when_stored_is_refused_before_any_data_moves(
    request: pytest.FixtureRequest, out_dir: Path, key_type: str, old: str, new: str, message: str
) -> None:
    """PostgreSQL finds ``new`` equal to ``old``, the merge compares stored values: an update from
    one to the other left the old row beside the new one (both formats), green."""
    system = "citext" in key_type or "COLLATE" in key_type  # the embedded server has neither ICU nor citext
    admin: psycopg.Connection = request.getfixturevalue("system_admin" if system else "admin")
    hook = ConnectorXPostgresHook(postgres_conn_id=request.getfixturevalue("system_conn_id" if system else "conn_id"))
    admin.execute("DROP SCHEMA IF EXISTS mergekeys CASCADE")
    admin.execute("CREATE SCHEMA mergekeys")
    if system:
        admin.execute("DROP EXTENSION IF EXISTS citext CASCADE")  # into this schema, and gone with it
        admin.execute("CREATE EXTENSION citext SCHEMA mergekeys")
        admin.execute(
            "CREATE COLLATION mergekeys.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
        )
    admin.execute(f"CREATE TABLE mergekeys.keyed (k {key_type} PRIMARY KEY, v text)")
    admin.execute(f"INSERT INTO mergekeys.keyed VALUES ({old}, 'old')")
    uri = str(out_dir / "merged")
    arguments = {"destination": uri, "table": "mergekeys.keyed", "table_format": "delta"}
    with pytest.raises(InvalidInputError, match=message):
        hook.extract(write_mode="merge", **arguments, **FAST)
    assert not (out_dir / "merged").exists() or not list((out_dir / "merged").rglob("*.parquet"))
    admin.execute(f"UPDATE mergekeys.keyed SET k = {new}")  # the same key to PostgreSQL
    hook.extract(write_mode="append", **arguments, **FAST)  # an append keeps it as read
    assert len(table_rows(uri, ("k", "v"))) == 1
    admin.execute("DROP SCHEMA mergekeys CASCADE")


def test_a_merge_whose_run_repeats_a_key_is_refused_before_its_commit_and_read_again_on_retry(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """A query source: nothing proves its key unique. Two rows of one key inside one chunk were
    merged as two rows of the table, for good (later merges kept both), with a green task."""
    source = f'"{schema}".events'
    admin.execute(f"CREATE TABLE {source} (id int NOT NULL, v text)")
    admin.execute(f"INSERT INTO {source} VALUES (1, 'a'), (2, 'b')")
    uri = str(out_dir / "merged")
    arguments = {
        "destination": uri,
        "sql": f"SELECT id, v FROM {source}",
        "key_columns": ["id"],
        "table_format": "delta",
        "write_mode": "merge",
        "chunk_rows": 10,
        **FAST,
    }
    hook.extract(**arguments)
    admin.execute(f"INSERT INTO {source} VALUES (5, 'x'), (5, 'y')")
    with pytest.raises(DataIntegrityError, match=r"key \[5\] appears 2 times"):
        hook.extract(run_key="day-2", **arguments)
    assert table_rows(uri, ("id", "v")) == [(1, "a"), (2, "b")]  # nothing committed
    admin.execute(f"DELETE FROM {source} WHERE v = 'y'")  # the source is fixed
    hook.extract(run_key="day-2", **arguments)  # the retry reads it again, never the refused files
    assert table_rows(uri, ("id", "v")) == [(1, "a"), (2, "b"), (5, "x")]
    assert_nothing_left(admin)


def test_a_killed_worker_and_a_retried_task_give_one_version_without_duplicates(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, out_dir: Path
) -> None:
    uri = str(out_dir / "retried")
    arguments: dict[str, Any] = {
        "destination": uri,
        "table": items,
        "table_format": "delta",
        "run_key": "dag.task@scheduled__2026-12-02",  # what the operator derives from its DAG run
        "chunk_rows": 300,
        "where": "pg_sleep(0.0005) IS NOT NULL",
        "max_worker_restarts": 0,
        **FAST,
    }
    with worker_killed_mid_run(), pytest.raises(CxpgError):
        hook.extract(**arguments)
    assert not (Path(uri) / "_delta_log").exists()  # nothing committed: readers see no table at all

    retried = hook.extract(**arguments)  # the task's retry: resumes the staged chunks
    assert retried.resumed_from_chunk is not None and retried.resumed_from_chunk > 0
    assert retried.extra["table_version"] == 0
    assert table_rows(uri) == source_rows(admin, items)  # every row once

    again = hook.extract(**arguments)  # a retry after the commit landed (the task died reporting it)
    assert again.extra["table_version"] == 0 and len(history(uri)) == 1  # nothing committed twice
    assert table_rows(uri) == source_rows(admin, items)
    assert_nothing_left(admin)


def test_a_new_nullable_column_evolves_the_table_and_a_lost_or_changed_one_fails_before_data_moves(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, out_dir: Path
) -> None:
    uri = str(out_dir / "evolving")
    hook.extract(destination=uri, table=items, table_format="delta", **FAST)
    admin.execute(f"ALTER TABLE {items} ADD COLUMN note text")
    admin.execute(f"UPDATE {items} SET note = 'n' || id WHERE id <= 10")
    run = hook.extract(destination=uri, table=items, table_format="delta", write_mode="overwrite", **FAST)
    assert table_rows(uri, ("id", "note"))[:11] == [(i, f"n{i}") for i in range(1, 11)] + [(11, None)]
    assert run.extra["table_version"] == 2  # 1: the new column, 2: the data

    before = len(history(uri))
    admin.execute(f"ALTER TABLE {items} DROP COLUMN amount")
    with pytest.raises(InvalidInputError, match="amount"):
        hook.extract(destination=uri, table=items, table_format="delta", **FAST)
    admin.execute(f"ALTER TABLE {items} ADD COLUMN amount text")
    with pytest.raises(InvalidInputError, match=r"amount \(decimal"):
        hook.extract(destination=uri, table=items, table_format="delta", **FAST)
    assert len(history(uri)) == before
    staged = [p for p in Path(uri).glob("cxpg-*/part-*.parquet")]
    assert len({p.parent for p in staged}) == 2  # the refused runs staged nothing
    assert_nothing_left(admin)


def test_columns_delta_cannot_store_and_bad_arguments_are_refused_before_anything_is_written(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".clock (id int PRIMARY KEY, at time, n int)')
    admin.execute(f"INSERT INTO \"{schema}\".clock VALUES (1, '12:30', 1)")
    uri = out_dir / "clock"
    with pytest.raises(InvalidInputError, match=r"at \(time64"):
        hook.extract(destination=str(uri), table=f"{schema}.clock", table_format="delta", **FAST)
    assert not uri.exists() or not any(uri.rglob("*.parquet"))
    hook.extract(
        destination=str(uri), table=f"{schema}.clock", table_format="delta", column_casts={"at": "text"}, **FAST
    )
    assert deltalake.DeltaTable(str(uri)).to_pyarrow_table().to_pylist() == [{"id": 1, "at": "12:30:00", "n": 1}]
    for kwargs, message in [
        ({"table_format": "iceberg"}, "namespace.table"),
        ({"table_format": "orc"}, "table_format"),
        ({"table_format": "delta", "write_mode": "upsert"}, "write_mode"),
        ({"write_mode": "merge"}, "table formats"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            hook.extract(destination=str(out_dir / "never"), table=f"{schema}.clock", **kwargs, **FAST)
    with pytest.raises(InvalidInputError, match="parallelism"):
        PostgresExtractOperator(
            task_id="t",
            table=f"{schema}.clock",
            destination=str(out_dir / "never"),
            table_format="delta",
            parallelism=2,
        ).execute({})
    assert not (out_dir / "never").exists()


def test_the_operator_commits_once_per_dag_run_and_reports_the_version(
    conn_id: str, admin: psycopg.Connection, items: str, out_dir: Path
) -> None:
    class _DagRun:
        run_id = "manual__2026-12-02T10:00:00"

    uri = str(out_dir / "by_operator")
    operator = PostgresExtractOperator(
        task_id="to_delta",
        postgres_conn_id=conn_id,
        table=items,
        destination=uri,
        table_format="delta",
        write_mode="merge",
        worker_settings=FAST,
    )
    summary = operator.execute({"dag_run": _DagRun()})
    assert summary["table_version"] == 0 and summary["rows"] == ROWS and summary["destination"] == uri
    assert operator.execute({"dag_run": _DagRun()})["table_version"] == 0  # the same DAG run: not again
    assert len(history(uri)) == 1
    _DagRun.run_id = "manual__2026-12-03T10:00:00"
    assert operator.execute({"dag_run": _DagRun()})["table_version"] == 1  # the next DAG run merges
    assert table_rows(uri) == source_rows(admin, items)
    assert [o.uri for o in operator.outlets] == ["file://" + uri]  # the asset names the table


def test_a_delta_table_on_object_storage(hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str) -> None:
    with start_s3_server() as s3:
        bucket = s3.create_bucket()
        uri = f"s3://{bucket}/lake/items"
        options = s3.storage_options()
        first = hook.extract(destination=uri, table=items, table_format="delta", storage_options=options, **FAST)
        admin.execute(f"UPDATE {items} SET name = 'changed' WHERE id <= 5")
        merged = hook.extract(
            destination=uri,
            table=items,
            where="id <= 5",
            table_format="delta",
            write_mode="merge",
            storage_options=options,
            **FAST,
        )
        assert (first.extra["table_version"], merged.extra["table_version"]) == (0, 1)
        assert table_rows(uri, storage_options=_delta_options(s3)) == source_rows(admin, items)
    assert_nothing_left(admin)


def _delta_options(s3: S3Server) -> dict[str, str]:
    from airflow_provider_cxpg.output.delta import delta_storage_options

    return delta_storage_options("s3://x", s3.storage_options())


def test_an_empty_merge_is_a_version_and_a_staged_run_commits_without_reading_again(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, out_dir: Path
) -> None:
    from airflow_provider_cxpg.querylog import QueryLog

    uri = str(out_dir / "quiet")
    hook.extract(destination=uri, table=items, table_format="delta", write_mode="merge", **FAST)
    quiet = {"destination": uri, "table": items, "where": "false", "table_format": "delta", "write_mode": "merge"}
    empty = hook.extract(run_key="hourly@nothing-changed", **quiet, **FAST)
    assert (empty.rows, empty.extra["table_version"]) == (0, 1)  # an hour with no change still commits
    assert hook.extract(run_key="hourly@nothing-changed", **quiet, **FAST).extra["table_version"] == 1
    assert table_rows(uri) == source_rows(admin, items)

    # A run whose chunks were all staged but whose commit never landed: the retry commits them.
    admin.execute(f"UPDATE {items} SET name = 'staged' WHERE id <= 3")
    staged = hook.prepare_table_extraction(
        destination=uri, table=items, where="id <= 3", table_format="delta", write_mode="merge", run_key="r@1", **FAST
    )
    staged.extraction.run()  # the extraction, without its commit (the task died in between)
    log = QueryLog("retry")
    retried = hook.extract(
        destination=uri,
        table=items,
        where="id <= 3",
        table_format="delta",
        write_mode="merge",
        run_key="r@1",
        querylog=log,
        **FAST,
    )
    assert retried.rows == 3 and retried.extra["table_version"] == 2
    assert not [e for e in log.events if e["event"] == "query.start"]  # no chunk read again
    assert table_rows(uri) == source_rows(admin, items)
    assert_nothing_left(admin)


def test_runs_that_cannot_be_one_faithful_version_are_refused(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, items: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".objects (id int PRIMARY KEY, o oid)')
    admin.execute(f'INSERT INTO "{schema}".objects VALUES (1, 3000000000)')
    with pytest.raises(InvalidInputError, match=r"o \(uint32"):  # delta-rs would store it as a signed int
        hook.extract(destination=str(out_dir / "objects"), table=f"{schema}.objects", table_format="delta", **FAST)
    for arguments, message in [
        ({"watermark_column": "changed_at", "write_mode": "overwrite"}, "incremental"),
        ({"lower_key": [10], "upper_key": [20]}, "fan-out"),
        ({"parallelism": 2}, "parallelism"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            PostgresExtractOperator(
                task_id="t", table=items, destination=str(out_dir / "never"), table_format="delta", **arguments
            ).execute({})
    with pytest.raises(InvalidInputError, match="S3"):
        hook.extract(destination="memory://bucket/t", table=items, table_format="delta", **FAST)
    assert not (out_dir / "never").exists() and not (out_dir / "objects").exists()


@pytest.mark.parametrize("made", ["partitioned", "check", "invariant", "generated", "append-only"])
def test_a_table_whose_writers_must_compute_or_check_values_is_refused_before_any_data_moves(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path, made: str
) -> None:
    """The commit adds the staged files as they are; delta-rs's own writer would have filled in
    partition values, evaluated constraints, computed columns. Added anyway, every row of a table
    partitioned by ``region`` read back with ``region`` NULL, and rows breaking a CHECK landed."""
    table = f'"{schema}".orders'
    admin.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, region text, amount bigint)")
    admin.execute(
        f"INSERT INTO {table} SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g - 3 FROM generate_series(1, 6) g"
    )
    uri = str(out_dir / made)
    fields = [pa.field("id", pa.int64()), pa.field("region", pa.string()), pa.field("amount", pa.int64())]
    if made in ("invariant", "generated"):
        key, value = {
            "invariant": ("delta.invariants", '{"expression": {"expression": "amount > 0"}}'),
            "generated": ("delta.generationExpression", "id * 2"),
        }[made]
        fields[2] = fields[2].with_metadata({key: value})
    deltalake.write_deltalake(
        uri, pa.schema(fields).empty_table(), partition_by=["region"] if made == "partitioned" else None
    )
    if made == "check":
        deltalake.DeltaTable(uri).alter.add_constraint({"amount_positive": "amount > 0"})
    if made == "append-only":
        deltalake.DeltaTable(uri).alter.set_table_properties({"delta.appendOnly": "true"})
    before = deltalake.DeltaTable(uri).version()
    with pytest.raises(InvalidInputError, match="cannot take the run's files"):
        mode = "overwrite" if made == "append-only" else "append"
        hook.extract(destination=uri, table=table, table_format="delta", write_mode=mode, **FAST)
    assert deltalake.DeltaTable(uri).version() == before and not list(Path(uri).glob("cxpg-*/*.parquet"))
    assert_nothing_left(admin)


def test_null_in_a_column_the_table_declares_not_null_is_refused_before_the_commit(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = f'"{schema}".orders'
    admin.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, amount bigint)")
    admin.execute(
        f"INSERT INTO {table} SELECT g, CASE WHEN g = 250 THEN NULL ELSE g END FROM generate_series(1, 300) g"
    )
    uri = str(out_dir / "strict")
    required = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("amount", pa.int64(), nullable=False)])
    deltalake.write_deltalake(uri, required.empty_table())
    with pytest.raises(DataIntegrityError, match=r"declares \['amount'\] NOT NULL"):
        hook.extract(destination=uri, table=table, table_format="delta", chunk_rows=100, **FAST)
    assert deltalake.DeltaTable(uri).version() == 0
    admin.execute(
        f"UPDATE {table} SET amount = 0 WHERE amount IS NULL"
    )  # fixed at the source: the retry reads it again
    run = hook.extract(destination=uri, table=table, table_format="delta", chunk_rows=100, **FAST)
    assert run.rows == 300 and table_rows(uri, ("id", "amount")) == source_rows(admin, table, "id, amount")
    assert_nothing_left(admin)


def test_a_damaged_staged_run_is_read_again_not_committed(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, items: str, out_dir: Path
) -> None:
    from airflow_provider_cxpg.querylog import QueryLog

    uri = str(out_dir / "damaged")
    arguments: dict[str, Any] = {
        "destination": uri,
        "table": items,
        "table_format": "delta",
        "run_key": "r@damaged",
        "chunk_rows": 1_000,
    }
    hook.prepare_table_extraction(**arguments, **FAST).extraction.run()  # staged; the commit never came
    staged = sorted(Path(uri).glob("cxpg-*/part-*.parquet"))
    assert len(staged) == 3
    staged[1].write_bytes(staged[1].read_bytes()[:-100])  # a torn file: the check must refuse it
    log = QueryLog("damaged")
    result = hook.extract(**arguments, querylog=log, **FAST)
    assert [e for e in log.events if e["event"] == "query.start"]  # read again, not committed as it was
    assert result.rows == ROWS and table_rows(uri) == source_rows(admin, items)
    assert_nothing_left(admin)


_FROZEN_MERGE = """
import os, signal, sys, time
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from deltalake.table import TableMerger

conn_id, table, uri, endpoint, store_pid = sys.argv[1:6]
options = {"key": "AKIAFROZENMERGE01", "secret": "frozen-merge-Secret", "client_kwargs": {"endpoint_url": endpoint}}
run = dict(destination=uri, table=table, table_format="delta", storage_options=options, storage_timeout=3)
hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
hook.extract(**run, write_mode="merge", run_key="first")
original = TableMerger.execute


def execute(self):
    os.kill(int(store_pid), signal.SIGSTOP)  # the store stops answering as the merge reads the run
    return original(self)


TableMerger.execute = execute
try:
    hook.extract(**run, write_mode="merge", run_key="second")
except Exception as exc:
    print("raised", type(exc).__name__, exc, flush=True)
print("done", time.monotonic(), flush=True)
"""


def test_a_merge_on_a_store_that_freezes_fails_on_time_and_the_process_exits(
    conn_id: str, admin: psycopg.Connection, items: str, tmp_path: Path
) -> None:
    """The merge read the staged run through pyarrow's S3 layer, which at interpreter exit waits for
    every request in flight: the task process's exit waited on the frozen store (8-10 s here, and
    with no end against a store that trickles bytes). Now through fsspec, under the deadline."""
    from tests.helpers import run_until_exit
    from tests.s3_server import s3_process

    script = tmp_path / "frozen_merge.py"
    script.write_text(_FROZEN_MERGE)
    with s3_process() as s3:
        bucket = s3.create_bucket()
        try:
            args = [conn_id, items, f"s3://{bucket}/lake/frozen", s3.endpoint, str(s3.process.pid)]
            temporary = tmp_path / "tmp"
            temporary.mkdir()
            lines, exiting = run_until_exit(script, args, timeout=120, env={"TMPDIR": str(temporary)})
        finally:
            s3.thaw()
    assert any(line.startswith("raised StorageError") and "within 3.0s" in line for line in lines), lines[-3:]
    assert exiting < 4, f"the process took {exiting:.1f}s to exit after the failure"
    assert not list(temporary.glob("cxpg-merge-*")), "the merge's local copies of source rows were left behind"
    assert_nothing_left(admin)
