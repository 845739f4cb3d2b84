"""Turn what the user asked for into exact keyset SQL, validated before any data moves.

Chunk *k+1* of a plan is::

    SELECT <columns> FROM <source> AS "_cxpg_src"
    WHERE (<user where>) AND (<window>) AND (k1, k2) > (<last key of chunk k>) [AND (k1, k2) <= (<upper>)]
    ORDER BY k1, k2
    LIMIT <chunk_rows>

never ``OFFSET``: each page starts where the previous ended, so pages cost the same however deep
they are, and rows are neither skipped nor repeated when the key is unique.

**One comparison for everything.** The ``ORDER BY``, the ``>`` of the next page, a range's bounds and
the duplicate check at a chunk boundary all use the same server-side comparison per key column (its
:attr:`KeyColumn.expr`), and it is one under which the key is unique, so no two rows compare equal:

* a key proven unique by an index is paged under that index's collation (a text key of a
  case-insensitive ICU collation that is unique under ``"C"`` pages under ``"C"``, and the index
  serves the ``ORDER BY``);
* a key nothing proves unique (a query, a view) is paged under a deterministic collation (``"C"``
  when the column's collation is nondeterministic), and the server itself flags a row whose key
  equals the previous row's (``lag()`` in the chunk query): a tie at a chunk boundary fails the run
  instead of losing rows. No boundary check compares in Python, where ``NaN != NaN``, ``'a' != 'A'``
  and ``'a' != 'a  '`` although the server calls them equal;
* ``citext`` pages by its text form under ``"C"`` (its own operators need not be on the search path,
  while its ``ORDER BY`` would still be case-insensitive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from airflow_provider_cxpg.exceptions import InvalidInputError, InvalidKeyError, SourceNotFoundError
from airflow_provider_cxpg.planning.catalog import (
    SourceColumn,
    TableInfo,
    UniqueIndex,
    describe_query,
    describe_table,
    query_column_collation,
    resolve_type,
)
from airflow_provider_cxpg.planning.pgtypes import KEY_TYPES, ColumnRead, PgType, plan_column
from airflow_provider_cxpg.planning.sql import literal, parse_qualified_name, quote_ident, row_comparison, text_form

__all__ = [
    "ExtractPlan",
    "HiddenField",
    "KeyColumn",
    "SourceSpec",
    "build_plan",
    "build_read_plan",
    "key_to_json",
]

SOURCE_ALIAS = quote_ident("_cxpg_src")
#: ``key_columns=["ctid"]`` asks for heap page-range chunks instead of keyset pages.
CTID = "ctid"


@dataclass(frozen=True)
class SourceSpec:
    """What to extract, as the user gave it (before validation).

    :param table: ``schema.table`` (or ``table`` on the search_path).
    :param sql: a query whose output contains the key columns (used when ``table`` is None).
    :param columns: output columns (default: all); key columns are added when missing.
    :param where: a SQL condition on the source's columns (trusted DAG code, validated by the server).
    :param key_columns: the keyset key; default: the table's primary key.
    :param column_casts: ``{column: sql_type}`` to read a column as another type (e.g. ``text``).
    """

    table: str | None = None
    sql: str | None = None
    columns: tuple[str, ...] | None = None
    where: str | None = None
    key_columns: tuple[str, ...] | None = None
    column_casts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.table is None) == (self.sql is None):
            raise InvalidInputError("give exactly one of `table` or `sql`")
        if self.sql is not None and not self.sql.strip():
            raise InvalidInputError("`sql` is empty")
        if self.columns is not None and not self.columns:
            raise InvalidInputError("`columns` is empty: omit it to read every column")
        if self.key_columns is not None and not self.key_columns:
            raise InvalidInputError("`key_columns` is empty: omit it to use the primary key")
        for name in (self.columns or ()) + (self.key_columns or ()):
            quote_ident(name)

    def describe(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "sql": self.sql,
            "columns": list(self.columns) if self.columns else None,
            "where": self.where,
            "key_columns": list(self.key_columns) if self.key_columns else None,
            "column_casts": dict(self.column_casts) or None,
        }


@dataclass(frozen=True)
class KeyColumn:
    """One key column: how to order and compare by it, and the type for its literals.

    :param expr: the paging expression, used for the ``ORDER BY``, every comparison and every
        equality with this column's literals (the column itself, or it under another collation).
    :param sql_type: the type of ``expr``, for its literals.
    :param field: the result field the worker reads the key's values from: the column itself, or a
        hidden ``key::text`` field for types whose Python values do not round-trip.
    :param plain: ``expr`` is the bare column (so ``pg_stats`` bounds are in its order).
    :param nullable: nothing in the catalog proves the column NOT NULL (views, materialized views,
        queries): a NULL would sort after every key and never pass ``(k) > (last)``.
    :param collation: the collation ``expr`` orders by (None: not a collatable type).
    """

    name: str
    expr: str
    sql_type: str
    typname: str
    field: str = ""
    plain: bool = True
    nullable: bool = False
    collation: str | None = None


@dataclass(frozen=True)
class HiddenField:
    """A field read but not written: a key's exact text form, or a guard flag.

    :param guard: for a boolean guard: the error raised when it is true for any row.
    """

    name: str
    expr: str
    arrow_type: pa.DataType
    guard: str | None = None


#: Key types read natively whose Python values may not round-trip (time '24:00' reads as 00:00;
#: dates and timestamps outside years 1-9999 cannot become Python objects): their literals come
#: from the server's own text form, read in a hidden field.
_TEXT_KEYED = frozenset({"date", "time", "timestamp", "timestamptz"})
#: Key types that carry a collation (domains are resolved to their base type).
_COLLATABLE = frozenset({"text", "varchar", "bpchar", "name"})
#: A deterministic collation every server has: byte order, equality is byte equality.
BYTE_COLLATION = '"C"'
#: The hidden field that is true where a row's key equals the previous row's (the server's equality).
_HIDDEN_PREFIX = "__cxpg_"
TIE_FIELD = "__cxpg_tie"


@dataclass(frozen=True)
class ExtractPlan:
    """A validated extraction: columns with their read strategy, the key, the filters.

    :param key_unique: proven unique by the catalog (a primary key or unique index); otherwise every
        chunk peeks one row past its end to detect a duplicate key at the boundary.
    :param pages: for ``key_columns=["ctid"]``: heap pages at planning time (chunks are page ranges).
    :param rows_per_page: for page chunks: the estimate that turns ``chunk_rows`` into pages.
    :param key_bounds: the filters of a key range (:meth:`with_key_range`), also in ``filters``.
    :param bounded_above: the key range has an upper bound, so the rows that sort last (NULL keys)
        belong to another range.
    """

    source: SourceSpec
    from_clause: str
    columns: tuple[ColumnRead, ...]
    select_exprs: tuple[str, ...]
    key: tuple[KeyColumn, ...]
    key_unique: bool
    filters: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    table: TableInfo | None = None
    pages: int | None = None
    rows_per_page: float | None = None
    hidden: tuple[HiddenField, ...] = ()
    key_bounds: tuple[str, ...] = ()
    bounded_above: bool = False

    @property
    def schema(self) -> pa.Schema:
        """The schema written (Parquet, or the tables ``iter_chunks`` yields)."""
        return pa.schema([pa.field(c.name, c.arrow_type) for c in self.columns])

    @property
    def read_schema(self) -> pa.Schema:
        """The schema the worker reads: written columns, then hidden fields."""
        return pa.schema(list(self.schema) + [pa.field(h.name, h.arrow_type) for h in self.hidden])

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.key)

    @property
    def key_fields(self) -> tuple[str, ...]:
        return tuple(k.field or k.name for k in self.key)

    def _select(self, *, without: str | None = None) -> str:
        hidden = [f"{h.expr} AS {quote_ident(h.name)}" for h in self.hidden if h.name != without]
        return ", ".join([*self.select_exprs, *hidden])

    @property
    def infinity_columns(self) -> tuple[str, ...]:
        return tuple(
            c.name for c in self.columns if not c.as_text and c.pg.typname in {"date", "timestamp", "timestamptz"}
        )

    def request_fields(self) -> dict[str, Any]:
        """The :class:`ReadChunk` fields every chunk of this plan shares."""
        return {
            "schema": self.read_schema,
            "key_fields": self.key_fields,
            "infinity_columns": self.infinity_columns,
            "drop_fields": tuple(h.name for h in self.hidden),
            "guards": tuple((h.name, h.guard) for h in self.hidden if h.guard),
            "tie_field": TIE_FIELD if any(h.name == TIE_FIELD for h in self.hidden) else None,
        }

    def with_filters(self, *filters: str) -> ExtractPlan:
        return replace(self, filters=self.filters + tuple(f for f in filters if f))

    def with_key_range(self, lower: Sequence[Any] | None, upper: Sequence[Any] | None) -> ExtractPlan:
        """This plan restricted to keys in ``(lower, upper]`` (a partition, a parallel worker's range)."""
        bounds = tuple(self.range_condition(lower, upper))
        return replace(
            self,
            filters=self.filters + bounds,
            key_bounds=self.key_bounds + bounds,
            bounded_above=self.bounded_above or upper is not None,
        )

    def null_key_sql(self) -> str | None:
        """A one-row statement that finds a row whose key is NULL, or None when none can exist here.

        ``(k) > (last)`` is never true for a NULL and NULLs sort after every key, so after the first
        chunk no page returns such rows: the worker's per-chunk check would never see them and the run
        would end green without them. Where the catalog cannot prove the key NOT NULL, the worker runs
        this first (the chunk's checks raise on the row it returns), under the run's deadlines and in
        its snapshot. A NULL first key column sorts after every bound, so those rows are the open last
        range's: it looks for them without its key bounds. A range with an upper bound looks only
        for NULLs in later key columns, within its bounds (``(a, b) <= (u)`` holds for ``(a < u, NULL)``,
        yet paging inside the range skips such a row). It asks ``num_nulls(...) > 0``, not ``IS NULL``:
        the planner drops ``k IS NULL`` as always false where a NOT NULL is declared (on partitions,
        and from PostgreSQL 17 on any relation), and a foreign table's or foreign partition's declared
        NOT NULL is not enforced, so the probe would see nothing while the NULL rows are there. The
        cost is one scan of the source per worker session (no index answers it; unordered, so the
        scan stops at the first NULL and is sequential rather than a walk of the key's index).
        """
        if self.pages is not None:
            return None
        if self.bounded_above:
            nullable = [k for k in self.key[1:] if k.nullable]
            filters = self.filters
        else:
            nullable = [k for k in self.key if k.nullable]
            filters = tuple(f for f in self.filters if f not in self.key_bounds)
        if not nullable:
            return None
        columns = ", ".join(f"{SOURCE_ALIAS}.{quote_ident(k.name)}" for k in nullable)
        return replace(self, filters=(*filters, f"num_nulls({columns}) > 0"), key_bounds=()).chunk_sql(
            None, 1, ordered=False
        )

    def key_literals(self, values: Sequence[Any]) -> list[str]:
        """Literals for the first ``len(values)`` key columns (a bound may be a key prefix)."""
        if not values or len(values) > len(self.key):
            raise InvalidKeyError(f"a key bound needs 1 to {len(self.key)} values, got {list(values)!r}")
        return [literal(v, k.sql_type) for v, k in zip(values, self.key[: len(values)], strict=True)]

    def key_in(self, keys: Sequence[Sequence[Any]]) -> str:
        """``(k1, k2) IN ((...), ...)`` for whole keys, under the paging comparison (its equality)."""
        if not self.key or not keys:
            raise InvalidKeyError("a key list needs a key and at least one key value")
        exprs = [k.expr for k in self.key]
        rows = [self.key_literals(list(values)) for values in keys]
        if len(exprs) == 1:
            return f"{exprs[0]} IN ({', '.join(r[0] for r in rows)})"
        return f"({', '.join(exprs)}) IN ({', '.join('(' + ', '.join(r) + ')' for r in rows)})"

    def range_condition(self, lower: Sequence[Any] | None, upper: Sequence[Any] | None) -> list[str]:
        """Conditions for keys in ``(lower, upper]`` (either side open when None).

        A bound shorter than the key compares that key prefix: ``(k1) > (v)`` puts every row with
        ``k1 = v`` below the bound, so prefix ranges still cover the key space exactly once.
        """
        conditions = []
        for bound, op in ((lower, ">"), (upper, "<=")):
            if bound is not None:
                exprs = [k.expr for k in self.key[: len(bound)]]
                conditions.append(row_comparison(exprs, self.key_literals(bound), op))
        return conditions

    def chunk_sql(self, after: Sequence[Any] | None, limit: int | None, *, ordered: bool = True) -> str:
        """The statement for the chunk that follows key ``after`` (None: the first chunk).

        ``ordered=False`` leaves out the inner ``ORDER BY`` (a probe for any one row: ordered, the
        planner walks the key's index through the whole relation when no row matches).

        With the tie flag (keys nothing proves unique), the chunk is selected first and the flag
        computed over it: ``lag()`` over the limited, already sorted rows costs nothing more, where a
        window over the whole source would sort all of it for every chunk (no top-N sort).
        """
        conditions = [f"({f})" for f in self.filters]
        conditions.extend(self.range_condition(after, None))
        tied = any(h.name == TIE_FIELD for h in self.hidden)
        paging = [f"{k.expr} AS {quote_ident(f'__cxpg_p{i}')}" for i, k in enumerate(self.key)] if tied else []
        select = ", ".join([self._select(without=TIE_FIELD if tied else None), *paging])
        sql = f"SELECT {select} FROM {self.from_clause}"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        if self.key and ordered:
            sql += " ORDER BY " + ", ".join(k.expr for k in self.key)
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        if not tied:
            return sql
        chunk = quote_ident("_cxpg_chunk")
        keys = [f"{chunk}.{quote_ident(f'__cxpg_p{i}')}" for i in range(len(self.key))]
        order = ", ".join(keys)
        tie = " AND ".join(f"{k} = lag({k}) OVER (ORDER BY {order})" for k in keys)
        outer = [
            f"({tie}) AS {quote_ident(f.name)}" if f.name == TIE_FIELD else f"{chunk}.{quote_ident(f.name)}"
            for f in self.read_schema
        ]
        return f"SELECT {', '.join(outer)} FROM ({sql}) AS {chunk} ORDER BY {order}"

    def page_sql(self, first_page: int, end_page: int | None) -> str:
        """The statement for heap pages ``[first_page, end_page)`` (open-ended when None)."""
        conditions = [f"({f})" for f in self.filters]
        conditions.append(f"{SOURCE_ALIAS}.ctid >= '({int(first_page)},0)'::tid")
        if end_page is not None:
            conditions.append(f"{SOURCE_ALIAS}.ctid < '({int(end_page)},0)'::tid")
        return f"SELECT {self._select()} FROM {self.from_clause} WHERE " + " AND ".join(conditions)

    def count_sql(self) -> str:
        conditions = [f"({f})" for f in self.filters]
        sql = f"SELECT count(*) FROM {self.from_clause}"
        return sql + (" WHERE " + " AND ".join(conditions) if conditions else "")

    def key_order(self) -> list[list[str | None]] | None:
        """How the key is ordered: each paging expression and its collation (None: no collatable key).

        Part of an extraction's fingerprint: a resumed run continues after the last key *in this
        order*; after the key's collation changed (``ALTER COLUMN ... COLLATE``, another unique index
        proving the key), the keys after it are another set, and resuming would skip rows.
        """
        if all(k.collation is None for k in self.key):
            return None  # the order is the type's: unchanged fingerprints for the common case
        return [[k.expr, k.collation] for k in self.key]

    def describe_schema(self) -> list[dict[str, str]]:
        return [
            {"name": c.name, "pg_type": c.pg.sql_name, "arrow_type": str(c.arrow_type), "read_as": c.read_as}
            for c in self.columns
        ]


def key_to_json(values: Sequence[Any] | None) -> list[Any] | None:
    """Key values as JSON: ints, floats, bools and strings stay; others become their exact text form."""
    if values is None:
        return None
    return [v if v is None or isinstance(v, (bool, int, float, str)) else text_form(v) for v in values]


def _resolve_cast(conn: Any, type_name: str) -> str:
    """The server's name for the type ``type_name`` names, its modifier kept.

    ``to_regtype`` checks the name whole (nothing but a type name passes) but drops the modifier,
    and ``format_type(oid, NULL)`` of ``bpchar`` or ``bit`` is ``character`` / ``bit``, which mean
    ``char(1)`` / ``bit(1)``: ``char(6)`` read ``'ABCDEF'`` as ``'A'``. The modifier comes from the
    server's own parse of a cast to it instead, and ``format_type`` of ``-1`` names no length. A
    domain is kept as named (a result column would report its base type, and the cast its CHECKs).
    """
    row = conn.execute(
        "SELECT t.oid, t.typtype FROM pg_catalog.pg_type t WHERE t.oid = to_regtype(%s)", (type_name,)
    ).fetchone()
    if row is None or row[0] is None:
        raise InvalidInputError(f"column_casts: {type_name!r} is not a known type")
    if row[1] == "d":  # a domain takes no modifier, and a result column reports its base type: keep its CHECKs
        return str(conn.execute("SELECT format_type(%s::oid, -1)", (row[0],)).fetchone()[0])
    ((_, oid, typmod),) = describe_query(conn, f"SELECT NULL::{type_name}")
    named = conn.execute("SELECT format_type(%s::oid, %s::int)", (oid, typmod)).fetchone()
    return str(named[0])


def _source_columns(conn: Any, spec: SourceSpec) -> tuple[str, list[SourceColumn], TableInfo | None]:
    if spec.table is not None:
        schema, name = parse_qualified_name(spec.table)
        table = describe_table(conn, schema, name)
        return f"{table.qualified_name} AS {SOURCE_ALIAS}", list(table.columns), table
    assert spec.sql is not None
    text = spec.sql.strip().rstrip(";").strip()
    described = describe_query(conn, text)
    cache: dict[tuple[int, int], PgType] = {}
    columns = []
    for name, oid, typmod in described:
        if (oid, typmod) not in cache:
            cache[(oid, typmod)] = resolve_type(conn, oid, typmod)
        columns.append(SourceColumn(name, cache[(oid, typmod)], None))
    return f"({text}) AS {SOURCE_ALIAS}", columns, None


def _choose_key(
    spec: SourceSpec, by_name: dict[str, SourceColumn], table: TableInfo | None
) -> tuple[tuple[str, ...], bool, list[str]]:
    notes: list[str] = []
    if spec.key_columns is None:
        if table is None:
            raise InvalidKeyError("a `sql` source needs `key_columns`: keyset chunks need a key to order by")
        proven = table.indexes_cover_rows
        if table.primary_key:
            return table.primary_key, proven, notes if proven else [_unproven(table.primary_key, table)]
        if table.unique_keys:
            notes.append(f"no primary key: using unique index on {list(table.unique_keys[0])} as the key")
            return table.unique_keys[0], proven, notes if proven else [*notes, _unproven(table.unique_keys[0], table)]
        raise InvalidKeyError(
            f"{table.kind} {table.schema}.{table.name} has no primary key or unique index on NOT NULL "
            "columns: pass key_columns"
        )
    key = tuple(spec.key_columns)
    if len(set(key)) != len(key):
        raise InvalidKeyError(f"key_columns repeats a column: {list(key)}")
    for name in key:
        if name not in by_name:
            raise SourceNotFoundError(
                f"key column {name!r} is not in the source (columns: {', '.join(by_name)})", column=name
            )
    if table is None:
        return key, False, notes
    if not table.indexes_cover_rows or table.foreign_descendants:
        return key, False, [*notes, _unproven(key, table)]
    if table.is_unique(key):
        return key, True, notes
    if table.primary_key:
        extra = tuple(c for c in table.primary_key if c not in key)
        notes.append(f"key {list(key)} is not unique: primary key {list(extra)} appended as tie-breaker")
        return key + extra, True, notes
    if table.kind in {"view", "materialized view", "foreign table"}:
        notes.append(f"uniqueness of key {list(key)} cannot be proven for a {table.kind}: checked per chunk")
        return key, False, notes
    raise InvalidKeyError(
        f"key {list(key)} is not unique in {table.schema}.{table.name} and the table has no primary key "
        "to break ties: rows sharing a key value could be lost at chunk boundaries"
    )


def _unproven(key: tuple[str, ...], table: TableInfo) -> str:
    why = (
        "the tables that inherit from it are read with it, and its indexes do not cover them"
        if table.inheritance_children
        else "a foreign table among its partitions has no unique index"
    )
    return f"uniqueness of key {list(key)} cannot be proven for {table.schema}.{table.name} ({why}): checked per chunk"


def _plan_select(
    conn: Any, spec: SourceSpec, from_clause: str, wanted: list[str], filters: tuple[str, ...]
) -> tuple[list[ColumnRead], list[str]]:
    """Decide each output column's read strategy from the types the server reports for it."""
    exprs: list[str] = []
    for name in wanted:
        expr = f"{SOURCE_ALIAS}.{quote_ident(name)}"
        if name in spec.column_casts:
            expr = f"({expr})::{_resolve_cast(conn, spec.column_casts[name])}"
        exprs.append(expr)
    probe = "SELECT " + ", ".join(f"{e} AS {quote_ident(n)}" for e, n in zip(exprs, wanted, strict=True))
    probe += f" FROM {from_clause}" + (f" WHERE ({filters[0]})" if filters else "")
    described = describe_query(conn, probe)
    columns: list[ColumnRead] = []
    select_exprs: list[str] = []
    cache: dict[tuple[int, int], PgType] = {}
    for (name, oid, typmod), expr in zip(described, exprs, strict=True):
        if (oid, typmod) not in cache:
            cache[(oid, typmod)] = resolve_type(conn, oid, typmod)
        read = plan_column(name, cache[(oid, typmod)])
        columns.append(read)
        select_exprs.append(
            f"({expr})::text AS {quote_ident(name)}" if read.as_text else f"{expr} AS {quote_ident(name)}"
        )
    return columns, select_exprs


def _column_names(source_cols: Sequence[SourceColumn], what: str) -> list[str]:
    """The names of the columns ``what`` returns: at least one, each once."""
    names = [c.name for c in source_cols]
    if not names:  # Arrow and Parquet hold no rows without columns: refused now, not by connectorx at chunk 0
        raise InvalidInputError(
            f"{what} returns no columns (a table created without any, or with every column dropped): "
            "there is nothing to write"
        )
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InvalidInputError(f"{what} returns duplicate column names {dupes}: alias them")
    return names


def build_read_plan(conn: Any, sql: str, column_casts: Mapping[str, str] | None = None) -> ExtractPlan:
    """Plan a single unchunked read of ``sql`` (no key): the same type handling as extraction."""
    spec = SourceSpec(sql=sql, column_casts=dict(column_casts or {}))
    from_clause, source_cols, _ = _source_columns(conn, spec)
    names = _column_names(source_cols, "the query")
    unknown_casts = set(spec.column_casts) - set(names)
    if unknown_casts:
        raise SourceNotFoundError(f"column_casts names columns not in the output: {sorted(unknown_casts)}")
    columns, select_exprs = _plan_select(conn, spec, from_clause, names, ())
    return ExtractPlan(
        source=spec,
        from_clause=from_clause,
        columns=tuple(columns),
        select_exprs=tuple(select_exprs),
        key=(),
        key_unique=True,
        hidden=_value_guards(columns, select_exprs),
    )


def _page_plan(conn: Any, spec: SourceSpec, from_clause: str, names: list[str], table: TableInfo | None) -> ExtractPlan:
    """A plan chunked by heap page ranges (``key_columns=["ctid"]``): for tables with no usable key."""
    if table is None or table.kind not in {"table", "materialized view"}:
        raise InvalidKeyError(
            "key_columns=['ctid'] (page-range chunks) needs a plain table or materialized view `table` source"
        )
    if table.inheritance_children:  # its page count is its own heap's: the children's rows would be one chunk
        raise InvalidKeyError(
            f"key_columns=['ctid'] cannot page {table.qualified_name}: tables inherit from it, and page numbers "
            "are per table; extract each table (FROM ONLY) or use a key"
        )
    wanted = list(spec.columns) if spec.columns else names
    for name in wanted:
        if name not in names:
            raise SourceNotFoundError(f"column {name!r} does not exist in the source (columns: {', '.join(names)})")
    filters = (spec.where,) if spec.where and spec.where.strip() else ()
    columns, select_exprs = _plan_select(conn, spec, from_clause, wanted, filters)
    pages, reltuples, relpages = conn.execute(
        "SELECT pg_relation_size(c.oid) / current_setting('block_size')::int, c.reltuples, c.relpages "
        "FROM pg_class c WHERE c.oid = to_regclass(%s)",
        (table.qualified_name,),
    ).fetchone()
    if reltuples is not None and reltuples > 0 and relpages:
        per_page = float(reltuples) / float(relpages)
    else:  # never analysed: count the first pages
        sample = min(int(pages), 64) or 1
        counted = conn.execute(
            f"SELECT count(*) FROM {from_clause} WHERE {SOURCE_ALIAS}.ctid < '({sample},0)'::tid"
        ).fetchone()[0]
        per_page = max(1.0, counted / sample)
    return ExtractPlan(
        source=spec,
        from_clause=from_clause,
        columns=tuple(columns),
        select_exprs=tuple(select_exprs),
        key=(),
        key_unique=True,
        filters=filters,
        notes=(f"page-range chunks over {pages} heap pages (~{per_page:.0f} rows/page)",),
        table=table,
        pages=int(pages),
        rows_per_page=per_page,
        hidden=_value_guards(columns, select_exprs),
    )


def build_plan(conn: Any, spec: SourceSpec) -> ExtractPlan:
    """Validate ``spec`` against the server and return the plan (no data is read).

    :raises InvalidInputError: and its subclasses, each naming what is wrong.
    """
    from_clause, source_cols, table = _source_columns(conn, spec)
    names = _column_names(source_cols, "the source")
    reserved = [n for n in names if n.startswith(_HIDDEN_PREFIX)]
    if reserved:  # the chunk statements add fields of these names: refused now, not at chunk 0
        raise InvalidInputError(
            f"the source has columns named {reserved}: names starting with {_HIDDEN_PREFIX!r} are the "
            "provider's own hidden fields; alias them"
        )
    by_name = {c.name: c for c in source_cols}
    if spec.key_columns == (CTID,):
        return _row_security_noted(_page_plan(conn, spec, from_clause, names, table), table)
    key_names, key_unique, notes = _choose_key(spec, by_name, table)

    for name in key_names:
        col = by_name[name]
        if col.pg.typname not in KEY_TYPES and col.pg.typtype != "e":
            raise InvalidKeyError(
                f"key column {name!r} has type {col.pg.sql_name}, which cannot order keyset pages exactly; "
                f"supported: integers, numeric, text/varchar/char/citext, uuid, date, time, timestamp[tz], "
                "float, bytea, boolean, enums"
            )
        if col.not_null is False:
            raise InvalidKeyError(
                f"key column {name!r} is nullable: rows with NULL keys cannot be paged by key. Add a NOT NULL "
                "constraint, or read through `sql` with the NULLs filtered out"
            )
        if name in spec.column_casts:
            raise InvalidInputError(f"column_casts cannot change key column {name!r}: its values must stay exact")

    wanted = list(spec.columns) if spec.columns else names
    for name in wanted:
        if name not in by_name:
            raise SourceNotFoundError(
                f"column {name!r} does not exist in the source (columns: {', '.join(names)})", column=name
            )
    if len(set(wanted)) != len(wanted):
        raise InvalidInputError(f"`columns` repeats a column: {wanted}")
    missing_keys = [k for k in key_names if k not in wanted]
    if missing_keys:
        notes.append(f"key columns {missing_keys} added to the output")
        wanted += missing_keys
    unknown_casts = set(spec.column_casts) - set(wanted)
    if unknown_casts:
        raise SourceNotFoundError(f"column_casts names columns not in the output: {sorted(unknown_casts)}")

    filters = (spec.where,) if spec.where and spec.where.strip() else ()
    columns, select_exprs = _plan_select(conn, spec, from_clause, wanted, filters)
    reads = {c.name: c for c in columns}
    proof = table.proving_index(key_names) if table is not None and key_unique else None
    hidden: list[HiddenField] = []
    key: list[KeyColumn] = []
    for index, name in enumerate(key_names):
        col = by_name[name]
        if table is None and col.pg.typname in _COLLATABLE:  # a query: ask the server for the key's collation
            collation, deterministic = query_column_collation(conn, from_clause, f"{SOURCE_ALIAS}.{quote_ident(name)}")
            col = SourceColumn(col.name, col.pg, col.not_null, collation, deterministic)
        expr, sql_type, note, collation = _paging_expression(col, proof, key_unique)
        if note:
            notes.append(note)
        field_name = name
        if col.pg.typname in _TEXT_KEYED and not reads[name].as_text:
            field_name = f"__cxpg_key{index}"
            hidden.append(HiddenField(field_name, f"({expr})::text", pa.string()))
        base = f"{SOURCE_ALIAS}.{quote_ident(name)}"
        key.append(
            KeyColumn(
                name,
                expr,
                sql_type,
                col.pg.typname,
                field_name,
                plain=expr == base,
                nullable=col.not_null is not True,
                collation=collation,
            )
        )
    if not key_unique:
        # Nothing proves the key unique: the server flags a row whose key equals the previous row's,
        # under the paging comparison itself (a tie at a chunk boundary would lose rows). The flag is
        # computed over each chunk's rows by chunk_sql.
        hidden.append(HiddenField(TIE_FIELD, "NULL::boolean", pa.bool_()))
    plan = ExtractPlan(
        source=spec,
        from_clause=from_clause,
        columns=tuple(columns),
        select_exprs=tuple(select_exprs),
        key=tuple(key),
        key_unique=key_unique,
        filters=filters,
        notes=tuple(notes),
        table=table,
        hidden=(*hidden, *_value_guards(columns, select_exprs)),
    )
    return _row_security_noted(plan, table)


def _row_security_noted(plan: ExtractPlan, table: TableInfo | None) -> ExtractPlan:
    """Say so when row-level security filters what this login reads: the output is then the rows its
    policies allow, not the table (pg_dump refuses such a table unless told to; here the run goes on,
    since extracting through a restricted role can be the intent, and the plan says it)."""
    if table is None or not table.row_security:
        return plan
    note = (
        f"row-level security applies to this login on {table.qualified_name}: only the rows its policies "
        "allow are read (a role with BYPASSRLS, or the owner of a table without FORCE ROW LEVEL SECURITY, reads all)"
    )
    return replace(plan, notes=(*plan.notes, note))


def _paging_expression(
    col: SourceColumn, proof: UniqueIndex | None, unique: bool
) -> tuple[str, str, str | None, str | None]:
    """The expression a key column is ordered and compared by, its literal type, a note, and the
    collation it orders by.

    Keyset paging is exact when no two rows compare equal under the paging comparison. A unique
    index proves that under its own collation, so a column of the proving index is paged under the
    index's collation. Without a proof, a nondeterministic collation (where 'a' = 'A') is replaced by
    byte order, whose equality is byte equality.
    """
    base = f"{SOURCE_ALIAS}.{quote_ident(col.name)}"
    if col.pg.typname == "citext":
        return (
            f"(({base})::text COLLATE {BYTE_COLLATION})",
            "text",
            f'citext key {col.name!r} is paged by its text form under COLLATE "C" (an index on the '
            "citext column cannot serve that order)",
            BYTE_COLLATION,
        )
    if col.collation is None:
        return base, col.pg.literal_type, None, None
    wanted = col.collation
    if proof is not None and col.name in proof.columns:
        wanted = proof.collations[proof.columns.index(col.name)] or col.collation
    elif not unique and col.deterministic is not True:
        wanted = BYTE_COLLATION
    if wanted == col.collation:
        return base, col.pg.literal_type, None, wanted
    note = (
        f"key column {col.name!r} (collation {col.collation}) is paged under collation {wanted}"
        + (", the collation of the unique index that proves the key unique" if wanted != BYTE_COLLATION else "")
        + (": its own collation is nondeterministic" if col.deterministic is False else "")
    )
    return f"({base} COLLATE {wanted})", col.pg.literal_type, note, wanted


def _value_guards(columns: list[ColumnRead], select_exprs: list[str]) -> tuple[HiddenField, ...]:
    """Flags, true for a row holding a value connectorx would read as another one.

    * time '24:00' reads as 00:00;
    * an array whose subscripts do not start at 1 (``'[0:2]={1,2,3}'``, which PostgreSQL tells from
      ``'{1,2,3}'``) reads as the same list: the bounds are dropped, two values become one.

    Each tests the expression the column is read as, a ``column_casts`` cast included (an array cast
    to ``int8[]`` keeps its bounds; a time cast to ``time(0)`` can round to '24:00').
    """
    native = []
    for column, select in zip(columns, select_exprs, strict=True):
        if not column.as_text:  # selected as "<expr> AS <name>" (see _plan_select)
            native.append((column, select.removesuffix(f" AS {quote_ident(column.name)}")))
    guards: list[HiddenField] = []
    times = [(c.name, expr) for c, expr in native if c.pg.typname == "time"]
    if times:
        test = " OR ".join(f"({expr}) = '24:00'::time" for _, expr in times)
        names = [name for name, _ in times]
        message = (
            f"a time column ({', '.join(names)}) holds '24:00', which connectorx would read as 00:00; "
            f"read it as text with column_casts={{{names[0]!r}: 'text'}}"
        )
        guards.append(HiddenField("__cxpg_time24", f"({test})", pa.bool_(), guard=message))
    arrays = [
        (c.name, expr) for c, expr in native if pa.types.is_large_list(c.arrow_type) or pa.types.is_list(c.arrow_type)
    ]
    if arrays:
        test = " OR ".join(f"array_lower({expr}, 1) <> 1" for _, expr in arrays)
        names = [name for name, _ in arrays]
        message = (
            f"an array column ({', '.join(names)}) holds an array whose subscripts do not start at 1 "
            "(e.g. '[0:2]={1,2,3}'), which would be written as a plain list, its bounds lost; "
            f"read it as text with column_casts={{{names[0]!r}: 'text'}}"
        )
        guards.append(HiddenField("__cxpg_array_lower", f"({test})", pa.bool_(), guard=message))
    return tuple(guards)
