"""Incremental windows: read only the rows whose watermark lies in a window, exactly once.

Two kinds of watermark.

**A column** (``updated_at``, a version or batch number, a ``date``...). The window is fixed when the
run starts and reads::

    start <= wm  (minus the keys the previous run already read at start)   -- carried over
    wm < end  OR  (wm = end AND key IN <the keys at end when the run started>)

* ``end`` defaults to ``max(wm)`` over the finite values, read when the run starts. The rows that
  hold ``end`` at that moment are read, and their keys *and row versions* (``xmin``) are remembered
  (:attr:`Window.boundary_keys`). A row written later with a watermark *equal* to ``end`` (a coarse
  ``date`` or ``timestamp(0)``, a batch number, a clock with coarse resolution), or a remembered row
  updated since without its watermark moving, is therefore not lost: the next run starts *at*
  ``end``, inclusive, and skips only the remembered versions. This is exactly once, and the summary
  says so (``watermark_contract="exactly_once"``). A source without row versions (a query, a view)
  cannot remember them: its window ends before ``end``, and the rows holding it are the next run's.
* When more than :data:`END_KEYS_MAX` rows hold ``end`` (a ``date`` watermark on a busy table), or
  their keys take more than :data:`END_KEYS_CHARS_MAX` characters, they are too many to remember: the
  window ends *before* ``end`` (``wm < end``) and those rows are read by the next run, still exactly
  once, one run later.
* ``lag`` re-reads a trailing interval for writers whose commits arrive late (as dlt's ``lag``): the
  window starts at ``start - lag``, inclusive, and remembers nothing. Rows in that interval are read
  again (``watermark_contract="at_least_once"``): upsert by key downstream.
* **NULL and non-finite watermarks.** A first run (no start) is a full copy: rows with a NULL
  watermark are read too, and so are ``NaN`` and ``±Infinity`` ones. Later windows cannot see them
  (``NULL >= start`` is not true; the end is the largest *finite* value, so a single ``NaN`` or
  ``'infinity'`` cannot push every later window past all real rows), and an update that sets the
  watermark to NULL is not seen either; the run logs an estimate of how many NULL rows that leaves
  out.
* Caveat, as with any column watermark: a transaction that stamps a row *before* ``end`` but commits
  *after* the window was fixed is missed. ``lag`` covers commits up to ``lag`` late; ``xmin`` has no
  such gap.
* **Rows that arrive with an old watermark or xmin**: a partition attached or an inheritance child
  added after a window. Each window records the source's partitions and children (OIDs,
  :attr:`Window.descendants`); the next one reads those that arrived since whole, up to its end
  (``tableoid``), for a column watermark as its first run would (NULLs and non-finite values too).

**xmin** (``watermark_column="xmin"``), the transaction id that wrote each row version. ``end`` comes
from the current snapshot: ``pg_snapshot_xmin(pg_current_snapshot()) - 1``, the newest transaction id
below which every transaction has finished, so nothing in the window can still commit, and no later
row can tie with it: the window is ``start < xmin <= end``. Reading a snapshot assigns no transaction
id, so this works on a hot-standby replica. Bounds are 64-bit (``xid8``, epoch included); rows carry
32-bit xids, so the filter compares modulo 2^32::

    ((end32 - xmin) mod 2^32) < end - start      -- start < xmin <= end, across wraparound

A window of 2^31 transactions or more is ambiguous modulo 2^32: the run then reads the whole table
(logged) and the next run continues incrementally. The first run (no ``start``) reads every row.

Inside any window, chunks are still ordered and paged by the key, not by the watermark.

**Servers that disagree.** The window is fixed on the parent's connection; every chunk checks that
its own server has replayed at least the WAL position the window was fixed at (a load balancer in
front of replicas could otherwise send a chunk to one that does not yet see rows inside the window).
A chunk served by a server that is behind fails with a clear error instead of missing them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg

from airflow_provider_cxpg.exceptions import InvalidInputError, SourceChangedError, SourceNotFoundError
from airflow_provider_cxpg.planning.catalog import (
    cluster_identifier,
    may_call,
    query_column_collation,
    timeline_identifier,
)
from airflow_provider_cxpg.planning.plan import SOURCE_ALIAS, ExtractPlan
from airflow_provider_cxpg.planning.sql import literal, quote_ident, text_form

__all__ = [
    "AT_LEAST_ONCE",
    "END_KEYS_CHARS_MAX",
    "END_KEYS_MAX",
    "EXACTLY_ONCE",
    "XMIN",
    "WatermarkSpec",
    "Window",
    "check_watermark",
    "replay_guard",
    "resolve_window",
    "wal_position",
]

XMIN = "xmin"
EXACTLY_ONCE = "exactly_once"
AT_LEAST_ONCE = "at_least_once"
#: At most this many keys holding the window's end are remembered; with more, the end is exclusive.
END_KEYS_MAX = 1000
#: ... and at most this many characters of them (key texts and row versions together). Every chunk of
#: the next run carries them in its SQL, and the state Variable keeps them for 10 runs: 1000 long text
#: keys would make both megabytes (a MySQL metadata database refuses a Variable over 16 MB).
END_KEYS_CHARS_MAX = 256 * 1024

_XID_MODULO = 1 << 32
_XID_HALF = 1 << 31
_FIRST_NORMAL_XID = 3
_NUMBER_TYPES = frozenset({"int2", "int4", "int8", "numeric", "float4", "float8"})
_TIME_TYPES = frozenset({"date", "timestamp", "timestamptz"})
_WATERMARK_TYPES = _NUMBER_TYPES | _TIME_TYPES | {"text", "varchar", "uuid"}

Keys = tuple[tuple[Any, ...], ...]


def _keys(value: Any) -> Keys:
    return tuple(tuple(k) for k in value or ())


@dataclass(frozen=True)
class WatermarkSpec:
    """What to read: a column and the window's bounds.

    :param column: the watermark column, or ``"xmin"``.
    :param start: lower bound; exclusive, unless ``start_inclusive`` (a carried-over window).
    :param end: upper bound (default: fixed when the run starts); rows holding it when the run starts
        are read.
    :param lag: re-read this much before ``start`` (a number, or seconds / ``timedelta`` for
        date and timestamp columns): at-least-once.
    :param start_inclusive: ``start`` is the previous run's end: rows at it are read, except
        ``start_keys``.
    :param start_keys: keys (as JSON values) already read at ``start`` by the previous run.
    :param first_run: no earlier run exists: rows with a NULL watermark are read too. Defaults to
        "no start given".
    :param recorded: a resolved window (:meth:`Window.to_json`) to read again exactly (resume, the
        ranges of a fan-out, a re-run of the same DAG run); the other fields are ignored.
    :param sequence: the window's place in its task's chain of committed windows (the one it follows
        plus one; a first run is 1): what decides whether a committed window moves the next start,
        whatever order the watermark's values sort in. None when not known.
    :param one_off: no later window starts where this one ends (an explicit ``watermark_start``:
        the state is neither read nor moved), so ``end`` is read as given. Otherwise an ``end`` past
        the largest value at run start (for xmin: past the oldest running transaction) is lowered to
        it: rows written later below it would fall behind the next window's start.
    :param known_descendants: the source's partitions and children when the window this one follows
        was fixed (None: not known); those that arrived since are read whole, up to ``end``.
    :param known_cluster: for xmin, the system identifier of the cluster whose transaction ids the
        window this one follows counted (None: not known); on another cluster they mean nothing.
    """

    column: str
    start: Any = None
    end: Any = None
    lag: Any = None
    start_inclusive: bool = False
    start_keys: Keys = ()
    first_run: bool | None = None
    recorded: Mapping[str, Any] | None = field(default=None, compare=False)
    sequence: int | None = field(default=None, compare=False)
    one_off: bool = field(default=False, compare=False)
    known_descendants: tuple[int, ...] | None = field(default=None, compare=False)
    known_cluster: str | None = field(default=None, compare=False)
    known_timeline: int | None = field(default=None, compare=False)

    @property
    def window_sequence(self) -> int | None:
        """The sequence the resolved window records (a first run is 1)."""
        return self.sequence if self.sequence is not None else (1 if self.is_first_run else None)

    @property
    def is_xmin(self) -> bool:
        return self.column == XMIN

    @property
    def is_first_run(self) -> bool:
        return self.start in (None, "") if self.first_run is None else self.first_run

    def identity(self) -> list[Any]:
        """What makes two specs the same window request (part of an extraction's fingerprint)."""
        if self.recorded is not None:
            return [self.column, "recorded", self.recorded.get("start"), self.recorded.get("end")]
        return [
            self.column,
            str(self.start),
            str(self.end),
            self.start_inclusive,
            [list(k) for k in self.start_keys],
            str(self.lag),
        ]

    @classmethod
    def following(cls, window: Mapping[str, Any], *, end: Any = None, lag: Any = None) -> WatermarkSpec:
        """The window that follows ``window`` (a :meth:`Window.to_json`): it starts where that one ended."""
        previous = window.get("sequence")
        sequence = previous + 1 if isinstance(previous, int) and not isinstance(previous, bool) else None
        recorded = window.get("descendants")
        known = tuple(int(d) for d in recorded) if isinstance(recorded, list) else None
        if window.get("column") == XMIN:
            return cls(
                XMIN,
                start=window.get("high_watermark"),
                end=end,
                first_run=False,
                sequence=sequence,
                known_descendants=known,
                known_cluster=window.get("cluster"),
                known_timeline=window.get("timeline"),
            )
        return cls(
            str(window["column"]),
            start=window.get("high_watermark"),
            end=end,
            lag=lag,
            start_inclusive=bool(window.get("next_start_inclusive", True)),
            start_keys=_keys(window.get("boundary_keys")),
            first_run=False,
            sequence=sequence,
            known_descendants=known,
        )

    @classmethod
    def again(cls, window: Mapping[str, Any]) -> WatermarkSpec:
        """Exactly ``window`` (a :meth:`Window.to_json`) again."""
        return cls(str(window["column"]), recorded=dict(window))


@dataclass(frozen=True)
class Window:
    """A resolved window: the filters to add, what to record, and what the next run starts from.

    :param start_inclusive: rows at ``start`` are in the window (except ``start_keys``).
    :param end_mode: ``keys`` (rows at ``end`` when the run started: ``end_keys``), ``exclusive``
        (rows at ``end`` are left for the next run) or ``inclusive`` (xmin: nothing can tie later).
    :param boundary_keys: keys read at ``high_watermark``: the next run skips them.
    :param contract: ``exactly_once``, or ``at_least_once`` with a ``lag``.
    :param sequence: its place in its task's chain of committed windows (see :class:`WatermarkSpec`).
    :param descendants: the source's partitions and children (OIDs) when the window was fixed.
    :param arrived: those of them the previous window did not know: read whole, up to ``end``.
    :param cluster: for xmin, the system identifier of the cluster whose transaction ids ``start``
        and ``end`` count (``pg_control_system()``; a physical standby shares its primary's).
    """

    column: str
    start: Any
    end: Any
    filters: tuple[str, ...]
    high_watermark: Any
    note: str | None = None
    start_inclusive: bool = False
    start_keys: Keys = ()
    end_mode: str = "inclusive"
    end_keys: Keys = ()
    boundary_keys: Keys = ()
    next_start_inclusive: bool = False
    lag: Any = None
    contract: str = EXACTLY_ONCE
    first_run: bool = False
    wal_position: str | None = None
    null_rows_estimate: int | None = None
    versioned: bool = False
    sequence: int | None = None
    descendants: tuple[int, ...] | None = None
    arrived: tuple[int, ...] = ()
    cluster: str | None = None
    timeline: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Everything needed to read this window again, or the one after it (manifests, state)."""
        return {
            "column": self.column,
            "start": self.start,
            "start_inclusive": self.start_inclusive,
            "start_keys": [list(k) for k in self.start_keys],
            "end": self.end,
            "end_mode": self.end_mode,
            "end_keys": [list(k) for k in self.end_keys],
            "high_watermark": self.high_watermark,
            "boundary_keys": [list(k) for k in self.boundary_keys],
            "next_start_inclusive": self.next_start_inclusive,
            "lag": self.lag,
            "contract": self.contract,
            "first_run": self.first_run,
            "wal_position": self.wal_position,
            "versioned": self.versioned,
            "note": self.note,
            "sequence": self.sequence,
            "descendants": list(self.descendants) if self.descendants is not None else None,
            "arrived": list(self.arrived),
            "cluster": self.cluster,
            "timeline": self.timeline,
        }

    def summary(self) -> dict[str, Any]:
        """The XCom-sized form: bounds and counts, no key lists."""
        data = {
            "column": self.column,
            "start": self.start,
            "start_inclusive": self.start_inclusive,
            "end": self.end,
            "end_mode": self.end_mode,
            "high_watermark": self.high_watermark,
            "contract": self.contract,
            "skipped_at_start": len(self.start_keys),
            "boundary_keys": len(self.boundary_keys),
        }
        if self.lag is not None:
            data["lag"] = self.lag
        if self.null_rows_estimate:
            data["null_rows_estimate"] = self.null_rows_estimate
        if self.arrived:
            data["arrived_partitions"] = len(self.arrived)
        return data


def _column_type(plan: ExtractPlan, column: str) -> tuple[str, str, bool]:
    """(type for its literals, without the modifier; typname; may be NULL) of ``column`` in the source."""
    if plan.table is not None:
        for col in plan.table.columns:
            if col.name == column:
                return col.pg.literal_type, col.pg.typname, col.not_null is not True
        raise SourceNotFoundError(
            f"watermark column {column!r} does not exist in {plan.table.schema}.{plan.table.name}"
        )
    for read in plan.columns:
        if read.name == column:
            return read.pg.literal_type, read.pg.typname, True
    raise SourceNotFoundError(f"watermark column {column!r} is not in the output of the source query")


def _as_int(value: Any, what: str) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{what} for an xmin watermark must be a transaction id (integer), got {value!r}"
        ) from None


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_watermark(plan: ExtractPlan, spec: WatermarkSpec) -> None:
    """Refuse a watermark the source cannot serve, from the plan alone: before anything is written.

    :raises InvalidInputError: naming what does not fit.
    """
    if spec.recorded is not None or not spec.is_xmin:
        return
    if not _blank(spec.lag):
        raise InvalidInputError("watermark_lag does not apply to xmin: an xmin window already sees late commits")
    if plan.table is None or plan.table.kind not in {"table", "partitioned table", "materialized view"}:
        raise InvalidInputError("watermark_column='xmin' needs a `table` source (xmin is a system column of tables)")
    if plan.table.foreign_descendants:
        raise InvalidInputError(
            f"watermark_column='xmin' cannot read {plan.table.qualified_name}: a foreign table among its partitions "
            "or children reports xmin 0 for every row, so no window would ever select its rows; use a column "
            "watermark"
        )


def resolve_window(conn: Any, plan: ExtractPlan, spec: WatermarkSpec) -> Window:
    """Fix the window now (a few queries on the control connection) and build its filters."""
    if spec.recorded is not None:
        return _rebuild(conn, plan, spec.recorded)
    check_watermark(plan, spec)
    if spec.is_xmin:
        return _xmin_window(conn, plan, spec)
    return _column_window(conn, plan, spec)


def _lag_seconds(lag: Any) -> float:
    if isinstance(lag, dt.timedelta):
        return lag.total_seconds()
    if isinstance(lag, bool) or not isinstance(lag, (int, float, str)):
        raise InvalidInputError(f"watermark_lag must be a number or a timedelta, got {lag!r}")
    try:
        return float(lag)
    except ValueError:
        raise InvalidInputError(f"watermark_lag must be a number or a timedelta, got {lag!r}") from None


def _lagged_start(conn: Any, start: Any, lag: Any, sql_type: str, typname: str) -> Any:
    """``start - lag`` computed by the server, in the column's own text form."""
    if typname in _TIME_TYPES:
        seconds = _lag_seconds(lag)
        amount = f"make_interval(secs => {seconds!r})"
    elif typname in _NUMBER_TYPES:
        if isinstance(lag, dt.timedelta):
            raise InvalidInputError(f"watermark_lag for a {sql_type} column must be a number, got {lag!r}")
        amount = literal(_lag_seconds(lag), "numeric")
    else:
        raise InvalidInputError(f"watermark_lag does not apply to a {sql_type} watermark (it has no distance)")
    if _lag_seconds(lag) < 0:
        raise InvalidInputError(f"watermark_lag must not be negative, got {lag!r}")
    row = conn.execute(f"SELECT (({literal(start, sql_type)}) - {amount})::{sql_type}::text").fetchone()
    return row[0]


def _column_window(conn: Any, plan: ExtractPlan, spec: WatermarkSpec) -> Window:
    sql_type, typname, nullable = _column_type(plan, spec.column)
    if typname not in _WATERMARK_TYPES:
        raise InvalidInputError(f"watermark column {spec.column!r} has type {sql_type}, which cannot be a watermark")
    expr = f"{SOURCE_ALIAS}.{quote_ident(spec.column)}"
    start = None if _blank(spec.start) else spec.start
    start_inclusive, start_keys = spec.start_inclusive and start is not None, spec.start_keys if start else ()
    lag = None if _blank(spec.lag) else spec.lag
    contract = EXACTLY_ONCE
    if lag is not None and start is not None:
        start = _lagged_start(conn, start, lag, sql_type, typname)
        start_inclusive, start_keys, contract = True, (), AT_LEAST_ONCE
    where = " AND ".join(f"({f})" for f in plan.filters) or "true"
    finite = _finite(conn, expr, sql_type, typname)
    condition = f"{where} AND {finite}" if finite else where
    notes: list[str] = []
    given = None if _blank(spec.end) else spec.end
    if given is not None and spec.one_off:
        end = given  # a one-off window reads what it was given: no later window starts at its end
    else:
        # max(expr) keeps the column's collation, so "< given" compares as the window's filters do.
        past = f", max({expr}) < {literal(given, sql_type)}" if given is not None else ""
        row = conn.execute(f"SELECT max({expr})::text{past} FROM {plan.from_clause} WHERE {condition}").fetchone()
        largest = row[0] if row else None
        end = largest if given is None else given
        if given is not None and (largest is None or row[1]):
            # A given end past every value the source holds now (a data interval that has not
            # closed, a date ahead): rows written later below it would fall behind the next run's
            # start. The window ends at what exists, as without an end; they are the next run's.
            notes.append(
                f"watermark_end {given!r} lies past the largest {spec.column} when the run started "
                f"({largest!r}): the window ends there; rows written later up to watermark_end are the next run's"
            )
            end = largest
    end_mode, end_keys = "keys", ()
    versioned = _has_row_versions(plan)
    if end is not None:
        found, too_many = _keys_at(conn, plan, expr, literal(end, sql_type), where) if versioned else (None, "")
        if found is None:
            end_mode = "exclusive"
            notes.append(
                f"{too_many} hold the window's end {end!r}: they are left for the next run"
                if versioned
                else "the source has no row versions to remember the rows at the window's end by (a query, a "
                "view, a materialized view, a foreign table or one among its partitions): they are left for the "
                "next run"
            )
        else:
            end_keys = found
    collation = _collation(conn, plan, expr, typname) if end is not None and start is not None else None
    order = _compare(conn, end, start, sql_type, collation) if end is not None and start is not None else None
    if order is not None and order < 0:
        notes.append(f"the window's end {end!r} lies before its start {start!r}: nothing to read")
    # Where the next run starts: the end, skipping the keys read there (all of them, when the end is
    # the start too); or, when nothing could be read, where this one started.
    if end is None or (order is not None and order < 0):
        high, boundary, next_inclusive = start, start_keys, start_inclusive or start is None
    elif order == 0 and not start_inclusive:  # `wm > start` and `wm <= start`: nothing, start stays exclusive
        high, boundary, next_inclusive = start, (), False
    else:
        carried = set(start_keys) if order == 0 else set()
        if end_mode == "keys":
            carried |= set(end_keys)
        high, boundary, next_inclusive = end, tuple(sorted(carried, key=repr)), True
    descendants, arrived = _descendants(plan, spec)
    if arrived:
        notes.append(_arrived_note(arrived))
    null_estimate = None
    if nullable and not spec.is_first_run and plan.table is not None:
        null_estimate = _null_estimate(conn, plan, spec.column)
        if null_estimate:
            notes.append(
                f"about {null_estimate} rows have a NULL {spec.column}: only a first run (no start) reads them"
            )
    window = Window(
        column=spec.column,
        start=_jsonable(start),
        end=_jsonable(end),
        filters=(),
        high_watermark=_jsonable(high),
        note="; ".join(notes) or None,
        start_inclusive=start_inclusive,
        start_keys=tuple(start_keys),
        end_mode=end_mode,
        end_keys=tuple(end_keys),
        boundary_keys=boundary,
        next_start_inclusive=next_inclusive,
        lag=lag.total_seconds() if isinstance(lag, dt.timedelta) else lag,
        contract=contract,
        first_run=spec.is_first_run,
        wal_position=wal_position(conn),
        null_rows_estimate=null_estimate,
        versioned=versioned,
        sequence=spec.window_sequence,
        descendants=descendants,
        arrived=arrived,
    )
    return replace(window, filters=_column_filters(plan, window, sql_type, finite))


#: Relations whose rows carry ``xmin``: a row version, which changes with every update. Not a
#: materialized view: ``REFRESH`` rewrites every row (new versions of unchanged rows: re-read as
#: duplicates an exactly-once window may not have).
_VERSIONED_KINDS = frozenset({"table", "partitioned table"})


def _has_row_versions(plan: ExtractPlan) -> bool:
    # A foreign table among the partitions or children: postgres_fdw reports xmin 0 for its rows,
    # before and after an update, so an updated row at the window's end would pass for one read.
    table = plan.table
    return bool(plan.key) and table is not None and table.kind in _VERSIONED_KINDS and not table.foreign_descendants


def _finite(conn: Any, expr: str, sql_type: str, typname: str) -> str | None:
    """A condition true for finite watermark values (None: every value of the type is finite).

    ``NaN`` and ``Infinity`` sort above every number, ``'infinity'`` above every date: one such row
    as the window's end would put every later window past all real rows.
    """
    if typname in _TIME_TYPES:
        return f"isfinite({expr})"
    # numeric(p, s) holds NaN but not ±Infinity ('Infinity'::numeric(10,2) is an overflow): the
    # specials are unconstrained numeric literals, which compare with any numeric column.
    special_type = "numeric" if typname == "numeric" else sql_type
    if typname in {"float4", "float8"} or (typname == "numeric" and conn.info.server_version >= 140000):
        specials = ", ".join(literal(v, special_type) for v in ("NaN", "Infinity", "-Infinity"))
        return f"{expr} NOT IN ({specials})"
    if typname == "numeric":  # numeric infinities arrived in PostgreSQL 14
        return f"{expr} <> {literal('NaN', special_type)}"
    return None


def _versioned_in(plan: ExtractPlan, entries: Keys) -> str:
    """``(k1, ..., xmin) IN (...)``: these keys *in these row versions* (the last value of each entry)."""
    # xid's = belongs to no btree family, which a row comparison needs: compare its text form
    exprs = [k.expr for k in plan.key] + [f"({SOURCE_ALIAS}.xmin)::text"]
    rows = [[*plan.key_literals(list(entry[:-1])), literal(entry[-1], "text")] for entry in entries]
    return f"({', '.join(exprs)}) IN ({', '.join('(' + ', '.join(r) + ')' for r in rows)})"


def _keys_at(conn: Any, plan: ExtractPlan, expr: str, end_literal: str, where: str) -> tuple[Keys | None, str]:
    """Keys and row versions of the rows holding the end value now; or None and what made them too
    many to remember (more than :data:`END_KEYS_MAX` rows, or :data:`END_KEYS_CHARS_MAX` characters)."""
    texts = ", ".join(f"({k.expr})::text" for k in plan.key) + f", {SOURCE_ALIAS}.xmin::text"
    order = ", ".join(k.expr for k in plan.key)
    rows = conn.execute(
        f"SELECT {texts} FROM {plan.from_clause} WHERE {where} AND {expr} = {end_literal} "
        f"ORDER BY {order} LIMIT {END_KEYS_MAX + 1}"
    ).fetchall()
    if len(rows) > END_KEYS_MAX:
        return None, f"more than {END_KEYS_MAX} rows"
    # A btree key is at most ~2.7 kB a column, so the rows fetched above are bounded; their texts are not
    # small enough to keep when the keys are long.
    chars = sum(len(v) for row in rows for v in row if v is not None)
    if chars > END_KEYS_CHARS_MAX:
        return None, f"{len(rows)} rows whose keys take {chars} characters (more than {END_KEYS_CHARS_MAX})"
    return tuple((*_typed_key(plan, row[:-1]), row[-1]) for row in rows), ""


def _typed_key(plan: ExtractPlan, row: Sequence[Any]) -> tuple[Any, ...]:
    """Integers back to ints (readable manifests); every other key value keeps its exact text form."""
    integers = {"int2", "int4", "int8", "oid"}
    return tuple(int(v) if k.typname in integers else v for k, v in zip(plan.key, row, strict=True))


def _collation(conn: Any, plan: ExtractPlan, expr: str, typname: str) -> str | None:
    """The collation the window's filters compare ``expr`` under (None: not a text watermark)."""
    if typname not in {"text", "varchar"}:
        return None
    return query_column_collation(conn, plan.from_clause, expr)[0]


def _compare(conn: Any, a: Any, b: Any, sql_type: str, collation: str | None = None) -> int:
    """-1, 0 or 1 as the server orders ``a`` and ``b`` of ``sql_type`` (under ``collation``: the
    column's, as the filters compare; two bare literals would compare under the database's)."""
    x, y = literal(a, sql_type), literal(b, sql_type)
    if collation:
        x, y = f"({x} COLLATE {collation})", f"({y} COLLATE {collation})"
    return int(conn.execute(f"SELECT CASE WHEN {x} < {y} THEN -1 WHEN {x} = {y} THEN 0 ELSE 1 END").fetchone()[0])


def _column_filters(plan: ExtractPlan, window: Window, sql_type: str, finite: str | None) -> tuple[str, ...]:
    expr = f"{SOURCE_ALIAS}.{quote_ident(window.column)}"
    conditions: list[str] = []
    if window.start is not None:
        start = literal(window.start, sql_type)
        if window.start_inclusive:
            conditions.append(f"{expr} >= {start}")
            if window.start_keys:  # the versions read at the start: an updated row is read again
                conditions.append(f"NOT ({expr} = {start} AND {_versioned_in(plan, window.start_keys)})")
        else:
            conditions.append(f"{expr} > {start}")
    if window.end is None:
        end_condition = "false"  # an empty source (or only NULL watermarks)
    else:
        end = literal(window.end, sql_type)
        if window.end_mode == "keys" and window.end_keys:
            end_condition = f"({expr} < {end} OR ({expr} = {end} AND {_versioned_in(plan, window.end_keys)}))"
        else:  # no key at the end (or too many): rows holding it are the next run's
            end_condition = f"{expr} < {end}"
    conditions.append(end_condition)
    condition = " AND ".join(f"({c})" for c in conditions)
    # num_nulls, not IS NULL: the planner folds IS NULL to false under a declared NOT NULL that
    # nobody enforces (a foreign table or partition), and those rows would be no run's.
    unseen = f"num_nulls({expr}) > 0" + (f" OR NOT ({finite})" if finite else "")
    if window.first_run:  # a full copy: NULL and non-finite watermarks too
        condition = f"({condition}) OR {unseen}"
    elif window.arrived:  # partitions or children attached since: a first run of theirs, up to the end
        condition = f"({condition}) OR ({_arrived_in(window.arrived)} AND ({end_condition} OR {unseen}))"
    filters = [condition]
    if window.wal_position:
        filters.append(replay_guard(window.wal_position))
    return tuple(filters)


def replay_guard(wal_position: str, fixed: str = "the incremental window was fixed") -> str:
    """A condition that raises unless this connection's server has replayed ``wal_position``.

    It references no column, so PostgreSQL evaluates it once per query (a one-time filter), also when
    no row matches; a server that is behind fails the query with this text in the error message.

    :param fixed: what happened at ``wal_position``, for the message.
    """
    lsn = literal(wal_position, "pg_lsn")
    position = _WAL_POSITION
    message = (
        f"cxpg: this server has not yet replayed WAL position {wal_position}, at which {fixed}; it is behind "
        "the server that was read then (a replica behind a load balancer, another host of a list?) backend "
    )
    # A scalar subquery becomes an InitPlan, run once per query even when no row matches (a volatile
    # condition in WHERE would run per row, so not at all for an empty result). The failing cast
    # includes pg_backend_pid() so the planner cannot fold it (and raise) while planning.
    failure = f"({literal(message, 'text')} || pg_backend_pid()::text)::int::bool"
    return f"(SELECT CASE WHEN {position} >= {lsn} THEN true ELSE {failure} END)"


#: Where this server's visible data ends in the WAL: what a standby has replayed; on a primary the
#: *insert* position (a commit becomes visible once inserted; with synchronous_commit=off it may not
#: be written yet, so pg_current_wal_lsn() can lie before it).
_WAL_POSITION = "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END"


def _in_recovery(conn: Any) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def wal_position(conn: Any) -> str | None:
    """Where this server's visible data ends in the WAL now: every row a window's end or a plan saw is
    visible there (for :func:`replay_guard`; None: the role may not ask)."""
    try:
        if not may_call(conn, "pg_current_wal_insert_lsn()", "pg_last_wal_replay_lsn()"):
            return None
        row = conn.execute(f"SELECT ({_WAL_POSITION})::text").fetchone()
    except psycopg.Error:  # not Exception: a deadline, an abort, AirflowTaskTimeout (Airflow 2) must go on
        return None
    return row[0] if row and row[0] else None


def _null_estimate(conn: Any, plan: ExtractPlan, column: str) -> int | None:
    """``pg_stats``' estimate of rows with a NULL ``column`` (cheap: reads no table pages)."""
    assert plan.table is not None
    row = conn.execute(
        "SELECT (s.null_frac * greatest(c.reltuples, 0))::bigint FROM pg_stats s, pg_class c "
        "WHERE s.schemaname = %s AND s.tablename = %s AND s.attname = %s AND c.oid = to_regclass(%s)",
        (plan.table.schema, plan.table.name, column, plan.table.qualified_name),
    ).fetchone()
    return int(row[0]) if row and row[0] else None


def _rebuild(conn: Any, plan: ExtractPlan, recorded: Mapping[str, Any]) -> Window:
    """A recorded window again, with the same filters (no query decides anything new)."""
    column = str(recorded["column"])
    window = Window(
        column=column,
        start=recorded.get("start"),
        end=recorded.get("end"),
        filters=(),
        high_watermark=recorded.get("high_watermark"),
        note=recorded.get("note"),
        start_inclusive=bool(recorded.get("start_inclusive")),
        start_keys=_keys(recorded.get("start_keys")),
        end_mode=str(recorded.get("end_mode") or ("inclusive" if column == XMIN else "keys")),
        end_keys=_keys(recorded.get("end_keys")),
        boundary_keys=_keys(recorded.get("boundary_keys")),
        next_start_inclusive=bool(recorded.get("next_start_inclusive")),
        lag=recorded.get("lag"),
        contract=str(recorded.get("contract") or EXACTLY_ONCE),
        first_run=bool(recorded.get("first_run")),
        wal_position=recorded.get("wal_position"),
        versioned=bool(recorded.get("versioned")),
        sequence=recorded.get("sequence"),
        descendants=tuple(recorded["descendants"]) if isinstance(recorded.get("descendants"), list) else None,
        arrived=tuple(int(d) for d in recorded.get("arrived") or ()),
        cluster=recorded.get("cluster"),
        timeline=recorded.get("timeline"),
    )
    if column == XMIN:
        _refuse_another_cluster(conn, window)
        return replace(window, filters=_xmin_filters(window))
    sql_type, typname, _ = _column_type(plan, column)
    return replace(
        window, filters=_column_filters(plan, window, sql_type, _finite(conn, expr_of(column), sql_type, typname))
    )


def expr_of(column: str) -> str:
    return f"{SOURCE_ALIAS}.{quote_ident(column)}"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return text_form(value)


def _xmin_window(conn: Any, plan: ExtractPlan, spec: WatermarkSpec) -> Window:
    row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()
    settled = int(row[0]) - 1  # every transaction up to here has ended: none can still commit into the window
    end, note = settled, None
    if not _blank(spec.end):
        end = _as_int(spec.end, "watermark_end")
        # A transaction at or below it may still commit: it would fall behind the next window's start.
        if end > settled and not spec.one_off:
            note = (
                f"watermark_end {end} lies past the oldest transaction still running ({settled + 1}): "
                f"the window ends at {settled}"
            )
            end = settled
    start = None if _blank(spec.start) else _as_int(spec.start, "watermark_start")
    cluster = cluster_identifier(conn)
    moved = start is not None and None not in (cluster, spec.known_cluster) and cluster != spec.known_cluster
    # The same cluster whose transaction ids went back: a physical restore (PITR, a snapshot, a
    # clone) or a failover that lost transactions keeps the system identifier. On a primary the
    # ids never go back otherwise; a standby behind the server the last window was read on may.
    # A restore (PITR) or a promotion starts a new timeline: transactions of the old one past the
    # branch point were lost and their ids are issued again, and once enough are, the ids alone no
    # longer show it. A restore that keeps the timeline (a volume snapshot) shows only while the ids
    # are still below the last window's end.
    timeline = timeline_identifier(conn)
    # Timelines only grow: a lower one is a server behind (a standby before its next restartpoint).
    branched = timeline is not None and spec.known_timeline is not None and timeline > spec.known_timeline
    rewound = (
        not moved
        and not spec.one_off
        and start is not None
        and (branched or (settled < start and not _in_recovery(conn)))
    )
    if moved or rewound:  # ids that mean other rows here: a window from ``start`` would select nothing
        start = None
    # At least once, honestly: a first run (or a too-wide window) reads every row, also rows
    # committed after ``end`` that the next window reads again, and a frozen tuple's raw xmin can
    # collide modulo 2^32 with a later window.
    window = Window(
        XMIN,
        start,
        end,
        (),
        end,
        end_mode="inclusive",
        first_run=start is None,
        contract=AT_LEAST_ONCE,
        wal_position=wal_position(conn),
        sequence=spec.window_sequence,
        cluster=cluster,
        timeline=timeline,
    )
    descendants, arrived = _descendants(plan, replace(spec, first_run=True) if moved or rewound else spec)
    window = replace(window, descendants=descendants, arrived=arrived)
    if arrived:
        note = "; ".join(n for n in (note, _arrived_note(arrived)) if n)
    if moved:
        window = replace(
            window,
            note=f"the last window counted the transaction ids of another cluster (system identifier "
            f"{spec.known_cluster}; this server's is {cluster}): every row is read",
        )
    elif rewound:
        went = (
            f"the server is on timeline {timeline}, the last window was read on timeline {spec.known_timeline}"
            if branched
            else f"this primary's transaction ids went back below the last window's end ({spec.start}; now {settled})"
        )
        window = replace(
            window,
            note=f"{went} (a restore from a backup, a failover): transactions may have been lost and their ids "
            "issued again; every row is read",
        )
    elif start is None:
        window = replace(window, note="first xmin run: every row is read")
    elif end - start <= 0:
        window = replace(window, high_watermark=max(start, end), note="empty xmin window")
    elif end - start >= _XID_HALF:
        window = replace(
            window,
            note=f"xmin window of {end - start} transactions is too wide to compare modulo 2^32: reading every row",
        )
    if note is not None:
        window = replace(window, note="; ".join(n for n in (note, window.note) if n))
    return replace(window, filters=_xmin_filters(window))


def _refuse_another_cluster(conn: Any, window: Window) -> None:
    """A recorded xmin window read again on a server of another cluster would select other rows."""
    if window.cluster is None:
        return
    cluster = cluster_identifier(conn)
    if cluster is not None and cluster != window.cluster:
        raise SourceChangedError(
            f"this xmin window ({window.start}, {window.end}] was fixed on another PostgreSQL cluster (system "
            f"identifier {window.cluster}; this server's is {cluster}): its transaction ids select other rows "
            "here. Read it on the server it was fixed on, or start a new window on this one",
            changes=[f"system identifier {window.cluster} -> {cluster}"],
        )


def _xmin_filters(window: Window) -> tuple[str, ...]:
    guard = (replay_guard(window.wal_position),) if window.wal_position else ()
    start, end = window.start, window.end
    if start is None:
        return guard
    span = int(end) - int(start)
    if span >= _XID_HALF:
        return guard
    xmin = f"{SOURCE_ALIAS}.xmin::text::bigint"
    end32 = int(end) % _XID_MODULO
    condition = (
        f"(({end32}::bigint - {xmin} + {_XID_MODULO}) % {_XID_MODULO}) < {span} AND {xmin} >= {_FIRST_NORMAL_XID}"
        if span > 0
        else "false"
    )
    if window.arrived:  # attached since the last window: their rows keep old xmins; read them whole
        condition = f"({condition}) OR {_arrived_in(window.arrived)}"
    return (condition, *guard)


def _arrived_note(arrived: Sequence[int]) -> str:
    return (
        f"{len(arrived)} partition(s) or inheritance child(ren) arrived since the last window: read whole, "
        "up to the window's end (their rows keep the watermarks and xmins they had before)"
    )


def _arrived_in(oids: Sequence[int]) -> str:
    """True for rows of these partitions or inheritance children (``tableoid`` names a row's relation)."""
    return f"{SOURCE_ALIAS}.tableoid = ANY ('{{{','.join(str(int(o)) for o in oids)}}}'::oid[])"


def _descendants(plan: ExtractPlan, spec: WatermarkSpec) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """The source's partitions and children now, and those that arrived since the window ``spec`` follows.

    A partition attached (``ATTACH PARTITION``) or a child added (``INHERIT``) brings rows whose
    watermarks and xmins are old: below every later window's start, no window would hold them.
    """
    if plan.table is None:
        return None, ()
    current = tuple(plan.table.descendants)
    known = spec.known_descendants
    if known is None or spec.is_first_run:  # a first run reads everything; an old state knows none
        return current, ()
    return current, tuple(sorted(set(current) - set(known)))
