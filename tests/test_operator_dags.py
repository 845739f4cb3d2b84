"""The operator inside Airflow: registration, the example DAGs end to end, incremental runs."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_provider_cxpg.demo import create_orders
from airflow_provider_cxpg.exceptions import InvalidInputError
from airflow_provider_cxpg.operators.extract import SUMMARY_KEYS, PostgresExtractOperator
from airflow_provider_cxpg.version_compat import AIRFLOW_V_3_0_PLUS
from tests.helpers import PgInfo, assert_nothing_left, manifest_of, read_output, register_dag

DAGS = Path(__file__).resolve().parent.parent / "dags"
ORDERS = 30_000


def load_dag(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}_{time.monotonic_ns()}", DAGS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return register_dag(module.dag)


def xcom_return(dag_run: Any, task_id: str) -> Any:
    if not AIRFLOW_V_3_0_PLUS:
        from airflow.models.xcom import XCom

        return XCom.get_one(run_id=dag_run.run_id, dag_id=dag_run.dag_id, task_id=task_id, key="return_value")
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=task_id, key="return_value")
        ).first()
        assert row is not None, f"no XCom from {task_id}"
        return XComModel.deserialize_value(row)


def run_dag(dag: Any, hours_later: int = 0) -> Any:
    """``dag.test()`` at now + ``hours_later``.

    On Airflow 3 the run has *no logical date*, as a run triggered from the UI, the CLI or the REST
    API has none (``{{ ds }}`` and ``{{ ts_nodash }}`` are then undefined); Airflow 2 gives every run
    one (``execution_date``).
    """
    when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours_later)
    if AIRFLOW_V_3_0_PLUS:
        return dag.test(logical_date=None, run_after=when)
    return dag.test(execution_date=when)


@pytest.fixture
def orders_db(
    pg: PgInfo, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, airflow_db: Path
) -> Iterator[Path]:
    """``public.orders`` on the test server, connection ``orders_db``, outputs under tmp_path."""
    create_orders(admin, ORDERS)
    monkeypatch.setenv("AIRFLOW_CONN_ORDERS_DB", pg.airflow_conn_json())
    monkeypatch.setenv("CXPG_EXAMPLE_OUTPUT", str(tmp_path))
    try:
        yield tmp_path
    finally:
        admin.execute("DROP TABLE IF EXISTS public.orders")


def orders_by_id(admin: psycopg.Connection, where: str = "true") -> dict[int, tuple[Any, ...]]:
    rows = admin.execute(f"SELECT id, status, amount, updated_at FROM public.orders WHERE {where}").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def output_by_id(directory: Path) -> dict[int, tuple[Any, ...]]:
    return {r["id"]: (r["status"], r["amount"], r["updated_at"]) for r in read_output(directory).to_pylist()}


# -- registration and loading ------------------------------------------------------------------------


def test_providers_manager_lists_the_package() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-cxpg" in manager.providers
    info = manager.providers["airflow-provider-cxpg"]
    assert "airflow_provider_cxpg.operators.extract" in info.data["operators"][0]["python-modules"]
    assert info.data["hooks"][0]["python-modules"] == ["airflow_provider_cxpg.hooks.connectorx"]


def test_dagbag_loads_every_example_without_errors(airflow_db: Path) -> None:
    import inspect

    if AIRFLOW_V_3_0_PLUS:
        from airflow.dag_processing.dagbag import DagBag
    else:
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]

    kwargs = {"include_examples": False} if "include_examples" in inspect.signature(DagBag).parameters else {}
    bag = DagBag(dag_folder=str(DAGS), **kwargs)
    assert not bag.import_errors, bag.import_errors
    assert {
        "example_full_table_extract",
        "example_incremental_updated_at",
        "example_xmin_replica",
        "example_taskflow_iter_chunks",
        "example_delta_merge",
        "example_iceberg_snapshot",
    } <= set(bag.dag_ids)


def test_operator_conventions() -> None:
    import inspect

    params = inspect.signature(PostgresExtractOperator.__init__).parameters
    keyword_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    contract = {
        "postgres_conn_id",
        "table",
        "sql",
        "columns",
        "where",
        "key_columns",
        "chunk_rows",
        "destination",
        "file_format",
        "query_timeout",
        "heartbeat_interval",
        "heartbeat_timeout",
        "max_worker_restarts",
        "watermark_column",
        "watermark_start",
        "watermark_end",
        "table_format",
        "write_mode",
    }
    assert contract <= keyword_only
    assert {"sql", "where", "destination", "watermark_start", "watermark_end"} <= set(
        PostgresExtractOperator.template_fields
    )
    assert ".sql" in PostgresExtractOperator.template_ext
    assert SUMMARY_KEYS == (
        "rows",
        "chunks",
        "files",
        "destination",
        "first_key",
        "last_key",
        "high_watermark",
        "seconds",
        "run_id",
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": "abc"}, "chunk_rows"),
        ({"file_format": "csv"}, "file_format"),
        ({"table": None}, "exactly one"),
        ({"sql": "select 1"}, "exactly one"),
        ({"query_timeout": -1}, "query_timeout"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"max_worker_restarts": -1}, "max_worker_restarts"),
        ({"watermark_start": "2024-01-01"}, "watermark_column"),
        ({"destination": ""}, "destination"),
    ],
)
def test_operator_validates_arguments_in_execute(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"task_id": "t", "table": "public.orders", "destination": "/tmp/x"}
    arguments.update(kwargs)
    op = PostgresExtractOperator(**arguments)  # construction never fails: templated values come later
    with pytest.raises(InvalidInputError, match=message):
        op.execute({})


# -- the example DAGs, end to end ------------------------------------------------------------------------


def test_full_table_example_dag(orders_db: Path, admin: psycopg.Connection) -> None:
    dag_run = run_dag(load_dag("example_full_table_extract"))
    assert "success" in str(dag_run.state)
    summary = xcom_return(dag_run, "extract_orders")
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["rows"] == ORDERS and summary["chunks"] == 1 and summary["first_key"] == [1]
    destination = Path(summary["destination"])
    assert destination.parent == orders_db / "orders"
    assert output_by_id(destination) == orders_by_id(admin)
    assert_nothing_left(admin)


def test_delta_merge_example_dag_keeps_the_table_equal_to_the_source(
    orders_db: Path, admin: psycopg.Connection
) -> None:
    deltalake = pytest.importorskip("deltalake")
    dag = load_dag("example_delta_merge")
    table = orders_db / "lake" / "orders"

    def table_by_id() -> dict[int, tuple[Any, ...]]:
        rows = deltalake.DeltaTable(str(table)).to_pyarrow_table(columns=["id", "status", "amount", "updated_at"])
        return {r["id"]: (r["status"], r["amount"], r["updated_at"]) for r in rows.to_pylist()}

    first = xcom_return(run_dag(dag), "orders_table")
    assert (first["rows"], first["table_version"], first["write_mode"]) == (ORDERS, 0, "merge")
    assert table_by_id() == orders_by_id(admin)
    admin.execute(
        "UPDATE public.orders SET status = 'refunded', updated_at = now() + interval '1 day' WHERE id % 300 = 0"
    )
    admin.execute(
        "INSERT INTO public.orders SELECT id + 1000000, customer_id, 'new', amount, is_priority, ref, note, "
        "now(), now() + interval '1 day' FROM public.orders WHERE id <= 40"
    )
    second = xcom_return(run_dag(dag, 1), "orders_table")
    assert (second["rows"], second["table_version"]) == (100 + 40, 1)
    assert table_by_id() == orders_by_id(admin)  # row for row, after each run
    assert deltalake.DeltaTable(str(table)).history(1)[0]["operation"] == "MERGE"


def test_iceberg_snapshot_example_dag_commits_once_per_night(orders_db: Path, admin: psycopg.Connection) -> None:
    pytest.importorskip("pyiceberg")
    sqlalchemy = pytest.importorskip("sqlalchemy")
    if int(sqlalchemy.__version__.split(".")[0]) < 2:
        pytest.skip("pyiceberg's SQL catalog needs SQLAlchemy 2 (Airflow 3 has it)")
    from pyiceberg.catalog import load_catalog

    dag = load_dag("example_iceberg_snapshot")
    properties = dag.get_task("orders_snapshot").iceberg_catalog_properties

    def table_by_id() -> dict[int, tuple[Any, ...]]:
        table = load_catalog("examples", **properties).load_table("lake.orders")
        rows = table.scan(selected_fields=("id", "status", "amount", "updated_at")).to_arrow().to_pylist()
        return {r["id"]: (r["status"], r["amount"], r["updated_at"]) for r in rows}

    first = xcom_return(run_dag(dag), "orders_snapshot")
    assert (first["rows"], first["table_format"], first["write_mode"]) == (ORDERS, "iceberg", "overwrite")
    assert table_by_id() == orders_by_id(admin)
    admin.execute("DELETE FROM public.orders WHERE id % 2 = 0")
    second = xcom_return(run_dag(dag, 24), "orders_snapshot")
    assert second["rows"] == ORDERS // 2 and second["table_version"] != first["table_version"]
    assert table_by_id() == orders_by_id(admin)  # the night's table, not a mix


def test_incremental_updated_at_example_dag(orders_db: Path, admin: psycopg.Connection) -> None:
    dag = load_dag("example_incremental_updated_at")
    first = run_dag(dag)
    s1 = xcom_return(first, "changed_orders")
    assert s1["rows"] == ORDERS
    assert s1["high_watermark"] == admin.execute("SELECT max(updated_at)::text FROM public.orders").fetchone()[0]

    admin.execute(
        "UPDATE public.orders SET status = 'refunded', updated_at = now() + interval '1 day' WHERE id % 300 = 0"
    )
    admin.execute(
        "INSERT INTO public.orders SELECT id + 1000000, customer_id, 'new', amount, is_priority, ref, note, "
        "now(), now() + interval '1 day' FROM public.orders WHERE id <= 40"
    )
    second = run_dag(dag, 1)
    s2 = xcom_return(second, "changed_orders")
    expected = orders_by_id(admin, f"updated_at > '{s1['high_watermark']}'")
    assert len(expected) == 100 + 40
    assert output_by_id(Path(s2["destination"])) == expected
    assert s2["window"]["start"] == s1["high_watermark"]

    third = run_dag(dag, 2)
    assert xcom_return(third, "changed_orders")["rows"] == 0  # nothing changed since


def _wait_for_replay(primary: psycopg.Connection, replica_dsn: str, timeout: float = 30) -> None:
    # the insert position: with synchronous_commit=off a commit may not be written (pg_current_wal_lsn) yet
    target = primary.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout
    with psycopg.connect(replica_dsn, autocommit=True) as replica:
        while time.monotonic() < deadline:
            if replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the replica did not catch up")


def test_xmin_example_dag_on_a_hot_standby_replica(
    orders_db: Path, pg: PgInfo, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pg.server is None:
        pytest.skip("needs the embedded server to clone a replica from")
    replica = pg.server.create_replica()
    try:
        monkeypatch.setenv(
            "AIRFLOW_CONN_ORDERS_REPLICA",
            json.dumps(
                {
                    "conn_type": "postgres",
                    "host": replica.host,
                    "port": replica.port,
                    "login": pg.user,
                    "password": pg.password,
                    "schema": pg.dbname,
                }
            ),
        )
        _wait_for_replay(admin, replica.dsn())
        with psycopg.connect(replica.dsn(), autocommit=True) as standby:
            assert standby.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True

        dag = load_dag("example_xmin_replica")
        s1 = xcom_return(run_dag(dag), "orders_since_last_run")
        assert s1["rows"] == ORDERS and isinstance(s1["high_watermark"], int)

        admin.execute("UPDATE public.orders SET status = 'audited' WHERE id % 1000 = 0")  # 30 rows
        admin.execute(
            "INSERT INTO public.orders SELECT id + 2000000, customer_id, 'new', amount, is_priority, ref, note, "
            "created_at, updated_at FROM public.orders WHERE id <= 20"
        )
        _wait_for_replay(admin, replica.dsn())
        second = run_dag(dag, 1)
        s2 = xcom_return(second, "orders_since_last_run")
        changed = orders_by_id(admin, "id % 1000 = 0 OR id > 2000000")
        assert len(changed) == 50
        assert output_by_id(Path(s2["destination"])) == changed
        assert s2["window"]["start"] == s1["high_watermark"] and s2["high_watermark"] >= s1["high_watermark"]
    finally:
        replica.stop()


def test_taskflow_iter_chunks_example_dag(orders_db: Path, admin: psycopg.Connection) -> None:
    dag_run = run_dag(load_dag("example_taskflow_iter_chunks"))
    result = xcom_return(dag_run, "summarise_orders")
    expected = {s: float(a) for s, a in admin.execute("SELECT status, sum(amount) FROM public.orders GROUP BY 1")}
    assert result == pytest.approx(expected)
    assert_nothing_left(admin)


# -- xmin windows across transaction-id wraparound -------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (100, 200),  # plain
        ((1 << 32) - 50, (1 << 32) + 50),  # the 32-bit counter wraps inside the window
        ((5 << 32) + 10, (5 << 32) + 3000),  # a later epoch
    ],
)
def test_xmin_window_filter_is_exact_across_wraparound(admin: psycopg.Connection, start: int, end: int) -> None:
    """Evaluate the generated condition on synthetic 32-bit xids against the 64-bit truth."""
    from airflow_provider_cxpg.planning.incremental import WatermarkSpec, _xmin_window
    from airflow_provider_cxpg.planning.plan import ExtractPlan, SourceSpec

    class _Table:
        kind = "table"
        descendants: tuple[int, ...] = ()

    plan = ExtractPlan(
        source=SourceSpec(table="t"),
        from_clause="t",
        columns=(),
        select_exprs=(),
        key=(),
        key_unique=True,
        table=_Table(),
    )  # type: ignore[arg-type]
    # One-off windows (an explicit start): their end is used as given, not lowered to this server's xids.
    window = _xmin_window(admin, plan, WatermarkSpec("xmin", start, end, one_off=True))
    condition = window.filters[0].replace('"_cxpg_src".xmin::text::bigint', "x").replace("%", "%%")
    candidates = sorted(
        {start - 5, start, start + 1, (start + end) // 2, end, end + 1, end + 70}
        | {v for v in range(start - 3, start + 4)}
        | {v for v in range(end - 3, end + 4)}
    )
    # 32-bit xids 0, 1, 2 are special and never assigned to a transaction, even after wraparound
    truth = {c % (1 << 32) for c in candidates if start < c <= end and c % (1 << 32) >= 3}
    xids = sorted({c % (1 << 32) for c in candidates})
    got = {r[0] for r in admin.execute(f"SELECT x FROM unnest(%s::bigint[]) AS x WHERE {condition}", (xids,))}
    assert got == truth


def test_xmin_window_wider_than_half_the_xid_space_reads_everything(admin: psycopg.Connection) -> None:
    from airflow_provider_cxpg.planning.incremental import WatermarkSpec, _xmin_window
    from airflow_provider_cxpg.planning.plan import ExtractPlan, SourceSpec

    class _Table:
        kind = "table"
        descendants: tuple[int, ...] = ()

    plan = ExtractPlan(
        source=SourceSpec(table="t"),
        from_clause="t",
        columns=(),
        select_exprs=(),
        key=(),
        key_unique=True,
        table=_Table(),
    )  # type: ignore[arg-type]
    window = _xmin_window(admin, plan, WatermarkSpec("xmin", 10, 10 + (1 << 31), one_off=True))
    assert not any("xmin" in f for f in window.filters) and "too wide" in (window.note or "")


def test_amounts_stay_exact_decimals(orders_db: Path, admin: psycopg.Connection) -> None:
    dag_run = run_dag(load_dag("example_full_table_extract"))
    out = read_output(xcom_return(dag_run, "extract_orders")["destination"])
    assert str(out.schema.field("amount").type) == "decimal128(12, 2)"
    assert all(isinstance(v, Decimal) for v in out.column("amount").to_pylist()[:10])
    assert manifest_of(xcom_return(dag_run, "extract_orders")["destination"])["status"] == "complete"


def test_openlineage_facets_name_the_table_and_the_files(
    conn_id: str, pg: PgInfo, admin: psycopg.Connection, schema: str, tmp_path: Path
) -> None:
    pytest.importorskip("airflow.providers.openlineage")
    admin.execute(f'CREATE TABLE "{schema}".small AS SELECT g AS id FROM generate_series(1, 10) g')
    admin.execute(f'ALTER TABLE "{schema}".small ADD PRIMARY KEY (id)')
    op = PostgresExtractOperator(
        task_id="t", postgres_conn_id=conn_id, table=f"{schema}.small", destination=str(tmp_path / "out")
    )
    op.execute({})
    lineage = op.get_openlineage_facets_on_complete(None)
    (source,) = lineage.inputs
    assert source.namespace == f"postgres://{pg.host}:{pg.port}" and source.name == f"{pg.dbname}.{schema}.small"
    (target,) = lineage.outputs
    assert target.namespace == "file" and target.name == str(tmp_path / "out")


def test_one_stable_asset_per_target_with_the_runs_prefix_in_the_event(
    conn_id: str, admin: psycopg.Connection, schema: str, tmp_path: Path
) -> None:
    """A templated destination is one asset (its static part), on Airflow 2.11 and 3 alike."""
    from airflow.providers.common.compat.sdk import Asset

    admin.execute(f'CREATE TABLE "{schema}".small AS SELECT g AS id FROM generate_series(1, 10) g')
    admin.execute(f'ALTER TABLE "{schema}".small ADD PRIMARY KEY (id)')
    op = PostgresExtractOperator(
        task_id="t",
        postgres_conn_id=conn_id,
        table=f"{schema}.small",
        destination=str(tmp_path / "out") + "/{{ run_id }}",
    )
    (asset,) = op.outlets
    assert isinstance(asset, Asset) and asset.uri == "file://" + str(tmp_path / "out")  # known at parse time
    op.destination = str(tmp_path / "out" / "manual__1")  # what rendering gives

    class _Accessor:
        def __init__(self) -> None:
            self.extra: dict[str, Any] = {}

    accessor = _Accessor()
    op.execute({"outlet_events": {asset: accessor}})
    assert accessor.extra["prefix"] == "file://" + str(tmp_path / "out" / "manual__1") and accessor.extra["rows"] == 10
    same_folder = [
        PostgresExtractOperator(task_id=name, table=name, destination=f"s3://lake/raw/{name}_{{{{ run_id }}}}")
        for name in ("orders", "items")
    ]
    assert [o.outlets[0].uri for o in same_folder] == ["s3://lake/raw/orders_", "s3://lake/raw/items_"]  # two targets
    hive = PostgresExtractOperator(task_id="h", table="t", destination="s3://lake/raw/orders/dt={{ ds }}/")
    assert hive.outlets[0].uri == "s3://lake/raw/orders"  # a key=value folder belongs to its target
    for unknown in ("s3://{{ var.value.bucket }}/x", "s3://bucket{{ var.value.suffix }}/x"):
        assert not PostgresExtractOperator(task_id="b", table="t", destination=unknown).outlets
    ranged = PostgresExtractOperator(task_id="r", table="t", destination="/x/range=0001", emit_asset=False)
    assert not ranged.outlets  # a fan-out range: the validator emits the dataset's asset
