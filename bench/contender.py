"""One contender, run in a fresh process: ``python -m bench.contender NAME --table ... --result FILE``.

The orchestrator (:mod:`bench.run`) starts this module once per measurement. Each contender imports
what it needs first, then calls :meth:`Run.start`, does its work, and returns what it read; the
*work time* is from ``start`` to the end of the work, so interpreter start-up and imports
(``airflow`` alone takes over a second) are outside it, while everything a task pays per run (for
the provider: planning queries, spawning and supervising its worker) is inside. The orchestrator
measures the *process time* (spawn to exit) and the memory of the process tree on its own.

Credentials come from the environment, never argv: ``BENCH_PG_URI`` (a ``postgresql://`` URI) and
``AIRFLOW_CONN_BENCH_PG`` (the same server as an Airflow connection).

The result is one JSON object written to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CONTENDERS", "main"]

CONN_ID = "bench_pg"


@dataclass
class Run:
    """Arguments of one measurement, and its clock."""

    table: str
    rows: int
    out: Path
    chunk_rows: int
    partitions: int
    batch_size: int
    page_rows: int
    uri: str
    parallelism: int = 1
    key: str = "id"
    t0: float | None = None
    cpu0: float | None = None
    rss_at_start: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        """Mark the start of the work; remember what the process holds now (interpreter + imports)."""
        self.rss_at_start = _self_rss()
        self.cpu0 = _client_cpu()
        self.t0 = time.perf_counter()


def _client_cpu() -> float:
    """User + system CPU of this process and of the children it reaped (the provider's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _self_rss() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


Contender = Callable[[Run], dict[str, Any]]
CONTENDERS: dict[str, Contender] = {}


def contender(name: str) -> Callable[[Contender], Contender]:
    def register(func: Contender) -> Contender:
        CONTENDERS[name] = func
        return func

    return register


def _files(out: Path) -> tuple[int, int]:
    files = [p for p in out.rglob("*.parquet") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


# -- the provider ---------------------------------------------------------------------------------


def _provider_details(log_path: Path) -> dict[str, Any]:
    """Summarise the provider's query log: worker start-up, per-query read seconds, chunk commits.

    With ``parallelism > 1`` the workers' threads append to one log: the sums are over all workers,
    and the key-range planning (``job.plan`` with ``partition_method``) is recorded as well.
    """
    if not log_path.exists():
        return {}
    ready: list[float] = []
    reads: list[float] = []
    commits: list[float] = []
    planning: dict[str, Any] = {}
    with log_path.open() as handle:
        for line in handle:
            event = json.loads(line)
            name = event.get("event")
            if name == "worker.ready":
                ready.append(float(event.get("seconds", 0.0)))
            elif name == "query.done":
                reads.append(float(event.get("seconds", 0.0)))
            elif name == "chunk.commit":
                commits.append(float(event.get("seconds", 0.0)))
            elif name == "job.plan" and "partition_method" in event:
                planning = {"partition_method": event["partition_method"], "planning_s": event.get("seconds")}
            elif name == "job.plan" and event.get("snapshot"):
                planning.setdefault("snapshot", True)
    details: dict[str, Any] = {
        "worker_ready_s": round(sum(ready), 4),
        "workers": len(ready),
        "queries": len(reads),
        "query_read_s_sum": round(sum(reads), 4),
        "query_read_s_max": round(max(reads), 4) if reads else None,
        "chunk_read_write_s_sum": round(sum(commits), 4),
    }
    details.update(planning)
    return details


def _extract_to_parquet(run: Run, **options: Any) -> dict[str, Any]:
    from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

    hook = ConnectorXPostgresHook(postgres_conn_id=CONN_ID)
    log_path = run.out.parent / f"{run.out.name}.querylog.jsonl"
    dest = run.out / "parquet"
    run.start()
    result = hook.extract(
        destination=str(dest),
        table=f"public.{run.table}",
        chunk_rows=run.chunk_rows,
        query_log_path=str(log_path),
        **options,
    )
    end = time.perf_counter()
    files, size = _files(dest)
    details = _provider_details(log_path)
    details.update({"extract_seconds": round(result.seconds, 4), "chunks": result.chunks})
    return {"rows": result.rows, "files": files, "file_bytes": size, "end": end, "details": details}


@contender("provider_parquet")
def provider_parquet(run: Run) -> dict[str, Any]:
    return _extract_to_parquet(run)


def _extract_to_table(run: Run, table_format: str, write_mode: str = "append") -> dict[str, Any]:
    """The operator's path into a new table; ``merge`` first loads the same rows (outside the clock)."""
    from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

    hook = ConnectorXPostgresHook(postgres_conn_id=CONN_ID)
    log_path = run.out.parent / f"{run.out.name}.querylog.jsonl"
    arguments: dict[str, Any] = {"table": f"public.{run.table}", "chunk_rows": run.chunk_rows}
    if table_format == "iceberg":
        (run.out / "warehouse").mkdir(parents=True, exist_ok=True)
        arguments.update(
            destination="bench.rows",
            iceberg_catalog="bench",
            iceberg_catalog_properties={
                "type": "sql",
                "uri": f"sqlite:///{run.out}/catalog.db",
                "warehouse": f"file://{run.out}/warehouse",
            },
        )
    else:
        arguments["destination"] = str(run.out / "delta")
    if write_mode == "merge":  # the worst case of a merge: every row of the run matches one in the table
        hook.extract(table_format=table_format, **arguments)
    run.start()
    result = hook.extract(table_format=table_format, write_mode=write_mode, query_log_path=str(log_path), **arguments)
    end = time.perf_counter()
    files, size = _files(run.out)
    details = _provider_details(log_path)
    details.update(
        {
            "extract_seconds": round(result.seconds, 4),
            "chunks": result.chunks,
            "commit_seconds": result.extra.get("commit_seconds"),
            "table_version": result.extra.get("table_version"),
        }
    )
    return {"rows": result.rows, "files": files, "file_bytes": size, "end": end, "details": details}


@contender("provider_delta")
def provider_delta(run: Run) -> dict[str, Any]:
    return _extract_to_table(run, "delta")


@contender("provider_delta_merge")
def provider_delta_merge(run: Run) -> dict[str, Any]:
    return _extract_to_table(run, "delta", "merge")


@contender("provider_iceberg")
def provider_iceberg(run: Run) -> dict[str, Any]:
    return _extract_to_table(run, "iceberg")


@contender("provider_parquet_dict")
def provider_parquet_dict(run: Run) -> dict[str, Any]:
    return _extract_to_parquet(run, parquet_dictionary=True)  # every column dictionary-encoded: pyarrow's default


@contender("provider_pages")
def provider_pages(run: Run) -> dict[str, Any]:
    # Heap page ranges (TID range scans: sequential reads) inside one exported snapshot, instead of
    # keyset index scans: the server-CPU lever of issue 13, opt-in today.
    return _extract_to_parquet(run, key_columns=["ctid"], snapshot=True)


@contender("provider_parquet_stream")
def provider_parquet_stream(run: Run) -> dict[str, Any]:
    return _extract_to_parquet(run, stream_rows=65_536)  # each chunk streamed, written as batches arrive


@contender("provider_iter")
def provider_iter(run: Run) -> dict[str, Any]:
    import pyarrow.compute as pc

    from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

    hook = ConnectorXPostgresHook(postgres_conn_id=CONN_ID)
    log_path = run.out.parent / f"{run.out.name}.querylog.jsonl"
    rows = nbytes = chunks = 0
    id_sum = 0
    run.start()
    for table in hook.iter_chunks(table=f"public.{run.table}", chunk_rows=run.chunk_rows, query_log_path=str(log_path)):
        rows += table.num_rows
        nbytes += table.nbytes
        chunks += 1
        id_sum += pc.sum(table.column(run.key)).as_py() or 0  # touches one column of the mapped chunk
        del table  # drop the mapping before the next chunk arrives
    end = time.perf_counter()
    details = _provider_details(log_path)
    details.update({"chunks": chunks, "id_sum_ok": id_sum == run.rows * (run.rows + 1) // 2})
    return {"rows": rows, "arrow_bytes": nbytes, "end": end, "details": details}


@contender("provider_parallel")
def provider_parallel(run: Run) -> dict[str, Any]:
    """``PostgresExtractOperator(parallelism=N).execute``: N workers on planned key ranges.

    Defaults kept: ``partition_method="auto"`` (histogram on this table) and ``snapshot=True`` (every
    worker reads one exported snapshot, held by one more connection for the run).
    """
    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator
    from airflow_provider_cxpg.run.parallel import DATASET_MANIFEST

    log_path = run.out.parent / f"{run.out.name}.querylog.jsonl"
    dest = run.out / "parquet"
    operator = PostgresExtractOperator(
        task_id="b",
        postgres_conn_id=CONN_ID,
        table=f"public.{run.table}",
        destination=str(dest),
        chunk_rows=run.chunk_rows,
        parallelism=run.parallelism,
        query_log_path=str(log_path),
    )
    run.start()
    summary = operator.execute({})  # type: ignore[arg-type]
    end = time.perf_counter()
    files, size = _files(dest)
    details = _provider_details(log_path)
    details.update(
        {
            "parallelism": run.parallelism,
            "extract_seconds": summary.get("seconds"),
            "chunks": summary.get("chunks"),
            "partitions": summary.get("partitions"),
        }
    )
    manifest = dest / DATASET_MANIFEST
    if manifest.exists():
        record = json.loads(manifest.read_text())
        details["range_rows"] = [p.get("rows") for p in record.get("partitions", [])]
        details["planning_s"] = record.get("planning_seconds", details.get("planning_s"))
        details["partition_method"] = record.get("partition_method", details.get("partition_method"))
    return {"rows": summary["rows"], "files": files, "file_bytes": size, "end": end, "details": details}


# -- connectorx directly ---------------------------------------------------------------------------


@contender("cx_single_parquet")
def cx_single_parquet(run: Run) -> dict[str, Any]:
    import connectorx as cx
    import pyarrow.parquet as pq

    run.start()
    table = cx.read_sql(run.uri, f"SELECT * FROM public.{run.table}", return_type="arrow")
    read_end = time.perf_counter()
    pq.write_table(table, run.out / "bench.parquet", compression="zstd")
    end = time.perf_counter()
    assert run.t0 is not None
    files, size = _files(run.out)
    return {
        "rows": table.num_rows,
        "arrow_bytes": table.nbytes,
        "files": files,
        "file_bytes": size,
        "end": end,
        "details": {"read_s": round(read_end - run.t0, 4), "write_s": round(end - read_end, 4)},
    }


@contender("cx_single_read")
def cx_single_read(run: Run) -> dict[str, Any]:
    import connectorx as cx

    run.start()
    table = cx.read_sql(run.uri, f"SELECT * FROM public.{run.table}", return_type="arrow")
    end = time.perf_counter()
    return {"rows": table.num_rows, "arrow_bytes": table.nbytes, "end": end}


@contender("cx_partitioned")
def cx_partitioned(run: Run) -> dict[str, Any]:
    import connectorx as cx

    run.start()
    table = cx.read_sql(
        run.uri,
        f"SELECT * FROM public.{run.table}",
        return_type="arrow",
        partition_on=run.key,
        partition_num=run.partitions,
    )
    end = time.perf_counter()
    return {"rows": table.num_rows, "arrow_bytes": table.nbytes, "end": end}


@contender("cx_stream")
def cx_stream(run: Run) -> dict[str, Any]:
    import connectorx as cx

    rows = nbytes = batches = 0
    run.start()
    reader = cx.read_sql(
        run.uri, f"SELECT * FROM public.{run.table}", return_type="arrow_stream", batch_size=run.batch_size
    )
    for batch in reader:
        rows += batch.num_rows
        nbytes += batch.nbytes
        batches += 1
    end = time.perf_counter()
    return {"rows": rows, "arrow_bytes": nbytes, "end": end, "details": {"batches": batches}}


@contender("cx_offset_parquet")
def cx_offset_parquet(run: Run) -> dict[str, Any]:
    import connectorx as cx
    import pyarrow.parquet as pq

    rows = offset = page = 0
    page_seconds: list[float] = []
    run.start()
    while True:
        t = time.perf_counter()
        table = cx.read_sql(
            run.uri,
            f"SELECT * FROM public.{run.table} ORDER BY {run.key} LIMIT {run.page_rows} OFFSET {offset}",
            return_type="arrow",
        )
        if table.num_rows:
            pq.write_table(table, run.out / f"part-{page:06d}.parquet", compression="zstd")
        page_seconds.append(round(time.perf_counter() - t, 3))
        rows += table.num_rows
        offset += run.page_rows
        page += 1
        if table.num_rows < run.page_rows:
            break
        del table
    end = time.perf_counter()
    files, size = _files(run.out)
    return {
        "rows": rows,
        "files": files,
        "file_bytes": size,
        "end": end,
        "details": {"pages": page, "page_seconds": page_seconds},
    }


def _chunk_writer(run: Run, pending: Any) -> Callable[[], None]:
    """The bare pipelines' writer thread: each chunk ``pending`` hands over to Parquet as the worker writes it."""
    import pyarrow.parquet as pq

    from airflow_provider_cxpg.worker.sinks import dictionary_columns

    def write() -> None:
        while (item := pending.get()) is not None:
            index, chunk = item
            pq.write_table(
                chunk,
                run.out / f"part-{index:06d}.parquet",
                compression="zstd",
                use_dictionary=dictionary_columns(chunk),
                row_group_size=65_536,
            )

    return write


@contender("cx_keyset_pipeline")
def cx_keyset_pipeline(run: Run) -> dict[str, Any]:
    """The provider's data path bare, in one process: the ceiling of reading beside writing.

    Keyset chunks of ``chunk_rows`` read one after another, each handed to a writer thread (Parquet
    zstd, 65,536-row groups, dictionaries chosen as the worker chooses them) while the next reads:
    no worker process, planning, casts, checks, events or manifest. With ``partitions`` > 1 each
    chunk is read as that many concurrent reads of consecutive key ranges, their boundaries probed
    with ``OFFSET`` first: "more than one read in flight" with the chunk's memory unchanged.
    """
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from itertools import pairwise

    import connectorx as cx
    import psycopg
    import pyarrow as pa

    source, key, slices = f"public.{run.table}", run.key, max(1, run.partitions)
    pending: queue.Queue[tuple[int, pa.Table] | None] = queue.Queue(maxsize=1)  # one written, one read

    def where(low: Any, high: Any = None) -> str:
        conditions = [f"{key} > {low}"] if low is not None else []
        conditions += [f"{key} <= {high}"] if high is not None else []
        return " WHERE " + " AND ".join(conditions) if conditions else ""

    def read(sql: str) -> pa.Table:
        return cx.read_sql(run.uri, sql, return_type="arrow")

    writer = threading.Thread(target=_chunk_writer(run, pending))
    rows = index = 0
    run.start()
    writer.start()
    with ThreadPoolExecutor(slices) as pool, psycopg.connect(run.uri, autocommit=True) as probe:
        last = None
        while True:
            step = run.chunk_rows // slices
            bounds = [last]
            for _ in range(slices - 1):
                found = probe.execute(
                    f"SELECT {key} FROM {source}{where(bounds[-1])} ORDER BY {key} OFFSET {step - 1} LIMIT 1"
                ).fetchone()
                if found is None:
                    break
                bounds.append(found[0])
            statements = [f"SELECT * FROM {source}{where(low, high)} ORDER BY {key}" for low, high in pairwise(bounds)]
            rest = run.chunk_rows - step * (len(bounds) - 1)
            statements.append(f"SELECT * FROM {source}{where(bounds[-1])} ORDER BY {key} LIMIT {rest}")
            chunk = pa.concat_tables(list(pool.map(read, statements)))
            rows += chunk.num_rows
            pending.put((index, chunk))
            index += 1
            if chunk.num_rows < run.chunk_rows:
                break
            last = chunk.column(key)[-1].as_py()
            del chunk
    pending.put(None)
    writer.join()
    end = time.perf_counter()
    files, size = _files(run.out)
    return {"rows": rows, "files": files, "file_bytes": size, "end": end, "details": {"chunks": index}}


@contender("cx_keyset_split")
def cx_keyset_split(run: Run) -> dict[str, Any]:
    """``cx_keyset_pipeline`` with each chunk read as two concurrent reads split by key *value*.

    No probes: the split point is the chunk's first key plus half the previous chunk's key span.
    ``key > last AND key <= split LIMIT half`` and ``key > split LIMIT rest`` run at once; when the
    first fills its limit (the keys got denser) the second is dropped and the chunk is the first
    alone, so the chunk is always every row of one key interval and never more than ``chunk_rows``.
    """
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import connectorx as cx
    import pyarrow as pa

    source, key = f"public.{run.table}", run.key
    pending: queue.Queue[tuple[int, pa.Table] | None] = queue.Queue(maxsize=1)

    def read(sql: str) -> pa.Table:
        return cx.read_sql(run.uri, sql, return_type="arrow")

    writer = threading.Thread(target=_chunk_writer(run, pending))
    rows = index = dropped = 0
    half = run.chunk_rows // 2
    run.start()
    writer.start()
    with ThreadPoolExecutor(2) as pool:
        last: int | None = None
        span: int | None = None
        while True:
            if last is None or span is None:
                after = f" WHERE {key} > {last}" if last is not None else ""
                chunk = read(f"SELECT * FROM {source}{after} ORDER BY {key} LIMIT {run.chunk_rows}")
                ended = chunk.num_rows < run.chunk_rows
            else:
                split = last + max(1, span // 2)
                first, second = pool.map(
                    read,
                    [
                        f"SELECT * FROM {source} WHERE {key} > {last} AND {key} <= {split} ORDER BY {key} LIMIT {half}",
                        f"SELECT * FROM {source} WHERE {key} > {split} ORDER BY {key} LIMIT {run.chunk_rows - half}",
                    ],
                )
                if first.num_rows == half and first.column(key)[-1].as_py() < split:  # denser: a gap
                    chunk, ended, dropped = first, False, dropped + second.num_rows
                else:
                    chunk, ended = pa.concat_tables([first, second]), second.num_rows < run.chunk_rows - half
                del first, second
            rows += chunk.num_rows
            if chunk.num_rows:
                keys = chunk.column(key)
                start, last = keys[0].as_py(), keys[-1].as_py()
                span = last - start + 1
                pending.put((index, chunk))
                index += 1
                del chunk, keys
            if ended:
                break
    pending.put(None)
    writer.join()
    end = time.perf_counter()
    files, size = _files(run.out)
    return {
        "rows": rows,
        "files": files,
        "file_bytes": size,
        "end": end,
        "details": {"chunks": index, "dropped_rows": dropped},
    }


# -- other readers ---------------------------------------------------------------------------------


@contender("adbc_stream")
def adbc_stream(run: Run) -> dict[str, Any]:
    import adbc_driver_postgresql.dbapi as adbc

    rows = nbytes = batches = 0
    run.start()
    with adbc.connect(run.uri) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM public.{run.table}")
        reader = cur.fetch_record_batch()
        for batch in reader:
            rows += batch.num_rows
            nbytes += batch.nbytes
            batches += 1
    end = time.perf_counter()
    return {"rows": rows, "arrow_bytes": nbytes, "end": end, "details": {"batches": batches}}


@contender("airflow_get_df")
def airflow_get_df(run: Run) -> dict[str, Any]:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    hook = PostgresHook(postgres_conn_id=CONN_ID)
    run.start()
    df = hook.get_df(f"SELECT * FROM public.{run.table}")
    end = time.perf_counter()
    return {"rows": len(df), "end": end, "details": {"pandas_bytes": int(df.memory_usage(deep=False).sum())}}


@contender("psycopg_copy")
def psycopg_copy(run: Run) -> dict[str, Any]:
    import psycopg

    total = blocks = 0
    run.start()
    with (
        psycopg.connect(run.uri) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY (SELECT * FROM public.{run.table}) TO STDOUT (FORMAT binary)") as copy,
    ):
        for block in copy:
            total += len(block)
            blocks += 1
    end = time.perf_counter()
    # Binary COPY is not parsed, so rows are not counted: the orchestrator knows the table's size.
    return {"rows": None, "end": end, "details": {"copy_bytes": total, "blocks": blocks}}


# -- entry point -----------------------------------------------------------------------------------


def _watch_parent() -> None:
    """Exit when the orchestrator is gone (killed without a chance to clean up)."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, name="bench-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contender")
    parser.add_argument("name", choices=sorted(CONTENDERS))
    parser.add_argument("--table", required=True)
    parser.add_argument("--rows", type=int, required=True, help="rows the table holds (for checks)")
    parser.add_argument("--out", type=Path, required=True, help="an empty directory for output files")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--chunk-rows", type=int, default=500_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--page-rows", type=int, default=1_000_000)
    parser.add_argument("--parallelism", type=int, default=1, help="provider_parallel: workers")
    parser.add_argument("--key", default="id", help="the table's key column (its values are 1..rows)")
    args = parser.parse_args(argv)
    _watch_parent()
    started = time.perf_counter()
    run = Run(
        table=args.table,
        rows=args.rows,
        out=args.out,
        chunk_rows=args.chunk_rows,
        partitions=args.partitions,
        batch_size=args.batch_size,
        page_rows=args.page_rows,
        uri=os.environ["BENCH_PG_URI"],
        parallelism=args.parallelism,
        key=args.key,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    outcome = CONTENDERS[args.name](run)
    assert run.t0 is not None, "the contender never called run.start()"
    end = float(outcome.pop("end"))
    work_cpu = _client_cpu() - (run.cpu0 or 0.0)  # the workers are reaped by now
    result: dict[str, Any] = {
        "name": args.name,
        "setup_s": round(run.t0 - started, 4),
        "work_s": round(end - run.t0, 4),
        # From just before the first query to the end: the parent, and every worker it spawned and
        # reaped in that time (a worker's own imports included: a run pays them).
        "work_cpu_s": round(work_cpu, 4),
        "rss_at_start_bytes": run.rss_at_start,
        "rows": outcome.pop("rows"),
        "arrow_bytes": outcome.pop("arrow_bytes", None),
        "files": outcome.pop("files", None),
        "file_bytes": outcome.pop("file_bytes", None),
        "details": outcome.pop("details", {}),
        # Kernel high-water marks, a cross-check of the sampled tree peak (children: reaped ones only).
        "maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "maxrss_children_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }
    tmp = args.result.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args.result)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: freeing a multi-GB table or joining native threads is not the work.
    os._exit(0)


if __name__ == "__main__":
    main()
