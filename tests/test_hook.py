"""The hook against a real server: URI building, a real read, redaction, bad connections."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psycopg
import pytest

from airflow_provider_cxpg.conninfo import Redactor
from airflow_provider_cxpg.exceptions import ConnectionConfigError, ServerConnectionError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from tests.helpers import PgInfo, assert_nothing_left


def _set_conn(monkeypatch: pytest.MonkeyPatch, pg: PgInfo, **kwargs: object) -> str:
    cid = f"cxpg_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{cid.upper()}", pg.airflow_conn_json(**kwargs))  # type: ignore[arg-type]
    return cid


@pytest.fixture
def nasty_role(admin: psycopg.Connection) -> tuple[str, str]:
    """A login role whose password needs every kind of escaping."""
    name = f"r_{uuid.uuid4().hex[:8]}"
    password = "p@ss:w/rd%#?& x+'\"\\ü"
    admin.execute(
        psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            psycopg.sql.Identifier(name), psycopg.sql.Literal(password)
        )
    )
    try:
        yield name, password
    finally:
        admin.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


# -- URI building (pure) --------------------------------------------------------------------------


# -- the hook against Airflow connections -----------------------------------------------------------


def test_hook_builds_endpoint_from_allowlisted_extras(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {
        "sslmode": "disable",
        "sslrootcert": "/etc/ssl/root.crt",
        "sslcert": "/etc/ssl/client.crt",
        "sslkey": "/etc/ssl/client.key",
        "application_name": "nightly",
        "options": "-c search_path=public",
        "cursor": "dictcursor",  # Airflow's business, not the server's
        "iam": False,
        "evil": "drop table",
    }
    cid = _set_conn(monkeypatch, pg, extra=extra)
    hook = ConnectorXPostgresHook(postgres_conn_id=cid)
    ep = hook.get_endpoint()
    assert ep.params["sslmode"] == "disable" and ep.params["sslrootcert"] == "/etc/ssl/root.crt"
    assert ep.params["sslcert"] == "/etc/ssl/client.crt" and ep.params["sslkey"] == "/etc/ssl/client.key"
    assert ep.params["application_name"] == "nightly"
    assert "cursor" not in ep.params and "evil" not in ep.params and "iam" not in ep.params
    assert "sslmode=disable" in hook.connectorx_uri


def test_no_io_in_init(monkeypatch: pytest.MonkeyPatch) -> None:
    # a connection id that does not exist: constructing the hook must not look it up
    ConnectorXPostgresHook(postgres_conn_id="does_not_exist_anywhere")


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
def test_real_select_through_connectorx(
    pg: PgInfo, monkeypatch: pytest.MonkeyPatch, admin: psycopg.Connection, sslmode: str
) -> None:
    cid = _set_conn(monkeypatch, pg, extra={"sslmode": sslmode, "application_name": "hooktest"})
    table = ConnectorXPostgresHook(postgres_conn_id=cid).read_arrow(
        "SELECT 42::int AS answer, 'x'::text AS s, current_setting('application_name') AS app"
    )
    assert table.to_pylist()[0]["answer"] == 42
    assert table.to_pylist()[0]["app"].startswith("hooktest-cxpg-")
    assert_nothing_left(admin)


def test_special_character_password_authenticates(
    pg: PgInfo, monkeypatch: pytest.MonkeyPatch, nasty_role: tuple[str, str]
) -> None:
    user, password = nasty_role
    cid = _set_conn(monkeypatch, pg, login=user, password=password)
    table = ConnectorXPostgresHook(postgres_conn_id=cid).read_arrow("SELECT current_user AS u")
    assert table.column("u").to_pylist() == [user]


def test_unix_socket_host(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    if pg.server is None:
        pytest.skip("needs the embedded server's socket directory")
    cid = _set_conn(monkeypatch, pg, host=str(pg.server.socket_dir))
    table = ConnectorXPostgresHook(postgres_conn_id=cid).read_arrow("SELECT inet_server_addr() IS NULL AS over_socket")
    assert table.column("over_socket").to_pylist() == [True]


def test_iam_token_path(pg: PgInfo, monkeypatch: pytest.MonkeyPatch, nasty_role: tuple[str, str]) -> None:
    """With ``iam: true`` the password comes from PostgresHook's token call (stubbed here)."""
    user, token = nasty_role
    cid = _set_conn(monkeypatch, pg, login=user, password="not-the-token", extra={"iam": True, "aws_conn_id": "x"})
    calls: list[str] = []

    def fake_token(self: ConnectorXPostgresHook, conn: object) -> tuple[str, str, int]:
        calls.append(getattr(conn, "conn_id", ""))
        return user, token, pg.port

    monkeypatch.setattr(ConnectorXPostgresHook, "get_aws_iam_token", fake_token)
    hook = ConnectorXPostgresHook(postgres_conn_id=cid)
    assert hook.read_arrow("SELECT current_user AS u").column("u").to_pylist() == [user]
    assert calls


def test_password_never_in_repr_logs_or_errors(
    pg: PgInfo,
    monkeypatch: pytest.MonkeyPatch,
    nasty_role: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    user, password = nasty_role
    cid = _set_conn(monkeypatch, pg, login=user, password=password)
    hook = ConnectorXPostgresHook(postgres_conn_id=cid)
    caplog.set_level(logging.DEBUG)
    texts = [repr(hook), str(hook.get_endpoint()), repr(hook.get_endpoint()), hook.connectorx_uri]
    hook.read_arrow("SELECT 1 AS one")
    with pytest.raises(Exception) as failure:
        hook.read_arrow("SELECT * FROM no_such_table_anywhere")
    texts.append(str(failure.value))
    texts.append(repr(failure.value))
    if failure.value.__cause__ is not None:
        texts.append(str(failure.value.__cause__))
    out, err = capfd.readouterr()
    texts += [caplog.text, out, err]
    for text in texts:
        for form in Redactor.variants([password]):
            assert form not in text


def test_wrong_password_fails_fast_with_clear_error(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "definitely-wrong-" + uuid.uuid4().hex
    cid = _set_conn(monkeypatch, pg, password=secret)
    with pytest.raises(Exception) as failure:
        ConnectorXPostgresHook(postgres_conn_id=cid).read_arrow("SELECT 1 AS one")
    assert "password authentication failed" in str(failure.value)
    assert secret not in str(failure.value)


# -- bad connections ---------------------------------------------------------------------------------


def test_unknown_connection_id() -> None:
    with pytest.raises(ConnectionConfigError, match="no_such_conn_xyz"):
        ConnectorXPostgresHook(postgres_conn_id="no_such_conn_xyz").get_endpoint()


def test_connection_of_another_type(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = _set_conn(monkeypatch, pg, conn_type="mysql")
    with pytest.raises(ConnectionConfigError, match=f"{cid}.*'mysql'") as failure:
        ConnectorXPostgresHook(postgres_conn_id=cid).get_endpoint()
    assert pg.password not in str(failure.value)


def test_connection_without_host(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = f"cxpg_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{cid.upper()}", json.dumps({"conn_type": "postgres", "login": "u", "password": "hunter2-secret"})
    )
    with pytest.raises(ConnectionConfigError, match=f"{cid}.*no host") as failure:
        ConnectorXPostgresHook(postgres_conn_id=cid).get_endpoint()
    assert "hunter2-secret" not in str(failure.value)


def test_refused_port_fails_fast(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """connectorx alone waits 30 s for a dead server; the hook's control connection says so at once."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    cid = f"cxpg_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{cid.upper()}",
        json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": free, "login": "u", "password": "pw-123456"}),
    )
    started = time.monotonic()
    with pytest.raises((ServerConnectionError, psycopg.OperationalError, Exception)) as failure:
        ConnectorXPostgresHook(postgres_conn_id=cid).read_arrow("SELECT 1 AS one")
    assert time.monotonic() - started < 15
    assert "pw-123456" not in str(failure.value)


def test_embedded_server_helper_stops_its_server_on_a_plain_kill(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) of the helper must not leave an orphaned PostgreSQL behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_cxpg.demo.embedded_postgres"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline() if proc.stdout else ""))
        reader.start()
        reader.join(120)
        assert lines and lines[0].startswith("postgresql://"), lines
        dsn = lines[0].strip()
        psycopg.connect(dsn, connect_timeout=10).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=5).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_row_level_security_on_the_source_is_said_in_the_plan(
    pg: PgInfo, admin: psycopg.Connection, schema: str, nasty_role: tuple[str, str]
) -> None:
    """A login its policies restrict reads a subset: the run goes on (that can be the intent) and says so."""
    from airflow_provider_cxpg.planning.plan import SourceSpec, build_plan

    role, password = nasty_role
    table = f'"{schema}".secured'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tenant int NOT NULL)")
    admin.execute(f"INSERT INTO {table} SELECT g, g % 2 FROM generate_series(1, 20) g")
    admin.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    admin.execute(f'CREATE POLICY tenant_zero ON {table} FOR SELECT TO "{role}" USING (tenant = 0)')
    admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
    admin.execute(f'GRANT SELECT ON {table} TO "{role}"')
    spec = SourceSpec(table=table)
    login = {"host": pg.host, "port": pg.port, "dbname": pg.dbname, "user": role, "password": password}
    try:
        with psycopg.connect(**login, autocommit=True) as restricted:
            assert any("row-level security applies" in note for note in build_plan(restricted, spec).notes)
        assert not any("row-level security" in note for note in build_plan(admin, spec).notes)  # superuser: all
    finally:  # the role goes before the schema: nothing of it may be left to depend on it
        admin.execute(f"DROP TABLE {table}")
        admin.execute(f'REVOKE USAGE ON SCHEMA "{schema}" FROM "{role}"')
