"""Keyset paging is exact for every key type: each value becomes a chunk boundary and round-trips.

Each keyed table holds awkward key values plus ``rn``, the row's rank in the server's own
``ORDER BY key``. With ``chunk_rows=3`` nearly every value is the last key of some chunk, so it is
rendered by :func:`airflow_provider_cxpg.planning.sql.literal` and sent back to the server as the next lower
bound. The output's ``rn`` column must then read exactly 1..n in chunk order (ascending, nothing
repeated, nothing missing) and every key value must equal what psycopg reads.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import random
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_provider_cxpg.exceptions import (
    CxpgError,
    DataIntegrityError,
    InvalidInputError,
    InvalidKeyError,
    SourceNotFoundError,
)
from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
from airflow_provider_cxpg.planning.sql import literal
from tests.helpers import PgInfo, assert_nothing_left, manifest_of, read_output

pytestmark = pytest.mark.integration

SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3"
CHUNK_ROWS = 3
JOB_TIMEOUT = 30.0  # a keyset that stops advancing must fail the test, not hang it

_rng = random.Random(20240229)


def _fill(values: list[str], make: Any, count: int = 50) -> tuple[str, ...]:
    """``values`` plus generated distinct fillers up to ``count`` (deterministic)."""
    out = list(dict.fromkeys(values))
    while len(out) < count:
        candidate = make()
        if candidate not in out:
            out.append(candidate)
    return tuple(out)


def _micro_ts() -> str:
    base = dt.datetime(2020, 1, 1) + dt.timedelta(microseconds=_rng.randrange(0, 10**12))
    return base.isoformat(sep=" ", timespec="microseconds")


TEXT_KEYS = (
    "",
    " ",
    "  ",
    "a",
    "A",
    "a ",
    " a",
    "Ab",
    "aB",
    "AB",
    "ab",
    "it's",
    "''",
    "'",
    "\\",
    "\\\\",
    "back\\slash",
    "ends with backslash\\",
    'double"quote',
    "tab\tsep",
    "new\nline",
    "crlf\r\n",
    "ü",
    "u",
    "é",
    "e\u0301",
    "日本語",
    "🎉",
    "🎉🎉",
    "😀 smile",
    "zero\u200bwidth",
    "nbsp\u00a0",
    "%",
    "_",
    "$1",
    "$$",
    "$tag$",
    "--comment",
    "/* c */",
    "'); DROP TABLE x; --",
    "NULL",
    "null",
    "E'\\x41'",
    "1",
    "10",
    "2",
    "~",
    "\x7f",
    "\x01control",
    "z" * 300,
)

NUMERIC_KEYS = _fill(
    [
        "0",
        "0.1",
        "0.10000000000000000000001",
        "0.33333333333333333333",
        "1e-20",
        "-5",
        "-5.000000000000000000001",
        "123456789012345678901234567890.123456789",
        "1e100",
        "-1e100",
        "NaN",
        "Infinity",
        "-Infinity",
        "1.500",
        "99999999999999999999999999999999999999",
        "-0.000000000000000000000000000001",
        "0.14285714285714285714285714285714285714",
        "7",
        "7.0000001",
    ],
    lambda: f"{_rng.choice('-+')}{_rng.randrange(10 ** _rng.randrange(1, 25))}.{_rng.randrange(10**20):020d}",
)


@dataclass(frozen=True)
class KeyCase:
    """One key type: its SQL type, the text forms of its values, and how to compare a value."""

    id: str
    sql_type: str
    texts: tuple[str, ...]
    kind: str  # int | float4 | float8 | text_form | decimal | plain | str | uuid | tstz


KEY_CASES = (
    KeyCase(
        "smallint",
        "smallint",
        _fill(["-32768", "32767", "0", "1", "-1"], lambda: str(_rng.randrange(-32768, 32768))),
        "int",
    ),
    KeyCase(
        "integer",
        "integer",
        _fill(["-2147483648", "2147483647", "0", "1", "-1"], lambda: str(_rng.randrange(-(2**31), 2**31))),
        "int",
    ),
    KeyCase(
        "bigint",
        "bigint",
        _fill(
            ["-9223372036854775808", "9223372036854775807", "0", "1", "-1", "9007199254740993", "-9007199254740993"],
            lambda: str(_rng.randrange(-(2**63), 2**63)),
        ),
        "int",
    ),
    KeyCase(
        "oid",
        "oid",
        _fill(["0", "1", "2147483647", "2147483648", "4294967295"], lambda: str(_rng.randrange(0, 2**32))),
        "int",
    ),
    KeyCase("numeric", "numeric", NUMERIC_KEYS, "text_form"),
    KeyCase(
        "numeric_12_2",
        "numeric(12,2)",
        _fill(
            ["-9999999999.99", "9999999999.99", "0", "0.01", "-0.01", "1.5", "100"],
            lambda: f"{_rng.randrange(-(10**12) + 1, 10**12) / 100:.2f}",
        ),
        "decimal",
    ),
    KeyCase(
        "double",
        "double precision",
        _fill(
            [
                "0",
                "0.1",
                "0.2",
                "0.30000000000000004",
                "5e-324",
                "-5e-324",
                "1.7976931348623157e308",
                "-1.7976931348623157e308",
                "Infinity",
                "-Infinity",
                "NaN",
                "1e-300",
                "2.2250738585072014e-308",
                "9007199254740993",
            ],
            lambda: repr(_rng.uniform(-1e6, 1e6) * 10 ** _rng.randrange(-30, 30)),
        ),
        "float8",
    ),
    KeyCase(
        "real",
        "real",
        _fill(
            [
                "0",
                "0.1",
                "3.4028235e38",
                "-3.4028235e38",
                "1.4e-45",
                "-1.4e-45",
                "NaN",
                "Infinity",
                "-Infinity",
                "16777216",
                "0.2",
            ],
            lambda: repr(struct.unpack("<f", struct.pack("<f", _rng.uniform(-1e6, 1e6)))[0]),
        ),
        "float4",
    ),
    KeyCase("text", "text", TEXT_KEYS, "str"),
    KeyCase("varchar", "varchar(400)", TEXT_KEYS, "str"),
    KeyCase(
        "char5",
        "char(5)",
        _fill(
            ["", "a", "A", " a", "it's", "\\", "ü", "🎉", "ab c", "x'\\y", "abcde"],
            lambda: "".join(_rng.choice("aB' \\ü🎉") for _ in range(_rng.randrange(1, 6))).rstrip() or "q",
            count=30,
        ),
        "str",
    ),
    KeyCase(
        "uuid",
        "uuid",
        _fill(
            [
                "00000000-0000-0000-0000-000000000000",
                "ffffffff-ffff-ffff-ffff-ffffffffffff",
                "7fffffff-ffff-ffff-ffff-ffffffffffff",
                "80000000-0000-0000-0000-000000000000",
            ],
            lambda: str(uuid.UUID(int=_rng.getrandbits(128))),
        ),
        "uuid",
    ),
    KeyCase(
        "bytea",
        "bytea",
        _fill(
            ["\\x", "\\x00", "\\x0000", "\\x01", "\\x7f", "\\x80", "\\xff", "\\xffff", "\\x2720", "\\x5c"],
            lambda: "\\x" + _rng.randbytes(_rng.randrange(1, 6)).hex(),
        ),
        "plain",
    ),
    KeyCase(
        "date",
        "date",
        _fill(
            ["0001-01-01", "9999-12-31", "2000-02-29", "1970-01-01", "1969-12-31", "1582-10-15", "1582-10-04"],
            lambda: (dt.date(1, 1, 1) + dt.timedelta(days=_rng.randrange(3_652_058))).isoformat(),
        ),
        "plain",
    ),
    KeyCase(
        "time",
        "time",
        _fill(
            [
                "00:00:00",
                "00:00:00.000001",
                "00:00:00.000002",
                "12:00:00",
                "11:59:59.999999",
                "23:59:59.999999",
                "23:59:59.999998",
            ],
            lambda: (
                (dt.datetime(2000, 1, 1) + dt.timedelta(microseconds=_rng.randrange(86_400 * 10**6))).time().isoformat()
            ),
        ),
        "plain",
    ),
    KeyCase(
        "timestamp",
        "timestamp",
        _fill(
            [
                "2020-01-01 00:00:00",
                "2020-01-01 00:00:00.000001",
                "2020-01-01 00:00:00.000002",
                "2019-12-31 23:59:59.999999",
                "1969-12-31 23:59:59.999999",
                "1970-01-01 00:00:00",
                "1970-01-01 00:00:00.000001",
                "0001-01-01 00:00:00",
                "9999-12-31 23:59:59.999999",
                "9999-12-31 23:59:59.999998",
            ],
            _micro_ts,
        ),
        "plain",
    ),
    KeyCase(
        "timestamptz",
        "timestamptz",
        _fill(
            [
                "2020-01-01 00:00:00+00",
                "2020-01-01 00:00:00.000001+00",
                "2020-01-01 05:30:00.000002+05:30",
                "2019-12-31 13:00:00.000003-11",
                "2019-12-31 23:59:59.999999+00",
                "1969-12-31 23:59:59.999999+00",
                "1970-01-01 00:00:00+00",
                "0001-01-01 00:00:00+00",
                "9999-12-31 23:59:59.999999+00",
                "2024-03-10 02:30:00.000001-05",
            ],
            lambda: _micro_ts() + _rng.choice(["+00", "+14", "-12", "+05:45"]),
        ),
        "tstz",
    ),
)

ENUM_LABELS = (
    "zeta",
    "alpha",
    "",
    "it's",
    "back\\slash",
    'dq"',
    "ü",
    "🎉",
    " spaced ",
    "Case",
    "case",
    "CASE",
    "'); DROP TABLE x; --",
    "NULL",
    *(f"label {i:02d}" for i in range(40, 0, -1)),
)


# -- fixtures and helpers -----------------------------------------------------------------------------


@pytest.fixture
def hook(conn_id: str) -> ConnectorXPostgresHook:
    return ConnectorXPostgresHook(postgres_conn_id=conn_id)


@pytest.fixture
def pgsession(pg: PgInfo) -> Iterator[psycopg.Connection]:
    """psycopg with the provider's session settings: the reference reader."""
    with psycopg.connect(pg.dsn, autocommit=True, options=SESSION_OPTIONS) as conn:
        yield conn


def create_keyed_table(
    admin: psycopg.Connection, schema: str, keys: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]]
) -> str:
    """``"schema".t``: key columns built from text forms, ``rn`` = rank in the server's ORDER BY key."""
    names = [name for name, _ in keys]
    admin.execute(f'CREATE TABLE "{schema}".src ({", ".join(f"{n} {t}" for n, t in keys)})')
    arrays = [[row[i] for row in rows] for i in range(len(keys))]
    unnest = ", ".join(["%s::text[]"] * len(keys))
    casts = ", ".join(f"u.c{i}::{t}" for i, (_, t) in enumerate(keys))
    aliases = ", ".join(f"c{i}" for i in range(len(keys)))
    admin.execute(f'INSERT INTO "{schema}".src SELECT {casts} FROM unnest({unnest}) AS u({aliases})', arrays)
    order = ", ".join(names)
    admin.execute(
        f'CREATE TABLE "{schema}".t AS SELECT {order}, (row_number() OVER (ORDER BY {order}))::int AS rn, '
        f"'row ' || (row_number() OVER (ORDER BY {order})) AS payload FROM \"{schema}\".src"
    )
    admin.execute(f'ALTER TABLE "{schema}".t ADD PRIMARY KEY ({order})')
    return f"{schema}.t"


def _float_bits(value: float, fmt: str) -> bytes | str:
    return "nan" if math.isnan(value) else struct.pack(fmt, value)


def same_key(kind: str, got: Any, want: Any) -> bool:
    if kind == "float4":
        return _float_bits(got, "<f") == _float_bits(want, "<f")
    if kind == "float8":
        return _float_bits(got, "<d") == _float_bits(want, "<d")
    if kind == "uuid":
        return got == str(want)
    if kind == "tstz":
        return got.utcoffset() == dt.timedelta(0) and got == want
    if kind == "decimal":
        return got == want and got.as_tuple().exponent == want.as_tuple().exponent
    return type(got) is type(want) and got == want


def assert_exact_keyset_copy(
    out_dir: Path, pgsession: psycopg.Connection, table: str, keys: Sequence[tuple[str, str, str]], n: int
) -> None:
    """Output rows are the source rows, once each, in ascending key order across chunks.

    :param keys: ``(column, reference select expression, comparison kind)`` per key column.
    """
    output = read_output(out_dir)
    assert output.num_rows == n
    assert output.column("rn").to_pylist() == list(range(1, n + 1)), "rows out of order, repeated or missing"
    schema, name = table.split(".")
    reference = pgsession.execute(
        f'SELECT {", ".join(expr for _, expr, _ in keys)} FROM "{schema}"."{name}" ORDER BY rn'
    ).fetchall()
    for position, (column, _, kind) in enumerate(keys):
        got = output.column(column).to_pylist()
        bad = [(g, r[position]) for g, r in zip(got, reference, strict=True) if not same_key(kind, g, r[position])]
        assert bad == [], f"{column}: {bad[:5]}"
    manifest = manifest_of(out_dir)
    assert manifest["status"] == "complete" and manifest["rows"] == n
    sizes = [c["rows"] for c in manifest["chunks"]]
    assert sum(sizes) == n and all(s == CHUNK_ROWS for s in sizes[:-1]) and 0 < sizes[-1] <= CHUNK_ROWS
    assert len({c["file"] for c in manifest["chunks"]}) == len(sizes)
    pg_types = {c["name"]: c["pg_type"] for c in manifest["schema"]}
    assert_every_value_is_an_exact_boundary(
        pgsession, table, {column: (output.column(column).to_pylist(), pg_types[column]) for column, _, _ in keys}
    )


def assert_every_value_is_an_exact_boundary(
    pgsession: psycopg.Connection, table: str, keys: dict[str, tuple[list[Any], str]]
) -> None:
    """Each output key value, rendered by ``literal`` as a chunk boundary would be, finds its own row
    with ``=`` and starts the next page exactly at the following row with ``>``.

    ``chunk_rows=3`` makes only every third value a real boundary; this checks all of them in one query.
    """
    schema, name = table.split(".")
    columns = list(keys)
    n = len(next(iter(keys.values()))[0])
    tuples = []
    for i in range(n):
        literals = ", ".join(literal(keys[c][0][i], keys[c][1]) for c in columns)
        tuples.append(f"({i + 1}, ROW({literals}))")
    target = f"ROW({', '.join(f't.{c}' for c in columns)})"
    rows = pgsession.execute(
        f'SELECT v.rn, (SELECT count(*) FROM "{schema}"."{name}" t WHERE {target} = v.key), '
        f'(SELECT min(t.rn) FROM "{schema}"."{name}" t WHERE {target} > v.key) '
        f"FROM (VALUES {', '.join(tuples)}) AS v(rn, key) ORDER BY v.rn"
    ).fetchall()
    expected = [(i, 1, i + 1 if i < n else None) for i in range(1, n + 1)]
    assert [tuple(r) for r in rows] == expected


def _reference_expr(column: str, kind: str) -> str:
    return f"{column}::text" if kind == "text_form" else column


# -- one key column per type ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", KEY_CASES, ids=[c.id for c in KEY_CASES])
def test_single_column_key_pages_exactly_with_every_value_a_boundary(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
    case: KeyCase,
) -> None:
    table = create_keyed_table(admin, schema, [("k", case.sql_type)], [(t,) for t in case.texts])
    n = len(case.texts)
    result = hook.extract(destination=str(out_dir), table=table, chunk_rows=CHUNK_ROWS, job_timeout=JOB_TIMEOUT)
    assert result.summary()["rows"] == n
    assert manifest_of(out_dir)["key_columns"] == ["k"]
    assert_exact_keyset_copy(out_dir, pgsession, table, [("k", _reference_expr("k", case.kind), case.kind)], n)
    assert_nothing_left(admin)


def test_enum_key_pages_in_declaration_order_with_a_hostile_type_name(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
) -> None:
    type_name = f'"{schema}"."Mood ""x""; --"'
    labels = ", ".join(psycopg.sql.Literal(label).as_string(admin) for label in ENUM_LABELS)
    admin.execute(f"CREATE TYPE {type_name} AS ENUM ({labels})")
    # labels added later get fractional sort positions, between and before existing ones
    admin.execute(f"ALTER TYPE {type_name} ADD VALUE 'mid''dle' BEFORE 'alpha'")
    admin.execute(f"ALTER TYPE {type_name} ADD VALUE 'first' BEFORE 'zeta'")
    all_labels = [*ENUM_LABELS, "mid'dle", "first"]
    table = create_keyed_table(admin, schema, [("k", type_name)], [(label,) for label in all_labels])
    hook.extract(destination=str(out_dir), table=table, chunk_rows=CHUNK_ROWS, job_timeout=JOB_TIMEOUT)
    assert_exact_keyset_copy(out_dir, pgsession, table, [("k", "k::text", "str")], len(all_labels))
    order = read_output(out_dir).column("k").to_pylist()
    assert order[:3] == ["first", "zeta", "mid'dle"]  # the enum's order, not alphabetical
    assert_nothing_left(admin)


# -- composite keys ---------------------------------------------------------------------------------------


def test_composite_text_timestamptz_key_pages_exactly(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
) -> None:
    texts = ["", "a", "A", "it's", "back\\slash"]
    stamps = [
        "2020-01-01 00:00:00+00",
        "2020-01-01 00:00:00.000001+00",
        "2020-01-01 00:00:00.000002+00",
        "2020-01-01 05:30:00.000003+05:30",
        "2019-12-31 23:59:59.999999+00",
        "1970-01-01 00:00:00+00",
        "0001-01-01 00:00:00+00",
        "9999-12-31 23:59:59.999999+00",
        "2024-03-10 02:30:00.000001-05",
        "2024-03-10 07:30:00.000002+00",
    ]
    rows = [(a, b) for a in texts for b in stamps]
    table = create_keyed_table(admin, schema, [("a", "text"), ("b", "timestamptz")], rows)
    hook.extract(destination=str(out_dir), table=table, chunk_rows=CHUNK_ROWS, job_timeout=JOB_TIMEOUT)
    assert manifest_of(out_dir)["key_columns"] == ["a", "b"]
    assert_exact_keyset_copy(out_dir, pgsession, table, [("a", "a", "str"), ("b", "b", "tstz")], len(rows))
    assert_nothing_left(admin)


def test_composite_int_uuid_key_pages_exactly(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
) -> None:
    ints = ["-2147483648", "-1", "0", "1", "2147483647"]
    uuids = [
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        *(str(uuid.UUID(int=_rng.getrandbits(128))) for _ in range(8)),
    ]
    rows = [(a, b) for a in ints for b in uuids]
    table = create_keyed_table(admin, schema, [("a", "integer"), ("b", "uuid")], rows)
    hook.extract(destination=str(out_dir), table=table, chunk_rows=CHUNK_ROWS, job_timeout=JOB_TIMEOUT)
    assert manifest_of(out_dir)["key_columns"] == ["a", "b"]
    assert_exact_keyset_copy(out_dir, pgsession, table, [("a", "a", "int"), ("b", "b", "uuid")], len(rows))
    assert_nothing_left(admin)


def test_non_unique_key_choice_gets_the_primary_key_appended(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE TABLE "{schema}".t (id bigint PRIMARY KEY, grp text NOT NULL, v int)')
    admin.execute(
        f"INSERT INTO \"{schema}\".t SELECT g, (ARRAY['b', 'a', 'it''s', ''])[g % 4 + 1], g * 10 "
        "FROM generate_series(1, 40) g"
    )
    hook.extract(
        destination=str(out_dir),
        table=f"{schema}.t",
        key_columns=["grp"],
        chunk_rows=CHUNK_ROWS,
        job_timeout=JOB_TIMEOUT,
    )
    assert manifest_of(out_dir)["key_columns"] == ["grp", "id"]
    output = read_output(out_dir)
    got = list(zip(output.column("grp").to_pylist(), output.column("id").to_pylist(), strict=True))
    expected = admin.execute(f'SELECT grp, id FROM "{schema}".t ORDER BY grp, id').fetchall()
    assert got == [tuple(r) for r in expected]
    assert_nothing_left(admin)


def test_query_source_with_a_duplicate_key_at_a_chunk_boundary_fails_instead_of_losing_rows(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, out_dir: Path, tmp_path: Path
) -> None:
    # a query's key cannot be proven unique: each chunk reads one row more to check the boundary
    hook.extract(
        destination=str(out_dir),
        sql="SELECT g AS k FROM generate_series(1, 10) g",
        key_columns=["k"],
        chunk_rows=CHUNK_ROWS,
        job_timeout=JOB_TIMEOUT,
    )
    assert read_output(out_dir).column("k").to_pylist() == list(range(1, 11))
    # duplicates inside a chunk are harmless; a duplicate straddling chunks 0 and 1 would lose a row
    with pytest.raises(DataIntegrityError, match="not unique"):
        hook.extract(
            destination=str(tmp_path / "dup"),
            sql="SELECT k FROM unnest(ARRAY[1, 2, 3, 3, 4, 5]) AS u(k)",
            key_columns=["k"],
            chunk_rows=CHUNK_ROWS,
            job_timeout=JOB_TIMEOUT,
        )
    assert_nothing_left(admin)


def test_view_source_with_key_columns_is_extracted(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    admin.execute(f'CREATE VIEW "{schema}".v AS SELECT g AS k, g * 2 AS v FROM generate_series(1, 10) g')
    hook.extract(
        destination=str(out_dir), table=f"{schema}.v", key_columns=["k"], chunk_rows=CHUNK_ROWS, job_timeout=JOB_TIMEOUT
    )
    assert read_output(out_dir).column("k").to_pylist() == list(range(1, 11))
    assert_nothing_left(admin)


def test_keyset_is_exact_when_the_login_role_has_hostile_session_defaults(
    pg: PgInfo,
    admin: psycopg.Connection,
    pgsession: psycopg.Connection,
    schema: str,
    out_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Role defaults that change how literals and text forms read are overridden by the provider."""
    role = f"r_{uuid.uuid4().hex[:8]}"
    password = "pw-" + uuid.uuid4().hex
    admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
    try:
        for setting in (
            "standard_conforming_strings = off",
            "TimeZone = 'Pacific/Chatham'",
            "DateStyle = 'SQL, DMY'",
            "IntervalStyle = 'sql_standard'",
            "extra_float_digits = -15",
        ):
            admin.execute(f"ALTER ROLE {role} SET {setting}")
        conn_id = f"cxpg_hostile_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", pg.airflow_conn_json(login=role, password=password))
        texts = ["\\", "back\\slash", "it's", "ends\\", "\\'"]
        stamps = ["2020-01-01 00:00:00.000001+00", "2020-03-01 00:00:00+13:45", "1999-12-31 23:59:59.999999-12"]
        numbers = ["0.1", "0.30000000000000004", "NaN"]
        rows = [(a, b, c) for a in texts for b in stamps for c in numbers]
        table = create_keyed_table(
            admin, schema, [("a", "text"), ("b", "timestamptz"), ("c", "double precision")], rows
        )
        hook = ConnectorXPostgresHook(postgres_conn_id=conn_id)
        hook.extract(destination=str(out_dir), table=table, chunk_rows=CHUNK_ROWS, job_timeout=JOB_TIMEOUT)
        assert_exact_keyset_copy(
            out_dir, pgsession, table, [("a", "a", "str"), ("b", "b", "tstz"), ("c", "c", "float8")], len(rows)
        )
        assert_nothing_left(admin)
    finally:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        admin.execute(f"DROP ROLE IF EXISTS {role}")


# -- known bugs ---------------------------------------------------------------------------------------


def test_time_key_of_24_00_terminates_and_is_exact(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table = create_keyed_table(
        admin, schema, [("k", "time")], [(t,) for t in ["01:00", "23:00", "23:30", "24:00:00", "12:00"]]
    )
    try:
        hook.extract(destination=str(out_dir), table=table, chunk_rows=2, job_timeout=5)
    except DataIntegrityError as exc:  # acceptable: refused, naming the column
        assert "'k'" in str(exc)
        return
    finally:
        assert_nothing_left(admin)
    output = read_output(out_dir)
    assert output.column("rn").to_pylist() == [1, 2, 3, 4, 5]
    assert output.column("k").cast("int64").to_pylist()[-1] == 86_400_000_000


@pytest.mark.parametrize(("sql_type", "value"), [("date", "4713-01-01 BC"), ("timestamp", "10000-01-01 00:00:00")])
def test_key_outside_python_datetime_range_is_exact_or_clearly_refused(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    schema: str,
    out_dir: Path,
    sql_type: str,
    value: str,
) -> None:
    table = create_keyed_table(admin, schema, [("k", sql_type)], [(t,) for t in [value, "2000-01-01", "1999-01-01"]])
    try:
        hook.extract(destination=str(out_dir), table=table, chunk_rows=2, job_timeout=JOB_TIMEOUT)
    except CxpgError as exc:
        assert "'k'" in str(exc), f"the error does not name the key column: {type(exc).__name__}: {exc}"
        return
    finally:
        assert_nothing_left(admin)
    assert read_output(out_dir).column("rn").to_pylist() == [1, 2, 3]


# -- sql.literal round-trips through the server -----------------------------------------------------------------


LITERAL_CASES: list[tuple[Any, str]] = [
    (0, "smallint"),
    (-32768, "smallint"),
    (2**31 - 1, "integer"),
    (-(2**63), "bigint"),
    (2**63 - 1, "bigint"),
    (4294967295, "oid"),
    (True, "boolean"),
    (False, "boolean"),
    (0.1, "double precision"),
    (5e-324, "double precision"),
    (1.7976931348623157e308, "double precision"),
    (-0.0, "double precision"),
    (float("inf"), "double precision"),
    (float("-inf"), "double precision"),
    (float("nan"), "double precision"),
    (1e16, "double precision"),
    (0.30000000000000004, "double precision"),
    (struct.unpack("<f", struct.pack("<f", 0.1))[0], "real"),
    (3.4028234663852886e38, "real"),
    (Decimal("0.1"), "numeric"),
    (Decimal("1E-20"), "numeric"),
    (Decimal("-5"), "numeric"),
    (Decimal("123456789012345678901234567890.123456789"), "numeric"),
    (Decimal("1E+30"), "numeric"),
    (Decimal("1.500"), "numeric"),
    (Decimal("NaN"), "numeric"),
    (Decimal("9999999999.99"), "numeric(12,2)"),
    (Decimal("-0.01"), "numeric(12,2)"),
    ("", "text"),
    ("it's", "text"),
    ("\\", "text"),
    ("ends\\", "text"),
    ("\\'", "text"),
    ("'; DROP TABLE x; --", "text"),
    ("ünïcödé 日本語 🎉", "text"),
    ("tab\tnew\ncr\r", "text"),
    ("  spaces  ", "text"),
    ("$$dollar$$", "text"),
    ("E'\\x41'", "text"),
    ("abc", "varchar(10)"),
    ("ab", "character(5)"),
    (uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "uuid"),
    (uuid.UUID(int=0), "uuid"),
    (dt.date(1, 1, 1), "date"),
    (dt.date(9999, 12, 31), "date"),
    (dt.date(2000, 2, 29), "date"),
    (dt.time(0, 0), "time"),
    (dt.time(23, 59, 59, 999999), "time"),
    (dt.time(12, 0, 0, 1), "time"),
    (dt.datetime(1, 1, 1), "timestamp"),
    (dt.datetime(9999, 12, 31, 23, 59, 59, 999999), "timestamp"),
    (dt.datetime(2020, 1, 1, 0, 0, 0, 1), "timestamp"),
    (dt.datetime(1969, 12, 31, 23, 59, 59, 999999), "timestamp"),
    (dt.datetime(2020, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC), "timestamp with time zone"),
    (
        dt.datetime(2020, 1, 1, 5, 30, 0, 2, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        "timestamp with time zone",
    ),
    (
        dt.datetime(1901, 12, 13, 20, 45, 52, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-12))),
        "timestamp with time zone",
    ),
    (dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC), "timestamp with time zone"),
    (b"", "bytea"),
    (b"\x00", "bytea"),
    (b"\x00\xff'\\", "bytea"),
    (bytes(range(256)), "bytea"),
]


def _same_literal_value(value: Any, back: Any) -> bool:
    if isinstance(value, float):
        return (math.isnan(value) and math.isnan(back)) or struct.pack("<d", value) == struct.pack("<d", back)
    if isinstance(value, Decimal) and value.is_nan():
        return isinstance(back, Decimal) and back.is_nan()
    if isinstance(value, uuid.UUID):
        return back == value
    return type(back) is type(value) and back == value


@pytest.mark.parametrize(("value", "pg_type"), LITERAL_CASES, ids=[f"{t}-{v!r}"[:60] for v, t in LITERAL_CASES])
def test_literal_round_trips_through_the_server(pgsession: psycopg.Connection, value: Any, pg_type: str) -> None:
    text = literal(value, pg_type)
    # real is widened to double precision so the float32 value is read back exactly
    select = f"({text})::double precision" if pg_type == "real" else text
    row = pgsession.execute(f"SELECT {select}").fetchone()
    assert row is not None
    back = row[0]
    if pg_type == "character(5)":
        assert back == value.ljust(5)
    elif pg_type == "numeric(12,2)":
        assert back == value
    else:
        assert _same_literal_value(value, back), f"{text} read back as {back!r}"


def test_literal_of_none_is_a_typed_null(pgsession: psycopg.Connection) -> None:
    assert literal(None, "bigint") == "NULL::bigint"
    row = pgsession.execute(f"SELECT {literal(None, 'timestamp with time zone')} IS NULL").fetchone()
    assert row == (True,)


# -- hostile identifiers ----------------------------------------------------------------------------------------


def test_hostile_table_and_column_names_are_extracted_safely(
    hook: ConnectorXPostgresHook, admin: psycopg.Connection, schema: str, out_dir: Path
) -> None:
    table_name = 'x"; drop table y; --'
    quoted_table = '"' + table_name.replace('"', '""') + '"'
    admin.execute(f'CREATE TABLE "{schema}".y (canary int)')
    admin.execute(
        f'CREATE TABLE "{schema}".{quoted_table} ("k""ey" bigint PRIMARY KEY, "va""l; --" text, "Mixed Case.col" int)'
    )
    admin.execute(f'INSERT INTO "{schema}".{quoted_table} SELECT g, $$it\'s "$$ || g, -g FROM generate_series(1, 7) g')
    result = hook.extract(
        destination=str(out_dir), table=f'"{schema}".{quoted_table}', chunk_rows=2, job_timeout=JOB_TIMEOUT
    )
    assert result.summary()["rows"] == 7 and result.summary()["chunks"] == 4
    output = read_output(out_dir)
    assert output.column_names == ['k"ey', 'va"l; --', "Mixed Case.col"]
    assert output.column('k"ey').to_pylist() == list(range(1, 8))
    assert output.column('va"l; --').to_pylist() == [f"it's \"{g}" for g in range(1, 8)]
    assert manifest_of(out_dir)["key_columns"] == ['k"ey']
    assert admin.execute(f"SELECT to_regclass('\"{schema}\".y') IS NOT NULL").fetchone() == (True,)

    # the same names passed as columns and key_columns
    sub = out_dir / "subset"
    hook.extract(
        destination=str(sub),
        table=f'"{schema}".{quoted_table}',
        columns=['va"l; --'],
        key_columns=['k"ey'],
        chunk_rows=3,
        job_timeout=JOB_TIMEOUT,
    )
    assert read_output(sub).column_names == ['va"l; --', 'k"ey']
    assert_nothing_left(admin)


# -- bad input is refused before anything is written ------------------------------------------------------------


@pytest.fixture
def bad_input_table(admin: psycopg.Connection, schema: str) -> str:
    admin.execute(f'CREATE TABLE "{schema}".t (id bigint PRIMARY KEY, maybe int, doc json NOT NULL, note text)')
    admin.execute(f"""INSERT INTO "{schema}".t SELECT g, g, '{{}}', 'n' FROM generate_series(1, 5) g""")
    admin.execute(f'CREATE TABLE "{schema}".nokey (a int, b text)')
    return schema


BAD_INPUTS: list[tuple[str, dict[str, Any], type[InvalidInputError], str]] = [
    ("unknown_table", {"table": "{schema}.no_such_table"}, SourceNotFoundError, "no_such_table"),
    ("unknown_schema", {"table": "no_such_schema_xyz.t"}, SourceNotFoundError, "no_such_schema_xyz"),
    ("unknown_column", {"table": "{schema}.t", "columns": ["id", "nope"]}, SourceNotFoundError, "nope"),
    ("unknown_key_column", {"table": "{schema}.t", "key_columns": ["nope"]}, SourceNotFoundError, "nope"),
    ("nullable_key", {"table": "{schema}.t", "key_columns": ["maybe"]}, InvalidKeyError, "maybe"),
    ("json_key", {"table": "{schema}.t", "key_columns": ["doc"]}, InvalidKeyError, "doc"),
    ("repeated_key", {"table": "{schema}.t", "key_columns": ["id", "id"]}, InvalidKeyError, "repeats"),
    ("no_key_at_all", {"table": "{schema}.nokey"}, InvalidKeyError, "key_columns"),
    ("chunk_rows_zero", {"table": "{schema}.t", "chunk_rows": 0}, InvalidInputError, "chunk_rows"),
    ("chunk_rows_negative", {"table": "{schema}.t", "chunk_rows": -3}, InvalidInputError, "chunk_rows"),
    ("chunk_rows_bool", {"table": "{schema}.t", "chunk_rows": True}, InvalidInputError, "chunk_rows"),
    ("chunk_bytes_zero", {"table": "{schema}.t", "chunk_bytes": 0}, InvalidInputError, "chunk_bytes"),
    ("stream_rows_negative", {"table": "{schema}.t", "stream_rows": -1}, InvalidInputError, "stream_rows"),
    ("restarts_negative", {"table": "{schema}.t", "max_worker_restarts": -1}, InvalidInputError, "max_worker_restarts"),
    ("unknown_codec", {"table": "{schema}.t", "compression": "zip"}, InvalidInputError, "compression"),
    ("bad_dictionary", {"table": "{schema}.t", "parquet_dictionary": "sometimes"}, InvalidInputError, "dictionary"),
    ("bad_where", {"table": "{schema}.t", "where": "no_such_col = 1"}, InvalidInputError, "no_such_col"),
    ("table_and_sql", {"table": "{schema}.t", "sql": "SELECT 1 AS id"}, InvalidInputError, "exactly one"),
    ("bad_identifier", {"table": "{schema}." + "x" * 64}, InvalidInputError, "63 bytes"),
]


@pytest.mark.parametrize(("kwargs", "error", "mentions"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_invalid_input_error_before_any_file_is_written(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    bad_input_table: str,
    tmp_path: Path,
    kwargs: dict[str, Any],
    error: type[InvalidInputError],
    mentions: str,
) -> None:
    destination = tmp_path / "never_created"
    resolved = {k: v.format(schema=bad_input_table) if isinstance(v, str) else v for k, v in kwargs.items()}
    resolved.setdefault("chunk_rows", 2)
    with pytest.raises(error) as failure:
        hook.extract(destination=str(destination), job_timeout=JOB_TIMEOUT, **resolved)
    assert isinstance(failure.value, InvalidInputError)
    assert mentions in str(failure.value)
    assert not destination.exists() or not any(destination.iterdir()), sorted(os.listdir(destination))
    assert_nothing_left(admin)


@pytest.mark.parametrize(
    ("sql_type", "values", "bound", "above"),
    [
        (
            "timestamp(0)",
            ["2024-01-01 10:00:00", "2024-01-01 10:00:01", "2024-01-01 10:00:02"],
            "2024-01-01 10:00:00.6",
            2,
        ),
        ("numeric(10,2)", ["1.00", "1.01", "1.02"], "1.005", 2),
    ],
)
def test_a_given_bound_is_compared_as_given_not_rounded_to_the_columns_modifier(
    hook: ConnectorXPostgresHook,
    admin: psycopg.Connection,
    schema: str,
    tmp_path: Path,
    sql_type: str,
    values: list[str],
    bound: str,
    above: int,
) -> None:
    """``'10:00:00.6'::timestamp(0)`` is 10:00:01: a bound cast with the modifier lost the row holding it."""
    from airflow_provider_cxpg.planning.incremental import WatermarkSpec

    table = f'"{schema}".bounded'
    admin.execute(f"CREATE TABLE {table} (k {sql_type} PRIMARY KEY, wm {sql_type} NOT NULL)")
    for value in values:
        admin.execute(f"INSERT INTO {table} VALUES (%s, %s)", (value, value))
    keyed = hook.extract(destination=str(tmp_path / "keys"), table=table, lower=[bound], chunk_rows=CHUNK_ROWS)
    windowed = hook.extract(
        destination=str(tmp_path / "window"), table=table, watermark=WatermarkSpec("wm", start=bound, one_off=True)
    )
    assert keyed.rows == windowed.rows == above  # both rows above the bound, the one rounding would drop included
    assert_nothing_left(admin)
