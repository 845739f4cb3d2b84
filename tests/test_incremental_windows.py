"""Incremental windows lose nothing: NULL watermarks, ties at the end, lag, state, fan-out windows.

Every test here runs real DAG runs (``dag.test()`` on the metadata database the suite creates) of
an operator whose window is decided by the provider's own state, with the table changed between
runs, and checks that the outputs of the runs together hold every row exactly once (or, where the
contract says at-least-once, every row at least once).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_provider_cxpg.demo.embedded_postgres import EmbeddedPostgres
from airflow_provider_cxpg.exceptions import SourceChangedError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
from airflow_provider_cxpg.operators.partition import PostgresPartitionPlanOperator, PostgresPartitionValidateOperator
from airflow_provider_cxpg.planning.incremental import END_KEYS_CHARS_MAX, END_KEYS_MAX, WatermarkSpec
from airflow_provider_cxpg.planning.watermark_state import WatermarkState, default_state_key
from tests.helpers import PgInfo, read_output, register_dag
from tests.test_operator_dags import run_dag, xcom_return

pytestmark = pytest.mark.integration

_DAG_IDS = itertools.count()


def _dag_id(name: str) -> str:
    return f"cxpg_{name}_{next(_DAG_IDS)}_{dt.datetime.now().strftime('%H%M%S%f')}"


def make_dag(dag_id: str, **operator_kwargs: Any) -> Any:
    from airflow.providers.common.compat.sdk import DAG

    with DAG(dag_id=dag_id, schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False) as dag:
        PostgresExtractOperator(task_id="extract", **operator_kwargs)
    return register_dag(dag)


class Runs:
    """Consecutive DAG runs of one incremental DAG, an hour apart, and their outputs."""

    def __init__(self, dag: Any, task_id: str = "extract") -> None:
        self.dag, self.task_id, self.count = dag, task_id, 0
        self.summaries: list[dict[str, Any]] = []

    def run(self) -> dict[str, Any]:
        dag_run = run_dag(self.dag, self.count)
        self.count += 1
        assert "success" in str(dag_run.state), dag_run.state
        summary = xcom_return(dag_run, self.task_id)
        self.summaries.append(summary)
        return summary

    def rows(self, summary: dict[str, Any], key: str = "id") -> list[Any]:
        return [r[key] for r in read_output(summary["destination"]).to_pylist()]


@pytest.fixture
def events(admin: psycopg.Connection, schema: str) -> Iterator[str]:
    table = f'"{schema}".events'
    yield table


class MetadataVariables:
    """Read the Variables tasks wrote, from the metadata database (this process runs no task)."""

    def get(self, key: str) -> str | None:
        from airflow.models.variable import Variable

        try:
            return Variable.get(key)
        except KeyError:
            return None


def state(dag_id: str, task_id: str = "extract", map_index: int | None = None) -> WatermarkState:
    return WatermarkState(default_state_key(dag_id, task_id, map_index), store=MetadataVariables())


# -- NULL watermarks -------------------------------------------------------------------------------------


def test_first_run_is_a_full_copy_with_null_watermarks_and_later_runs_say_what_they_cannot_see(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, updated_at timestamptz)")
    admin.execute(
        f"INSERT INTO {events} SELECT g, CASE WHEN g % 4 = 0 THEN NULL ELSE '2024-01-01'::timestamptz + g * interval '1 s' END "
        "FROM generate_series(1, 400) g"
    )
    admin.execute(f"ANALYZE {events}")
    runs = Runs(
        make_dag(
            _dag_id("nulls"),
            postgres_conn_id=conn_id,
            table=events,
            watermark_column="updated_at",
            destination=str(tmp_path / "{{ run_id }}"),
            chunk_rows=64,
        )
    )
    first = runs.run()
    assert sorted(runs.rows(first)) == list(range(1, 401))  # the 100 NULL rows too
    admin.execute(f"INSERT INTO {events} VALUES (401, now()), (402, NULL)")
    second = runs.run()
    assert runs.rows(second) == [401]
    assert second["window"]["null_rows_estimate"] >= 90  # pg_stats: about a quarter of 400
    assert second["watermark_contract"] == "exactly_once"


# -- ties at the window's end ----------------------------------------------------------------------------


@pytest.mark.parametrize("column_type", ["date", "timestamp(0)", "bigint"])
def test_rows_that_tie_with_the_previous_end_are_read_by_the_next_run_exactly_once(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path, column_type: str
) -> None:
    value = {"date": "'2024-03-0{d}'::date", "timestamp(0)": "'2024-03-01 10:00:0{d}'", "bigint": "{d}"}[column_type]
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, wm {column_type} NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, {value.format(d=1)} FROM generate_series(1, 30) g")
    admin.execute(f"INSERT INTO {events} SELECT g, {value.format(d=2)} FROM generate_series(31, 50) g")
    runs = Runs(
        make_dag(
            _dag_id("ties"),
            postgres_conn_id=conn_id,
            table=events,
            watermark_column="wm",
            destination=str(tmp_path / "{{ run_id }}"),
            chunk_rows=7,
        )
    )
    first = runs.run()
    assert sorted(runs.rows(first)) == list(range(1, 51))
    assert first["window"]["boundary_keys"] == 20  # the 20 rows holding the end value are remembered
    # Written after the run, with the value the run ended at (a coarse clock, a batch number)
    admin.execute(f"INSERT INTO {events} SELECT g, {value.format(d=2)} FROM generate_series(51, 60) g")
    admin.execute(f"UPDATE {events} SET wm = {value.format(d=2)} WHERE id IN (3, 4)")  # moved onto the end
    second = runs.run()
    assert sorted(runs.rows(second)) == [3, 4, *range(51, 61)]
    third = runs.run()
    assert runs.rows(third) == []
    every = Counter(i for s in runs.summaries for i in runs.rows(s))
    assert set(every) == set(range(1, 61)) and every[3] == every[4] == 2  # updated rows: their new version
    assert all(n == 1 for i, n in every.items() if i not in (3, 4))


def test_too_many_rows_at_the_end_are_left_whole_for_the_next_run(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    crowd = END_KEYS_MAX + 200
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, day date NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, '2024-01-01' FROM generate_series(1, 100) g")
    admin.execute(f"INSERT INTO {events} SELECT g, '2024-01-02' FROM generate_series(101, {100 + crowd}) g")
    runs = Runs(
        make_dag(
            _dag_id("crowd"),
            postgres_conn_id=conn_id,
            table=events,
            watermark_column="day",
            destination=str(tmp_path / "{{ run_id }}"),
            chunk_rows=500,
        )
    )
    first = runs.run()
    assert sorted(runs.rows(first)) == list(range(1, 101)) and first["window"]["end_mode"] == "exclusive"
    admin.execute(f"INSERT INTO {events} SELECT g, '2024-01-02' FROM generate_series(5000, 5009) g")
    admin.execute(f"INSERT INTO {events} VALUES (6000, '2024-01-03')")
    second = runs.run()
    # the whole crowded day once, and the one row of the new end (few enough to remember)
    assert sorted(runs.rows(second)) == [*range(101, 101 + crowd), *range(5000, 5010), 6000]
    assert second["window"]["end_mode"] == "keys" and second["window"]["boundary_keys"] == 1


def test_long_keys_at_the_end_are_left_whole_for_the_next_run(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    """Few rows, but keys too long to carry in every chunk's SQL and in the state Variable."""
    admin.execute(f"CREATE TABLE {events} (code text PRIMARY KEY, day date NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT 'a' || g, '2024-01-01' FROM generate_series(1, 10) g")
    long_keys = END_KEYS_CHARS_MAX // 2000 + 5  # 2000-character keys: a few more than fit
    admin.execute(
        f"INSERT INTO {events} SELECT 'b' || g || repeat('x', 2000), '2024-01-02' "
        f"FROM generate_series(1, {long_keys}) g"
    )
    runs = Runs(
        make_dag(
            _dag_id("longkeys"),
            postgres_conn_id=conn_id,
            table=events,
            watermark_column="day",
            destination=str(tmp_path / "{{ run_id }}"),
        )
    )

    def codes(summary: dict) -> list[str]:
        return sorted(c[:8] for c in runs.rows(summary, "code"))

    first = runs.run()
    assert first["window"]["end_mode"] == "exclusive"  # far fewer rows than END_KEYS_MAX
    assert codes(first) == sorted(f"a{g}" for g in range(1, 11))
    admin.execute(f"INSERT INTO {events} VALUES ('c1', '2024-01-03')")
    second = runs.run()
    # the long-keyed day whole, once, and the new end (one short key: remembered)
    assert codes(second) == sorted([*(f"b{g}xxxxxxxx"[:8] for g in range(1, long_keys + 1)), "c1"])
    assert second["window"]["end_mode"] == "keys" and second["window"]["boundary_keys"] == 1


def test_watermark_lag_rereads_the_trailing_interval_and_says_at_least_once(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, updated_at timestamptz NOT NULL)")
    admin.execute(
        f"INSERT INTO {events} SELECT g, '2024-01-01 00:00'::timestamptz + g * interval '1 min' "
        "FROM generate_series(1, 60) g"
    )
    runs = Runs(
        make_dag(
            _dag_id("lag"),
            postgres_conn_id=conn_id,
            table=events,
            watermark_column="updated_at",
            watermark_lag=dt.timedelta(minutes=10),
            destination=str(tmp_path / "{{ run_id }}"),
        )
    )
    first = runs.run()
    assert len(runs.rows(first)) == 60 and first["watermark_contract"] == "exactly_once"  # a first run: no lag
    # A late commit: stamped 5 minutes before the previous end, committed after that run
    admin.execute(f"INSERT INTO {events} VALUES (61, '2024-01-01 00:55'::timestamptz)")
    second = runs.run()
    assert sorted(runs.rows(second)) == [*range(50, 62)]  # 00:50 .. 01:00 again, and the late row
    assert second["watermark_contract"] == "at_least_once"


# -- where the next run starts ---------------------------------------------------------------------------


def test_mapped_incremental_tasks_keep_their_own_windows(
    conn_id: str, admin: psycopg.Connection, schema: str, tmp_path: Path, airflow_db: Path
) -> None:
    """A mapped task never starts at a sibling's end (Airflow 3's xcom_pull returns siblings too)."""
    from airflow.providers.common.compat.sdk import DAG

    for name, base in (("a", 0), ("b", 1000)):
        admin.execute(f'CREATE TABLE "{schema}".{name} (id int PRIMARY KEY, v bigint NOT NULL)')
        admin.execute(f'INSERT INTO "{schema}".{name} SELECT g, {base} + g FROM generate_series(1, 20) g')
    dag_id = _dag_id("mapped")
    with DAG(dag_id=dag_id, schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False) as dag:
        PostgresExtractOperator.partial(
            task_id="extract", postgres_conn_id=conn_id, watermark_column="v"
        ).expand_kwargs(
            [
                {"table": f"{schema}.{n}", "destination": str(tmp_path / n / "{{ run_id }}")}
                for n in ("b", "a")  # b's window ends far above a's values
            ]
        )
    register_dag(dag)
    assert "success" in str(run_dag(dag, 0).state)
    admin.execute(f'INSERT INTO "{schema}".a SELECT g, g FROM generate_series(21, 25) g')
    admin.execute(f'INSERT INTO "{schema}".b SELECT g, 1000 + g FROM generate_series(21, 23) g')
    second = run_dag(dag, 1)
    assert "success" in str(second.state)
    for name, expected in (("a", list(range(21, 26))), ("b", list(range(21, 24)))):
        out = tmp_path / name / second.run_id
        assert sorted(r["id"] for r in read_output(out).to_pylist()) == expected
    assert {state(dag_id, map_index=i).last_window()["high_watermark"] for i in (0, 1)} == {"25", "1023"}


def test_an_explicit_start_is_a_one_off_window_that_leaves_the_state_alone(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(1, 30) g")
    dag = make_dag(
        _dag_id("explicit"),
        postgres_conn_id=conn_id,
        table=events,
        watermark_column="v",
        watermark_start="20",
        destination=str(tmp_path / "{{ run_id }}"),
    )
    runs = Runs(dag)
    assert sorted(runs.rows(runs.run())) == list(range(21, 31))  # exclusive, as documented
    assert state(dag.dag_id).load() == {}


@pytest.mark.parametrize("column", ["v", "xmin"])
def test_an_end_past_every_value_leaves_no_row_written_later_behind(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path, column: str
) -> None:
    """``watermark_end`` past what the source holds (a data interval not yet closed, a date ahead).

    The state once moved to that end: rows written later below it fell behind the next run's start,
    lost with a green task. The window ends at what exists when the run starts (for xmin: the
    oldest transaction still running), as without an end.
    """
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(1, 30) g")
    runs = Runs(
        make_dag(
            _dag_id("end_ahead"),
            postgres_conn_id=conn_id,
            table=events,
            watermark_column=column,
            watermark_end=str(10**9),  # templated values arrive as text
            destination=str(tmp_path / "{{ run_id }}"),
            chunk_rows=7,
        )
    )
    first = runs.run()
    assert sorted(runs.rows(first)) == list(range(1, 31))
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(31, 40) g")  # below the given end
    second = runs.run()
    assert sorted(runs.rows(second)) == list(range(31, 41))
    every = Counter(i for s in runs.summaries for i in runs.rows(s))
    assert set(every) == set(range(1, 41)) and all(n == 1 for n in every.values())
    assert int(first["window"]["end"]) < 10**9 and int(first["high_watermark"]) < 10**9, first["window"]
    assert state(runs.dag.dag_id).last_window()["sequence"] == 2  # the chain of committed windows


def test_a_one_off_window_reads_up_to_the_end_it_was_given(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    """An explicit start: no later window starts at this one's end, so the end is not lowered.

    Lowered to the largest value, a source without row versions (a query) would leave the rows at
    that value to a "next run" that one-off windows (0, 100], (100, 200] never make.
    """
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(1, 30) g")
    dag = make_dag(
        _dag_id("one_off_end"),
        postgres_conn_id=conn_id,
        sql=f"SELECT id, v FROM {events}",
        key_columns=["id"],
        watermark_column="v",
        watermark_start="0",
        watermark_end="100",
        destination=str(tmp_path / "{{ run_id }}"),
        chunk_rows=7,
    )
    runs = Runs(dag)
    assert sorted(runs.rows(runs.run())) == list(range(1, 31))
    assert state(dag.dag_id).load() == {}


@pytest.mark.parametrize("given_end", [None, "C"])
def test_a_text_watermark_moves_on_in_its_own_collation_exactly_once(
    system_conn_id: str, system_admin: psycopg.Connection, tmp_path: Path, airflow_db: Path, given_end: str | None
) -> None:
    """The column sorts under ICU ('b' < 'C'); the database's own collation is "C" ('C' < 'b').

    Comparing the window's bounds as bare literals used the database's order: a next start left
    behind (rows read again: ``None``), or an end past every value taken as reached, so the next
    start passed a row written later below it (lost: ``"C"``).
    """
    schema = f"wm_coll_{uuid.uuid4().hex[:8]}"
    system_admin.execute(f"CREATE SCHEMA {schema}")
    try:
        table = f"{schema}.codes"
        system_admin.execute(f'CREATE TABLE {table} (id int PRIMARY KEY, code text COLLATE "und-x-icu" NOT NULL)')
        system_admin.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
        runs = Runs(
            make_dag(
                _dag_id("text_collation"),
                postgres_conn_id=system_conn_id,
                table=table,
                watermark_column="code",
                watermark_end=given_end,
                destination=str(tmp_path / "{{ run_id }}"),
            )
        )
        assert sorted(runs.rows(runs.run())) == [1, 2]
        # Later than 'b' under the column's collation: 'bz' < 'C' (lost past an end of 'C'), and 'C'.
        system_admin.execute(f"INSERT INTO {table} VALUES (3, %s)", ("bz" if given_end else "C",))
        assert runs.rows(runs.run()) == [3]
        assert runs.rows(runs.run()) == []
    finally:
        system_admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.parametrize("how", ["attach", "inherit"])
@pytest.mark.parametrize("column", ["xmin", "updated_at"])
def test_rows_of_a_partition_attached_between_runs_are_read_by_the_next_run(
    conn_id: str, admin: psycopg.Connection, schema: str, tmp_path: Path, airflow_db: Path, column: str, how: str
) -> None:
    """``ATTACH PARTITION`` / ``INHERIT`` bring rows whose xmins and watermarks are old: below every
    later window's start, no run read them (30 rows attached between two runs: never read, green)."""
    parent, loaded = f'"{schema}".parent', f'"{schema}".loaded'
    columns = "id int NOT NULL, part int NOT NULL, updated_at timestamptz NOT NULL"
    if how == "attach":
        admin.execute(f"CREATE TABLE {parent} ({columns}, PRIMARY KEY (part, id)) PARTITION BY LIST (part)")
        admin.execute(f'CREATE TABLE "{schema}".p1 PARTITION OF {parent} FOR VALUES IN (1)')
    else:
        admin.execute(f"CREATE TABLE {parent} ({columns}, PRIMARY KEY (part, id))")
    stamp = "'2024-01-01'::timestamptz + g * interval '1 minute'"
    admin.execute(f"INSERT INTO {parent} SELECT g, 1, {stamp} FROM generate_series(1, 50) g")
    # Loaded before the first run, elsewhere: older xmins and watermarks than anything that run ends at.
    admin.execute(f"CREATE TABLE {loaded} ({columns})")
    admin.execute(f"INSERT INTO {loaded} SELECT g, 2, {stamp} - interval '1 year' FROM generate_series(1, 30) g")
    runs = Runs(
        make_dag(
            _dag_id(f"attach_{how}"),
            postgres_conn_id=conn_id,
            table=f"{schema}.parent",
            watermark_column=column,
            destination=str(tmp_path / "{{ run_id }}"),
            chunk_rows=20,
        )
    )

    def rows(summary: dict[str, Any]) -> list[tuple[int, int]]:
        return sorted((r["part"], r["id"]) for r in read_output(summary["destination"]).to_pylist())

    assert rows(runs.run()) == [(1, i) for i in range(1, 51)]
    if how == "attach":
        admin.execute(f"ALTER TABLE {parent} ATTACH PARTITION {loaded} FOR VALUES IN (2)")
    else:
        admin.execute(f"ALTER TABLE {loaded} INHERIT {parent}")
    admin.execute(f"INSERT INTO {parent} VALUES (51, 1, '2025-01-01')")
    second = runs.run()
    assert rows(second) == sorted([(2, i) for i in range(1, 31)] + [(1, 51)])
    assert second["window"].get("arrived_partitions") == 1
    admin.execute(f"INSERT INTO {parent} VALUES (52, 1, '2025-01-02')")
    assert rows(runs.run()) == [(1, 52)]  # known now: read by its watermark like any other
    every = Counter(r for summary in runs.summaries for r in rows(summary))
    assert len(every) == 82 and all(n == 1 for n in every.values())


# -- fan-out --------------------------------------------------------------------------------------------


def fan_out_dag(dag_id: str, conn_id: str, table: str, base: Path, partitions: int = 4) -> Any:
    """Planner -> mapped extracts -> (a task that damages a file when ``base/damage`` exists) -> validator."""
    from airflow.providers.common.compat.sdk import DAG, task

    dataset = str(base / "{{ run_id }}")
    with DAG(dag_id=dag_id, schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False) as dag:
        plan = PostgresPartitionPlanOperator(
            task_id="plan",
            postgres_conn_id=conn_id,
            table=table,
            partitions=partitions,
            method="ntile",
            watermark_column="updated_at",
            destination=dataset,
        )
        extract = PostgresExtractOperator.partial(
            task_id="extract", postgres_conn_id=conn_id, table=table, chunk_rows=40
        ).expand_kwargs(plan.output)

        @task(task_id="damage")
        def damage(run_id: str | None = None) -> None:
            if (base / "damage").exists():
                for part in sorted((base / str(run_id)).glob("range=*/part-*.parquet"))[:1]:
                    part.unlink()

        check = PostgresPartitionValidateOperator(
            task_id="validate", destination=dataset, verify_count=True, postgres_conn_id=conn_id
        )
        plan >> extract >> damage() >> check
    return register_dag(dag)


def dataset_ids(base: Path) -> list[int]:
    ids: list[int] = []
    for part in sorted(base.glob("range=*")):
        ids.extend(r["id"] for r in read_output(part).to_pylist())
    return ids


def test_incremental_fan_out_reads_exactly_each_runs_window(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, updated_at timestamptz NOT NULL, note text)")
    admin.execute(
        f"INSERT INTO {events} SELECT g, '2024-01-01'::timestamptz + (g / 10) * interval '1 s', 'v1' "
        "FROM generate_series(1, 400) g"
    )  # ten rows share each second: ties everywhere, also at every window's end
    admin.execute(f"ANALYZE {events}")
    dag = fan_out_dag(_dag_id("fanout"), conn_id, events, tmp_path)

    def current(where: str) -> list[int]:
        return sorted(r[0] for r in admin.execute(f"SELECT id FROM {events} WHERE {where}"))

    first = run_dag(dag, 0)
    assert "success" in str(first.state)
    expected_runs = [current("true")]
    admin.execute(f"UPDATE {events} SET note = 'v2', updated_at = now() WHERE id % 7 = 0")
    admin.execute(f"INSERT INTO {events} SELECT g, now(), 'new' FROM generate_series(401, 450) g")
    second = run_dag(dag, 1)
    assert "success" in str(second.state)
    expected_runs.append(current("id % 7 = 0 OR id > 400"))
    admin.execute(
        f"INSERT INTO {events} SELECT g, (SELECT max(updated_at) FROM {events}), 'tie' FROM generate_series(451, 460) g"
    )
    third = run_dag(dag, 2)
    assert "success" in str(third.state)
    expected_runs.append(list(range(451, 461)))  # tied with the second run's end: read now, once
    for dag_run, expected in zip((first, second, third), expected_runs, strict=True):
        base = tmp_path / dag_run.run_id
        assert sorted(dataset_ids(base)) == expected
        assert json.loads((base / "_dataset_manifest.json").read_text())["status"] == "complete"
    first_parts = [read_output(p).num_rows for p in sorted((tmp_path / first.run_id).glob("range=*"))]
    assert len(first_parts) == 4 and all(n > 0 for n in first_parts)  # every range read the first window


def test_a_dataset_that_fails_validation_does_not_move_the_next_window(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, updated_at timestamptz NOT NULL, note text)")
    admin.execute(
        f"INSERT INTO {events} SELECT g, '2024-01-01'::timestamptz + g * interval '1 s', 'a' "
        "FROM generate_series(1, 100) g"
    )
    dag = fan_out_dag(_dag_id("fanfail"), conn_id, events, tmp_path, partitions=2)
    assert "success" in str(run_dag(dag, 0).state)
    committed = state(dag.dag_id, "plan").last_window()
    admin.execute(f"INSERT INTO {events} SELECT g, now(), 'b' FROM generate_series(101, 120) g")
    (tmp_path / "damage").touch()
    failed = run_dag(dag, 1)
    assert "failed" in str(failed.state)  # the validator found the deleted file
    assert state(dag.dag_id, "plan").last_window() == committed
    (tmp_path / "damage").unlink()
    admin.execute(f"INSERT INTO {events} SELECT g, now(), 'c' FROM generate_series(121, 125) g")
    retried = run_dag(dag, 2)
    assert "success" in str(retried.state)
    assert sorted(dataset_ids(tmp_path / retried.run_id)) == list(range(101, 126))  # the failed run's rows too


# -- what the review found -------------------------------------------------------------------------------


def test_a_remembered_row_updated_without_moving_its_watermark_is_read_again(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    """The rows at a window's end are remembered by key *and version*: an update is a new version."""
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, day date NOT NULL, v text)")
    admin.execute(f"INSERT INTO {events} SELECT g, '2024-01-01'::date + (g / 10), 'a' FROM generate_series(1, 39) g")
    runs = Runs(
        make_dag(
            _dag_id("versions"),
            postgres_conn_id=conn_id,
            table=events,
            watermark_column="day",
            destination=str(tmp_path / "{{ run_id }}"),
            chunk_rows=8,
        )
    )
    assert len(runs.rows(runs.run())) == 39
    admin.execute(f"UPDATE {events} SET v = 'changed' WHERE id = 35")  # at the end, the day unchanged
    second = runs.run()
    got = read_output(second["destination"]).to_pylist()
    assert [(r["id"], r["v"]) for r in got] == [(35, "changed")]
    assert runs.rows(runs.run()) == []


def test_nan_and_infinite_watermarks_do_not_freeze_the_windows_after_them(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, score float8, at timestamptz)")
    admin.execute(
        f"""INSERT INTO {events} VALUES (1, 1.5, now()), (2, 'NaN', now()), (3, 'Infinity', 'infinity'),
            (4, 2.5, '-infinity'), (5, NULL, NULL)"""
    )
    for column in ("score", "at"):
        runs = Runs(
            make_dag(
                _dag_id(f"finite_{column}"),
                postgres_conn_id=conn_id,
                table=events,
                watermark_column=column,
                destination=str(tmp_path / column / "{{ run_id }}"),
                column_casts={"at": "text"},  # ±infinity timestamps do not fit Arrow's
            )
        )
        everything = sorted(r[0] for r in admin.execute(f"SELECT id FROM {events}"))
        assert sorted(runs.rows(runs.run())) == everything  # a first run is a full copy, NaN and infinity too
        new = 10 if column == "score" else 20
        admin.execute(f"INSERT INTO {events} VALUES ({new}, 9.5, now() + interval '1 day')")
        assert runs.rows(runs.run()) == [new], column  # not frozen behind NaN / infinity


def test_a_constrained_numeric_watermark_runs_window_after_window(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    # numeric(10,2) cannot hold Infinity: the finite-value guard must not cast 'Infinity' to it (the
    # statement failed on PostgreSQL 14+ with "numeric field overflow" before any row was read)
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, amount numeric(10,2))")
    admin.execute(f"INSERT INTO {events} VALUES (1, 1.00), (2, 0.01), (3, 2.50), (4, NULL), (5, 2.5)")
    runs = Runs(
        make_dag(
            _dag_id("numeric_wm"),
            postgres_conn_id=conn_id,
            table=events,
            watermark_column="amount",
            destination=str(tmp_path / "{{ run_id }}"),
        )
    )
    assert sorted(runs.rows(runs.run())) == [1, 2, 3, 4, 5]
    admin.execute(f"INSERT INTO {events} VALUES (6, 2.50), (7, 9.75)")  # 2.50 ties with the last end
    assert sorted(runs.rows(runs.run())) == [6, 7]
    assert runs.rows(runs.run()) == []


def test_a_query_source_without_row_versions_defers_the_rows_at_its_end(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, batch int NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, g / 10 FROM generate_series(1, 25) g")
    runs = Runs(
        make_dag(
            _dag_id("query_end"),
            postgres_conn_id=conn_id,
            sql=f"SELECT id, batch FROM {events}",
            key_columns=["id"],
            watermark_column="batch",
            destination=str(tmp_path / "{{ run_id }}"),
        )
    )
    first = runs.run()
    assert sorted(runs.rows(first)) == list(range(1, 20)) and first["window"]["end_mode"] == "exclusive"
    admin.execute(f"UPDATE {events} SET batch = 3 WHERE id = 5")
    assert sorted(runs.rows(runs.run())) == list(range(20, 26))  # batch 2 now; batch 3 (row 5) is the end
    admin.execute(f"INSERT INTO {events} VALUES (99, 4)")
    assert runs.rows(runs.run()) == [5]  # and the run after it reads batch 3


def test_a_task_whose_source_changed_does_not_continue_the_old_sources_windows(
    conn_id: str, admin: psycopg.Connection, schema: str, tmp_path: Path, airflow_db: Path
) -> None:
    for name in ("a", "b"):
        admin.execute(f'CREATE TABLE "{schema}".{name} (id int PRIMARY KEY, v int NOT NULL)')
    admin.execute(f'INSERT INTO "{schema}".a SELECT g, 1000 + g FROM generate_series(1, 10) g')
    admin.execute(f'INSERT INTO "{schema}".b SELECT g, g FROM generate_series(1, 10) g')
    dag_id = _dag_id("moved")
    kwargs = {"postgres_conn_id": conn_id, "watermark_column": "v", "destination": str(tmp_path / "{{ run_id }}")}
    assert (
        len(
            Runs(make_dag(dag_id, table=f"{schema}.a", **kwargs)).rows(
                Runs(make_dag(dag_id, table=f"{schema}.a", **kwargs)).run()
            )
        )
        == 10
    )
    moved = Runs(make_dag(dag_id, table=f"{schema}.b", **kwargs))  # the same task, now on table b
    moved.count = 1
    assert sorted(moved.rows(moved.run())) == list(range(1, 11))  # b's v < a's high watermark: a full copy


# -- sources whose rows have no real row versions ----------------------------------------------------------


def _window_runs(conn_id: str, tmp_path: Path, **kwargs: Any) -> Iterator[tuple[list[dict[str, Any]], Any]]:
    """Consecutive windows of one source through the hook, each starting after the last."""
    from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
    from airflow_provider_cxpg.planning.incremental import WatermarkSpec

    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    last: dict[str, Any] | None = None
    for number in itertools.count():
        spec = WatermarkSpec("batch") if last is None else WatermarkSpec.following(last)
        out = tmp_path / f"run{number}"
        result = hook.extract(destination=str(out), watermark=spec, heartbeat_timeout=5.0, **kwargs)
        last = result.window
        yield read_output(out).to_pylist(), result


def test_a_materialized_view_defers_the_rows_at_its_end(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path
) -> None:
    """REFRESH rewrites every row of a materialized view: remembered row versions would not match."""
    view = events.replace(".events", ".events_mv")
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, batch int NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, g / 10 FROM generate_series(1, 25) g")
    admin.execute(f"CREATE MATERIALIZED VIEW {view} AS SELECT * FROM {events}")
    admin.execute(f"CREATE UNIQUE INDEX ON {view} (id)")
    runs = _window_runs(conn_id, tmp_path, table=view, key_columns=["id"])
    rows, first = next(runs)
    assert first.window["end_mode"] == "exclusive" and not first.window["versioned"]
    assert sorted(r["id"] for r in rows) == list(range(1, 20))  # batch 2 (the end) is the next run's
    admin.execute(f"INSERT INTO {events} VALUES (99, 3)")
    admin.execute(f"REFRESH MATERIALIZED VIEW {view}")
    rows, _ = next(runs)
    assert sorted(r["id"] for r in rows) == list(range(20, 26))  # once each, after a refresh too


def test_a_partitioned_table_with_a_foreign_partition_loses_no_update_at_its_end(
    system_conn_id: str, system_admin: psycopg.Connection, system_pg: Any, tmp_path: Path
) -> None:
    """postgres_fdw reports xmin 0 for every row, before and after an update: not a row version."""
    admin = system_admin
    admin.execute("DROP SCHEMA IF EXISTS fdw CASCADE")
    admin.execute("DROP SERVER IF EXISTS cxpg_loop CASCADE")
    admin.execute("CREATE SCHEMA fdw")
    admin.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    admin.execute(
        f"CREATE SERVER cxpg_loop FOREIGN DATA WRAPPER postgres_fdw "
        f"OPTIONS (host '{system_pg.host}', port '{system_pg.port}', dbname '{system_pg.dbname}')"
    )
    admin.execute(
        f"CREATE USER MAPPING FOR CURRENT_USER SERVER cxpg_loop "
        f"OPTIONS (user '{system_pg.user}', password '{system_pg.password}')"
    )
    admin.execute("CREATE TABLE fdw.remote (id int NOT NULL, batch int NOT NULL, note text)")
    admin.execute("CREATE TABLE fdw.parted (id int NOT NULL, batch int NOT NULL, note text) PARTITION BY RANGE (id)")
    admin.execute("CREATE TABLE fdw.local PARTITION OF fdw.parted FOR VALUES FROM (0) TO (100)")
    admin.execute(
        "CREATE FOREIGN TABLE fdw.far PARTITION OF fdw.parted FOR VALUES FROM (100) TO (200) "
        "SERVER cxpg_loop OPTIONS (schema_name 'fdw', table_name 'remote')"
    )
    admin.execute("INSERT INTO fdw.parted VALUES (1, 1, 'a'), (2, 1, 'a'), (150, 2, 'a'), (151, 2, 'a')")
    assert {r[0] for r in admin.execute("SELECT xmin::text FROM fdw.far")} == {"0"}
    try:
        runs = _window_runs(system_conn_id, tmp_path, table="fdw.parted", key_columns=["id"])
        rows, first = next(runs)
        assert first.window["end_mode"] == "exclusive" and not first.window["versioned"]
        assert sorted(r["id"] for r in rows) == [1, 2]
        admin.execute("UPDATE fdw.parted SET note = 'changed' WHERE id = 150")  # still batch 2, still xmin 0
        admin.execute("INSERT INTO fdw.parted VALUES (152, 3, 'a')")
        rows, _ = next(runs)
        assert sorted((r["id"], r["note"]) for r in rows) == [(150, "changed"), (151, "a")]
        from airflow_provider_cxpg.exceptions import InvalidInputError
        from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
        from airflow_provider_cxpg.planning.incremental import WatermarkSpec

        with pytest.raises(InvalidInputError, match="xmin 0"):  # no xmin window would select those rows
            ConnectorXPostgresHook(postgres_conn_id=system_conn_id).extract(
                destination=str(tmp_path / "xmin"),
                table="fdw.parted",
                key_columns=["id"],
                watermark=WatermarkSpec("xmin"),
            )
        assert not (tmp_path / "xmin").exists()
    finally:
        admin.execute("DROP SCHEMA fdw CASCADE")
        admin.execute("DROP SERVER cxpg_loop CASCADE")


# -- mapped windows over key ranges (stop 30's hunt) -------------------------------------------------------


def _ranged_dag(dag_id: str, conn_id: str, table: str, base: Path, ranges: list[tuple[Any, Any]]) -> Any:
    from airflow.providers.common.compat.sdk import DAG

    with DAG(dag_id=dag_id, schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False) as dag:
        PostgresExtractOperator.partial(
            task_id="extract", postgres_conn_id=conn_id, table=table, watermark_column="v", chunk_rows=4
        ).expand_kwargs(
            [
                {"lower_key": lower, "upper_key": upper, "destination": str(base / f"{lower}-{upper}" / "{{ run_id }}")}
                for lower, upper in ranges
            ]
        )
    return register_dag(dag)


def test_a_mapped_task_whose_key_range_changed_does_not_continue_another_ranges_window(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    """The windows of a map index are windows of its key range: reordered, it starts with a full copy."""
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, v bigint NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, 1000 + g FROM generate_series(1, 10) g")  # ids <= 10: v to 1010
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(11, 20) g")  # ids > 10: v to 20
    dag_id = _dag_id("reordered")
    first = run_dag(_ranged_dag(dag_id, conn_id, events, tmp_path, [(None, 10), (10, None)]), 0)
    assert "success" in str(first.state)
    admin.execute(f"INSERT INTO {events} VALUES (21, 21), (0, 1011)")
    second = run_dag(_ranged_dag(dag_id, conn_id, events, tmp_path, [(10, None), (None, 10)]), 1)  # reordered
    assert "success" in str(second.state)
    read: Counter[int] = Counter()
    for dag_run in (first, second):
        for folder in tmp_path.glob(f"*/{dag_run.run_id}"):
            read.update(r["id"] for r in read_output(folder).to_pylist())
    assert set(read) == set(range(0, 22))  # id 21 (v 21, below the other range's end 1010) is not lost
    again = run_dag(_ranged_dag(dag_id, conn_id, events, tmp_path, [(10, None), (None, 10)]), 2)  # same order
    assert "success" in str(again.state)
    assert [read_output(f).num_rows for f in tmp_path.glob(f"*/{again.run_id}")] == [0, 0]  # incremental again


def test_a_range_of_a_plan_without_a_watermark_cannot_keep_a_window_of_its_own(
    conn_id: str,
    admin: psycopg.Connection,
    events: str,
    tmp_path: Path,
    airflow_db: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Planned ranges move from plan to plan; a window per range would miss rows between old and new bounds."""
    from airflow.providers.common.compat.sdk import DAG

    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, v bigint NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(1, 20) g")
    with DAG(dag_id=_dag_id("planshift"), schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False) as dag:
        ranges = PostgresPartitionPlanOperator(
            task_id="plan",
            postgres_conn_id=conn_id,
            table=events,
            partitions=2,
            method="ntile",
            destination=str(tmp_path / "{{ run_id }}"),
        )
        PostgresExtractOperator.partial(
            task_id="extract", postgres_conn_id=conn_id, table=events, watermark_column="v"
        ).expand_kwargs(ranges.output)
    register_dag(dag)
    dag_run = run_dag(dag, 0)
    assert "failed" in str(dag_run.state)
    logged = capsys.readouterr()  # Airflow 3's task logger writes to stdout; Airflow 2's is a stdlib logger
    assert "planned without a watermark: give PostgresPartitionPlanOperator watermark_column='v'" in (
        logged.out + logged.err + caplog.text
    )
    assert not list(tmp_path.glob("*/range=*/part-*.parquet"))  # refused before any data moved


def test_an_xmin_task_moved_to_another_cluster_reads_every_row_there_and_goes_on_from_it(
    pg: PgInfo,
    admin: psycopg.Connection,
    events: str,
    tmp_path: Path,
    airflow_db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restore into a new cluster, a move by logical replication: transaction ids start again.

    The state's start was another cluster's transaction id, past every id here: each run read an
    empty window and ended green, every row written on the new server lost. The window records the
    cluster's system identifier; on another one the run reads every row (at least once) and the
    chain goes on from there. A recorded window of the old cluster is not read again here.
    """
    definition = f"CREATE TABLE {events} (id int PRIMARY KEY, v int NOT NULL)"
    admin.execute(definition)
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(1, 30) g")
    while int(admin.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]) < 5000:
        pass  # autocommit: one transaction id each, past anything a new cluster has used
    moving = f"cxpg_moving_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{moving.upper()}", pg.airflow_conn_json())
    runs = Runs(
        make_dag(
            _dag_id("moved"),
            postgres_conn_id=moving,
            table=events,
            watermark_column="xmin",
            destination=str(tmp_path / "{{ run_id }}"),
            chunk_rows=7,
        )
    )
    assert sorted(runs.rows(runs.run())) == list(range(1, 31))
    old_window = state(runs.dag.dag_id).last_window()
    assert old_window is not None
    with EmbeddedPostgres() as server, psycopg.connect(PgInfo.of(server).dsn, autocommit=True) as other:
        other.execute(f"CREATE SCHEMA {events.split('.')[0]}")
        other.execute(definition)
        other.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(1, 30) g")  # the restore
        other.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(31, 40) g")
        other.execute(f"UPDATE {events} SET v = -5 WHERE id = 5")
        monkeypatch.setenv(f"AIRFLOW_CONN_{moving.upper()}", PgInfo.of(server).airflow_conn_json())
        assert sorted(runs.rows(runs.run())) == list(range(1, 41))
        moved = state(runs.dag.dag_id).last_window()
        assert moved is not None and "another cluster" in moved["note"]
        assert None not in (moved["cluster"], old_window["cluster"]) and moved["cluster"] != old_window["cluster"]
        other.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(41, 50) g")
        assert sorted(runs.rows(runs.run())) == list(range(41, 51))
        with pytest.raises(SourceChangedError, match="another PostgreSQL cluster"):
            ConnectorXPostgresHook(postgres_conn_id=moving).extract(
                table=events, destination=str(tmp_path / "again"), watermark=WatermarkSpec.again(old_window)
            )


def test_an_xmin_run_in_a_snapshot_by_a_role_that_may_not_read_the_control_data(
    pg: PgInfo, admin: psycopg.Connection, events: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pg_control_system()`` revoked (a hardened server, a managed one): the call failed inside the
    run's snapshot transaction, and every later planning statement failed with it."""
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(1, 30) g")
    role = f"r_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    admin.execute(f"GRANT USAGE ON SCHEMA {events.split('.')[0]} TO {role}")
    admin.execute(f"GRANT SELECT ON {events} TO {role}")
    admin.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    try:
        conn_id = f"cxpg_plain_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", pg.airflow_conn_json(login=role, password="pw"))
        result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
            table=events,
            destination=str(tmp_path / "out"),
            watermark=WatermarkSpec("xmin"),
            snapshot=True,
            chunk_rows=7,
        )
        assert result.rows == 30 and result.window is not None and result.window["cluster"] is None
    finally:
        admin.execute("GRANT EXECUTE ON FUNCTION pg_control_system() TO PUBLIC")
        admin.execute(f"DROP OWNED BY {role}")
        admin.execute(f"DROP ROLE {role}")


def test_an_xmin_task_whose_primary_went_back_in_transaction_ids_reads_every_row_once(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path
) -> None:
    """A physical restore or a failover that lost transactions keeps the system identifier while
    the transaction ids go back below the last window's end: every window was empty, green, the
    rows written with the ids issued again lost. (Stood in for by a window ending ahead of now.)"""
    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(1, 30) g")
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    first = hook.extract(table=events, destination=str(tmp_path / "first"), watermark=WatermarkSpec("xmin"))
    assert first.rows == 30 and first.window is not None
    ahead = {
        **first.window,
        "end": int(first.window["end"]) + 100_000,
        "high_watermark": int(first.window["end"]) + 100_000,
    }
    admin.execute(f"INSERT INTO {events} SELECT g, g FROM generate_series(31, 35) g")  # ids this cluster issues again
    second = hook.extract(table=events, destination=str(tmp_path / "second"), watermark=WatermarkSpec.following(ahead))
    assert second.rows == 35 and second.window is not None and "went back" in second.window["note"]
    third = hook.extract(
        table=events, destination=str(tmp_path / "third"), watermark=WatermarkSpec.following(second.window)
    )
    assert third.rows == 0  # and on from there
    assert third.window is not None and isinstance(third.window["timeline"], int)
    # A point-in-time restore or a promotion starts a new timeline: once enough ids were issued
    # again, only the timeline shows that transactions of the last window's history were lost.
    branched = {**third.window, "timeline": third.window["timeline"] - 1}  # the server is on a later one
    fourth = hook.extract(
        table=events, destination=str(tmp_path / "fourth"), watermark=WatermarkSpec.following(branched)
    )
    assert fourth.rows == 35 and fourth.window is not None and "timeline" in fourth.window["note"]


def test_a_fan_out_planner_run_again_alone_keeps_its_validated_dataset(
    conn_id: str, admin: psycopg.Connection, events: str, tmp_path: Path, airflow_db: Path
) -> None:
    """Clearing only the planner of a validated DAG run planned the dataset again: every range folder
    was removed while the window stayed committed, and the next run started after it: those rows
    were in no dataset, green. The planner of the same DAG run reuses its complete plan."""
    from airflow_provider_cxpg.version_compat import AIRFLOW_V_3_0_PLUS

    admin.execute(f"CREATE TABLE {events} (id int PRIMARY KEY, updated_at timestamptz NOT NULL, note text)")
    admin.execute(
        f"INSERT INTO {events} SELECT g, '2024-01-01'::timestamptz + g * interval '1 s', 'a' FROM generate_series(1, 200) g"
    )
    admin.execute(f"ANALYZE {events}")
    dag = fan_out_dag(_dag_id("planner_again"), conn_id, events, tmp_path, partitions=3)
    when = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)

    def run(**kwargs: Any) -> Any:
        if AIRFLOW_V_3_0_PLUS:
            return dag.test(logical_date=when, run_after=when, **kwargs)
        return dag.test(execution_date=when, **kwargs)

    first = run()
    assert "success" in str(first.state)
    base = tmp_path / first.run_id
    assert sorted(dataset_ids(base)) == list(range(1, 201))
    again = run(mark_success_pattern="^(extract|damage|validate)$")  # the planner alone runs again
    assert "success" in str(again.state) and again.run_id == first.run_id
    assert sorted(dataset_ids(base)) == list(range(1, 201)) and (base / "_SUCCESS").exists()
    assert json.loads((base / "_dataset_manifest.json").read_text())["status"] == "complete"
