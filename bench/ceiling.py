"""The ceiling of the provider's data path on this machine: ``python -m bench.ceiling --dsn ... --table ...``.

Issue 13 asks for the provider at 0.85x the wall time of one connectorx read + one ``write_table``.
This measures, in fresh processes alternated round by round, what the same work costs with none of
the provider around it (no worker process, no planning, no casts, checks, manifests or events):

* ``baseline``: ``connectorx.read_sql`` of the whole table, then ``pyarrow.parquet.write_table``;
* ``keyset``: ``WHERE id > last ORDER BY id LIMIT n`` chunks read one after another in one process,
  each handed to a writer thread (Parquet zstd, dictionary on ``active`` only) while the next reads:
  the provider's pipeline, bare;
* ``keyset-split``: the same, each chunk read as ``--slices`` concurrent connectorx reads of
  consecutive key ranges (the boundaries probed first with ``OFFSET``): "more than one read in
  flight" inside one process, with the chunk's memory unchanged.

The figures go to stdout as a Markdown table; bench/README.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from queue import Queue
from typing import Any

VARIANTS = ("baseline", "keyset", "keyset-split")


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _baseline(dsn: str, table: str, out: str) -> None:
    import connectorx as cx
    import pyarrow.parquet as pq

    data = cx.read_sql(dsn, f"SELECT * FROM {table}", return_type="arrow", protocol="binary")
    pq.write_table(data, os.path.join(out, "whole.parquet"), compression="zstd")


def _keyset(dsn: str, table: str, out: str, chunk_rows: int, slices: int) -> None:
    import connectorx as cx
    import psycopg
    import pyarrow as pa
    import pyarrow.parquet as pq

    pending: Queue[tuple[int, pa.Table] | None] = Queue(maxsize=1)  # one chunk written, one read: as the worker

    def write() -> None:
        while (item := pending.get()) is not None:
            index, chunk = item
            path = os.path.join(out, f"{index}.parquet")
            pq.write_table(chunk, path, compression="zstd", use_dictionary=["active"], row_group_size=65_536)

    def read(sql: str) -> pa.Table:
        return cx.read_sql(dsn, sql, return_type="arrow", protocol="binary")

    def where(low: Any, high: Any = None) -> str:
        conditions = ([f"id > {low}"] if low is not None else []) + ([f"id <= {high}"] if high is not None else [])
        return " WHERE " + " AND ".join(conditions) if conditions else ""

    writer = threading.Thread(target=write)
    writer.start()
    pool = ThreadPoolExecutor(max(1, slices))
    with psycopg.connect(dsn, autocommit=True) as probe:
        last, index = None, 0
        while True:
            step = chunk_rows // slices
            bounds = [last]
            for _ in range(slices - 1):
                row = probe.execute(
                    f"SELECT id FROM {table}{where(bounds[-1])} ORDER BY id OFFSET {step - 1} LIMIT 1"
                ).fetchone()
                if row is None:
                    break
                bounds.append(row[0])
            statements = [f"SELECT * FROM {table}{where(low, high)} ORDER BY id" for low, high in pairwise(bounds)]
            statements.append(
                f"SELECT * FROM {table}{where(bounds[-1])} ORDER BY id LIMIT {chunk_rows - step * (len(bounds) - 1)}"
            )
            chunk = pa.concat_tables(list(pool.map(read, statements)))
            pending.put((index, chunk))
            index += 1
            if chunk.num_rows < chunk_rows:
                break
            last = chunk.column("id")[-1].as_py()
    pending.put(None)
    writer.join()
    pool.shutdown()


def _child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as out:
        started, cpu = time.perf_counter(), _cpu()
        if args.child == "baseline":
            _baseline(args.dsn, args.table, out)
        else:
            _keyset(args.dsn, args.table, out, args.chunk_rows, args.slices if args.child == "keyset-split" else 1)
        print(json.dumps({"wall": time.perf_counter() - started, "cpu": _cpu() - cpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--table", default="public.bench_5000000")
    parser.add_argument("--chunk-rows", type=int, default=500_000)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            command = [sys.executable, "-m", "bench.ceiling", "--child", name, "--dsn", args.dsn, "--table", args.table]
            command += ["--chunk-rows", str(args.chunk_rows), "--slices", str(args.slices)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[name].append(json.loads(line))
    base = statistics.median(r["wall"] for r in results["baseline"])
    print("| variant | wall s median (min–max) | client CPU s median (min–max) | wall × baseline |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        walls, cpus = [r["wall"] for r in runs], [r["cpu"] for r in runs]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(
            f"| {name} | {wall:.2f} ({min(walls):.2f}–{max(walls):.2f}) | "
            f"{cpu:.2f} ({min(cpus):.2f}–{max(cpus):.2f}) | {wall / base:.2f}× |"
        )


if __name__ == "__main__":
    main()
