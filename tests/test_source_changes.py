"""DDL that commits between two chunks of a run: the run stops before it keeps a chunk read after it.

Each test starts a run whose chunks are slowed by the server (``pg_sleep`` in ``where``), commits a
migration on another connection once the first chunk is committed, and checks that the run fails
with :class:`SourceChangedError` instead of writing values, an order or a snapshot it did not plan
for, that nothing it kept came from after the change, and that a retry ends exact.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_provider_cxpg.exceptions import DataIntegrityError, SourceChangedError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from tests.helpers import PgInfo, assert_nothing_left, manifest_of, read_output

pytestmark = pytest.mark.integration

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 5.0, "cancel_grace": 2.0, "kill_grace": 2.0}
SLOW_CHUNKS = "(SELECT pg_sleep(0.2)) IS NOT NULL"


class Migration:
    """What :func:`after_first_chunk` did: the chunks the run had committed when it committed."""

    chunks_before: int | None = None


@contextlib.contextmanager
def after_first_chunk(pg: PgInfo, destination: Path, statements: list[str]) -> Iterator[Migration]:
    """Commit ``statements`` in one transaction, on a connection of their own, once the run started
    inside the block has committed its first chunk; on leaving the block, check that they did."""
    migration = Migration()
    done = threading.Event()

    def chunks() -> int:
        try:
            return len(json.loads((destination / "_manifest.json").read_text())["chunks"])
        except (OSError, ValueError, KeyError):
            return 0

    def migrate() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not chunks():
            time.sleep(0.01)
        with psycopg.connect(pg.dsn, autocommit=True) as conn, conn.transaction():
            for statement in statements:
                conn.execute(statement)
        migration.chunks_before = chunks()
        done.set()

    thread = threading.Thread(target=migrate, daemon=True)
    thread.start()
    yield migration
    assert done.wait(30), "the statements were never committed"


def read_after(migration: Migration, result: Any) -> None:
    """A run that goes on past the change must have read (and checked) chunks after it: not vacuous."""
    assert migration.chunks_before is not None and result.chunks >= migration.chunks_before + 2, (
        f"the change committed after {migration.chunks_before} of {result.chunks} chunks: nothing was read after it"
    )


def _extract(conn_id: str, destination: Path, table: str, **kwargs: Any) -> Any:
    return ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(destination), table=table, chunk_rows=4, where=SLOW_CHUNKS, **FAST, **kwargs
    )


def test_a_column_whose_type_changes_mid_run_is_not_written_as_the_old_type(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """text -> numeric mid-run: connectorx then decodes decimals, which Arrow would have cast to strings."""
    table = f'"{schema}".migrating'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text NOT NULL)")
    admin.execute(f"INSERT INTO {table} SELECT g, '0.12345678901234567890123' FROM generate_series(1, 60) g")
    with (
        after_first_chunk(pg, out_dir, [f"ALTER TABLE {table} ALTER COLUMN v TYPE numeric USING v::numeric"]),
        pytest.raises(SourceChangedError, match=r"column 'v' is now numeric \(was text\)"),
    ):
        _extract(conn_id, out_dir, table)
    kept = read_output(out_dir)
    assert set(kept.column("v").to_pylist()) <= {"0.12345678901234567890123"}  # only chunks read before it
    assert manifest_of(out_dir)["status"] == "failed"
    retried = _extract(conn_id, out_dir, table)
    assert retried.resumed_from_chunk is None and retried.rows == 60  # the columns changed: it starts over
    assert_nothing_left(admin)


def test_a_table_truncated_and_reloaded_under_the_runs_snapshot_is_not_read_as_empty(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """TRUNCATE is not MVCC-safe: the snapshot would see the new, empty storage and end the run short, green."""
    table = f'"{schema}".reloaded'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, 60) g")
    with (
        after_first_chunk(
            pg, out_dir, [f"TRUNCATE {table}", f"INSERT INTO {table} SELECT g, g FROM generate_series(1, 60) g"]
        ),
        pytest.raises(SourceChangedError, match="got new storage"),
    ):
        _extract(conn_id, out_dir, table, snapshot=True)
    retried = _extract(conn_id, out_dir, table, snapshot=True)
    assert sorted(read_output(out_dir).column("id").to_pylist()) == list(range(1, 61))
    assert retried.resumed_from_chunk is not None  # same columns: it resumes, in a new snapshot
    assert_nothing_left(admin)


def test_a_key_whose_collation_changes_mid_run_stops_the_run(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """Later chunks would page in another order, skipping the keys between the two orders."""
    table = f'"{schema}".collated'
    admin.execute(f'CREATE TABLE {table} (k text COLLATE "C" PRIMARY KEY)')
    admin.execute(f"INSERT INTO {table} SELECT lpad(g::text, 3, '0') FROM generate_series(1, 60) g")
    with (
        after_first_chunk(pg, out_dir, [f'ALTER TABLE {table} ALTER COLUMN k TYPE text COLLATE "POSIX"']),
        pytest.raises(SourceChangedError, match="column 'k' now has collation POSIX"),
    ):
        _extract(conn_id, out_dir, table)
    _extract(conn_id, out_dir, table)
    assert sorted(read_output(out_dir).column("k").to_pylist()) == [f"{g:03d}" for g in range(1, 61)]
    assert_nothing_left(admin)


@pytest.mark.parametrize("statement", ["ADD COLUMN z float8 DEFAULT random()", "TRUNCATE"])
def test_a_rewrite_of_a_table_read_without_a_snapshot_stops_the_run_and_the_retry_resumes_exactly(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path, statement: str
) -> None:
    """A chunk's COPY takes its snapshot before it waits for the table's lock: a chunk that waited on a
    rewriting ALTER TABLE read the new storage with a snapshot older than it, got no rows, and the run
    ended there, green, 4 rows of 60 (CI, floor stage). Without a snapshot, new storage stops the run."""
    table = f'"{schema}".rewritten'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, 60) g")
    migration = (
        [f"TRUNCATE {table}", f"INSERT INTO {table} SELECT g, g FROM generate_series(1, 60) g"]
        if statement == "TRUNCATE"
        else [f"ALTER TABLE {table} {statement}"]
    )
    with (
        after_first_chunk(pg, out_dir, migration),
        pytest.raises(SourceChangedError, match="got new storage"),
    ):
        _extract(conn_id, out_dir, table, columns=["id", "v"])
    retried = _extract(conn_id, out_dir, table, columns=["id", "v"])
    assert retried.resumed_from_chunk is not None  # the columns read did not change: it resumes
    assert sorted(read_output(out_dir).column("id").to_pylist()) == list(range(1, 61))
    assert_nothing_left(admin)


def test_a_chunk_that_waited_for_a_rewrite_is_not_read_as_the_end_of_the_table(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """The race itself, made certain: the rewrite holds its lock while the next chunk's COPY starts."""
    table = f'"{schema}".raced'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, 60) g")
    holder = psycopg.connect(pg.dsn, autocommit=True)
    locked = threading.Event()

    def rewrite_while_the_next_chunk_waits() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out_dir / "_manifest.json").exists():
            time.sleep(0.005)
        with holder.transaction():
            holder.execute(f"ALTER TABLE {table} ADD COLUMN z float8 DEFAULT random()")
            locked.set()
            time.sleep(1.0)  # the next chunk's COPY takes its snapshot, then waits here for the lock

    thread = threading.Thread(target=rewrite_while_the_next_chunk_waits, daemon=True)
    thread.start()
    try:
        with pytest.raises(SourceChangedError, match="got new storage"):
            ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
                destination=str(out_dir), table=table, columns=["id", "v"], chunk_rows=4, **FAST
            )
    finally:
        thread.join(30)
        holder.close()
    assert locked.is_set()
    retried = _extract(conn_id, out_dir, table, columns=["id", "v"])
    assert sorted(read_output(out_dir).column("id").to_pylist()) == list(range(1, 61)) and retried.rows == 60
    assert_nothing_left(admin)


def test_iter_chunks_stops_before_it_hands_out_a_chunk_read_after_a_change(
    conn_id: str, admin: psycopg.Connection, schema: str
) -> None:
    table = f'"{schema}".iterated'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text NOT NULL)")
    admin.execute(f"INSERT INTO {table} SELECT g, '1.5' FROM generate_series(1, 20) g")
    chunks = ConnectorXPostgresHook(postgres_conn_id=conn_id).iter_chunks(
        table=table, chunk_rows=4, where=SLOW_CHUNKS, **FAST
    )
    seen: list[Any] = []
    with pytest.raises(SourceChangedError, match="column 'v' is now numeric"):
        for chunk in chunks:
            seen.extend(chunk.column("v").to_pylist())
            if len(seen) == 4:  # a migration commits while the consumer holds the first chunk
                admin.execute(f"ALTER TABLE {table} ALTER COLUMN v TYPE numeric USING v::numeric")
    assert set(seen) == {"1.5"} and len(seen) < 20
    assert_nothing_left(admin)


def test_a_view_whose_table_is_truncated_under_the_runs_snapshot_stops_the_run(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """A view has no storage of its own: the tables it reads are watched."""
    base, view = f'"{schema}".viewed_base', f'"{schema}".viewed'
    admin.execute(f"CREATE TABLE {base} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {base} SELECT g, g FROM generate_series(1, 60) g")
    admin.execute(f"CREATE VIEW {view} AS SELECT id, v FROM {base}")
    with (
        after_first_chunk(
            pg, out_dir, [f"TRUNCATE {base}", f"INSERT INTO {base} SELECT g, g FROM generate_series(1, 60) g"]
        ),
        pytest.raises(SourceChangedError, match="viewed_base got new storage"),
    ):
        _extract(conn_id, out_dir, view, key_columns=["id"], snapshot=True)
    assert_nothing_left(admin)


def test_a_watermark_column_not_in_the_output_is_watched_too(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """The window's filter compares it: a new type (timestamp -> timestamptz) moves which rows it holds."""
    from airflow_provider_cxpg.planning.incremental import WatermarkSpec

    table = f'"{schema}".stamped'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, ts timestamp NOT NULL)")
    admin.execute(
        f"INSERT INTO {table} SELECT g, '2024-01-01'::timestamp + g * interval '1 h' FROM generate_series(1, 60) g"
    )
    with (
        after_first_chunk(pg, out_dir, [f"ALTER TABLE {table} ALTER COLUMN ts TYPE timestamptz"]),
        pytest.raises(SourceChangedError, match="column 'ts' is now timestamp with time zone"),
    ):
        _extract(
            conn_id, out_dir, table, columns=["id"], watermark=WatermarkSpec("ts", start="2023-12-31", one_off=True)
        )
    assert_nothing_left(admin)


def test_a_column_swapped_for_a_new_one_under_the_runs_snapshot_stops_the_run(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """Add, fill, drop the old one, rename: the snapshot's row versions hold no value for the new column."""
    table = f'"{schema}".swapped'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, 60) g")
    with (
        after_first_chunk(
            pg,
            out_dir,
            [
                f"ALTER TABLE {table} ADD COLUMN v2 int",
                f"UPDATE {table} SET v2 = v",
                f"ALTER TABLE {table} DROP COLUMN v",
                f"ALTER TABLE {table} RENAME COLUMN v2 TO v",
            ],
        ),
        pytest.raises(SourceChangedError, match="column 'v' is another column now"),
    ):
        _extract(conn_id, out_dir, table, snapshot=True)
    assert None not in read_output(out_dir).column("v").to_pylist()
    assert_nothing_left(admin)


def test_a_server_that_ends_idle_sessions_between_chunks_does_not_fail_the_check(
    pg: PgInfo, admin: psycopg.Connection, schema: str, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """idle_session_timeout shorter than a chunk: the check's connection is replaced once, not given up on."""
    import uuid

    if admin.info.server_version < 140000:
        pytest.skip("idle_session_timeout needs PostgreSQL 14")
    role = f"idle_{uuid.uuid4().hex[:8]}"
    table = f'"{schema}".idled'
    admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' SUPERUSER")
    admin.execute(f"ALTER ROLE {role} SET idle_session_timeout = '700ms'")
    try:
        admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        admin.execute(f"INSERT INTO {table} SELECT generate_series(1, 12)")
        conn_id = f"cxpg_{role}"
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", pg.airflow_conn_json(login=role, password="pw"))
        result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir),
            table=table,
            chunk_rows=4,
            where="(SELECT pg_sleep(1.2)) IS NOT NULL",
            monitor_interval=30.0,
            **FAST,
        )
        assert result.rows == 12
    finally:
        admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        admin.execute(f"DROP ROLE IF EXISTS {role}")


def test_a_key_renamed_into_another_columns_place_stops_a_run_without_a_snapshot(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """Same name, type and collation, another column: keyset paging would go on by other values."""
    table = f'"{schema}".renamed_keys'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, id2 int NOT NULL UNIQUE)")
    admin.execute(f"INSERT INTO {table} SELECT g, 1000 + g FROM generate_series(1, 60) g")
    with (
        after_first_chunk(
            pg,
            out_dir,
            [
                f"ALTER TABLE {table} RENAME COLUMN id TO tmp",
                f"ALTER TABLE {table} RENAME COLUMN id2 TO id",
                f"ALTER TABLE {table} RENAME COLUMN tmp TO id2",
            ],
        ),
        pytest.raises(SourceChangedError, match="column 'id' is another column now"),
    ):
        _extract(conn_id, out_dir, table, columns=["id", "id2"], key_columns=["id"])
    # same names, types and key (id is unique either way): only the column numbers tell them apart
    retried = _extract(conn_id, out_dir, table, columns=["id", "id2"], key_columns=["id"])
    assert retried.resumed_from_chunk is None  # it must not continue paging by the other column
    output = read_output(out_dir)
    assert sorted(zip(output.column("id").to_pylist(), output.column("id2").to_pylist(), strict=True)) == sorted(
        admin.execute(f"SELECT id, id2 FROM {table}").fetchall()
    )
    assert_nothing_left(admin)


def test_a_view_redefined_mid_run_stops_the_run(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    base, view = f'"{schema}".priced', f'"{schema}".prices'
    admin.execute(f"CREATE TABLE {base} (id int PRIMARY KEY, amount int NOT NULL)")
    admin.execute(f"INSERT INTO {base} SELECT g, g FROM generate_series(1, 60) g")
    admin.execute(f"CREATE VIEW {view} AS SELECT id, amount FROM {base}")
    with (
        after_first_chunk(
            pg, out_dir, [f"CREATE OR REPLACE VIEW {view} AS SELECT id, amount * 100 AS amount FROM {base}"]
        ),
        pytest.raises(SourceChangedError, match="prices was redefined"),
    ):
        _extract(conn_id, out_dir, view, key_columns=["id"])
    retried = _extract(conn_id, out_dir, view, key_columns=["id"])
    assert retried.resumed_from_chunk is None  # not half one definition, half the other
    assert read_output(out_dir).column("amount").to_pylist() == [100 * g for g in range(1, 61)]
    assert_nothing_left(admin)


def test_a_views_other_rules_and_sequences_are_not_what_it_reads(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """Under a snapshot: an INSTEAD rule's audit table and a sequence the view reads get new storage, harmlessly."""
    base, view = f'"{schema}".ruled_base', f'"{schema}".ruled'
    audit, counter = f'"{schema}".ruled_audit', f'"{schema}".ruled_seq'
    admin.execute(f"CREATE TABLE {base} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {base} SELECT g, g FROM generate_series(1, 60) g")
    admin.execute(f"CREATE TABLE {audit} (id int)")
    admin.execute(f"CREATE SEQUENCE {counter}")
    admin.execute(f"CREATE VIEW {view} AS SELECT id, v, (SELECT last_value FROM {counter}) > 0 AS used FROM {base}")
    admin.execute(f"CREATE RULE audit_insert AS ON INSERT TO {view} DO INSTEAD INSERT INTO {audit} VALUES (NEW.id)")
    with after_first_chunk(pg, out_dir, [f"TRUNCATE {audit}", f"ALTER SEQUENCE {counter} RESTART"]) as maintenance:
        result = _extract(conn_id, out_dir, view, key_columns=["id"], columns=["id", "v"], snapshot=True)
    read_after(maintenance, result)
    assert result.rows == 60
    assert_nothing_left(admin)


@pytest.mark.parametrize("snapshot", [False, True], ids=["no-snapshot", "snapshot"])
def test_an_enum_value_renamed_mid_run_stops_the_run(
    pg: PgInfo, conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path, snapshot: bool
) -> None:
    """A row stores its enum value's OID; the label is looked up in the catalog as of now, snapshot or
    not: ``RENAME VALUE`` mid-run wrote one value as 'old' in some chunks and 'new' in others, green."""
    table = f'"{schema}".labelled'
    admin.execute(f"CREATE TYPE \"{schema}\".mood AS ENUM ('old', 'other')")
    admin.execute(f'CREATE DOMAIN "{schema}".mood_d AS "{schema}".mood')
    admin.execute(f'CREATE TABLE {table} (id int PRIMARY KEY, many "{schema}".mood[], wrapped "{schema}".mood_d)')
    admin.execute(
        f"INSERT INTO {table} SELECT g, ARRAY['old']::\"{schema}\".mood[], 'old' FROM generate_series(1, 60) g"
    )
    rename = f"ALTER TYPE \"{schema}\".mood RENAME VALUE 'old' TO 'new'"
    for columns in (["id", "many"], ["id", "wrapped"]):  # in an array, under a domain
        destination = out_dir / columns[-1]
        with (
            after_first_chunk(pg, destination, [rename]),
            pytest.raises(SourceChangedError, match="the value 'old' is now labelled 'new'"),
        ):
            _extract(conn_id, destination, table, columns=columns, snapshot=snapshot)
        assert set(read_output(destination).column(columns[-1]).to_pylist()) <= {"old", "{old}"}
        admin.execute(f"ALTER TYPE \"{schema}\".mood RENAME VALUE 'new' TO 'old'")
    retried = _extract(conn_id, out_dir / "many", table, columns=["id", "many"], snapshot=snapshot)
    assert retried.rows == 60 and set(map(str, read_output(out_dir / "many").column("many").to_pylist())) == {"{old}"}
    assert_nothing_left(admin)


def test_a_retry_resumes_after_an_enum_value_was_added_and_starts_over_after_one_was_renamed(
    conn_id: str, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = f'"{schema}".moods'
    admin.execute(f"CREATE TYPE \"{schema}\".mood AS ENUM ('calm', 'busy')")
    admin.execute(f'CREATE TABLE {table} (id int PRIMARY KEY, m "{schema}".mood NOT NULL, t time NOT NULL)')
    admin.execute(f"INSERT INTO {table} SELECT g, 'calm', '12:00' FROM generate_series(1, 20) g")
    admin.execute(f"UPDATE {table} SET t = '24:00' WHERE id = 15")  # its guard fails the run at chunk 2

    def run() -> Any:
        return ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            destination=str(out_dir), table=table, chunk_rows=5, **FAST
        )

    with pytest.raises(DataIntegrityError):
        run()
    admin.execute(f"ALTER TYPE \"{schema}\".mood ADD VALUE 'sleepy'")  # changes no row read
    with pytest.raises(DataIntegrityError):
        run()
    assert manifest_of(out_dir)["attempts"] == 2  # resumed
    admin.execute(f"ALTER TYPE \"{schema}\".mood RENAME VALUE 'calm' TO 'serene'")
    admin.execute(f"UPDATE {table} SET t = '12:00'")
    retried = run()
    assert retried.resumed_from_chunk is None  # the committed chunks say 'calm'
    assert set(read_output(out_dir).column("m").to_pylist()) == {"serene"}
