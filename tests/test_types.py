"""Type matrix against a real server: every common PostgreSQL type, value by value against psycopg.

Native columns are compared as Python values (floats bit for bit, numeric(p,s) as Decimal, timestamptz
as aware UTC datetimes, arrays as lists); columns the provider reads as text are compared with
``SELECT col::text`` read by psycopg under the same session settings the provider uses.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_cxpg.exceptions import (
    CxpgError,
    DataIntegrityError,
    ExtractionError,
    InvalidInputError,
    InvalidKeyError,
)
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from tests.helpers import PgInfo, assert_nothing_left, manifest_of, read_output

pytestmark = pytest.mark.integration

#: The session settings every provider connection uses (see conninfo.SESSION_SETTINGS).
SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3"


@dataclass(frozen=True)
class Col:
    """One matrix column.

    :param name: column name.
    :param sql_type: its declared type.
    :param arrow: the Arrow type the provider must write.
    :param kind: how to compare: a native kind (``int``, ``float4``, ...) or ``text`` (read as ``::text``).
    :param values: SQL expressions for the five non-NULL rows (ids 1, 2, 4, 5, 6; id 3 is all NULL).
    """

    name: str
    sql_type: str
    arrow: pa.DataType
    kind: str
    values: tuple[str, str, str, str, str]


MATRIX: tuple[Col, ...] = (
    Col("c_int2", "smallint", pa.int16(), "int", ("32767", "-32768", "0", "1", "-1")),
    Col("c_int4", "integer", pa.int32(), "int", ("2147483647", "-2147483648", "0", "42", "-7")),
    Col("c_int8", "bigint", pa.int64(), "int", ("9223372036854775807", "-9223372036854775808", "0", "1", "-1")),
    Col("c_float4", "real", pa.float32(), "float4", ("'3.4028235e38'", "'-1.4e-45'", "'0.1'", "'-0'", "'NaN'")),
    Col(
        "c_float8",
        "double precision",
        pa.float64(),
        "float8",
        ("'1.7976931348623157e308'", "'5e-324'", "'0.1'", "'-Infinity'", "'NaN'"),
    ),
    Col(
        "c_numeric",
        "numeric",
        pa.string(),
        "text",
        (
            "1/7::numeric",
            "'123456789012345678901234567890.123456789'",
            "'-0.000000000000000000001'",
            "'1.500'",
            "'NaN'",
        ),
    ),
    Col(
        "c_num_12_2",
        "numeric(12,2)",
        pa.decimal128(12, 2),
        "decimal",
        ("9999999999.99", "-9999999999.99", "0.01", "1.5", "0"),
    ),
    Col(
        "c_num_38_12",
        "numeric(38,12)",
        pa.string(),
        "text",
        ("'12345678901234567890123456.123456789012'", "'-0.000000000001'", "0", "1.5", "'-1'"),
    ),
    Col(
        "c_text",
        "text",
        pa.string(),
        "str",
        (
            "'héllo wörld ✓ 日本語 🎉'",
            "E'tab\\there\\nnewline\\r\\ncrlf'",
            "''",
            "$v$quote ' double \" backslash \\ end$v$",
            "'  padded  '",
        ),
    ),
    Col("c_varchar", "varchar(10)", pa.string(), "str", ("'abcdefghij'", "'ü'", "''", "'x y'", "'🎉🎉'")),
    Col("c_char", "char(5)", pa.string(), "str", ("'ab'", "'abcde'", "''", "'ü'", "' a'")),
    Col("c_bool", "boolean", pa.bool_(), "plain", ("true", "false", "true", "false", "true")),
    Col(
        "c_date",
        "date",
        pa.date32(),
        "plain",
        ("'0001-01-01'", "'9999-12-31'", "'2000-02-29'", "'1970-01-01'", "'1969-12-31'"),
    ),
    Col(
        "c_time",
        "time",
        pa.time64("us"),
        "plain",
        ("'00:00:00'", "'23:59:59.999999'", "'12:34:56.789012'", "'00:00:00.000001'", "'13:00'"),
    ),
    Col(
        "c_ts",
        "timestamp",
        pa.timestamp("us"),
        "plain",
        (
            "'0001-01-01 00:00:00'",
            "'9999-12-31 23:59:59.999999'",
            "'2000-02-29 12:34:56.789012'",
            "'1969-12-31 23:59:59.999999'",
            "'1970-01-01 00:00:00.000001'",
        ),
    ),
    Col(
        "c_tstz",
        "timestamptz",
        pa.timestamp("us", tz="UTC"),
        "tstz",
        (
            "'2024-03-10 02:30:00.000001-05'",
            "'1901-12-13 20:45:52.123456+00'",
            "'2038-01-19 03:14:07.999999+14'",
            "'1969-12-31 23:59:59.999999+00'",
            "'9999-12-31 23:59:59.999999+00'",
        ),
    ),
    Col(
        "c_interval",
        "interval",
        pa.string(),
        "text",
        (
            "'1 year 2 mons 3 days 04:05:06.789'",
            "'-1 days +02:00:00'",
            "'0'",
            "'178000000 years'",
            "'-00:00:00.000001'",
        ),
    ),
    Col(
        "c_timetz",
        "timetz",
        pa.string(),
        "text",
        ("'12:34:56.789+05:30'", "'00:00:00-15:59'", "'23:59:59.999999+00'", "'24:00:00+00'", "'01:02:03-01'"),
    ),
    Col(
        "c_uuid",
        "uuid",
        pa.string(),
        "uuid",
        (
            "'00000000-0000-0000-0000-000000000000'",
            "'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF'",
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            "'{12345678-1234-5678-1234-567812345678}'",
            "'00000000-0000-0000-0000-000000000001'",
        ),
    ),
    Col(
        "c_json",
        "json",
        pa.string(),
        "text",
        (
            '\'{"b": 1, "a": [1, 2.5, "x"]}\'',
            "'[]'",
            "'\"unicode ✓ \\u00e9\"'",
            "'null'",
            '\'{"nested": {"k": [true, false, null]}}\'',
        ),
    ),
    Col(
        "c_jsonb",
        "jsonb",
        pa.string(),
        "text",
        ("'{\"a\": 1}'", "'[1, \"two\", 3.5]'", "'\"s\"'", "'null'", '\'{"e": "", "q": "\\""}\''),
    ),
    Col(
        "c_bytea",
        "bytea",
        pa.large_binary(),
        "plain",
        ("'\\x00ff10'", "'\\x'", "'\\xdeadbeef'", "decode(repeat('ab', 1000), 'hex')", "'\\x00'"),
    ),
    Col(
        "c_int_arr",
        "int[]",
        pa.large_list(pa.int32()),
        "plain",
        ("'{1,NULL,3}'", "'{}'", "'{-2147483648,2147483647}'", "'{NULL}'", "'{0}'"),
    ),
    Col(
        "c_text_arr",
        "text[]",
        pa.large_list(pa.string()),
        "plain",
        ('\'{"a,b",NULL,"NULL","q\\"x","back\\\\slash"}\'', "'{}'", "'{\"\"}'", "'{\"ü ✓\"}'", "'{NULL,NULL}'"),
    ),
    Col(
        "c_uuid_arr",
        "uuid[]",
        pa.string(),
        "text",
        (
            "'{00000000-0000-0000-0000-000000000001,NULL}'",
            "'{}'",
            "'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'",
            "'{NULL}'",
            "'{}'",
        ),
    ),
    Col(
        "c_date_arr",
        "date[]",
        pa.string(),
        "text",
        ("'{2000-01-01,NULL,infinity}'", "'{}'", "'{0001-01-01}'", "'{-infinity}'", "'{1999-12-31,2000-01-01}'"),
    ),
    Col("c_enum", "mood", pa.string(), "str", ("'sad'", "'happy'", "'with space'", "'ü'", "'ok'")),
    Col(
        "c_inet",
        "inet",
        pa.string(),
        "text",
        ("'192.168.1.5/24'", "'::1'", "'10.0.0.1'", "'2001:db8::1/64'", "'0.0.0.0/0'"),
    ),
    Col(
        "c_cidr",
        "cidr",
        pa.string(),
        "text",
        ("'10.0.0.0/8'", "'::/0'", "'192.168.100.128/25'", "'2001:db8::/32'", "'1.2.3.4/32'"),
    ),
    Col("c_money", "money", pa.string(), "text", ("'12.34'", "'-92233720368547758.08'", "'0'", "'1000000'", "'0.01'")),
    Col(
        "c_macaddr",
        "macaddr",
        pa.string(),
        "text",
        (
            "'08:00:2b:01:02:03'",
            "'ff:ff:ff:ff:ff:ff'",
            "'00:00:00:00:00:00'",
            "'0800.2b01.0204'",
            "'01-02-03-04-05-06'",
        ),
    ),
    Col(
        "c_point",
        "point",
        pa.string(),
        "text",
        ("'(1.5,-2.25)'", "'(0,0)'", "'(1e300,-1e-300)'", "'(0.1,0.2)'", "'(-0,NaN)'"),
    ),
    Col(
        "c_tsvector",
        "tsvector",
        pa.string(),
        "text",
        ("'a fat cat sat'", "''", "$v$'quote''s':1A back\\\\slash$v$", "'ü:3 ✓'", "'x:1,2,3'"),
    ),
    Col("c_bit", "bit(4)", pa.string(), "text", ("B'1010'", "B'0000'", "B'1111'", "B'0001'", "B'1000'")),
    Col("c_varbit", "varbit", pa.string(), "text", ("B'1'", "B''", "B'101010'", "B'0'", "B'11111111111'")),
    Col("c_int4range", "int4range", pa.string(), "text", ("'[1,10)'", "'empty'", "'(,5]'", "'[3,)'", "'(,)'")),
    Col(
        "c_xml",
        "xml",
        pa.string(),
        "text",
        ("'<a x=\"1\">t &amp; u</a>'", "''", "'text only'", "'<?xml version=\"1.0\"?><r/>'", "'<b>ü ✓</b>'"),
    ),
    Col("c_char1", '"char"', pa.string(), "text", ("'x'", "'A'", "'1'", "'ü'", "' '")),
)
NON_NULL_IDS = (1, 2, 4, 5, 6)
ALL_IDS = (1, 2, 3, 4, 5, 6)
EXPECTED_SCHEMA = pa.schema([pa.field("id", pa.int64()), *(pa.field(c.name, c.arrow) for c in MATRIX)])


# -- fixtures and helpers -----------------------------------------------------------------------------


@pytest.fixture
def hook(conn_id: str) -> ConnectorXPostgresHook:
    return ConnectorXPostgresHook(postgres_conn_id=conn_id)


@pytest.fixture
def pgsession(pg: PgInfo) -> Iterator[psycopg.Connection]:
    """psycopg with the provider's session settings: the reference reader."""
    with psycopg.connect(pg.dsn, autocommit=True, options=SESSION_OPTIONS) as conn:
        yield conn


def server_has_libxml(admin: psycopg.Connection) -> bool:
    """xml values need a server built with libxml (pgserver's wheel is not); without it only NULLs."""
    try:
        admin.execute("SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:
        return False
    return True


def create_matrix(admin: psycopg.Connection, schema: str, *, rows: bool = True, name: str = "matrix") -> str:
    xml_ok = server_has_libxml(admin)
    admin.execute(f"CREATE TYPE \"{schema}\".mood AS ENUM ('sad', 'ok', 'happy', 'with space', 'ü')")
    admin.execute(f'SET search_path = "{schema}"')
    columns = ", ".join(f'"{c.name}" {c.sql_type}' for c in MATRIX)
    admin.execute(f'CREATE TABLE "{schema}"."{name}" (id bigint PRIMARY KEY, {columns})')
    if rows:
        for position, row_id in enumerate(NON_NULL_IDS):
            values = ", ".join(
                f"({'NULL' if c.sql_type == 'xml' and not xml_ok else c.values[position]})::{c.sql_type}"
                for c in MATRIX
            )
            admin.execute(f'INSERT INTO "{schema}"."{name}" VALUES ({row_id}, {values})')
        admin.execute(f'INSERT INTO "{schema}"."{name}" (id) VALUES (3)')
    admin.execute("RESET search_path")
    return f"{schema}.{name}"


def reference_rows(conn: psycopg.Connection, table: str, where: str = "true") -> list[dict[str, Any]]:
    """What psycopg reads: native columns as Python values, text-read and JSON columns as ``::text``."""
    schema, name = table.split(".")
    exprs = ['"id"'] + [
        f'"{c.name}"::text AS "{c.name}"' if c.kind in {"text", "json"} else f'"{c.name}"' for c in MATRIX
    ]
    cursor = conn.execute(f'SELECT {", ".join(exprs)} FROM "{schema}"."{name}" WHERE {where} ORDER BY id')
    names = [d.name for d in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _float_bits(value: float, fmt: str) -> bytes | str:
    return "nan" if math.isnan(value) else struct.pack(fmt, value)


def same_value(kind: str, got: Any, want: Any) -> bool:
    """Does the provider's value ``got`` equal psycopg's ``want`` for a column of ``kind``?"""
    if got is None or want is None:
        return got is None and want is None
    if kind == "float4":
        return _float_bits(got, "<f") == _float_bits(want, "<f")
    if kind == "float8":
        return _float_bits(got, "<d") == _float_bits(want, "<d")
    if kind == "int":
        return type(got) is int and got == want
    if kind == "decimal":
        return isinstance(got, Decimal) and got == want and got.as_tuple().exponent == want.as_tuple().exponent
    if kind == "tstz":
        return got.utcoffset() == dt.timedelta(0) and got == want
    if kind == "uuid":
        return got == str(want)
    if kind == "inet":
        return ipaddress.ip_interface(got) == ipaddress.ip_interface(str(want))
    if kind == "json":
        return json.loads(got, parse_float=Decimal) == json.loads(want, parse_float=Decimal)
    return type(got) is type(want) and got == want


def mismatches(table: pa.Table, reference: list[dict[str, Any]]) -> list[str]:
    """Every cell where ``table`` differs from ``reference`` (empty when identical)."""
    problems = []
    got_rows = table.to_pylist()
    if [r["id"] for r in got_rows] != [r["id"] for r in reference]:
        return [f"ids differ: {[r['id'] for r in got_rows]} != {[r['id'] for r in reference]}"]
    kinds = {c.name: c.kind for c in MATRIX}
    for got, want in zip(got_rows, reference, strict=True):
        for name, value in want.items():
            kind = kinds.get(name, "int")
            if name not in got:
                problems.append(f"column {name} missing")
            elif not same_value(kind, got[name], value):
                problems.append(f"id={want['id']} {name} ({kind}): got {got[name]!r}, want {value!r}")
    return problems


def part_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


# -- the matrix ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream_rows", [0, 1], ids=["whole-chunks", "streamed"])
def test_matrix_extract_equals_psycopg_value_by_value(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
    stream_rows: int,
) -> None:
    table = create_matrix(admin, schema)
    result = hook.extract(destination=str(out_dir), table=table, chunk_rows=2, stream_rows=stream_rows)
    assert_nothing_left(admin)

    summary = result.summary()
    assert summary["rows"] == 6 and summary["chunks"] == 3
    assert summary["first_key"] == [1] and summary["last_key"] == [6]
    manifest = manifest_of(out_dir)
    assert manifest["status"] == "complete"
    assert [c["rows"] for c in manifest["chunks"]] == [2, 2, 2]
    assert [p.name for p in part_files(out_dir)] == [c["file"] for c in manifest["chunks"]]

    output = read_output(out_dir)
    assert mismatches(output, reference_rows(pgsession, table)) == []


def test_matrix_parquet_schema_has_the_precise_arrow_types(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = create_matrix(admin, schema)
    hook.extract(destination=str(out_dir), table=table, chunk_rows=4)
    files = part_files(out_dir)
    assert len(files) == 2
    for file in files:
        written = pq.read_schema(file)
        assert written.names == EXPECTED_SCHEMA.names
        for field in EXPECTED_SCHEMA:
            assert written.field(field.name).type == field.type, field.name
    # spot checks the brief spells out
    written = pq.read_schema(files[0])
    assert written.field("c_num_12_2").type == pa.decimal128(12, 2)
    assert written.field("c_int2").type == pa.int16()
    assert written.field("c_tstz").type == pa.timestamp("us", tz="UTC")
    assert written.field("c_numeric").type == pa.string()
    # the manifest records the same plan, including which columns were read as text
    described = {c["name"]: c for c in manifest_of(out_dir)["schema"]}
    for col in MATRIX:
        assert described[col.name]["arrow_type"] == str(col.arrow), col.name
        assert described[col.name]["read_as"] == ("text" if col.kind == "text" else "native"), col.name
    assert_nothing_left(admin)


def test_matrix_unconstrained_numeric_is_never_rounded(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = create_matrix(admin, schema)
    hook.extract(destination=str(out_dir), table=table, chunk_rows=2)
    values = dict(
        zip(
            read_output(out_dir).column("id").to_pylist(),
            read_output(out_dir).column("c_numeric").to_pylist(),
            strict=True,
        )
    )
    assert values[1] == "0.14285714285714285714"
    assert values[2] == "123456789012345678901234567890.123456789"
    assert values[4] == "-0.000000000000000000001"
    assert values[5] == "1.500"  # trailing zeros (the value's scale) kept
    assert values[6] == "NaN"
    assert values[3] is None
    assert_nothing_left(admin)


def test_matrix_all_null_row_is_null_everywhere_and_empty_is_not_null(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = create_matrix(admin, schema)
    hook.extract(destination=str(out_dir), table=table, chunk_rows=2)
    rows = {r["id"]: r for r in read_output(out_dir).to_pylist()}
    assert all(v is None for k, v in rows[3].items() if k != "id")
    assert rows[4]["c_text"] == "" and rows[4]["c_varchar"] == ""
    assert rows[2]["c_bytea"] == b"" and rows[2]["c_int_arr"] == [] and rows[2]["c_text_arr"] == []
    assert rows[5]["c_json"] == "null" and rows[5]["c_jsonb"] == "null"  # JSON null is not SQL NULL
    assert rows[4]["c_text_arr"] == [""] and rows[6]["c_text_arr"] == [None, None]
    assert_nothing_left(admin)


def test_matrix_iter_chunks_gives_the_same_values(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, pgsession: psycopg.Connection, schema: str
) -> None:
    table = create_matrix(admin, schema)
    chunks = list(hook.iter_chunks(table=table, chunk_rows=2))
    assert [c.num_rows for c in chunks] == [2, 2, 2]
    for chunk in chunks:
        assert chunk.schema.equals(EXPECTED_SCHEMA), chunk.schema
    assert mismatches(pa.concat_tables(chunks), reference_rows(pgsession, table)) == []
    assert_nothing_left(admin)


def test_matrix_read_arrow_gives_the_same_values(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, pgsession: psycopg.Connection, schema: str
) -> None:
    table = create_matrix(admin, schema)
    schema_name, name = table.split(".")
    result = hook.read_arrow(f'SELECT * FROM "{schema_name}"."{name}" ORDER BY id')
    assert result.schema.equals(EXPECTED_SCHEMA), result.schema
    assert mismatches(result, reference_rows(pgsession, table)) == []
    assert_nothing_left(admin)


# -- empty sources --------------------------------------------------------------------------------------


def _assert_one_empty_typed_file(out_dir: Path, summary: dict[str, Any]) -> None:
    assert summary["rows"] == 0 and summary["chunks"] == 1
    assert summary["first_key"] is None and summary["last_key"] is None
    manifest = manifest_of(out_dir)
    assert manifest["status"] == "complete" and manifest["rows"] == 0
    assert [c["file"] for c in manifest["chunks"]] == ["part-000000.parquet"]
    files = part_files(out_dir)
    assert [f.name for f in files] == ["part-000000.parquet"]
    written = pq.read_table(files[0])
    assert written.num_rows == 0
    assert written.schema.equals(EXPECTED_SCHEMA), written.schema


def test_empty_table_gives_one_typed_parquet_file_with_zero_rows(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = create_matrix(admin, schema, rows=False)
    result = hook.extract(destination=str(out_dir), table=table, chunk_rows=2)
    _assert_one_empty_typed_file(out_dir, result.summary())
    assert_nothing_left(admin)


def test_empty_result_of_a_where_gives_one_typed_parquet_file_with_zero_rows(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = create_matrix(admin, schema)
    result = hook.extract(destination=str(out_dir), table=table, where="id < 0", chunk_rows=2)
    _assert_one_empty_typed_file(out_dir, result.summary())
    assert_nothing_left(admin)


def test_empty_table_through_iter_chunks_and_read_arrow_is_typed(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str
) -> None:
    table = create_matrix(admin, schema, rows=False)
    chunks = list(hook.iter_chunks(table=table, chunk_rows=2))
    assert sum(c.num_rows for c in chunks) == 0
    assert all(c.schema.equals(EXPECTED_SCHEMA) for c in chunks)
    schema_name, name = table.split(".")
    result = hook.read_arrow(f'SELECT * FROM "{schema_name}"."{name}"')
    assert result.num_rows == 0 and result.schema.equals(EXPECTED_SCHEMA)
    assert_nothing_left(admin)


# -- query sources and casts ------------------------------------------------------------------------------


def test_sql_source_with_key_columns_is_chunked_and_exact(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
) -> None:
    table = create_matrix(admin, schema)
    schema_name, name = table.split(".")
    query = (
        f"SELECT id, c_text, c_int4::bigint * 2 AS doubled, c_numeric, c_num_12_2, c_tstz "
        f'FROM "{schema_name}"."{name}" WHERE id <> 2'
    )
    result = hook.extract(destination=str(out_dir), sql=query, key_columns=["id"], chunk_rows=2)
    assert result.summary()["rows"] == 5 and result.summary()["chunks"] == 3
    assert manifest_of(out_dir)["key_columns"] == ["id"]
    output = read_output(out_dir)
    assert output.schema.field("doubled").type == pa.int64()
    assert output.schema.field("c_numeric").type == pa.string()
    assert output.schema.field("c_num_12_2").type == pa.decimal128(12, 2)
    expected = pgsession.execute(
        f"SELECT id, c_text, doubled, c_numeric::text, c_num_12_2, c_tstz FROM ({query}) q ORDER BY id"
    ).fetchall()
    got = [tuple(r.values()) for r in output.to_pylist()]
    assert got == [tuple(r) for r in expected]
    assert_nothing_left(admin)


def test_sql_source_without_key_columns_is_rejected_before_any_file(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = create_matrix(admin, schema)
    with pytest.raises(InvalidKeyError, match="key_columns"):
        hook.extract(destination=str(out_dir), sql=f"SELECT id, c_text FROM {table}", chunk_rows=2)
    assert part_files(out_dir) == []
    assert_nothing_left(admin)


def test_column_casts_to_text_read_the_servertext_form(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
) -> None:
    table = create_matrix(admin, schema)
    hook.extract(
        destination=str(out_dir),
        table=table,
        columns=["id", "c_int4", "c_jsonb", "c_ts"],
        column_casts={"c_int4": "text", "c_jsonb": "text", "c_ts": "text"},
        chunk_rows=2,
    )
    output = read_output(out_dir)
    assert output.schema.equals(
        pa.schema([("id", pa.int64()), ("c_int4", pa.string()), ("c_jsonb", pa.string()), ("c_ts", pa.string())])
    )
    expected = pgsession.execute(
        f"SELECT id, c_int4::text, c_jsonb::text, c_ts::text FROM {table} ORDER BY id"
    ).fetchall()
    assert [tuple(r.values()) for r in output.to_pylist()] == [tuple(r) for r in expected]
    described = {c["name"]: c for c in manifest_of(out_dir)["schema"]}
    assert described["c_int4"]["pg_type"] == "text"
    assert_nothing_left(admin)


def test_column_casts_keep_the_type_modifier_asked_for(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """``char(6)`` is not ``char(1)``, ``bit(8)`` not ``bit(1)``: a cast keeps its length, precision and scale."""
    table = f'"{schema}".casts'
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, code text, flags int, amount text, mark text)")
    admin.execute(f"INSERT INTO {table} VALUES (1, 'ABCDEF', 5, '12.345', 'x'), (2, 'AB', 255, '-0.5', NULL)")
    hook.extract(
        destination=str(out_dir),
        table=table,
        column_casts={"code": "char(6)", "flags": "bit(8)", "amount": "numeric(10,2)", "mark": "bpchar"},
        chunk_rows=1,
    )
    output = read_output(out_dir)
    assert output.column("code").to_pylist() == ["ABCDEF", "AB    "]
    assert output.column("mark").to_pylist() == ["x", None]
    assert output.schema.field("amount").type == pa.decimal128(10, 2)
    assert output.column("amount").to_pylist() == [Decimal("12.35"), Decimal("-0.50")]  # the server's rounding
    described = {c["name"]: c["pg_type"] for c in manifest_of(out_dir)["schema"]}
    assert described["code"] == "character(6)" and described["flags"] == "bit(8)"
    assert output.column("flags").to_pylist() == ["00000101", "11111111"]
    assert_nothing_left(admin)


def test_column_casts_to_a_domain_keep_its_checks(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """A result column reports a domain's base type: the cast must name the domain, or its CHECK is skipped."""
    table = f'"{schema}".checked'
    admin.execute(f'CREATE DOMAIN "{schema}".posint AS int CHECK (VALUE > 0)')
    admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n text)")
    admin.execute(f"INSERT INTO {table} VALUES (1, '5'), (2, '-1')")
    with pytest.raises(CxpgError, match="posint"):
        hook.extract(destination=str(out_dir), table=table, column_casts={"n": f"{schema}.posint"}, chunk_rows=1)
    assert_nothing_left(admin)


def test_column_casts_to_an_unknown_type_or_on_the_key_is_rejected(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = create_matrix(admin, schema)
    with pytest.raises(InvalidInputError, match="no_such_type"):
        hook.extract(destination=str(out_dir), table=table, column_casts={"c_int4": "no_such_type"})
    with pytest.raises(InvalidInputError, match="key column 'id'"):
        hook.extract(destination=str(out_dir), table=table, column_casts={"id": "text"})
    assert part_files(out_dir) == []
    assert_nothing_left(admin)


# -- values connectorx cannot represent ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql_type", "special"),
    [("timestamp", "infinity"), ("timestamp", "-infinity"), ("timestamptz", "infinity"), ("date", "-infinity")],
)
def test_infinite_timestamp_raises_data_integrity_error_naming_the_column_and_text_cast_reads_it(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    schema: str,
    out_dir: Path,
    tmp_path: Path,
    sql_type: str,
    special: str,
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, happened_at {sql_type})')
    admin.execute(
        f"INSERT INTO \"{schema}\".t SELECT g, '2020-01-01'::{sql_type} + g * interval '1 day' "
        "FROM generate_series(1, 6) g"
    )
    admin.execute(f"UPDATE \"{schema}\".t SET happened_at = '{special}' WHERE id = 5")  # in the third chunk
    with pytest.raises(DataIntegrityError) as failure:
        hook.extract(destination=str(out_dir), table=f"{schema}.t", chunk_rows=2)
    message = str(failure.value)
    assert "happened_at" in message and special in message and "column_casts" in message
    assert getattr(failure.value, "column", None) == "happened_at"
    assert manifest_of(out_dir)["status"] == "failed"
    assert_nothing_left(admin)

    ok_dir = tmp_path / "as_text"
    result = hook.extract(
        destination=str(ok_dir), table=f"{schema}.t", column_casts={"happened_at": "text"}, chunk_rows=2
    )
    assert result.summary()["rows"] == 6
    values = dict(zip(*read_output(ok_dir).select(["id", "happened_at"]).to_pydict().values(), strict=True))
    assert values[5] == special
    assert values[1].startswith("2020-01-02")
    assert_nothing_left(admin)


def test_numeric_nan_in_a_constrained_column_raises_instead_of_a_silent_value(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path, tmp_path: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, amount numeric(10,2))')
    admin.execute(f"INSERT INTO \"{schema}\".t VALUES (1, 1.25), (2, 'NaN'), (3, -3.5)")
    with pytest.raises(CxpgError) as failure:
        hook.extract(destination=str(out_dir), table=f"{schema}.t", chunk_rows=2)
    assert isinstance(failure.value, ExtractionError)
    assert "NaN" in str(failure.value)
    assert "part-000000.parquet" not in {c["file"] for c in manifest_of(out_dir)["chunks"]}
    assert_nothing_left(admin)

    ok_dir = tmp_path / "as_text"
    hook.extract(destination=str(ok_dir), table=f"{schema}.t", column_casts={"amount": "text"}, chunk_rows=2)
    assert read_output(ok_dir).column("amount").to_pylist() == ["1.25", "NaN", "-3.50"]
    assert_nothing_left(admin)


# -- values connectorx alone would lose or mangle: the provider must not -------------------------------------------


def test_numeric_nan_error_names_the_column_and_the_text_cast_remedy(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, note text, amount numeric(10,2))')
    admin.execute(f"INSERT INTO \"{schema}\".t VALUES (1, 'a', 1.25), (2, 'b', 'NaN')")
    try:
        with pytest.raises(DataIntegrityError) as failure:
            hook.extract(destination=str(out_dir), table=f"{schema}.t", chunk_rows=2)
        assert "'amount'" in str(failure.value) and "column_casts" in str(failure.value)
    finally:
        assert_nothing_left(admin)


def test_jsonb_numbers_keep_every_digit(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, doc jsonb, raw json)')
    doc = '{"pi": 3.14159265358979323846, "big": 12345678901234567890123, "tiny": 1.0000000000000000001}'
    admin.execute(f'INSERT INTO "{schema}".t VALUES (1, %s, %s)', (doc, doc))
    hook.extract(destination=str(out_dir), table=f"{schema}.t", chunk_rows=2)
    got = read_output(out_dir).to_pylist()[0]
    want_doc, want_raw = pgsession.execute(f'SELECT doc::text, raw::text FROM "{schema}".t').fetchone() or ()
    assert json.loads(got["doc"], parse_float=Decimal) == json.loads(want_doc, parse_float=Decimal)
    assert json.loads(got["raw"], parse_float=Decimal) == json.loads(want_raw, parse_float=Decimal)
    assert_nothing_left(admin)


def test_json_column_keeps_its_exact_stored_text(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, raw json)')
    raw = '{"b": 1, "a": [1, 2.50, 1e2], "a": "dup"}'
    admin.execute(f'INSERT INTO "{schema}".t VALUES (1, %s)', (raw,))
    hook.extract(destination=str(out_dir), table=f"{schema}.t", chunk_rows=2)
    assert read_output(out_dir).column("raw").to_pylist() == [raw]
    assert_nothing_left(admin)


def test_time_24_00_is_not_silently_turned_into_midnight(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, closes_at time)')
    admin.execute(f"INSERT INTO \"{schema}\".t VALUES (1, '00:00:00'), (2, '24:00:00')")
    try:
        hook.extract(destination=str(out_dir), table=f"{schema}.t", chunk_rows=2)
    except DataIntegrityError as exc:  # an acceptable outcome: refused, naming the column
        assert "closes_at" in str(exc)
        return
    finally:
        assert_nothing_left(admin)
    column = read_output(out_dir).column("closes_at")
    assert column.cast(pa.int64()).to_pylist() == [0, 86_400_000_000]


@pytest.mark.parametrize("stream_rows", [0, 2])
def test_an_array_whose_subscripts_do_not_start_at_1_is_not_written_as_another_value(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path, stream_rows: int
) -> None:
    """'[0:2]={1,2,3}' is not '{1,2,3}' in PostgreSQL; connectorx reads both as [1, 2, 3]: two values
    became one, green. Refused naming the column; read as text it is exact."""
    admin.execute(f'CREATE DOMAIN "{schema}".ints AS int[]')
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, a int4[], t text[], d "{schema}".ints)')
    admin.execute(
        f"INSERT INTO \"{schema}\".t VALUES (1, '{{1,2,3}}', '{{x,y}}', '{{7,8}}'), (2, NULL, '{{}}', NULL), "
        "(3, '{1,2,3}', '[5:6]={x,y}', '{7,8}'), (4, '[0:2]={1,2,3}', '{x}', '[-3:-2]={7,8}')"
    )
    source = f'"{schema}".t'
    with pytest.raises(DataIntegrityError, match=r"subscripts do not start at 1") as refused:
        hook.extract(destination=str(out_dir / "native"), table=source, chunk_rows=2, stream_rows=stream_rows)
    assert "a, t, d" in str(refused.value)
    casts = {"a": "text", "t": "text", "d": "text"}
    hook.extract(destination=str(out_dir / "text"), table=source, column_casts=casts, stream_rows=stream_rows)
    written = read_output(out_dir / "text").sort_by("id").to_pylist()
    expected = admin.execute(f"SELECT id, a::text, t::text, d::text FROM {source} ORDER BY id").fetchall()
    assert [(r["id"], r["a"], r["t"], r["d"]) for r in written] == [tuple(e) for e in expected]
    with pytest.raises(DataIntegrityError, match=r"subscripts do not start at 1"):  # a cast keeps the bounds
        hook.extract(
            destination=str(out_dir / "cast"), table=source, column_casts={"a": "int8[]", "t": "text", "d": "text"}
        )
    admin.execute(f"DELETE FROM {source} WHERE id > 2")  # arrays from 1 only: read natively, as before
    hook.extract(destination=str(out_dir / "plain"), table=source, stream_rows=stream_rows)
    assert read_output(out_dir / "plain").sort_by("id").column("a").to_pylist() == [[1, 2, 3], None]
    assert_nothing_left(admin)


def test_a_sql_ascii_database_is_read_and_bytes_that_are_not_utf8_fail_loudly(
    pg: Any, admin: psycopg.Connection, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a SQL_ASCII database psycopg returned the catalog's names as bytes: planning said the table
    does not exist (and redaction raised on bytes). The parent's connections now ask for UTF-8, as
    connectorx's do: UTF-8 text arrives exactly, other bytes fail naming the encoding."""
    from airflow_provider_cxpg.exceptions import QueryError

    admin.execute("DROP DATABASE IF EXISTS cxpg_sql_ascii")
    admin.execute("CREATE DATABASE cxpg_sql_ascii ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        with psycopg.connect(pg.dsn.rsplit("/", 1)[0] + "/cxpg_sql_ascii", autocommit=True) as db:
            db.execute("CREATE TABLE t (id int PRIMARY KEY, s text)")
            db.execute("INSERT INTO t VALUES (1, 'abc'), (2, E'h\\xc3\\xa9'), (3, '')")
        monkeypatch.setenv("AIRFLOW_CONN_CXPG_SQL_ASCII", pg.airflow_conn_json(schema="cxpg_sql_ascii"))
        hook = ConnectorXPostgresHook(postgres_conn_id="cxpg_sql_ascii")
        hook.extract(destination=str(out_dir / "utf8"), table="t", chunk_rows=2)
        assert read_output(out_dir / "utf8").sort_by("id").column("s").to_pylist() == ["abc", "hé", ""]
        with psycopg.connect(pg.dsn.rsplit("/", 1)[0] + "/cxpg_sql_ascii", autocommit=True) as db:
            db.execute("INSERT INTO t VALUES (4, E'\\xe9')")  # Latin-1 'é': not UTF-8
        with pytest.raises(QueryError, match="invalid byte sequence for encoding"):
            hook.extract(destination=str(out_dir / "latin1"), table="t", chunk_rows=2)
    finally:
        admin.execute("DROP DATABASE IF EXISTS cxpg_sql_ascii WITH (FORCE)")


def test_a_time_cast_of_24_00_is_refused_too(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    """The guard tests the expression read: a column in column_casts went unguarded, and its '24:00'
    arrived as midnight. (An int2vector, which is no array, is read as its text form.)"""
    admin.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, at time, v int2vector)')
    admin.execute(f"INSERT INTO \"{schema}\".t VALUES (1, '24:00', '1 2'), (2, '12:00', '3')")
    with pytest.raises(DataIntegrityError, match="24:00"):
        hook.extract(destination=str(out_dir / "cast"), table=f'"{schema}".t', column_casts={"at": "time(0)"})
    hook.extract(destination=str(out_dir / "text"), table=f'"{schema}".t', column_casts={"at": "text"})
    written = read_output(out_dir / "text").sort_by("id")
    assert written.column("at").to_pylist() == ["24:00:00", "12:00:00"]
    assert written.column("v").to_pylist() == ["1 2", "3"]  # int2vector: its text form
    assert_nothing_left(admin)
