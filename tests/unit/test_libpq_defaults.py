"""libpq's defaults resolved without a server: user, database, port, password file, folded and refused settings."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_cxpg.exceptions import ConnectionConfigError
from airflow_provider_cxpg.libpq_defaults import read_passfile, resolve_endpoint


def _resolve(environ: dict[str, str] | None = None, extra: dict[str, Any] | None = None, **parts: Any) -> Any:
    given: dict[str, Any] = {"host": "db", "port": None, "dbname": None, "user": None, "password": None, "params": {}}
    given.update(parts)
    # An empty HOME: no ~/.pgpass of the machine running the tests is read.
    return resolve_endpoint(extra=extra or {}, environ={"HOME": "/nonexistent", **(environ or {})}, **given)


def _passfile(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "pgpass"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


# -- user, database, port ---------------------------------------------------------------------------


def test_no_login_is_pguser_then_the_effective_os_user() -> None:
    assert _resolve({"PGUSER": "reporter"}).user == "reporter"
    assert _resolve().user == pwd.getpwuid(os.geteuid()).pw_name
    assert _resolve({"PGUSER": "reporter"}, user="etl").user == "etl"  # the connection's login wins


def test_no_database_is_pgdatabase_then_the_user_name() -> None:
    assert _resolve({"PGDATABASE": "sales"}, user="etl").dbname == "sales"
    assert _resolve(user="etl").dbname == "etl"
    assert _resolve({"PGDATABASE": "sales"}, user="etl", dbname="hr").dbname == "hr"


def test_no_port_is_pgport_and_a_port_list_is_refused() -> None:
    assert _resolve({"PGPORT": "6543"}).port == 6543
    assert _resolve().port == 5432
    assert _resolve({"PGPORT": "6543"}, port=7000).port == 7000
    with pytest.raises(ConnectionConfigError, match="PGPORT"):
        _resolve({"PGPORT": "6543,6544"})


def test_libpq_kwargs_name_the_resolved_user_explicitly() -> None:
    kwargs = _resolve({"PGUSER": "reporter"}).libpq_kwargs()
    assert kwargs["user"] == "reporter" and kwargs["dbname"] == "reporter"


# -- password ---------------------------------------------------------------------------------------


def test_pgpassword_fills_a_missing_password_and_is_a_secret() -> None:
    endpoint = _resolve({"PGPASSWORD": "s3cret-from-env"}, user="etl")
    assert endpoint.password == "s3cret-from-env"
    assert "s3cret-from-env" in endpoint.secrets() and "s3cret-from-env" not in endpoint.redacted_uri()
    assert _resolve({"PGPASSWORD": "env"}, user="etl", password="given").password == "given"


def test_passfile_from_pgpassfile_the_extra_and_home(tmp_path: Path) -> None:
    path = _passfile(tmp_path, "db:5432:*:etl:from-file\n")
    assert _resolve({"PGPASSFILE": path}, user="etl").password == "from-file"
    assert _resolve(extra={"passfile": path}, user="etl").password == "from-file"
    (tmp_path / ".pgpass").write_text("*:*:*:*:from-home\n")
    (tmp_path / ".pgpass").chmod(0o600)
    assert _resolve({"HOME": str(tmp_path)}, user="etl").password == "from-home"
    assert _resolve({"PGPASSFILE": path}, user="etl", password="given").password == "given"
    assert _resolve({"PGPASSFILE": path, "PGPASSWORD": "env"}, user="etl").password == "env"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_passfile_others_may_read_is_ignored(tmp_path: Path, mode: int) -> None:
    path = _passfile(tmp_path, "*:*:*:*:pw\n", mode)
    assert _resolve({"PGPASSFILE": path}, user="etl").password == ""
    assert read_passfile(path) == []


def test_passfile_that_is_a_directory_or_missing_is_ignored(tmp_path: Path) -> None:
    assert _resolve({"PGPASSFILE": str(tmp_path)}, user="etl").password == ""
    assert _resolve({"PGPASSFILE": str(tmp_path / "none")}, user="etl").password == ""


def test_passfile_lines_match_first_with_wildcards_comments_and_escapes(tmp_path: Path) -> None:
    text = (
        "# db:5432:*:etl:commented\n"
        " db:5432:*:etl:leading-space-is-part-of-the-host\n"
        "db:5433:*:etl:other-port\n"
        "db:5432:hr:*:hr-only\n"
        "db:*:*:etl:a\\:b\\\\c:ignored-sixth-field\r\n"
        "*:*:*:*:fallback\n"
    )
    path = _passfile(tmp_path, text)
    assert _resolve({"PGPASSFILE": path}, user="etl").password == "a:b\\c"
    assert _resolve({"PGPASSFILE": path}, user="etl", dbname="hr").password == "hr-only"
    assert _resolve({"PGPASSFILE": path}, user="etl", port=5433).password == "other-port"
    assert _resolve({"PGPASSFILE": path}, user="bob").password == "fallback"


def test_passfile_star_is_a_wildcard_only_alone(tmp_path: Path) -> None:
    path = _passfile(tmp_path, "*db:*:*:*:starred-name\n\\*:*:*:*:escaped-star\n")
    assert _resolve({"PGPASSFILE": path}, user="etl").password == ""
    assert _resolve({"PGPASSFILE": path}, user="etl", host="*").password == "escaped-star"
    assert read_passfile(_passfile(tmp_path, "*:*:*:*:*\n"))[0][4] == "\0*"  # a star password is kept


def test_passfile_socket_directory_default_is_localhost(tmp_path: Path) -> None:
    path = _passfile(tmp_path, "localhost:5432:*:*:local\n/tmp:5432:*:*:tmp-dir\n")
    assert _resolve({"PGPASSFILE": path}, user="etl", host="/var/run/postgresql").password == "local"
    assert _resolve({"PGPASSFILE": path}, user="etl", host="/tmp").password == "tmp-dir"


def test_passfile_host_list_needs_one_password(tmp_path: Path) -> None:
    path = _passfile(tmp_path, "a:5432:*:*:same\nb:5432:*:*:same\nc:5432:*:*:other\n")
    assert _resolve({"PGPASSFILE": path}, user="etl", host="a,b").password == "same"
    with pytest.raises(ConnectionConfigError, match="different passwords"):
        _resolve({"PGPASSFILE": path}, user="etl", host="a,c")
    with pytest.raises(ConnectionConfigError, match="different passwords"):
        _resolve({"PGPASSFILE": path}, user="etl", host="a,d")  # one with, one without


# -- folded and refused -----------------------------------------------------------------------------


def test_environment_folds_into_unset_parameters() -> None:
    environ = {
        "PGTARGETSESSIONATTRS": "read-write",
        "PGCHANNELBINDING": "require",
        "PGAPPNAME": "nightly",
        "PGCONNECT_TIMEOUT": " 7 ",
        "PGSSLMODE": "require",
    }
    endpoint = _resolve(environ, user="etl", params={"application_name": "mine"})
    assert endpoint.params == {
        "target_session_attrs": "read-write",
        "channel_binding": "require",
        "application_name": "mine",
        "connect_timeout": "7",
        "sslmode": "require",
    }
    assert "channel_binding=require" in endpoint.connectorx_uri()


@pytest.mark.parametrize(
    ("extra", "environ", "named"),
    [
        ({"hostaddr": "10.0.0.1"}, {}, "hostaddr"),
        ({}, {"PGHOSTADDR": "10.0.0.1"}, "PGHOSTADDR"),
        ({"service": "prod"}, {}, "service"),
        ({}, {"PGSERVICE": "prod"}, "PGSERVICE"),
        ({"require_auth": "scram-sha-256"}, {}, "require_auth"),
        ({}, {"PGREQUIREAUTH": "md5"}, "PGREQUIREAUTH"),
        ({"requirepeer": "postgres"}, {}, "requirepeer"),
        ({"sslcrl": "/etc/crl.pem"}, {}, "sslcrl"),
        ({"sslcrldir": "/etc/crls"}, {}, "sslcrldir"),
        ({}, {"PGSSLCRL": "/etc/crl.pem"}, "PGSSLCRL"),
        ({"gssencmode": "require"}, {}, "gssencmode"),
        ({}, {"PGGSSENCMODE": "require"}, "PGGSSENCMODE"),
        ({"sslcertmode": "require"}, {}, "sslcertmode"),
        ({"ssl_min_protocol_version": "TLSv1.3"}, {}, "ssl_min_protocol_version"),
        ({"load_balance_hosts": "random"}, {}, "load_balance_hosts"),
        ({}, {"PGLOADBALANCEHOSTS": "random"}, "PGLOADBALANCEHOSTS"),
    ],
)
def test_what_the_worker_cannot_follow_is_refused(extra: dict[str, str], environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConnectionConfigError, match=named):
        _resolve(environ, extra, user="etl")


@pytest.mark.parametrize(
    ("extra", "environ"),
    [
        ({"gssencmode": "prefer"}, {"PGGSSENCMODE": "disable"}),
        ({"load_balance_hosts": "disable"}, {}),
        ({"ssl_min_protocol_version": "TLSv1.2"}, {}),
        ({"hostaddr": ""}, {"PGSERVICEFILE": "/etc/pg_service.conf"}),  # a service file alone selects nothing
    ],
)
def test_what_changes_nothing_is_accepted(extra: dict[str, str], environ: dict[str, str]) -> None:
    _resolve(environ, extra, user="etl")


@pytest.mark.parametrize(
    ("params", "environ", "named"),
    [
        ({"target_session_attrs": "primary"}, {}, "target_session_attrs"),
        ({"target_session_attrs": "prefer-standby"}, {}, "target_session_attrs"),
        ({}, {"PGTARGETSESSIONATTRS": "standby"}, "target_session_attrs"),
        ({"channel_binding": "required"}, {}, "channel_binding"),
        ({"connect_timeout": "5.0"}, {}, "connect_timeout"),
        ({"keepalives_idle": "ten"}, {}, "keepalives_idle"),
        ({"keepalives": "-1"}, {}, "keepalives"),
    ],
)
def test_values_the_worker_rejects_are_refused(params: dict[str, str], environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConnectionConfigError, match=named):
        _resolve(environ, user="etl", params=params)


def test_integers_are_normalised_for_the_worker() -> None:
    params = {"connect_timeout": " 5", "keepalives": "1 ", "keepalives_idle": " +30 "}
    endpoint = _resolve(user="etl", params=params)
    assert endpoint.params == {"connect_timeout": "5", "keepalives": "1", "keepalives_idle": "30"}


def test_an_empty_entry_in_a_host_list_is_refused() -> None:
    with pytest.raises(ConnectionConfigError, match="empty entry"):
        _resolve(user="etl", host="a,,b")
