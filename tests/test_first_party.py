"""What users of first-party providers take for granted: durations, bounds, the demo from a wheel,
progress, a small XCom, the _SUCCESS marker."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_provider_cxpg.exceptions import InvalidInputError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
from airflow_provider_cxpg.run.extraction import SUMMARY_FILES_MAX
from airflow_provider_cxpg.supervisor.settings import WorkerSettings
from tests.helpers import PgInfo, manifest_of, read_output, wait_until

ROOT = Path(__file__).resolve().parent.parent
FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 5.0, "cancel_grace": 2.0, "kill_grace": 2.0}


@pytest.fixture
def table(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(f'CREATE TABLE "{schema}".t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 240) g')
    admin.execute(f'ALTER TABLE "{schema}".t ADD PRIMARY KEY (id)')
    admin.execute(f'ANALYZE "{schema}".t')
    return f"{schema}.t"


# -- durations the Airflow way ------------------------------------------------------------------------------


def test_every_duration_takes_a_timedelta_seconds_or_a_templated_number(
    conn_id: str, table: str, tmp_path: Path
) -> None:
    settings = WorkerSettings(
        query_timeout=dt.timedelta(minutes=10),
        heartbeat_interval=dt.timedelta(milliseconds=200),
        heartbeat_timeout="5",
        storage_timeout=dt.timedelta(seconds=30),
        cancel_grace=0,
    )
    assert (settings.query_timeout, settings.heartbeat_interval, settings.heartbeat_timeout) == (600.0, 0.2, 5.0)
    assert settings.storage_timeout == 30.0 and settings.cancel_grace == 0.0
    for bad in (dt.timedelta(seconds=-1), "soon", float("nan"), True):
        with pytest.raises(InvalidInputError, match="query_timeout"):
            WorkerSettings(query_timeout=bad)
    op = PostgresExtractOperator(
        task_id="t",
        postgres_conn_id=conn_id,
        table=table,
        destination=str(tmp_path / "out"),
        query_timeout=dt.timedelta(minutes=10),
        job_timeout=dt.timedelta(hours=1),
        storage_timeout="120",  # as a template renders it
        heartbeat_timeout=dt.timedelta(seconds=5),
        heartbeat_interval=0.2,
        worker_settings={"kill_grace": dt.timedelta(seconds=2)},
    )
    assert op.execute({})["rows"] == 240


# -- bounds that are true -----------------------------------------------------------------------------------


def test_the_floor_constraints_pin_exactly_the_declared_lower_bounds() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for requirement in declared:
        name, version = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^]]*\])?>=([0-9.]+)", requirement).groups()  # type: ignore[union-attr]
        bounds[name.lower()] = version
    pins = {}
    for line in (ROOT / "constraints" / "floor.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    assert {k: v for k, v in pins.items() if k in bounds} == bounds
    assert set(bounds) <= set(pins)


def test_the_package_list_names_every_package_in_the_tree() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "airflow_provider_cxpg").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found | {"airflow_provider_cxpg.example_dags"} == listed


def test_a_missing_log_masker_is_an_error_not_a_silent_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below common-compat 1.22 there is no mask_secret: passwords would reach the logs unmasked."""
    import types

    from airflow_provider_cxpg.hooks import connectorx

    monkeypatch.setitem(sys.modules, "airflow.providers.common.compat.sdk", types.ModuleType("too_old_compat"))
    with pytest.raises(ImportError):
        connectorx._mask("a-secret-value")


# -- the demo from an installed package ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_demo_runs_from_the_built_wheel_in_any_directory(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("airflow_provider_cxpg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "airflow_provider_cxpg/example_dags/example_full_table_extract.py" in names
    assert "airflow_provider_cxpg/py.typed" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import airflow_provider_cxpg as p; print(p.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(target)), where  # the wheel's copy, not the source tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "airflow_provider_cxpg.demo", "--rows", "3000", "--output", str(tmp_path / "demo")],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rows      3,000" in done.stdout and "[progress]" in done.stdout


# -- progress, a small XCom, _SUCCESS ---------------------------------------------------------------------


def test_progress_events_give_rows_estimate_percent_rate_and_eta(conn_id: str, table: str, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(tmp_path / "out"),
        table=table,
        chunk_rows=40,
        query_log_path=str(log),
        where="(SELECT pg_sleep(0.3)) IS NOT NULL",
        **FAST,
    )
    progress = [json.loads(line) for line in log.read_text().splitlines() if '"job.progress"' in line]
    assert len(progress) >= 2 and progress[-1]["final"] is True and progress[-1]["rows"] == 240
    first = progress[0]
    assert first["estimated_rows"] == 240 and 0 < first["percent"] < 100
    assert first["rows_per_s"] > 0 and first["eta_seconds"] > 0


def test_the_xcom_summary_stops_naming_files_past_the_threshold(conn_id: str, table: str, tmp_path: Path) -> None:
    op = PostgresExtractOperator(
        task_id="t",
        postgres_conn_id=conn_id,
        table=table,
        destination=str(tmp_path / "many"),
        chunk_rows=2,
        worker_settings=FAST,
    )
    summary = op.execute({})
    assert summary["file_count"] == 120 > SUMMARY_FILES_MAX and summary["files"] is None
    assert summary["manifest"].endswith("_manifest.json") and len(manifest_of(tmp_path / "many")["files"]) == 120
    assert len(json.dumps(summary)) < 4000
    few = PostgresExtractOperator(
        task_id="f",
        postgres_conn_id=conn_id,
        table=table,
        destination=str(tmp_path / "few"),
        chunk_rows=100,
        worker_settings=FAST,
    ).execute({})
    assert few["file_count"] == 3 and len(few["files"]) == 3


def test_success_marker_appears_only_over_a_complete_output(
    conn_id: str, pg: PgInfo, table: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    hook.extract(destination=str(out), table=table, chunk_rows=100, **FAST)
    assert (out / "_SUCCESS").exists()
    seen: dict[str, Any] = {}

    def watch() -> None:  # during the next run of the same extraction, the marker is gone
        seen["gone"] = wait_until(lambda: not (out / "_SUCCESS").exists(), 20, 0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    hook.extract(destination=str(out), table=table, chunk_rows=60, where="(SELECT pg_sleep(0.3)) IS NOT NULL", **FAST)
    watcher.join()
    assert seen["gone"] and (out / "_SUCCESS").exists()
    assert read_output(out).num_rows == 240
