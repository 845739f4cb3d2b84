"""Incremental windows: read only rows with ``start < watermark <= end``.

Two kinds of watermark:

**A column** (``updated_at``, a version number...). ``end`` defaults to ``max(column)`` read when the
run starts, so rows written while the run reads are left for the next run instead of being half
seen. ``high_watermark`` (the next run's ``start``) is that ``end``. Caveat, as with any column
watermark: a transaction that stamps a row *before* our ``end`` but commits *after* the run started
is missed. Use ``xmin`` where that matters.

**xmin** (``watermark_column="xmin"``), the transaction id that wrote each row version. ``end`` comes
from the current snapshot: ``pg_snapshot_xmin(pg_current_snapshot()) - 1``, the newest transaction id
below which every transaction has finished, so nothing in the window can still commit. Reading a
snapshot assigns no transaction id, so this works on a hot-standby replica. Bounds are 64-bit
(``xid8``, epoch included); rows carry 32-bit xids, so the filter compares modulo 2^32::

    ((end32 - xmin) mod 2^32) < end - start      -- start < xmin <= end, across wraparound

A window of 2^31 transactions or more is ambiguous modulo 2^32: the run then reads the whole table
(logged) and the next run continues incrementally. The first run (no ``start``) reads every row.
Inside the window, chunks are still ordered and paged by the key (primary key), not by xmin, which
has no index: paging by xmin would scan and sort the table once per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_provider_cxpg.exceptions import InvalidInputError, SourceNotFoundError
from airflow_provider_cxpg.plan import SOURCE_ALIAS, ExtractPlan
from airflow_provider_cxpg.sql import literal, quote_ident

__all__ = ["XMIN", "WatermarkSpec", "Window", "resolve_window"]

XMIN = "xmin"
_XID_MODULO = 1 << 32
_XID_HALF = 1 << 31
_FIRST_NORMAL_XID = 3
_WATERMARK_TYPES = frozenset(
    {
        "int2",
        "int4",
        "int8",
        "numeric",
        "float4",
        "float8",
        "date",
        "timestamp",
        "timestamptz",
        "text",
        "varchar",
        "uuid",
    }
)


@dataclass(frozen=True)
class WatermarkSpec:
    """What the user asked: a column and optional bounds (``start`` exclusive, ``end`` inclusive)."""

    column: str
    start: Any = None
    end: Any = None

    @property
    def is_xmin(self) -> bool:
        return self.column == XMIN


@dataclass(frozen=True)
class Window:
    """A resolved window: the filters to add, and what to record."""

    column: str
    start: Any
    end: Any
    filters: tuple[str, ...]
    high_watermark: Any
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"column": self.column, "start": self.start, "end": self.end, "high_watermark": self.high_watermark}


def _column_type(plan: ExtractPlan, column: str) -> tuple[str, str]:
    """(sql type, typname) of ``column`` in the source."""
    if plan.table is not None:
        for col in plan.table.columns:
            if col.name == column:
                return col.pg.sql_name, col.pg.typname
        raise SourceNotFoundError(
            f"watermark column {column!r} does not exist in {plan.table.schema}.{plan.table.name}"
        )
    for read in plan.columns:
        if read.name == column:
            return read.pg.sql_name, read.pg.typname
    raise SourceNotFoundError(f"watermark column {column!r} is not in the output of the source query")


def _as_int(value: Any, what: str) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{what} for an xmin watermark must be a transaction id (integer), got {value!r}"
        ) from None


def resolve_window(conn: Any, plan: ExtractPlan, spec: WatermarkSpec) -> Window:
    """Fix the window's end now (one query on the control connection) and build its filters."""
    if spec.is_xmin:
        return _xmin_window(conn, plan, spec)
    sql_type, typname = _column_type(plan, spec.column)
    if typname not in _WATERMARK_TYPES:
        raise InvalidInputError(f"watermark column {spec.column!r} has type {sql_type}, which cannot be a watermark")
    expr = f"{SOURCE_ALIAS}.{quote_ident(spec.column)}"
    start = None if spec.start in (None, "") else spec.start
    end = None if spec.end in (None, "") else spec.end
    if end is None:
        where = " AND ".join(f"({f})" for f in plan.filters) or "true"
        row = conn.execute(f"SELECT max({expr})::text FROM {plan.from_clause} WHERE {where}").fetchone()
        end = row[0] if row else None
    filters: list[str] = []
    if start is not None:
        filters.append(f"{expr} > {literal(start, sql_type)}")
    if end is not None:
        filters.append(f"{expr} <= {literal(end, sql_type)}")
    else:  # an empty source: nothing to read, and the watermark stays where it was
        filters.append("false")
    high = end if end is not None else start
    return Window(spec.column, _jsonable(start), _jsonable(end), tuple(filters), _jsonable(high))


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    from airflow_provider_cxpg.sql import _text_form

    return _text_form(value)


def _xmin_window(conn: Any, plan: ExtractPlan, spec: WatermarkSpec) -> Window:
    if plan.table is None or plan.table.kind not in {"table", "partitioned table", "materialized view"}:
        raise InvalidInputError("watermark_column='xmin' needs a `table` source (xmin is a system column of tables)")
    if spec.end not in (None, ""):
        end = _as_int(spec.end, "watermark_end")
    else:
        row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()
        end = int(row[0]) - 1
    start = None if spec.start in (None, "") else _as_int(spec.start, "watermark_start")
    xmin = f"{SOURCE_ALIAS}.xmin::text::bigint"
    if start is None:
        return Window(XMIN, None, end, (), end, note="first xmin run: every row is read")
    span = end - start
    if span <= 0:
        return Window(XMIN, start, end, ("false",), max(start, end), note="empty xmin window")
    if span >= _XID_HALF:
        return Window(
            XMIN,
            start,
            end,
            (),
            end,
            note=f"xmin window of {span} transactions is too wide to compare modulo 2^32: reading every row",
        )
    end32 = end % _XID_MODULO
    condition = (
        f"(({end32}::bigint - {xmin} + {_XID_MODULO}) % {_XID_MODULO}) < {span} AND {xmin} >= {_FIRST_NORMAL_XID}"
    )
    return Window(XMIN, start, end, (condition,), end)
