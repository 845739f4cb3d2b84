"""Where a chunk's CPU goes in the worker, stage by stage: ``python -m bench.profile --dsn ... --table ...``.

Runs the worker's own steps on one chunk of the bench table, in this process, each timed by
process CPU (user + system) and wall clock, ``--repeats`` times (the median is reported):

* ``read``: ``connectorx.read_sql(return_type="arrow")`` of one keyset chunk statement, as the
  worker sends it (the server's CPU is measured too: every backend of the server, before/after);
* ``cast``: ``Table.cast`` to the planned schema (what ``_conform`` did), casting only the columns
  that differ (what it does now), and per column;
* ``check``: the NULL-key, ±infinity and guard checks;
* ``encode``: Parquet to memory with pyarrow's defaults, the worker's settings (dictionary only for
  repetitive columns) and the alternatives the issue names (zstd levels, statistics off);
* ``keys``: reading the first and last key.

The figures go to stdout as a Markdown table; bench/README.md quotes them.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _server_cpu(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick  # utime stime cutime cstime
    return total


def _postgres_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as handle:
                    if handle.read().strip() in {"postgres", "postmaster"}:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def measure(name: str, fn: Callable[[], Any], repeats: int, server: bool = False) -> dict[str, Any]:
    cpus, walls, servers = [], [], []
    result = None
    for _ in range(repeats):
        pids = _postgres_pids() if server else []
        s0 = _server_cpu(pids)
        c0, w0 = _cpu(), time.perf_counter()
        result = fn()
        cpus.append(_cpu() - c0)
        walls.append(time.perf_counter() - w0)
        if server:  # connectorx's backend has exited: its CPU counts once the postmaster reaped it
            time.sleep(0.5)
        servers.append(_server_cpu(pids) - s0)
    return {
        "stage": name,
        "cpu": statistics.median(cpus),
        "wall": statistics.median(walls),
        "server_cpu": statistics.median(servers) if server else None,
        "result": result,
    }


def main() -> None:
    import connectorx as cx

    from airflow_provider_cxpg.conninfo import PostgresEndpoint, connect
    from airflow_provider_cxpg.planning.plan import SourceSpec, build_plan
    from airflow_provider_cxpg.worker.chunk import _cast, _check
    from airflow_provider_cxpg.worker.sinks import dictionary_columns

    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--chunk-rows", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from urllib.parse import unquote, urlparse

    url = urlparse(args.dsn)
    endpoint = PostgresEndpoint(
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        dbname=(url.path or "/postgres").lstrip("/"),
        user=unquote(url.username or ""),
        password=unquote(url.password or ""),
    ).with_session()
    with connect(endpoint) as conn:
        plan = build_plan(conn, SourceSpec(table=args.table))
    sql = plan.chunk_sql(None, args.chunk_rows + 1)
    fields = plan.request_fields()
    schema: pa.Schema = fields["schema"]
    uri = endpoint.connectorx_uri()

    rows: list[dict[str, Any]] = []
    repeats = args.repeats
    read = measure(
        "read (connectorx, one chunk)", lambda: cx.read_sql(uri, sql, return_type="arrow"), args.repeats, True
    )
    rows.append(read)
    raw: pa.Table = read["result"]
    rows.append(measure("cast to the planned schema (Table.cast: every column)", lambda: raw.cast(schema), repeats))
    rows.append(measure("cast only the columns that differ (the worker's now)", lambda: _cast(raw, schema), repeats))
    for index, field in enumerate(schema):
        got = raw.schema.field(index).type
        if got != field.type:
            column = raw.column(index)
            rows.append(
                measure(
                    f"  cast {field.name}: {got} -> {field.type}",
                    lambda c=column, t=field.type: c.cast(t),
                    args.repeats,
                )
            )
    table = raw.cast(schema, safe=True)

    class _Request:
        chunk_index = 0
        key_fields = fields["key_fields"]
        infinity_columns = fields["infinity_columns"]
        guards = fields["guards"]

    rows.append(measure("checks (NULL keys, infinity, guards)", lambda: _check(table, _Request()), args.repeats))
    rows.append(
        measure(
            "first and last key",
            lambda: (table.slice(0, 1).to_pylist(), table.slice(table.num_rows - 1, 1).to_pylist()),
            args.repeats,
        )
    )

    def encode(**options: Any) -> Callable[[], int]:
        def run() -> int:
            sink = io.BytesIO()
            with pq.ParquetWriter(sink, table.schema, **options) as writer:
                writer.write_table(table, row_group_size=65_536)
            return sink.tell()

        return run

    rows.append(measure("choosing dictionary columns (auto)", lambda: dictionary_columns(table), repeats))
    auto = dictionary_columns(table)
    variants = {
        "parquet zstd, dictionary on every column (pyarrow's default; the worker's before)": {"compression": "zstd"},
        "  zstd level 1": {"compression": "zstd", "compression_level": 1},
        "  zstd level 3": {"compression": "zstd", "compression_level": 3},
        "  statistics off": {"compression": "zstd", "write_statistics": False},
        "  dictionary off": {"compression": "zstd", "use_dictionary": False},
        f"  dictionary auto (the worker's now: {', '.join(auto) or 'none'})": {
            "compression": "zstd",
            "use_dictionary": auto,
        },
        "  dictionary auto, zstd level 1": {"compression": "zstd", "use_dictionary": auto, "compression_level": 1},
        "  snappy": {"compression": "snappy"},
        "  none": {"compression": "none"},
    }
    for name, options in variants.items():
        result = measure(name, encode(**options), args.repeats)
        result["bytes"] = result["result"]
        rows.append(result)

    print(
        f"| stage ({table.num_rows:,} rows, {table.nbytes / 1e6:.0f} MB Arrow) "
        "| CPU s | wall s | server CPU s | bytes |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        server = f"{row['server_cpu']:.3f}" if row.get("server_cpu") is not None else ""
        size = f"{row['bytes'] / 1e6:.1f} MB" if row.get("bytes") else ""
        print(f"| {row['stage']} | {row['cpu']:.3f} | {row['wall']:.3f} | {server} | {size} |")


if __name__ == "__main__":
    main()
