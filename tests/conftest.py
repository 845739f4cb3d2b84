"""Test harness: a real PostgreSQL, a private Airflow home, and helpers to inspect what is left behind.

PostgreSQL: the DSN in ``CXPG_TEST_POSTGRES_DSN`` when set (it must allow creating roles and
databases), otherwise an embedded server started here on 127.0.0.1 with a free port and stopped at
the end of the session.

Airflow: ``AIRFLOW_HOME`` is a temporary directory with SQLite metadata, set before Airflow is
imported, so nothing on the developer's machine is used or changed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# -- Airflow home: must be set before anything imports airflow ---------------------------------------
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="cxpg-airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parent.parent / "dags")
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "INFO"
os.environ.pop("AIRFLOW_CONN_POSTGRES_DEFAULT", None)

import uuid  # noqa: E402
from urllib.parse import unquote, urlparse  # noqa: E402

import psycopg  # noqa: E402
import pytest  # noqa: E402

from airflow_provider_cxpg.demo.embedded_postgres import EmbeddedPostgres, interrupt_on_termination  # noqa: E402
from tests.helpers import PgInfo, system_bindir  # noqa: E402


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def pg() -> Iterator[PgInfo]:
    """The test server: superuser DSN, host, port, and (when embedded) the server object."""
    dsn = os.environ.get("CXPG_TEST_POSTGRES_DSN")
    if dsn:
        parsed = urlparse(dsn)
        yield PgInfo(
            dsn=dsn,
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 5432,
            user=unquote(parsed.username or "postgres"),
            password=unquote(parsed.password or ""),
            dbname=(parsed.path or "/postgres").lstrip("/") or "postgres",
            server=None,
        )
        return
    # A CI runner that kills pytest with SIGTERM gets a KeyboardInterrupt instead: pytest then runs
    # this fixture's teardown, and no server is left running.
    interrupt_on_termination()
    server = EmbeddedPostgres().start()
    try:
        yield PgInfo.of(server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def system_pg() -> Iterator[PgInfo]:
    """A second server from the system's PostgreSQL packages, for what the pgserver wheel lacks.

    The wheel's server is built without ICU, OpenSSL and contrib: nondeterministic collations,
    TLS and ``citext`` need a distribution's build (Debian's ``postgresql`` package; ``.ci/run``
    installs it). Without one, the tests that need it skip, unless ``CXPG_REQUIRE_SYSTEM_PG=1`` (CI)
    makes that an error.
    """
    bindir = system_bindir()
    if bindir is None:
        message = "no system PostgreSQL server (with ICU, OpenSSL, contrib) found: pg_config --bindir"
        if os.environ.get("CXPG_REQUIRE_SYSTEM_PG") == "1":
            pytest.fail(message)
        pytest.skip(message)
    server = EmbeddedPostgres(bindir=bindir).start()
    try:
        yield PgInfo.of(server)
    finally:
        server.stop()


@pytest.fixture
def system_admin(system_pg: PgInfo) -> Iterator[psycopg.Connection]:
    with psycopg.connect(system_pg.dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def system_conn_id(system_pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> str:
    cid = f"cxpg_sys_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{cid.upper()}", system_pg.airflow_conn_json())
    return cid


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Create the Airflow metadata database once (needed by dag.test())."""
    from airflow.utils import db

    db.initdb() if hasattr(db, "initdb") else db.resetdb()
    return _AIRFLOW_HOME


@pytest.fixture
def admin(pg: PgInfo) -> Iterator[psycopg.Connection]:
    """An autocommit superuser connection to the test database."""
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def schema(pg: PgInfo, admin: psycopg.Connection) -> Iterator[str]:
    """A fresh schema per test (dropped afterwards), so tests never see each other's tables."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(pg.dsn, autocommit=True) as fresh:  # `admin` may have died in a restart test
            fresh.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture
def conn_id(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection (env var) to the test server as the superuser."""
    cid = f"cxpg_test_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{cid.upper()}", pg.airflow_conn_json())
    return cid


@pytest.fixture
def out_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cxpg-out-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
