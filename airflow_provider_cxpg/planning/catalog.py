"""What the server's catalog says about a source: columns, types, keys.

Runs in the parent on the psycopg control connection (see
:mod:`~airflow_provider_cxpg.supervisor.monitor`), before any data moves.
Every name reaches the server as a bind parameter or a quoted identifier, never spliced raw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from airflow_provider_cxpg.exceptions import (
    CxpgError,
    InvalidInputError,
    QueryError,
    QueryTimeoutError,
    ServerConnectionError,
    SourceNotFoundError,
)
from airflow_provider_cxpg.planning.pgtypes import PgType
from airflow_provider_cxpg.planning.sql import qualified, quote_ident

__all__ = [
    "SourceColumn",
    "TableInfo",
    "UniqueIndex",
    "classify_control_error",
    "describe_query",
    "describe_table",
    "numeric_typmod",
    "query_column_collation",
    "resolve_type",
]

#: query_canceled (statement_timeout) and lock_not_available (lock_timeout)
_TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})
#: SQLSTATE classes that say the query itself is wrong: feature not supported (0A), data exception
#: (22: a literal of the wrong type), invalid catalog or schema name (3D, 3F), syntax error or access
#: rule violation (42: an unknown column, a missing privilege), program limit exceeded (54).
_INPUT_SQLSTATE_CLASSES = ("0A", "22", "3D", "3F", "42", "54")

_RELKINDS = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view", "f": "foreign table"}

_TYPE_SQL = """
WITH RECURSIVE base(oid, typmod, depth) AS (
    SELECT %(oid)s::oid, %(typmod)s::int, 0
  UNION ALL
    SELECT t.typbasetype, t.typtypmod, b.depth + 1
    FROM base b JOIN pg_type t ON t.oid = b.oid
    WHERE t.typtype = 'd' AND b.depth < 10
)
SELECT t.typname, format_type(b.oid, NULLIF(b.typmod, -1)), t.typtype,
       e.typname AS element, b.typmod, format_type(b.oid, -1)
FROM base b
JOIN pg_type t ON t.oid = b.oid
LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' AND e.typarray = t.oid  -- a true array: not int2vector
WHERE t.typtype <> 'd'
ORDER BY b.depth DESC
LIMIT 1
"""


#: A collation as SQL names it (``"pg_catalog"."C"``) and whether it is deterministic, i.e. whether
#: its equality is byte equality. Nondeterministic (ICU) collations make 'a' = 'A' and sort them as ties.
_COLLATION_SQL = (
    "CASE WHEN {oid} <> 0 THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END, co.collisdeterministic"
)


@dataclass(frozen=True)
class SourceColumn:
    """One column of a source.

    :param not_null: True when the catalog guarantees no NULL; None when unknown (query sources).
    :param collation: the column's collation as SQL names it (None: not a collatable type, or unknown).
    :param deterministic: whether that collation's equality is byte equality (None: unknown).
    """

    name: str
    pg: PgType
    not_null: bool | None = None
    collation: str | None = None
    deterministic: bool | None = None


@dataclass(frozen=True)
class UniqueIndex:
    """A valid, total unique index (or the primary key) on plain columns.

    :param collations: per column, the collation the index compares it under (None: not collatable).
        The index proves uniqueness under *its* equality, which is what keyset paging must use.
    """

    columns: tuple[str, ...]
    collations: tuple[str | None, ...]
    primary: bool = False


@dataclass(frozen=True)
class TableInfo:
    """A table (or view) as the catalog describes it."""

    schema: str
    name: str
    kind: str
    columns: tuple[SourceColumn, ...]
    primary_key: tuple[str, ...] | None
    unique_keys: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    estimated_rows: int | None = None
    unique_indexes: tuple[UniqueIndex, ...] = field(default_factory=tuple)
    #: Rows of tables that inherit from this one (``INHERITS``, not partitions) are read with it, but
    #: its indexes do not cover them: they prove nothing unique across the children.
    inheritance_children: bool = False
    #: A foreign table among its partitions or children: those rows have no row versions (``xmin``).
    foreign_descendants: bool = False
    #: The OIDs of every partition and inheritance child below it, all levels (an incremental window
    #: reads those that arrived since the last one whole: their rows keep old watermarks and xmins).
    descendants: tuple[int, ...] = ()
    #: The relation's OID: another table of the same name (dropped and created again, or found first
    #: on another ``search_path``) is another source.
    oid: int | None = None
    #: Row-level security filters what this login reads of it (``row_security_active``).
    row_security: bool = False

    @property
    def indexes_cover_rows(self) -> bool:
        """Whether this relation's unique indexes hold for every row a ``SELECT`` from it returns."""
        return not self.inheritance_children

    @property
    def qualified_name(self) -> str:
        return qualified(self.schema, self.name)

    def column(self, name: str) -> SourceColumn:
        for col in self.columns:
            if col.name == name:
                return col
        raise SourceNotFoundError(
            f"column {name!r} does not exist in {self.schema}.{self.name} "
            f"(columns: {', '.join(c.name for c in self.columns)})",
            column=name,
        )

    def is_unique(self, key: tuple[str, ...]) -> bool:
        """True when some primary key or full unique index on NOT NULL columns lies within ``key``."""
        return self.proving_index(key) is not None

    def proving_index(self, key: tuple[str, ...]) -> UniqueIndex | None:
        """The index that proves ``key`` unique (its columns lie within ``key``), primary key first."""
        for index in self.unique_indexes:
            if set(index.columns) <= set(key):
                return index
        return None


#: An index key column whose operator class has another equality than its type's default btree
#: class (a custom class that tells ``1.0`` from ``1.00``): the index proves values distinct under
#: *its* equality, while paging compares with the type's default operators, under which two such rows
#: are one key, so a chunk's end between them lost the second. Such an index proves nothing here.
#: (``text_pattern_ops`` and its kin share ``=`` with the default class: they still prove.)
_OTHER_EQUALITY = (
    "SELECT 1 FROM unnest(i.indclass::oid[]) WITH ORDINALITY k(opc, ord) "
    "JOIN pg_opclass c ON c.oid = k.opc "
    "WHERE k.ord <= i.indnkeyatts AND ("
    "  SELECT o.amopopr FROM pg_amop o WHERE o.amopfamily = c.opcfamily AND o.amopstrategy = 3 "
    "    AND o.amoplefttype = c.opcintype AND o.amoprighttype = c.opcintype"
    ") IS DISTINCT FROM ("
    "  SELECT o.amopopr FROM pg_opclass d JOIN pg_amop o ON o.amopfamily = d.opcfamily AND o.amopstrategy = 3 "
    "    AND o.amoplefttype = d.opcintype AND o.amoprighttype = d.opcintype "
    "  WHERE d.opcmethod = c.opcmethod AND d.opcdefault AND d.opcintype = c.opcintype"
    ")"
)


def numeric_typmod(typmod: int) -> tuple[int, int]:
    """``(precision, scale)`` of a ``numeric(p, s)`` type modifier.

    The scale is an 11-bit two's complement field (PostgreSQL 15 allows ``-1000 <= s <= 1000``, so
    ``numeric(5, -2)`` and ``numeric(2, 5)`` exist), as ``NUMERIC_TYPMOD_SCALE`` in ``numeric.c``.
    """
    packed = typmod - 4  # VARHDRSZ
    return (packed >> 16) & 0xFFFF, ((packed & 0x7FF) ^ 1024) - 1024


def resolve_type(conn: Any, oid: int, typmod: int) -> PgType:
    """Describe a type by OID and modifier, following domains down to their base type."""
    row = conn.execute(_TYPE_SQL, {"oid": oid, "typmod": typmod}).fetchone()
    if row is None:
        raise InvalidInputError(f"unknown type oid {oid}")
    typname, sql_name, typtype, element, base_typmod, unmodified_name = row
    precision = scale = None
    if typname == "numeric" and base_typmod is not None and base_typmod >= 4:
        precision, scale = numeric_typmod(base_typmod)
    return PgType(
        typname=typname,
        sql_name=sql_name,
        typtype=typtype,
        unmodified_name=unmodified_name,
        element=element,
        precision=precision,
        scale=scale,
    )


_DESCENDANTS = """
WITH RECURSIVE tree(oid) AS (
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = %s
    UNION ALL
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.oid
)
SELECT count(*) > 0, coalesce(bool_or(c.relkind = 'f'), false),
    coalesce((SELECT array_agg(DISTINCT a.attname::text) FROM tree t JOIN pg_catalog.pg_attribute a
              ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.attnotnull), '{}'),
    coalesce(array_agg(tree.oid::bigint ORDER BY tree.oid), '{}')
FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid
"""


def describe_table(conn: Any, schema: str | None, name: str) -> TableInfo:
    """Look a table up (search_path applies when ``schema`` is None).

    :raises SourceNotFoundError: no such relation visible to the login.
    """
    target = qualified(schema, name)
    row = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, c.relkind, c.reltuples::bigint, row_security_active(c.oid) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass(%s)",
        (target,),
    ).fetchone()
    if row is None or row[3] not in _RELKINDS:
        where = f"schema {schema!r}" if schema else "the search_path"
        raise SourceNotFoundError(f"table {target} does not exist in {where} (or is not visible to this login)")
    relid, nspname, relname, relkind, reltuples, row_security = row
    children, foreign, nullable_below, descendants = conn.execute(_DESCENDANTS, (relid,)).fetchone()
    # NOT NULL is a promise only where the server enforces it: a foreign table's (or a foreign
    # partition's) rows come from elsewhere unchecked, and from PostgreSQL 18 a NOT VALID one
    # (pg_constraint contype 'n') leaves the rows that were there. An inheritance child may drop
    # the parent's NOT NULL (or, from PostgreSQL 18, never get a NO INHERIT one), and its rows are
    # read too. Unproven, the key gets probed.
    enforced = relkind in {"r", "p"} and not foreign
    type_cache: dict[tuple[int, int], PgType] = {}
    columns: list[SourceColumn] = []
    for attname, atttypid, atttypmod, attnotnull, collation, deterministic in conn.execute(
        "SELECT a.attname, a.atttypid, a.atttypmod, a.attnotnull AND NOT EXISTS ("
        "SELECT 1 FROM pg_constraint k WHERE k.conrelid = a.attrelid AND k.contype = 'n' "
        "AND k.conkey[1] = a.attnum AND NOT k.convalidated), "
        + _COLLATION_SQL.format(oid="a.attcollation")
        + " FROM pg_attribute a "
        "LEFT JOIN pg_collation co ON co.oid = a.attcollation "
        "LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (relid,),
    ).fetchall():
        key = (atttypid, atttypmod)
        if key not in type_cache:
            type_cache[key] = resolve_type(conn, atttypid, atttypmod)
        # A view's columns never carry NOT NULL: their nullability is unknown, not "nullable".
        not_null = bool(attnotnull) if enforced else None
        if not_null and attname in nullable_below:
            not_null = None
        columns.append(SourceColumn(attname, type_cache[key], not_null, collation, deterministic))
    not_null = {c.name for c in columns if c.not_null}
    primary: tuple[str, ...] | None = None
    uniques: list[tuple[str, ...]] = []
    indexes: list[UniqueIndex] = []
    # Only the key columns of an index (indnkeyatts): INCLUDE columns take no part in uniqueness.
    for is_primary, names, collations in conn.execute(
        "SELECT i.indisprimary, "
        "       array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
        "             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "             WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)::text[], "
        "       array(SELECT CASE WHEN k.coll <> 0 THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END "
        "             FROM unnest(i.indcollation::oid[]) WITH ORDINALITY k(coll, ord) "
        "             LEFT JOIN pg_collation co ON co.oid = k.coll "
        "             LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace "
        "             WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)::text[] "
        "FROM pg_index i "
        "WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid "
        "  AND i.indpred IS NULL AND i.indexprs IS NULL "
        f"  AND NOT EXISTS ({_OTHER_EQUALITY}) "
        "ORDER BY i.indisprimary DESC, i.indnatts, i.indexrelid",
        (relid,),
    ).fetchall():
        names = tuple(names)
        if is_primary:
            primary = names
        elif not set(names) <= not_null:  # a NULL-able unique index allows repeated NULLs
            continue
        else:
            uniques.append(names)
        indexes.append(UniqueIndex(names, tuple(collations), bool(is_primary)))
    return TableInfo(
        inheritance_children=relkind == "r" and bool(children),
        foreign_descendants=bool(foreign),
        schema=nspname,
        name=relname,
        kind=_RELKINDS[relkind],
        columns=tuple(columns),
        primary_key=primary,
        unique_keys=tuple(uniques),
        estimated_rows=int(reltuples) if reltuples is not None and reltuples >= 0 else None,
        unique_indexes=tuple(indexes),
        descendants=tuple(int(d) for d in descendants),
        oid=int(relid),
        row_security=bool(row_security),
    )


def query_column_collation(conn: Any, from_clause: str, expr: str) -> tuple[str | None, bool | None]:
    """The collation of ``expr`` over ``from_clause`` (a query source), without reading a row.

    ``COLLATION FOR`` of a scalar subquery is the collation of its output column, fixed when the
    statement is parsed; ``LIMIT 0`` keeps the subquery from running.
    """
    row = conn.execute(
        "SELECT " + _COLLATION_SQL.format(oid="co.oid") + " FROM pg_collation co "
        "JOIN pg_namespace cn ON cn.oid = co.collnamespace "
        f"WHERE co.oid = (COLLATION FOR ((SELECT {expr} FROM {from_clause} LIMIT 0)))::regcollation"
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def describe_query(conn: Any, sql: str) -> list[tuple[str, int, int]]:
    """Return ``(name, type oid, typmod)`` for each column the statement returns, without running it.

    The statement is wrapped in ``LIMIT 0``; errors (syntax, unknown column, bad cast) surface here.

    :raises InvalidInputError: the server rejects the statement.
    :raises QueryTimeoutError: describing it waited past the control connection's statement or lock
        timeout (e.g. another session holds an ACCESS EXCLUSIVE lock on a table it reads).
    """
    try:
        cursor = conn.execute(f"SELECT * FROM ({sql}) AS {quote_ident('_cxpg_describe')} LIMIT 0")
    except psycopg.Error as exc:  # a deadline, an abort, AirflowTaskTimeout pass as they are
        raise classify_control_error(exc, "describing the source query") from None
    result = cursor.pgresult
    if result is None or cursor.description is None:
        raise InvalidInputError("the source query returns no columns")
    return [(cursor.description[i].name, result.ftype(i), result.fmod(i)) for i in range(len(cursor.description))]


def classify_control_error(exc: BaseException, doing: str) -> Exception:
    """A server error on the control connection: a timeout, a lost connection, or bad input.

    One of the provider's own errors (a client-side deadline, an abort) is returned as it is.
    """
    if isinstance(exc, CxpgError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate in _TIMEOUT_SQLSTATES:
        return QueryTimeoutError(
            f"{doing} timed out on the server ({_first_line(exc)}): another session may hold a lock on the source",
            limit="query_timeout",
            sqlstate=sqlstate,
        )
    if sqlstate is None or sqlstate.startswith(("08", "57P")):
        return ServerConnectionError(f"{doing} failed: {_first_line(exc)}")
    if sqlstate.startswith(_INPUT_SQLSTATE_CLASSES):
        return InvalidInputError(f"the source query is not valid: {_first_line(exc)}", sqlstate=sqlstate)
    # What the server met while running it: an error a function raised, a deadlock, a conflict with
    # recovery on a standby, no memory or disk left. Not the input's fault; a retry may succeed.
    return QueryError(f"{doing} failed on the server: {_first_line(exc)}", sqlstate=sqlstate)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def may_call(conn: Any, *functions: str) -> bool:
    """Whether this role may call these ``pg_catalog`` functions. Asked first, in a statement of its
    own: a call refused for want of privilege would abort the transaction a run's snapshot holds,
    and every later planning statement with it (the check happens when a statement starts, so a
    ``CASE`` around the call does not help)."""
    checks = " AND ".join(f"has_function_privilege('pg_catalog.{f}', 'EXECUTE')" for f in functions)
    row = conn.execute(f"SELECT {checks}").fetchone()
    return bool(row and row[0])


def cluster_identifier(conn: Any) -> str | None:
    """This server's system identifier: the same on a physical standby as on its primary, another
    after a restore into a new cluster or a move by logical replication (None: not readable)."""
    value = _control_value(conn, "pg_control_system()", "system_identifier::text")
    return str(value) if value else None


def timeline_identifier(conn: Any) -> int | None:
    """The timeline of this server's last checkpoint (restartpoint on a standby): a new one after a
    point-in-time restore or a promotion (None: not readable)."""
    value = _control_value(conn, "pg_control_checkpoint()", "timeline_id")
    return int(value) if value is not None else None


def _control_value(conn: Any, function: str, column: str) -> Any:
    """``column`` of a ``pg_catalog`` control-data function, or None where this role may not call it."""
    try:
        if not may_call(conn, function):
            return None
        row = conn.execute(f"SELECT {column} FROM pg_catalog.{function}").fetchone()
    except psycopg.Error:  # not Exception: a deadline, an abort, AirflowTaskTimeout (Airflow 2) must go on
        return None
    return row[0] if row else None


def relation_identity(conn: Any, table: TableInfo) -> dict[str, Any]:
    """Which relation of which database of which cluster ``table`` is: the same on a physical replica."""
    row = conn.execute("SELECT current_database()").fetchone()
    return {"cluster": cluster_identifier(conn), "database": row[0] if row else None, "oid": table.oid}
