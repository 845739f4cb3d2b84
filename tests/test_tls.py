"""TLS parity: the worker's connections verify what the parent's libpq verifies, or the run refuses.

A server of the system's PostgreSQL build (the pgserver wheel has no OpenSSL) with a certificate
from a test CA, and ``pg_hba.conf`` that refuses every connection without TLS: an extraction that
succeeds proves every connection of the run (the worker's included) used TLS.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from airflow_provider_cxpg.conninfo import PostgresEndpoint
from airflow_provider_cxpg.demo.embedded_postgres import EmbeddedPostgres
from airflow_provider_cxpg.exceptions import ServerConnectionError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from tests.helpers import PgInfo, read_output, system_bindir

pytestmark = pytest.mark.integration


def _certificates(directory: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    now = dt.datetime.now(dt.UTC)
    paths: dict[str, Path] = {}
    for name in ("ca", "other_ca"):
        ca_key = key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cxpg test {name}")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        if name == "ca":
            server_key = key()
            server = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                .issuer_name(subject)
                .public_key(server_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
                .sign(ca_key, hashes.SHA256())
            )
            paths["cert"] = directory / "server.crt"
            paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
            paths["key"] = directory / "server.key"
            write_key(server_key, paths["key"])
    return paths


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[tuple[PgInfo, dict[str, Path]]]:
    bindir = system_bindir()
    if bindir is None:
        if os.environ.get("CXPG_REQUIRE_SYSTEM_PG") == "1":
            pytest.fail("no system PostgreSQL server with OpenSSL found")
        pytest.skip("no system PostgreSQL server with OpenSSL found")
    directory = Path(tempfile.mkdtemp(prefix="cxpg-tls-"))  # pytest's own tmp is private to root
    directory.chmod(0o755)
    certs = _certificates(directory)
    if os.geteuid() == 0:  # the server runs as the postgres account and must own its key
        account = pwd.getpwnam("postgres")
        for name in ("cert", "key"):
            os.chown(certs[name], account.pw_uid, account.pw_gid)
    certs["key"].chmod(0o600)
    server = EmbeddedPostgres(
        bindir=bindir, settings={"ssl": "on", "ssl_cert_file": str(certs["cert"]), "ssl_key_file": str(certs["key"])}
    ).start()
    try:
        hba = server.datadir / "pg_hba.conf"
        hba.write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 0.0.0.0/0 reject\n"
        )
        with psycopg.connect(server.dsn() + "?sslmode=require", autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("CREATE TABLE public.secure AS SELECT g AS id FROM generate_series(1, 300) g")
            conn.execute("ALTER TABLE public.secure ADD PRIMARY KEY (id)")
        yield PgInfo.of(server), certs
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _conn_id(monkeypatch: pytest.MonkeyPatch, info: PgInfo, name: str, extra: dict[str, str]) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}", info.airflow_conn_json(extra=extra))
    return name


def test_without_tls_the_server_refuses(tls_pg: tuple[PgInfo, dict[str, Path]]) -> None:
    info, _ = tls_pg
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(info.dsn + "?sslmode=disable").close()


def test_verify_ca_extracts_with_every_connection_verified(
    tls_pg: tuple[PgInfo, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info, certs = tls_pg
    conn_id = _conn_id(monkeypatch, info, "tls_ca", {"sslmode": "verify-ca", "sslrootcert": str(certs["ca"])})
    result = ConnectorXPostgresHook(postgres_conn_id=conn_id).extract(
        destination=str(tmp_path / "out"), table="public.secure", chunk_rows=100
    )
    assert result.rows == 300 and read_output(tmp_path / "out").num_rows == 300


def test_the_parents_environment_pgsslmode_reaches_the_worker(
    tls_pg: tuple[PgInfo, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info, certs = tls_pg
    monkeypatch.setenv("PGSSLMODE", "verify-ca")
    monkeypatch.setenv("PGSSLROOTCERT", str(certs["ca"]))
    conn_id = _conn_id(monkeypatch, info, "tls_env", {})
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    assert "sslrootcert" in hook.get_endpoint().connectorx_uri()
    assert hook.extract(destination=str(tmp_path / "out"), table="public.secure", chunk_rows=150).rows == 300


def test_a_certificate_from_another_ca_is_refused_on_both_sides(
    tls_pg: tuple[PgInfo, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info, certs = tls_pg
    conn_id = _conn_id(monkeypatch, info, "tls_wrong", {"sslmode": "verify-ca", "sslrootcert": str(certs["other_ca"])})
    hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
    with pytest.raises(ServerConnectionError, match="certificate verify failed"):  # the parent, at once
        hook.extract(destination=str(tmp_path / "out"), table="public.secure")
    assert not (tmp_path / "out").exists()
    # The worker's URI verifies too: connectorx itself refuses the server's certificate.
    uri = PostgresEndpoint(
        host=info.host,
        port=info.port,
        dbname=info.dbname,
        user=info.user,
        password=info.password,
        params={"sslmode": "verify-ca", "sslrootcert": str(certs["other_ca"])},
    ).connectorx_uri()
    probe = "import connectorx, sys; connectorx.read_sql(sys.argv[1], 'SELECT 1 AS x', return_type='arrow')"
    done = subprocess.run([sys.executable, "-c", probe, uri], capture_output=True, text=True, timeout=90)
    assert done.returncode != 0, done.stdout
    uri_right = uri.replace("other_ca.pem", "ca.pem")
    done = subprocess.run([sys.executable, "-c", probe, uri_right], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
