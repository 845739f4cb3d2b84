"""Extraction to real object storage: moto's S3 server on 127.0.0.1, written through s3fs.

Every part is read back with s3fs + pyarrow and compared row by row with psycopg; the manifest must
list exactly the part objects; the S3 credentials must appear in no output; a part upload the store
refuses must fail the extraction clearly and leave no part object behind.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from airflow_provider_cxpg.exceptions import StorageError
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from tests.helpers import PgInfo, assert_nothing_left
from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server, start_s3_server

pytestmark = pytest.mark.integration

SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3"
ROWS = 23
CHUNK_ROWS = 5


# -- fixtures and helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with start_s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.create_bucket()


@pytest.fixture
def hook(conn_id: str) -> ConnectorXPostgresHook:
    return ConnectorXPostgresHook(postgres_conn_id=conn_id)


@pytest.fixture
def source(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(
        f'CREATE TABLE "{schema}".orders (id bigint PRIMARY KEY, name text, amount numeric(12,2), '
        "placed_at timestamptz, payload bytea, tags text[], exact numeric)"
    )
    admin.execute(
        f'INSERT INTO "{schema}".orders SELECT g, '
        "CASE WHEN g % 5 = 0 THEN NULL ELSE 'näme ' || g || E' it''s \\\\ \"q\"\\n🎉' END, "
        "g * 1.25 - 7, '2024-01-01 00:00:00.000001+00'::timestamptz + g * interval '1 day 1 microsecond', "
        "decode(md5(g::text), 'hex'), ARRAY['t' || g, NULL, ''], (1::numeric / 7) * g "
        f"FROM generate_series(1, {ROWS}) g"
    )
    return f"{schema}.orders"


def reference_rows(pg: PgInfo, table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn, options=SESSION_OPTIONS) as conn:
        rows = conn.execute(
            f"SELECT id, name, amount, placed_at, payload, tags, exact::text FROM {table} ORDER BY id"
        ).fetchall()
    return [tuple(r) for r in rows]


def s3_filesystem(s3: S3Server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())


def read_parts(fs: s3fs.S3FileSystem, prefix: str, files: list[str]) -> pa.Table:
    tables = []
    for name in files:
        with fs.open(f"{prefix}/{name}", "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables)


def secret_forms() -> list[str]:
    return [ACCESS_KEY, SECRET_KEY, quote(SECRET_KEY, safe=""), SECRET_KEY.replace("/", "\\/")]


# -- a successful extraction ----------------------------------------------------------------------------


def test_extract_to_s3_writes_every_chunk_and_a_manifest_that_lists_them(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, pg: PgInfo, s3: S3Server, bucket: str, source: str
) -> None:
    destination = f"s3://{bucket}/prefix/run1"
    result = hook.extract(
        destination=destination, table=source, chunk_rows=CHUNK_ROWS, storage_options=s3.storage_options()
    )
    assert_nothing_left(admin)

    summary = result.summary()
    expected_files = [f"part-{i:06d}.parquet" for i in range(5)]
    assert summary["rows"] == ROWS and summary["chunks"] == 5
    assert summary["destination"] == destination
    assert summary["files"] == [f"{destination}/{name}" for name in expected_files]
    assert summary["manifest"] == f"{destination}/_manifest.json"

    # exactly the parts, the manifest and the _SUCCESS marker: no temporaries, nothing else
    assert s3.keys(bucket, "prefix/run1/") == sorted(
        [f"prefix/run1/{name}" for name in expected_files] + ["prefix/run1/_manifest.json", "prefix/run1/_SUCCESS"]
    )
    fs = s3_filesystem(s3)
    manifest = json.loads(fs.cat_file(f"{bucket}/prefix/run1/_manifest.json"))
    assert manifest["status"] == "complete" and manifest["rows"] == ROWS
    assert manifest["files"] == expected_files
    assert [c["rows"] for c in manifest["chunks"]] == [5, 5, 5, 5, 3]
    for chunk in manifest["chunks"]:
        assert fs.size(f"{bucket}/prefix/run1/{chunk['file']}") == chunk["bytes"]

    # every part, read back with s3fs + pyarrow, equals the source row by row
    output = read_parts(fs, f"{bucket}/prefix/run1", manifest["files"])
    assert output.schema.field("amount").type == pa.decimal128(12, 2)
    assert output.schema.field("placed_at").type == pa.timestamp("us", tz="UTC")
    assert output.schema.field("exact").type == pa.string()
    got = [tuple(row.values()) for row in output.to_pylist()]
    assert got == reference_rows(pg, source)


def test_folder_markers_of_consoles_and_s3a_are_no_files_of_the_dataset(
    conn_id: str, admin: psycopg.Connection, s3: S3Server, bucket: str, source: str
) -> None:
    """A zero-byte ``prefix/`` object listed as a file named like its folder: the validator took it
    for a file no range wrote, and the dataset could never be proven complete."""
    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
    from airflow_provider_cxpg.operators.partition import (
        PostgresPartitionPlanOperator,
        PostgresPartitionValidateOperator,
    )

    base, options = f"s3://{bucket}/ds", s3.storage_options()
    ranges = PostgresPartitionPlanOperator(
        task_id="plan", postgres_conn_id=conn_id, table=source, partitions=2, destination=base, storage_options=options
    ).execute({})
    for key in ("ds/", "ds/range=0000/", "ds/range=0001/"):
        s3.client().put_object(Bucket=bucket, Key=key, Body=b"")
    for entry in ranges:
        PostgresExtractOperator(
            task_id="e", postgres_conn_id=conn_id, table=source, chunk_rows=CHUNK_ROWS, storage_options=options, **entry
        ).execute({})
    summary = PostgresPartitionValidateOperator(task_id="v", destination=base, storage_options=options).execute({})
    assert summary["rows"] == ROWS
    assert_nothing_left(admin)


def test_extract_to_s3_through_a_upath_carries_its_storage_options(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, pg: PgInfo, s3: S3Server, bucket: str, source: str
) -> None:
    from upath import UPath

    path = UPath(f"s3://{bucket}/upath/run1", **s3.storage_options())
    result = hook.extract(destination=path, table=source, chunk_rows=CHUNK_ROWS)
    assert result.summary()["rows"] == ROWS
    assert result.summary()["destination"] == f"s3://{bucket}/upath/run1"
    fs = s3_filesystem(s3)
    manifest = json.loads(fs.cat_file(f"{bucket}/upath/run1/_manifest.json"))
    output = read_parts(fs, f"{bucket}/upath/run1", manifest["files"])
    assert [tuple(r.values()) for r in output.to_pylist()] == reference_rows(pg, source)
    assert_nothing_left(admin)


def test_s3_credentials_never_appear_in_the_manifest_the_summary_or_the_logs(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    s3: S3Server,
    bucket: str,
    source: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    query_log = tmp_path / "queries.jsonl"
    result = hook.extract(
        destination=f"s3://{bucket}/secrets/run1",
        table=source,
        chunk_rows=CHUNK_ROWS,
        storage_options=s3.storage_options(),
        query_log_path=str(query_log),
    )
    manifest_text = s3_filesystem(s3).cat_file(f"{bucket}/secrets/run1/_manifest.json").decode()
    out, err = capfd.readouterr()
    # botocore's own DEBUG lines show the access key id (in the signed Authorization header, as AWS
    # intends); the provider's records must show neither part, and nothing may show the secret.
    provider_log = "\n".join(
        record.getMessage() for record in caplog.records if "cxpg" in record.name or record.name.startswith("airflow")
    )
    # (Airflow's structlog may print the provider's events instead of handing them to caplog)
    assert "chunk.commit" in provider_log + out + err, "the provider's log was not captured"
    texts = {
        "manifest": manifest_text,
        "summary": json.dumps(result.summary(), default=str),
        "result repr": repr(result),
        "query log": query_log.read_text(),
        "provider log": provider_log,
    }
    assert texts["query log"], "the query log should not be empty"
    for where, text in texts.items():
        for form in secret_forms():
            assert form not in text, f"credential found in {where}"
    # Raw process output and every logger at DEBUG include botocore's own lines (the key id, by design)
    for where, text in {"stdout": out, "stderr": err, "Python log (any logger, DEBUG)": caplog.text}.items():
        for form in secret_forms()[1:]:
            assert form not in text, f"secret key found in {where}"
    assert_nothing_left(admin)


# -- failures -------------------------------------------------------------------------------------------


def test_refused_part_upload_raises_storage_error_and_leaves_no_part_object(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    s3: S3Server,
    bucket: str,
    source: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The store accepts the manifest but refuses every Parquet object (AccessDenied)."""
    key, secret = s3.restricted_user(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "s3:*",
                    "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                },
                {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/denied/*.parquet"},
            ],
        }
    )
    with s3.enforce_iam(), pytest.raises(StorageError) as failure:
        hook.extract(
            destination=f"s3://{bucket}/denied/run1",
            table=source,
            chunk_rows=CHUNK_ROWS,
            storage_options=s3.storage_options(key=key, secret=secret),
        )
    message = str(failure.value)
    assert "chunk 0" in message or "part-000000" in message, message
    assert "denied" in message.lower() or "forbidden" in message.lower(), message
    assert secret not in message and secret not in capfd.readouterr().err

    keys = s3.keys(bucket, "denied/")
    assert keys == ["denied/run1/_manifest.json"], keys  # no part object, complete or partial
    manifest = json.loads(s3_filesystem(s3).cat_file(f"{bucket}/denied/run1/_manifest.json"))
    assert manifest["status"] == "failed" and manifest["chunks"] == []
    assert secret not in json.dumps(manifest)
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert_nothing_left(admin)


def test_destination_in_a_bucket_that_does_not_exist_fails_without_creating_it(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, s3: S3Server, source: str
) -> None:
    missing = "cxpg-missing-" + os.urandom(4).hex()
    try:
        with pytest.raises(StorageError, match=missing):
            hook.extract(
                destination=f"s3://{missing}/prefix/run1",
                table=source,
                chunk_rows=CHUNK_ROWS,
                storage_options=s3.storage_options(),
            )
        assert not s3.bucket_exists(missing), "the extraction created the bucket"
    finally:
        assert_nothing_left(admin)


def test_ambient_environment_credentials_reach_the_worker_that_uploads_parts(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    s3: S3Server,
    bucket: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    try:
        result = hook.extract(
            destination=f"s3://{bucket}/envcreds/run1",
            table=source,
            chunk_rows=CHUNK_ROWS,
            storage_options={"client_kwargs": {"endpoint_url": s3.endpoint}},  # no key/secret: the env has them
        )
        assert result.summary()["rows"] == ROWS
    finally:
        assert_nothing_left(admin)


def test_a_silent_credentials_service_fails_the_run_in_control_timeout_before_any_data_moves(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    s3: S3Server,
    bucket: str,
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Web identity (IRSA) credentials, their STS endpoint accepting connections and never answering.

    botocore fetches them on first use and retries a silent endpoint for minutes (a 60 s read timeout
    per attempt): the first resolution, not only each chunk's renewal, runs under ``control_timeout``.
    """
    silent = socket.create_server(("127.0.0.1", 0))  # listens, never accepts: requests hang
    token = tmp_path / "web-identity-token"
    token.write_text("token")
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/extract",
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
        "AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="credentials service does not answer"):
            hook.extract(
                destination=f"s3://{bucket}/irsa/run1",
                table=source,
                storage_options={"client_kwargs": {"endpoint_url": s3.endpoint}},
                control_timeout=2,
            )
        assert time.monotonic() - started < 15
        assert not s3.keys(bucket, "irsa")
    finally:
        silent.close()
        assert_nothing_left(admin)
