"""Pure units of the worker's chunk path: which columns get a Parquet dictionary, and the casts."""

from __future__ import annotations

import decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_provider_cxpg.worker.chunk import _cast
from airflow_provider_cxpg.worker.protocol import ParquetSink
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
    with pytest.raises(pa.ArrowInvalid):
        _cast(raw, pa.schema([("amount", pa.decimal128(12, 2))]))
