"""Pure units of the worker's chunk path: Parquet dictionaries, casts, and freeing a chunk as it is written."""

from __future__ import annotations

import decimal
import itertools
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_cxpg.exceptions import DataIntegrityError
from airflow_provider_cxpg.worker import chunk as chunk_module
from airflow_provider_cxpg.worker.chunk import _cast, release_as_written, write_chunk
from airflow_provider_cxpg.worker.protocol import IpcSink, ParquetSink, ReadChunk
from airflow_provider_cxpg.worker.sinks import _ParquetWriter, dictionary_columns


def test_only_repetitive_columns_get_a_dictionary() -> None:
    rows = 20_000
    table = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "state": pa.array([("new", "paid", "sent")[i % 3] for i in range(rows)]),
            "half": pa.array([i // 2 for i in range(rows)], pa.int64()),  # exactly half distinct: repeats pay
            "mostly_unique": pa.array([i if i % 10 else 0 for i in range(rows)], pa.int64()),
            "nothing": pa.nulls(rows, pa.string()),
            "ids": pa.array([[i] for i in range(rows)], pa.large_list(pa.int64())),  # arrays: judged on values
            "tags": pa.array([["a", "b"][: i % 3] for i in range(rows)], pa.large_list(pa.string())),
            "point": pa.array([{"x": 1}] * rows),  # a struct: the provider plans none; plain
        }
    )
    assert dictionary_columns(table) == ["state", "half", "nothing", "tags.list.element"]


def test_the_chosen_paths_are_the_ones_the_file_encodes(tmp_path: Path) -> None:
    """The names given to ``use_dictionary`` must be Parquet column paths, or nothing is encoded."""
    rows = 20_000
    table = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "tags": pa.array([["a", "b"][: i % 3] for i in range(rows)], pa.large_list(pa.string())),
        }
    )
    path = tmp_path / "f.parquet"
    writer = _ParquetWriter(table.schema, ParquetSink(url=str(path)), pa.OSFile(str(path), "wb"), owns_target=True)
    writer.write_table(table)
    writer.close()
    group = pq.ParquetFile(path).metadata.row_group(0)
    encoded = {
        group.column(i).path_in_schema: any("DICTIONARY" in e for e in group.column(i).encodings)
        for i in range(group.num_columns)
    }
    assert encoded == {"id": False, "tags.list.element": True}
    assert pq.read_table(path).equals(table)


def test_cast_refuses_nulls_in_a_non_nullable_field() -> None:
    raw = pa.table({"id": pa.array([1, None], pa.int64())})
    with pytest.raises(ValueError, match="non-nullable"):
        _cast(raw, pa.schema([pa.field("id", pa.int64(), nullable=False)]))


def test_the_decision_uses_the_sample_only() -> None:
    """Unique at the start, constant later: the sample (the first rows) decides."""
    table = pa.table({"v": pa.array(list(range(100)) + [7] * 10_000, pa.int64())})
    assert dictionary_columns(table, sample_rows=100) == []
    assert dictionary_columns(table, sample_rows=10_100) == ["v"]


def test_cast_converts_only_differing_columns_and_keeps_values() -> None:
    raw = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "amount": pa.array([decimal.Decimal("1.50"), None], pa.decimal128(38, 10)),
            "n": pa.array([1, None], pa.int64()),
        }
    )
    schema = pa.schema(
        [pa.field("id", pa.int64(), nullable=False), ("amount", pa.decimal128(12, 2)), ("n", pa.int32())],
        metadata={b"k": b"v"},
    )
    cast = _cast(raw, schema)
    assert cast.schema == schema and cast.schema.metadata == {b"k": b"v"}
    assert cast.column("id").equals(raw.column("id"))
    assert cast.to_pylist() == [
        {"id": 1, "amount": decimal.Decimal("1.50"), "n": 1},
        {"id": 2, "amount": None, "n": None},
    ]


def test_cast_refuses_a_lossy_value() -> None:
    raw = pa.table({"amount": pa.array([decimal.Decimal("1.555")], pa.decimal128(38, 10))})
    with pytest.raises(DataIntegrityError, match=r"column 'amount' .*data loss.*column_casts=\{'amount': 'text'\}"):
        _cast(raw, pa.schema([("amount", pa.decimal128(12, 2))]))


def _chunk_of_batches(batches: int, rows: int) -> pa.Table:
    """A chunk as connectorx returns one: record batches with buffers of their own."""
    return pa.Table.from_batches(
        [pa.record_batch({"id": pa.array(range(b * rows, (b + 1) * rows), pa.int64())}) for b in range(batches)]
    )


def _record_memory_per_write(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every part the chunk's writer receives note the bytes pyarrow holds as it arrives."""
    seen: list[int] = []
    real = chunk_module.open_writer

    def open_writer(schema: pa.Schema, sink: ParquetSink | IpcSink) -> Any:
        writer = real(schema, sink)
        write = writer.write

        def noting(table: pa.Table) -> None:
            seen.append(pa.total_allocated_bytes())
            write(table)

        writer.write = noting
        return writer

    monkeypatch.setattr(chunk_module, "open_writer", open_writer)
    return seen


@pytest.mark.parametrize("caller_keeps_it", [False, True], ids=["released-as-written", "caller-keeps-the-chunk"])
def test_a_chunk_s_batches_are_freed_as_they_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caller_keeps_it: bool
) -> None:
    """The next chunk is read while this one is written: its memory must shrink batch by batch.

    ``caller-keeps-the-chunk`` is the worker before: its writer thread's target held the whole
    chunk until the file was committed, so two full chunks stayed alive; that case shows the
    measurement tells the two apart.
    """
    seen = _record_memory_per_write(monkeypatch)
    table = _chunk_of_batches(batches=4, rows=65_536)  # 512 KiB per batch
    expected = table.column("id").to_pylist()
    request = ReadChunk(
        query_id=1, chunk_index=0, sql="", sink=ParquetSink(url=str(tmp_path / "c.parquet")), schema=table.schema
    )
    parts = release_as_written(table)
    kept = table if caller_keeps_it else None
    del table
    done = write_chunk(request, parts)
    assert parts == []
    assert done.rows == 4 * 65_536
    assert pq.read_table(tmp_path / "c.parquet").column("id").to_pylist() == expected
    assert len(seen) == 4
    batch = 65_536 * 8
    # From the second write on (the first row group sizes the writer's own buffers), each part
    # arrives with one batch fewer alive than the one before, unless something else holds them.
    drops = [before - after for before, after in itertools.pairwise(seen[1:])]
    if caller_keeps_it:
        assert all(drop < batch * 0.1 for drop in drops), seen
        assert kept is not None and kept.num_rows == 4 * 65_536
    else:
        assert all(drop > batch * 0.9 for drop in drops), seen


def test_a_chunk_written_whole_still_writes_every_row(tmp_path: Path) -> None:
    table = _chunk_of_batches(batches=3, rows=1000)
    request = ReadChunk(
        query_id=1, chunk_index=0, sql="", sink=ParquetSink(url=str(tmp_path / "c.parquet")), schema=table.schema
    )
    assert write_chunk(request, table).rows == 3000
    assert pq.read_table(tmp_path / "c.parquet").equals(table.combine_chunks())
    assert release_as_written(table.schema.empty_table())[0].num_rows == 0


@pytest.mark.parametrize("row_group_rows", [65_536, 100_000, 50_000, 1_000_000, 7])
def test_parts_give_the_row_groups_of_the_whole_table(tmp_path: Path, row_group_rows: int) -> None:
    """Written part by part, a chunk keeps the row groups one write of the whole table gives.

    A part that ends inside a row group waits for the next: flushing whatever was pending left a
    small row group after every full one (100,000-row groups from 65,536-row batches came out as
    100,000, 31,072, 100,000, ...).
    """
    rows = 5 * 65_536 + 1_000 if row_group_rows > 7 else 40
    batch = 65_536 if row_group_rows > 7 else 3
    table = pa.Table.from_batches(
        [
            pa.record_batch({"id": pa.array(range(start, min(start + batch, rows)), pa.int64())})
            for start in range(0, rows, batch)
        ]
    )
    sink = ParquetSink(url=str(tmp_path / "c.parquet"), row_group_rows=row_group_rows)
    request = ReadChunk(query_id=1, chunk_index=0, sql="", sink=sink, schema=table.schema)
    write_chunk(request, release_as_written(table))
    written = pq.ParquetFile(tmp_path / "c.parquet").metadata
    sizes = [written.row_group(i).num_rows for i in range(written.num_row_groups)]
    whole, left = divmod(rows, row_group_rows)
    assert sizes == [row_group_rows] * whole + ([left] if left else [])
    assert pq.read_table(tmp_path / "c.parquet").equals(table.combine_chunks())
