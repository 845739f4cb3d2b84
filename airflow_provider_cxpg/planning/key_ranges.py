"""Split a source's key space into ranges of about equal row counts, before any data moves.

Ranges are ``(lower, upper]`` in key order: the first has no lower bound, the last no upper bound, and
each ``upper`` is the next ``lower``, so together they cover every key exactly once, whatever rows
arrive later. Methods, cheapest first (costs measured in ``bench/``, see the README):

``histogram``
    ``pg_stats.histogram_bounds`` of the first key column (needs ANALYZE; bounds are a key prefix).
    No table access at all; sizes are as good as the statistics.
``sample``
    ``TABLESAMPLE SYSTEM`` reads a few percent of the table's pages and takes quantiles of the keys.
    Works for composite keys; sizes within a few percent on large tables.
``ntile``
    ``ntile(n) OVER (ORDER BY key)`` over every key (an index-only scan when possible): exact equal
    counts, at the price of reading the whole key column once.
``ctid``
    Heap page ranges ``[a, b)`` for tables with no usable key (``key_columns=["ctid"]``), read by TID
    range scans (PostgreSQL 14+). No table access to plan.

``auto`` picks ``ctid`` for page plans, else ``histogram`` when statistics exist, else ``sample``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from airflow_provider_cxpg.exceptions import DataIntegrityError, InvalidInputError
from airflow_provider_cxpg.planning.plan import ExtractPlan

__all__ = ["METHODS", "KeyRange", "plan_key_ranges", "ranges_to_kwargs"]

METHODS = ("auto", "histogram", "sample", "ntile", "ctid")
_SAMPLE_ROWS_PER_RANGE = 2_000
_SAMPLE_PAGES_PER_RANGE = 400


@dataclass(frozen=True)
class KeyRange:
    """One partition: keys in ``(lower, upper]`` (pages ``[lower, upper)`` for ``ctid`` plans)."""

    index: int
    lower: list[Any] | None
    upper: list[Any] | None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "lower": self.lower, "upper": self.upper}


def _from_bounds(bounds: list[list[Any]]) -> list[KeyRange]:
    edges: list[list[Any] | None] = [None, *bounds, None]
    return [KeyRange(i, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _dedupe(bounds: list[list[Any]]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for bound in bounds:
        if not out or bound != out[-1]:
            out.append(bound)
    return out


_INTEGER_TYPES = frozenset({"int2", "int4", "int8", "oid"})


def _typed(plan: ExtractPlan, bounds: list[list[Any]]) -> list[list[Any]]:
    """Integers back to ints (readable XCom); every other key keeps its exact text form."""
    types = [k.typname for k in plan.key]
    if any(v is None for b in bounds for v in b):  # `k <= NULL` would hold no row: refuse, never skip
        raise DataIntegrityError(
            "a key range bound is NULL: the key has NULLs, which keyset ranges cannot hold. Filter them out "
            "with `where`, or choose another key"
        )
    return [[int(v) if types[i] in _INTEGER_TYPES else v for i, v in enumerate(b)] for b in bounds]


def _key_text(plan: ExtractPlan) -> str:
    return ", ".join(f"{k.expr}::text" for k in plan.key)


def _where(plan: ExtractPlan) -> str:
    return " AND ".join(f"({f})" for f in plan.filters) or "true"


def _ntile(conn: Any, plan: ExtractPlan, n: int) -> list[list[Any]]:
    keys = ", ".join(k.expr for k in plan.key)
    texts = ", ".join(f"{k.expr}::text AS t{i}" for i, k in enumerate(plan.key))
    raws = ", ".join(f"{k.expr} AS k{i}" for i, k in enumerate(plan.key))
    inner = (
        f"SELECT {texts}, {raws}, ntile({n}) OVER (ORDER BY {keys}) AS bucket "
        f"FROM {plan.from_clause} WHERE {_where(plan)}"
    )
    width = len(plan.key)
    last_of_bucket = ", ".join(f"k{i} DESC" for i in range(width))
    sql = (
        f"SELECT DISTINCT ON (bucket) {', '.join(f't{i}' for i in range(width))} "
        f"FROM ({inner}) AS s ORDER BY bucket, {last_of_bucket}"
    )
    rows = conn.execute(sql).fetchall()
    return [list(row) for row in rows[:-1]]  # the last bucket's end is the open upper bound


def _sample(conn: Any, plan: ExtractPlan, n: int) -> list[list[Any]]:
    assert plan.table is not None
    estimate = plan.table.estimated_rows or 0
    relpages = conn.execute(
        "SELECT relpages FROM pg_class WHERE oid = to_regclass(%s)", (plan.table.qualified_name,)
    ).fetchone()[0]
    # SYSTEM sampling picks whole pages, and keys that follow the physical order cluster per page:
    # size the sample in pages too (measured: sizing by rows alone gave ranges 1.4-2.7x apart).
    by_rows = n * _SAMPLE_ROWS_PER_RANGE / estimate if estimate > 0 else 1.0
    by_pages = n * _SAMPLE_PAGES_PER_RANGE / relpages if relpages and relpages > 0 else 1.0
    percent = max(0.01, min(100.0, 100.0 * max(by_rows, by_pages)))
    keys = ", ".join(k.expr for k in plan.key)
    table = f"{plan.from_clause} TABLESAMPLE SYSTEM ({percent:.4f})"  # the sample clause follows the alias
    rows = conn.execute(f"SELECT {_key_text(plan)} FROM {table} WHERE {_where(plan)} ORDER BY {keys}").fetchall()
    if not rows:
        return []
    return _dedupe([list(rows[min(len(rows) - 1, math.ceil(len(rows) * i / n) - 1)]) for i in range(1, n)])


def _histogram(conn: Any, plan: ExtractPlan, n: int) -> list[list[Any]] | None:
    assert plan.table is not None
    row = conn.execute(
        "SELECT histogram_bounds::text::text[] FROM pg_stats WHERE schemaname = %s AND tablename = %s AND attname = %s",
        (plan.table.schema, plan.table.name, plan.key[0].name),
    ).fetchone()
    if row is None or not row[0] or len(row[0]) < n + 1:
        return None
    bounds = row[0]
    last = len(bounds) - 1
    integer = plan.key[0].typname in _INTEGER_TYPES
    picked: list[list[Any]] = []
    for i in range(1, n):
        position = last * i / n
        low = math.floor(position)
        if integer and low < last:
            # Between two bounds the rows are spread about evenly: interpolate instead of rounding to a
            # bound (with 100 buckets and 16 ranges, rounding made ranges up to 1.3x apart).
            a, b = int(bounds[low]), int(bounds[low + 1])
            picked.append([str(a + math.floor((position - low) * (b - a)))])
        else:
            picked.append([bounds[round(position)]])
    return _dedupe(picked)


def _pages(plan: ExtractPlan, n: int) -> list[KeyRange]:
    assert plan.pages is not None
    # Even splits (a ceil-sized step left the last range short, or made fewer than n ranges).
    starts = sorted({i * max(plan.pages, 1) // n for i in range(n)})
    return [KeyRange(i, [start], [starts[i + 1]] if i + 1 < len(starts) else None) for i, start in enumerate(starts)]


def plan_key_ranges(
    conn: Any, plan: ExtractPlan, partitions: int, method: str = "auto"
) -> tuple[list[KeyRange], str, float]:
    """Split ``plan``'s source into at most ``partitions`` ranges; return them, the method used, seconds."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions <= 0:
        raise InvalidInputError(f"partitions must be a positive integer, got {partitions!r}")
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {list(METHODS)}, got {method!r}")
    started = time.monotonic()
    if plan.pages is not None or method == "ctid":
        if plan.pages is None:
            raise InvalidInputError("method='ctid' needs key_columns=['ctid'] (a table with no usable key)")
        return _pages(plan, partitions), "ctid", time.monotonic() - started
    if not plan.key:
        raise InvalidInputError("the source has no key to partition by")
    if partitions == 1:
        return [KeyRange(0, None, None)], method, time.monotonic() - started
    # pg_stats bounds are sorted in the column's own collation: usable only when the key is paged by it
    if method in {"histogram", "auto"} and plan.table is not None:
        bounds = _histogram(conn, plan, partitions) if plan.key[0].plain else None
        if bounds is not None:
            return _from_bounds(_typed(plan, bounds)), "histogram", time.monotonic() - started
        if method == "histogram":
            raise InvalidInputError(
                f"no usable statistics for {plan.key[0].name!r} in pg_stats (or the key is paged under another "
                "collation than the statistics are sorted in): ANALYZE the table or use method='sample'"
            )
    if method in {"sample", "auto"} and plan.table is not None:
        return _from_bounds(_typed(plan, _sample(conn, plan, partitions))), "sample", time.monotonic() - started
    return _from_bounds(_typed(plan, _ntile(conn, plan, partitions))), "ntile", time.monotonic() - started


def ranges_to_kwargs(ranges: list[KeyRange], destination: str) -> list[dict[str, Any]]:
    """Operator keyword arguments per range, for ``PostgresExtractOperator.partial(...).expand_kwargs``."""
    base = str(destination).rstrip("/")
    return [{"lower_key": r.lower, "upper_key": r.upper, "destination": f"{base}/range={r.index:04d}"} for r in ranges]
