"""The job matrix: which contenders run, at which chunk sizes, in which order per round."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Sequence

from bench.stats import Job

#: Every contender of the main run, in display order (provider rows are added per chunk size;
#: ``provider_parallel`` once per ``--parallelism`` value, at the first chunk size).
ALL_CONTENDERS = (
    "provider_parquet",
    "provider_parquet_dict",
    "provider_pages",
    "provider_parquet_stream",
    "provider_delta",
    "provider_delta_merge",
    "provider_iceberg",
    "provider_iter",
    "provider_parallel",
    "cx_single_parquet",
    "cx_single_read",
    "cx_partition_2",
    "cx_partition_4",
    "cx_stream_100k",
    "cx_offset_parquet",
    "cx_keyset_pipeline",
    "cx_keyset_pipeline_2",
    "cx_keyset_split",
    "adbc_stream",
    "airflow_get_df",
    "psycopg_copy",
)


def parse_count(text: str) -> int:
    """``1M``, ``5m``, ``200k``, ``1_000_000`` or ``1000000`` -> int."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a row count: {text!r} (use e.g. 1M, 5M, 20M, 250k or 1000000)")
    number, unit = float(match.group(1).replace("_", "")), match.group(2).lower()
    value = round(number * {"": 1, "k": 1_000, "m": 1_000_000}[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"row count must be positive: {text!r}")
    return value


def parse_counts(text: str) -> list[int]:
    return [parse_count(part) for part in text.split(",") if part.strip()]


def short(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def rounds_order(jobs: Sequence[Job], rounds: int) -> Iterator[tuple[int, list[Job]]]:
    """Each round runs every job once, in an order rotated each round and reversed every other one.

    So no job always goes first, and no job always runs right after the same neighbour (whose page
    cache, CPU frequency or leftover server work it would inherit).
    """
    n = len(jobs)
    step = max(1, n // max(1, rounds))
    for r in range(rounds):
        shift = (r * step) % n if n else 0
        order = list(jobs[shift:]) + list(jobs[:shift])
        yield r + 1, order[::-1] if r % 2 else order


def main_jobs(args: argparse.Namespace, rows: int) -> list[Job]:
    wanted = set(args.contenders.split(",")) if args.contenders else set(ALL_CONTENDERS)
    wanted -= set(filter(None, (args.skip or "").split(",")))
    unknown = wanted - set(ALL_CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(sorted(unknown))}; known: {', '.join(ALL_CONTENDERS)}")
    if "airflow_get_df" in wanted and rows > args.max_pandas_rows and not args.contenders:
        print(
            f"skipping airflow_get_df at {rows:,} rows (> --max-pandas-rows {args.max_pandas_rows:,}: "
            "it needs ~1 GB of RAM per million rows); name it in --contenders to force it"
        )
        wanted.discard("airflow_get_df")
    jobs: list[Job] = []
    # One job per chunk size: (name, contender, its extra arguments, one of the provider's paths?)
    per_chunk: tuple[tuple[str, str, tuple[str, ...], bool, str], ...] = (
        ("provider_parquet", "provider_parquet", (), True, "ConnectorXPostgresHook.extract (the operator's path)"),
        (
            "provider_parquet_dict",
            "provider_parquet_dict",
            (),
            True,
            "the same with parquet_dictionary=True (every column; the default before issue 13)",
        ),
        (
            "provider_pages",
            "provider_pages",
            (),
            True,
            "the same with key_columns=['ctid'], snapshot=True: page ranges in one snapshot",
        ),
        (
            "provider_parquet_stream",
            "provider_parquet_stream",
            (),
            True,
            "the same with stream_rows=65536: each chunk streamed in batches",
        ),
        ("provider_delta", "provider_delta", (), True, "the same into a new Delta table: one commit of the files"),
        (
            "provider_delta_merge",
            "provider_delta_merge",
            (),
            True,
            "the same merged by key into a Delta table that holds every row already (a full upsert)",
        ),
        ("provider_iceberg", "provider_iceberg", (), True, "the same into a new Iceberg table (SQL catalog, SQLite)"),
        (
            "cx_keyset_pipeline",
            "cx_keyset_pipeline",
            ("--partitions", "1"),
            False,
            "the provider's data path bare: keyset chunks, a writer thread beside",
        ),
        (
            "cx_keyset_pipeline_2",
            "cx_keyset_pipeline",
            ("--partitions", "2"),
            False,
            "the same, each chunk read as 2 concurrent key-range reads",
        ),
        (
            "cx_keyset_split",
            "cx_keyset_split",
            (),
            False,
            "the same, each chunk read as 2 concurrent reads split by key value (no probes)",
        ),
    )
    for name, contender_name, extra, provider, description in per_chunk:
        if name not in wanted:
            continue
        for chunk in args.chunk_rows:
            jobs.append(
                Job(
                    f"{name}@{short(chunk)}",
                    contender_name,
                    ("--chunk-rows", str(chunk), *extra),
                    sink="Parquet zstd",
                    provider=provider,
                    table_rows=rows,
                    chunk_rows=chunk,
                    description=description,
                )
            )
    for chunk in args.chunk_rows:
        if "provider_iter" in wanted:
            jobs.append(
                Job(
                    f"provider_iter@{short(chunk)}",
                    "provider_iter",
                    ("--chunk-rows", str(chunk)),
                    sink="Arrow in caller",
                    provider=True,
                    table_rows=rows,
                    chunk_rows=chunk,
                    description="ConnectorXPostgresHook.iter_chunks, chunks consumed",
                )
            )
    if "provider_parallel" in wanted:
        chunk = args.chunk_rows[0]
        for workers in args.parallelism:
            jobs.append(
                Job(
                    f"provider_parallel{workers}@{short(chunk)}",
                    "provider_parallel",
                    ("--chunk-rows", str(chunk), "--parallelism", str(workers)),
                    sink="Parquet zstd",
                    provider=True,
                    table_rows=rows,
                    chunk_rows=chunk,
                    description=f"PostgresExtractOperator(parallelism={workers}).execute "
                    "(partition_method=auto, snapshot=True: the defaults)",
                )
            )
    simple: dict[str, tuple[str, tuple[str, ...], str, str]] = {
        "cx_single_parquet": ("cx_single_parquet", (), "Parquet zstd", "read_sql arrow + write_table"),
        "cx_single_read": ("cx_single_read", (), "Arrow (read only)", "read_sql arrow, no write"),
        "cx_partition_2": ("cx_partitioned", ("--partitions", "2"), "Arrow (read only)", "partition_on=id, 2"),
        "cx_partition_4": ("cx_partitioned", ("--partitions", "4"), "Arrow (read only)", "partition_on=id, 4"),
        "cx_stream_100k": (
            "cx_stream",
            ("--batch-size", str(args.stream_batch)),
            "batches (read only)",
            f"arrow_stream batch_size={args.stream_batch}",
        ),
        "cx_offset_parquet": (
            "cx_offset_parquet",
            ("--page-rows", str(args.offset_page_rows)),
            "Parquet zstd",
            f"OFFSET/LIMIT pages of {args.offset_page_rows:,}",
        ),
        "adbc_stream": ("adbc_stream", (), "batches (read only)", "ADBC fetch_record_batch"),
        "airflow_get_df": ("airflow_get_df", (), "pandas (read only)", "PostgresHook.get_df"),
        "psycopg_copy": ("psycopg_copy", (), "bytes to nowhere", "COPY binary, the ceiling"),
    }
    for name in ALL_CONTENDERS:
        if name in simple and name in wanted:
            contender, cargs, sink, description = simple[name]
            jobs.append(Job(name, contender, cargs, sink=sink, table_rows=rows, description=description))
    if not args.no_overhead and "provider_parquet" in wanted:
        for chunk in args.overhead_chunks:
            jobs.append(
                Job(
                    f"overhead_parquet@{short(chunk)}",
                    "provider_parquet",
                    ("--chunk-rows", str(chunk)),
                    sink="Parquet zstd",
                    section="overhead",
                    provider=True,
                    table_rows=rows,
                    chunk_rows=chunk,
                    description="per-chunk overhead probe",
                )
            )
    return jobs
