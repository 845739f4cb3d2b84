"""libpq's environment and files against a real server: parent and worker reach the same server, as the same role.

The parent plans through libpq, which reads ``PG*`` variables and the password file; connectorx in
the worker reads neither. Each test sets what a task's environment may hold and checks that the
worker read exactly the rows the source has, through the server and role the parent planned on.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from airflow_provider_cxpg.conninfo import connect
from airflow_provider_cxpg.exceptions import ConnectionConfigError, ServerConnectionError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.planning.incremental import WatermarkSpec
from airflow_provider_cxpg.run.parallel import ParallelExtraction
from tests.helpers import PgInfo, read_output


def _conn(monkeypatch: pytest.MonkeyPatch, pg: PgInfo, **fields: Any) -> str:
    """An Airflow connection to the test server; ``fields`` replace its parts (``login=""``: none)."""
    cid = f"cxpg_env_{uuid.uuid4().hex[:8]}"
    conn = {
        "conn_type": "postgres",
        "host": pg.host,
        "port": pg.port,
        "login": pg.user,
        "password": pg.password,
        "schema": pg.dbname,
        "extra": {},
    }
    conn.update(fields)
    monkeypatch.setenv(f"AIRFLOW_CONN_{cid.upper()}", json.dumps(conn))
    return cid


@pytest.fixture
def dmy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task environment whose libpq asks for day-first dates in Tokyo time."""
    monkeypatch.setenv("PGDATESTYLE", "SQL, DMY")
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")


@pytest.mark.usefixtures("dmy")
def test_pgdatestyle_and_pgtz_do_not_shift_a_date_window(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".d (id int PRIMARY KEY, d date NOT NULL)')
    admin.execute(f"INSERT INTO \"{schema}\".d SELECT i, date '2024-01-01' + (i % 32) FROM generate_series(1, 3200) i")
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg))
    with connect(hook.get_endpoint()) as conn:  # the parent's own connections speak ISO and UTC
        assert conn.execute("SELECT current_setting('DateStyle'), current_setting('TimeZone')").fetchone() == (
            "ISO, MDY",
            "UTC",
        )
    result = hook.extract(
        destination=tmp_path / "out", table=f"{schema}.d", watermark=WatermarkSpec("d"), chunk_rows=1000
    )
    assert result.rows == 3200  # the window's end, Feb 1, was read as January 2 by the worker: 100 rows
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == list(range(1, 3201))


@pytest.mark.usefixtures("dmy")
def test_pgtz_does_not_shift_a_timestamptz_window(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, at timestamptz NOT NULL)')
    admin.execute(
        f"INSERT INTO \"{schema}\".t SELECT i, timestamptz '2024-01-01 00:00+00' + i * interval '7 hours' "
        "FROM generate_series(1, 500) i"
    )
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg))
    result = hook.extract(
        destination=tmp_path / "out", table=f"{schema}.t", watermark=WatermarkSpec("at"), chunk_rows=100
    )
    assert result.rows == 500
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == list(range(1, 501))


@pytest.mark.usefixtures("dmy")
def test_pgdatestyle_does_not_overlap_parallel_ranges_on_a_date_key(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    days = ["2024-01-01", "2024-01-03", "2024-01-05", "2024-01-20", "2024-01-25", "2024-02-01", "2024-02-05"]
    days += ["2024-02-09", "2024-02-12"]
    admin.execute(f'CREATE TABLE "{schema}".k (d date PRIMARY KEY, v int NOT NULL)')
    for i, day in enumerate(days):
        admin.execute(f'INSERT INTO "{schema}".k VALUES (%s, %s)', (day, i))
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg))
    run = ParallelExtraction(
        hook, parallelism=3, partition_method="ntile", destination=str(tmp_path / "out"), table=f"{schema}.k"
    )
    result = run.run()
    import pyarrow.parquet as pq

    values = [
        v for f in sorted((tmp_path / "out").rglob("*.parquet")) for v in pq.read_table(f).column("v").to_pylist()
    ]
    assert sorted(values) == list(range(len(days)))  # 17 rows out of 9 when the ranges overlapped
    assert result.rows == len(days)


def test_pguser_is_the_role_of_both_sides_of_a_loginless_connection(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    os_user = getpass.getuser()
    if os_user == pg.user:
        pytest.skip("the OS user is the test server's superuser: the two roles would be one")
    role, password = f"r_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex
    created_os_role = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (os_user,)).fetchone() is None
    for name in [role, os_user] if created_os_role else [role]:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
    try:
        table = sql.Identifier(schema, "owned")
        admin.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, owner text NOT NULL)").format(table))
        admin.execute(
            sql.SQL(
                "INSERT INTO {} SELECT i, CASE WHEN i % 4 = 0 THEN {} ELSE {} END FROM generate_series(1, 400) i"
            ).format(table, sql.Literal(role), sql.Literal(os_user))
        )
        admin.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
        admin.execute(sql.SQL("CREATE POLICY mine ON {} USING (owner = current_user)").format(table))
        admin.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, {}").format(*map(sql.Identifier, (schema, role, os_user)))
        )
        admin.execute(
            sql.SQL("GRANT SELECT ON {} TO {}, {}").format(table, sql.Identifier(role), sql.Identifier(os_user))
        )
        monkeypatch.setenv("PGUSER", role)
        hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg, login="", password=password))
        assert hook.read_arrow("SELECT current_user::text AS u").column("u").to_pylist() == [role]
        result = hook.extract(destination=tmp_path / "out", table=f"{schema}.owned", chunk_rows=30)
        ids = sorted(read_output(tmp_path / "out").column("id").to_pylist())
        assert ids == list(range(4, 401, 4)) and result.rows == 100  # the OS user's rows were read
    finally:
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))  # the fixture drops it
        for name in [role, os_user] if created_os_role else [role]:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_password_file_is_read_for_both_sides(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    passfile = tmp_path / "pgpass"
    secret = pg.password.replace("\\", "\\\\").replace(":", "\\:")
    passfile.write_text(f"# the test server\n{pg.host}:{pg.port}:*:{pg.user}:{secret}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    admin.execute(f'CREATE TABLE "{schema}".p AS SELECT i AS id FROM generate_series(1, 250) i')
    admin.execute(f'ALTER TABLE "{schema}".p ADD PRIMARY KEY (id)')
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg, password=""))
    assert pg.password in hook.get_endpoint().secrets()  # redacted like a stored password
    result = hook.extract(destination=tmp_path / "out", table=f"{schema}.p", chunk_rows=100, query_timeout=60)
    assert result.rows == 250  # the worker failed after 30 s, "password missing"


def test_a_named_password_file_without_the_password_is_not_made_up_for_by_another(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The connection names a password file that has no line for it: the parent's libpq went on to
    ~/.pgpass and planned, the worker had no password and failed 30 s later."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pgpass").write_text(f"*:*:*:*:{pg.password.replace(chr(92), chr(92) * 2).replace(':', chr(92) + ':')}\n")
    (home / ".pgpass").chmod(0o600)
    named = tmp_path / "named"
    named.write_text("elsewhere:1:*:*:nothing\n")
    named.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("PGPASSFILE", raising=False)
    admin.execute(f'CREATE TABLE "{schema}".n (id int PRIMARY KEY)')
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg, password="", extra={"passfile": str(named)}))
    started = time.monotonic()
    with pytest.raises(ServerConnectionError, match="password"):
        hook.extract(destination=tmp_path / "out", table=f"{schema}.n", query_timeout=60)
    assert time.monotonic() - started < 15  # refused by the parent's own login, not by the worker's 30 s later
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


@pytest.mark.parametrize("hosts", ["127.0.0.2,{host}", "{host},127.0.0.2"])
def test_host_list_with_one_port_reaches_the_same_server(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hosts: str
) -> None:
    # libpq gives every host the one port; the worker gave a host without its own port 5432, so it
    # reached another server (or none: the first order then fell through to the right one).
    for address, port in (("127.0.0.2", pg.port), (pg.host, 5432)):
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex((address, port)) == 0:
                pytest.skip(f"something listens on {address}:{port}")
    admin.execute(f'CREATE TABLE "{schema}".h AS SELECT i AS id FROM generate_series(1, 700) i')
    admin.execute(f'ALTER TABLE "{schema}".h ADD PRIMARY KEY (id)')
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg, host=hosts.format(host=pg.host)))
    where = hook.read_arrow("SELECT inet_server_port() AS port, current_setting('data_directory') AS dir")
    expected = admin.execute("SELECT inet_server_port(), current_setting('data_directory')").fetchone()
    assert (where.column("port")[0].as_py(), where.column("dir")[0].as_py()) == expected
    result = hook.extract(destination=tmp_path / "out", table=f"{schema}.h", chunk_rows=300)
    assert result.rows == 700 and sorted(read_output(tmp_path / "out").column("id").to_pylist()) == list(range(1, 701))


@pytest.mark.parametrize(
    ("extra", "environ"),
    [
        ({"sslcrl": "/nonexistent/crl.pem"}, {}),
        ({"sslcrldir": "/nonexistent"}, {}),
        ({"require_auth": "scram-sha-256"}, {}),
        ({"hostaddr": "127.0.0.1"}, {}),
        ({}, {"PGHOSTADDR": "127.0.0.1"}),
        ({}, {"PGSERVICE": "nightly"}),
        ({"target_session_attrs": "primary"}, {}),
        ({}, {"PGTARGETSESSIONATTRS": "prefer-standby"}),
        ({"connect_timeout": "5 seconds"}, {}),
        ({}, {"PGLOADBALANCEHOSTS": "random"}),
    ],
)
def test_what_the_worker_cannot_follow_is_refused_before_anything_is_written(
    pg: PgInfo,
    admin: psycopg.Connection,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    extra: dict[str, str],
    environ: dict[str, str],
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".r AS SELECT i AS id FROM generate_series(1, 10) i')
    admin.execute(f'ALTER TABLE "{schema}".r ADD PRIMARY KEY (id)')
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg, extra=extra))
    with pytest.raises(ConnectionConfigError, match=next(iter(extra or environ))):
        hook.extract(destination=tmp_path / "out", table=f"{schema}.r")
    assert not (tmp_path / "out").exists()


def test_integer_extras_with_spaces_are_normalised(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".n AS SELECT i AS id FROM generate_series(1, 10) i')
    admin.execute(f'ALTER TABLE "{schema}".n ADD PRIMARY KEY (id)')
    extra = {"connect_timeout": " 5", "keepalives": "1 ", "keepalives_idle": " 30 "}
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg, extra=extra))
    assert hook.extract(destination=tmp_path / "out", table=f"{schema}.n").rows == 10  # QueryError in the worker


def test_channel_binding_require_reaches_both_sides(pg: PgInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    # The test server has no TLS, so no channel binding: libpq refuses, and so must the provider,
    # which dropped the extra and read without it.
    hook = ConnectorXPostgresHook(postgres_conn_id=_conn(monkeypatch, pg, extra={"channel_binding": "require"}))
    assert "channel_binding=require" in hook.get_endpoint().connectorx_uri()
    with pytest.raises(ServerConnectionError, match="channel binding"):
        hook.read_arrow("SELECT 1 AS one")


def test_a_host_list_is_narrowed_to_the_server_libpq_reached(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker's client moves on to the next host on any connection error where libpq reached the
    first (a connection limit, a restart): the parent planned on one server and the worker read a
    standby behind it, green. A first host that accepts and never answers cost the whole connect
    deadline of every later connection. Now the list is narrowed, once, to the host libpq reaches."""
    admin.execute(f'CREATE TABLE "{schema}".h AS SELECT i AS id FROM generate_series(1, 700) i')
    admin.execute(f'ALTER TABLE "{schema}".h ADD PRIMARY KEY (id)')
    silent = socket.socket()
    try:
        silent.bind(("127.0.0.2", pg.port))
    except OSError:
        silent.close()
        pytest.skip(f"127.0.0.2:{pg.port} is taken")
    silent.listen(16)  # accepts connections, never answers one
    try:
        hook = ConnectorXPostgresHook(
            postgres_conn_id=_conn(monkeypatch, pg, host=f"127.0.0.2,{pg.host}", extra={"connect_timeout": "2"})
        )
        endpoint = hook.get_endpoint()
        assert (endpoint.host, endpoint.port) == (pg.host, pg.port)
        assert "host=" not in endpoint.redacted_uri()  # the worker is given that one host, nothing to fail over to
        result = hook.extract(destination=tmp_path / "out", table=f"{schema}.h", chunk_rows=300)
        assert result.rows == 700 and sorted(read_output(tmp_path / "out").column("id").to_pylist()) == list(
            range(1, 701)
        )
        assert hook.fresh_endpoint().host == pg.host  # resolved again (a rotated password): the same server
    finally:
        silent.close()


def test_lineage_names_the_source_by_the_connections_host_list_not_the_host_a_run_reached(
    pg: PgInfo, admin: psycopg.Connection, schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("airflow.providers.openlineage.extractors")
    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

    admin.execute(f'CREATE TABLE "{schema}".l (id int PRIMARY KEY)')
    hosts = f"127.0.0.3,{pg.host}"  # nothing listens on 127.0.0.3: libpq reaches the second
    operator = PostgresExtractOperator(
        task_id="l",
        postgres_conn_id=_conn(monkeypatch, pg, host=hosts, extra={"connect_timeout": "2"}),
        table=f"{schema}.l",
        destination=str(tmp_path / "out"),
    )
    operator.execute({})
    assert operator.hook.get_endpoint().host == pg.host
    lineage = operator.get_openlineage_facets_on_complete(None)
    assert lineage is not None and [d.namespace for d in lineage.inputs] == [f"postgres://{hosts}:{pg.port}"]
