"""Connection info without a server: the worker URI, session options, TLS parameters, redaction."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor

NASTY_PASSWORDS = [
    "p@ss:w/rd%#?&",
    "with space and +plus",
    "quote'\"back\\slash",
    "ünïcödé-パスワード",
    "%40%3A already-encoded",
]


@pytest.mark.parametrize("password", NASTY_PASSWORDS)
def test_uri_percent_encodes_every_part(password: str) -> None:
    ep = PostgresEndpoint(host="db.example", port=6543, dbname="my db/x", user="us@er:1", password=password)
    uri = ep.connectorx_uri()
    assert quote(password, safe="") in uri
    assert "us%40er%3A1" in uri and "my%20db%2Fx" in uri
    assert password not in ep.redacted_uri() and "***" in ep.redacted_uri()
    assert password not in repr(ep) and password not in str(ep)


def test_uri_unix_socket_and_ipv6() -> None:
    sock = PostgresEndpoint(host="/var/run/postgresql", port=5433, user="u")
    assert sock.connectorx_uri().startswith("postgresql://u@%2Fvar%2Frun%2Fpostgresql:5433/postgres")
    assert PostgresEndpoint(host="::1", user="u").connectorx_uri().startswith("postgresql://u@[::1]:5432/")


def test_session_options_are_in_the_startup_packet() -> None:
    ep = PostgresEndpoint(host="h", user="u", params={"options": "-c search_path=app"}).with_session(
        application_name="x" * 100, statement_timeout_ms=1500
    )
    options = ep.params["options"]
    assert options.startswith("-c search_path=app ")
    assert "-c statement_timeout=1500" in options and "-c TimeZone=UTC" in options
    assert len(ep.params["application_name"]) == 63


def test_redactor_scrubs_raw_and_encoded_forms() -> None:
    secret = "p@ss:w/rd%#?& x"
    redact = Redactor([secret])
    text = f"raw {secret} enc {quote(secret, safe='')} plus {secret.replace(' ', '+')}"
    assert secret not in redact(text) and quote(secret, safe="") not in redact(text)


def test_pgssl_environment_reaches_the_worker_uri() -> None:
    from airflow_provider_cxpg.conninfo import PostgresEndpoint

    endpoint = PostgresEndpoint(host="db", user="u").with_ssl_environment(
        {"PGSSLMODE": "verify-ca", "PGSSLROOTCERT": "/etc/ca.pem", "PGSSLCERT": "/c.pem", "PGSSLKEY": "/k.pem"}
    )
    uri = endpoint.connectorx_uri()
    assert "sslmode=require" in uri and "sslrootcert=%2Fetc%2Fca.pem" in uri  # connectorx: require + root = verify-ca
    assert "sslcert=%2Fc.pem" in uri and "sslkey=%2Fk.pem" in uri
    assert endpoint.libpq_kwargs()["sslmode"] == "verify-ca"  # the parent keeps libpq's own meaning


def test_uri_gives_every_host_of_a_list_its_port() -> None:
    # tokio-postgres gives a host without its own port 5432: "a,b:6543" read another server.
    uri = PostgresEndpoint(
        host="127.0.0.2,127.0.0.1", port=6543, user="u", params={"sslmode": "prefer"}
    ).connectorx_uri()
    assert uri == "postgresql://u@127.0.0.2:6543/postgres?host=127.0.0.1&port=6543&sslmode=prefer"


def test_uri_host_list_with_ipv6_and_socket_directory() -> None:
    uri = PostgresEndpoint(host="::1,/var/run/postgresql,db", port=5433, user="u").connectorx_uri()
    assert uri.startswith("postgresql://u@[::1]:5433/postgres?")
    assert uri.endswith("?host=%2Fvar%2Frun%2Fpostgresql&port=5433&host=db&port=5433")
    assert (
        PostgresEndpoint(host="/tmp,::1", port=5433)
        .connectorx_uri()
        .endswith("@%2Ftmp:5433/postgres?host=%3A%3A1&port=5433")
    )
