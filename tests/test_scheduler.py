"""The provider under a real Airflow deployment: scheduler, DAG processor and API server.

LocalExecutor, the metadata database on the suite's PostgreSQL, DAGs triggered through the REST
API without a logical date (as from the UI): an example DAG runs to success with its output and
its task log in place; a task set to failed through the REST API while its query waits on a lock
ends, and neither its worker nor its backend remains.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from tests.helpers import PgInfo, cxpg_backends, wait_until, worker_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LOCK_KEY = 737373
LOCK_DAG = """
from __future__ import annotations

import datetime as dt
import os

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

with DAG(dag_id="cxpg_waits_on_a_lock", schedule=None, start_date=dt.datetime(2024, 1, 1), catchup=False) as dag:
    PostgresExtractOperator(
        task_id="extract",
        postgres_conn_id="orders_db",
        table="public.orders",
        where="(SELECT pg_advisory_lock_shared({key})) IS NOT NULL",
        destination=os.environ["CXPG_EXAMPLE_OUTPUT"] + "/locked/{{{{ run_id }}}}",
        query_timeout=600,
    )
"""


@dataclass
class Deployment:
    port: int
    home: Path
    output: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/v2{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if text.startswith(("{", "[")) else text

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def trigger(self, dag_id: str) -> str:
        assert wait_until(lambda: self._dag_exists(dag_id), 120, 1), self.log("dag-processor")
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None})  # as from the UI
        return str(run["dag_run_id"])

    def _dag_exists(self, dag_id: str) -> bool:
        try:
            self.api("GET", f"/dags/{dag_id}")
            return True
        except urllib.error.HTTPError:
            return False

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id)}")["state"])

    def task_state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}").get("state")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def deployment(pg: PgInfo) -> Iterator[Deployment]:
    from airflow import __version__ as airflow_version

    if int(airflow_version.split(".", 1)[0]) < 3:
        pytest.skip("runs Airflow 3's components (api-server, dag-processor, task supervisor)")
    database = f"cxpg_meta_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    home = Path(tempfile.mkdtemp(prefix="cxpg-deploy-"))
    dags, output = home / "dags", home / "output"
    dags.mkdir()
    output.mkdir()
    shutil.copy(ROOT / "dags" / "example_full_table_extract.py", dags)
    (dags / "cxpg_waits_on_a_lock.py").write_text(textwrap.dedent(LOCK_DAG.format(key=LOCK_KEY)))
    port = _free_port()
    password = quote(pg.password, safe="")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg.user}:{password}@{pg.host}:{pg.port}/{database}",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_ORDERS_DB": pg.airflow_conn_json(),
        "CXPG_EXAMPLE_OUTPUT": str(output),
    }
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    deploy = Deployment(port, home, output, env)
    try:
        for name in ("api-server", "scheduler", "dag-processor"):
            with (home / f"{name}.log").open("wb") as log:
                deploy.processes[name] = subprocess.Popen(
                    [*airflow, name], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        assert wait_until(lambda: _answers(deploy), 120, 1), deploy.log("api-server")
        yield deploy
    finally:
        for process in deploy.processes.values():
            with _quiet():
                os.killpg(process.pid, signal.SIGTERM)
        for process in deploy.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with _quiet():
                    os.killpg(process.pid, signal.SIGKILL)
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(home, ignore_errors=True)


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _answers(deploy: Deployment) -> bool:
    try:
        deploy.api("GET", "/version")
        return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@pytest.fixture
def orders(admin: psycopg.Connection) -> Iterator[None]:
    from airflow_provider_cxpg.demo import create_orders

    create_orders(admin, 20_000)
    try:
        yield
    finally:
        admin.execute("DROP TABLE IF EXISTS public.orders")


def test_an_example_dag_triggered_through_the_rest_api_runs_to_success(
    deployment: Deployment, orders: None, admin: psycopg.Connection
) -> None:
    run_id = deployment.trigger("example_full_table_extract")
    assert wait_until(
        lambda: deployment.run_state("example_full_table_extract", run_id) in {"success", "failed"}, 300, 1
    ), deployment.log("scheduler")
    assert deployment.run_state("example_full_table_extract", run_id) == "success", deployment.log("scheduler")
    written = deployment.output / "orders" / run_id.replace(":", "")  # the example's template drops ':'
    manifest = json.loads((written / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == 20_000
    assert (written / "_SUCCESS").exists()
    log = deployment.api(
        "GET",
        f"/dags/example_full_table_extract/dagRuns/{quote(run_id)}/taskInstances/extract_orders/logs/1?full_content=true",
    )
    text = json.dumps(log)
    assert "job.done" in text and "chunk.commit" in text, text[-2000:]
    assert wait_until(lambda: not worker_pids(0), 30, 0.5)


def test_a_task_set_to_failed_through_the_rest_api_leaves_no_worker_and_no_backend(
    deployment: Deployment, orders: None, pg: PgInfo, admin: psycopg.Connection
) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            run_id = deployment.trigger("cxpg_waits_on_a_lock")
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%%cxpg-%%' AND wait_event_type = 'Lock'"
            assert wait_until(lambda: admin.execute(waiting).fetchone()[0] > 0, 300, 1), deployment.log("scheduler")
            assert worker_pids(0)
            deployment.api(
                "PATCH",
                f"/dags/cxpg_waits_on_a_lock/dagRuns/{quote(run_id)}/taskInstances/extract",
                {"new_state": "failed"},
            )
            marked = time.monotonic()
            assert wait_until(lambda: not worker_pids(0), 60, 0.5), worker_pids(0)
            assert wait_until(lambda: not cxpg_backends(admin), 30, 0.5), cxpg_backends(admin)
            assert time.monotonic() - marked < 60
            assert deployment.task_state("cxpg_waits_on_a_lock", run_id, "extract") == "failed"
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
