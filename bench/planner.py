"""The planner's own cost, in a fresh process: ``python -m bench.planner --table ... --result FILE``.

Times :func:`airflow_provider_cxpg.planning.key_ranges.plan_key_ranges` — what ``parallelism=N`` and
``PostgresPartitionPlanOperator`` run before any data moves — for each method and partition count,
``--repeats`` times (the median is reported), on the benchmark table:

* ``histogram``, ``sample``, ``ntile`` on the table's primary key (``SourceSpec(table=...)``);
* ``ctid`` on the same table planned with ``key_columns=("ctid",)`` (heap page ranges).

``build_plan`` (the catalog queries that validate the source) is timed once per plan as well; it
is paid once per run whatever the method. Then, *untimed*, every distinct set of ranges a method
returned is measured with one ``count(*)`` per range (``plan.range_condition(lower, upper)`` for key
ranges, ``ctid`` page bounds for page ranges): the spread of rows per range is the quality the
method buys with its time. ``sample`` is random, so each of its repeats can give other ranges; the
reported min and max are over all of them.

Credentials come from ``AIRFLOW_CONN_BENCH_PG`` (the Airflow connection ``bench_pg``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "measure"]

CONN_ID = "bench_pg"
#: statement_timeout of the planner's connection: ntile and the count queries read the whole table.
STATEMENT_TIMEOUT_MS = 600_000


def _range_counts(conn: Any, plan: Any, ranges: list[Any], *, pages: bool) -> list[int]:
    from airflow_provider_cxpg.planning.plan import SOURCE_ALIAS

    counts: list[int] = []
    for r in ranges:
        conditions = [f"({f})" for f in plan.filters]
        if pages:  # page ranges are [lower, upper)
            if r.lower is not None:
                conditions.append(f"{SOURCE_ALIAS}.ctid >= '({int(r.lower[0])},0)'::tid")
            if r.upper is not None:
                conditions.append(f"{SOURCE_ALIAS}.ctid < '({int(r.upper[0])},0)'::tid")
        else:  # key ranges are (lower, upper]
            conditions.extend(plan.range_condition(r.lower, r.upper))
        sql = f"SELECT count(*) FROM {plan.from_clause}"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        counts.append(int(conn.execute(sql).fetchone()[0]))
    return counts


def measure(table: str, partitions: list[int], methods: list[str], repeats: int) -> dict[str, Any]:
    """Plan the table's ranges by every method and partition count; return timings and spreads."""
    from airflow_provider_cxpg.conninfo import connect
    from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook
    from airflow_provider_cxpg.planning.key_ranges import plan_key_ranges
    from airflow_provider_cxpg.planning.plan import SourceSpec, build_plan

    hook = ConnectorXPostgresHook(postgres_conn_id=CONN_ID)
    endpoint = hook.get_endpoint().with_session(application_name="cxpg-bench-planner")
    entries: list[dict[str, Any]] = []
    build: dict[str, float] = {}
    with connect(endpoint, statement_timeout_ms=STATEMENT_TIMEOUT_MS) as conn:
        plans: dict[str, Any] = {}
        for kind, key_columns in (("key", None), ("ctid", ("ctid",))):
            if kind == "ctid" and "ctid" not in methods:
                continue
            times: list[float] = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                plans[kind] = build_plan(conn, SourceSpec(table=table, key_columns=key_columns))
                times.append(time.perf_counter() - t0)
            build[kind] = statistics.median(times)
        for method in methods:
            kind = "ctid" if method == "ctid" else "key"
            plan = plans[kind]
            for n in partitions:
                entry: dict[str, Any] = {
                    "method": method,
                    "partitions": n,
                    "key_columns": ["ctid"] if kind == "ctid" else list(plan.key_names),
                }
                seconds: list[float] = []
                reported: list[float] = []
                results: list[list[Any]] = []
                try:
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        ranges, used, own = plan_key_ranges(conn, plan, n, method)
                        seconds.append(time.perf_counter() - t0)
                        reported.append(own)
                        results.append(ranges)
                        entry["method_used"] = used
                except Exception as exc:  # recorded, the other methods still run
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
                    entries.append(entry)
                    continue
                distinct: dict[str, list[Any]] = {}
                for ranges in results:
                    distinct.setdefault(json.dumps([r.to_json() for r in ranges], default=str), ranges)
                counts = [_range_counts(conn, plan, rs, pages=kind == "ctid") for rs in distinct.values()]
                flat = [c for cs in counts for c in cs]
                entry.update(
                    {
                        "seconds_all": [round(s, 5) for s in seconds],
                        "seconds_median": statistics.median(seconds),
                        "reported_seconds_median": statistics.median(reported),
                        "ranges": [len(rs) for rs in results],
                        "distinct_plans": len(distinct),
                        "rows_per_range": counts,
                        "rows_min": min(flat) if flat else None,
                        "rows_max": max(flat) if flat else None,
                        "rows_total": [sum(cs) for cs in counts],
                        "bounds_first": [r.to_json() for r in results[0]],
                    }
                )
                entries.append(entry)
    return {"table": table, "repeats": repeats, "build_plan_s": build, "entries": entries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planner")
    parser.add_argument("--table", required=True, help="schema.table")
    parser.add_argument("--partitions", default="4,16", help="comma list (default 4,16)")
    parser.add_argument("--methods", default="histogram,sample,ntile,ctid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    result = measure(
        args.table,
        [int(p) for p in args.partitions.split(",") if p.strip()],
        [m.strip() for m in args.methods.split(",") if m.strip()],
        max(1, args.repeats),
    )
    tmp = args.result.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    tmp.replace(args.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
