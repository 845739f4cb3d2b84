"""Progress a user can read: rows so far, the estimated total, percent, rows/s and an ETA.

One ``job.progress`` event after the first committed chunk, then after a chunk whenever
``interval`` seconds have passed since the last one (a long extraction logs it every few seconds,
a fast one does not flood the log), and one at the end. The estimate is the planner's: PostgreSQL's
row estimate for the run's filtered source (window and key range included), read with ``EXPLAIN``
without running anything; ``pg_class.reltuples`` when that fails.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg

from airflow_provider_cxpg.planning.plan import ExtractPlan
from airflow_provider_cxpg.querylog import QueryLog

__all__ = ["Progress", "estimate_rows"]


def estimate_rows(conn: Any, plan: ExtractPlan) -> int | None:
    """PostgreSQL's estimate of the rows ``plan`` reads (``EXPLAIN``, nothing runs)."""
    conditions = " AND ".join(f"({f})" for f in plan.filters) or "true"
    try:
        row = conn.execute(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {plan.from_clause} WHERE {conditions}").fetchone()
        document = row[0] if isinstance(row[0], list) else json.loads(row[0])
        return int(document[0]["Plan"]["Plan Rows"])
    # An estimate is a nicety: a server error or an unexpected plan falls back to the catalog's. Not
    # Exception: a deadline, an abort or AirflowTaskTimeout (an Exception on Airflow 2) must go on.
    except (psycopg.Error, LookupError, TypeError, ValueError):
        table = plan.table
        return table.estimated_rows if table is not None else None


class Progress:
    """Emits ``job.progress`` for one extraction (see the module docstring).

    :param rows_before: rows committed before this attempt (a resumed run).
    """

    def __init__(
        self, log: QueryLog, estimated_rows: int | None, *, rows_before: int = 0, interval: float = 5.0, **fields: Any
    ) -> None:
        self._log, self.estimated_rows, self._interval, self._fields = log, estimated_rows, interval, fields
        self._started = time.monotonic()
        self._rows_before = rows_before
        self._last: float | None = None

    def chunk(self, rows: int, *, final: bool = False) -> None:
        """After a committed chunk: ``rows`` committed in all."""
        now = time.monotonic()
        if not final and self._last is not None and now - self._last < self._interval:
            return
        self._last = now
        elapsed = max(now - self._started, 1e-6)
        rate = (rows - self._rows_before) / elapsed
        estimate = self.estimated_rows
        percent = min(100.0, 100.0 * rows / estimate) if estimate else None
        eta = max(0.0, (estimate - rows) / rate) if estimate and rate > 0 and not final else None
        self._log.emit(
            "job.progress",
            rows=rows,
            estimated_rows=estimate,
            percent=round(percent, 1) if percent is not None else None,
            rows_per_s=round(rate, 1),
            eta_seconds=round(eta, 1) if eta is not None else None,
            seconds=elapsed,
            final=final or None,
            **self._fields,
        )
