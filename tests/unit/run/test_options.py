"""ExtractOptions and ParquetOptions: the one place where chunking, restart and Parquet arguments are checked."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_cxpg.exceptions import InvalidInputError
from airflow_provider_cxpg.run.chunking import ChunkSizer
from airflow_provider_cxpg.run.options import ExtractOptions, ParquetOptions, positive_int


@pytest.mark.parametrize(
    ("kwargs", "mentions"),
    [
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": -1}, "chunk_rows"),
        ({"chunk_rows": True}, "chunk_rows"),
        ({"chunk_rows": 1.5}, "chunk_rows"),
        ({"chunk_rows": "many"}, "chunk_rows"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"stream_rows": -1}, "stream_rows"),
        ({"max_worker_restarts": -1}, "max_worker_restarts"),
        ({"max_worker_restarts": False}, "max_worker_restarts"),
        ({"read_ahead": "yes"}, "read_ahead"),
        ({"read_ahead": None}, "read_ahead"),
        ({"parquet": {"compression": "zstd"}}, "ParquetOptions"),
    ],
)
def test_bad_extract_options_are_refused_with_the_argument_named(kwargs: dict[str, Any], mentions: str) -> None:
    with pytest.raises(InvalidInputError, match=mentions):
        ExtractOptions(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "mentions"),
    [
        ({"compression": "zip"}, "compression"),
        ({"row_group_rows": 0}, "row_group_rows"),
        ({"dictionary": "sometimes"}, "parquet_dictionary"),
    ],
)
def test_bad_parquet_options_are_refused(kwargs: dict[str, Any], mentions: str) -> None:
    with pytest.raises(InvalidInputError, match=mentions):
        ParquetOptions(**kwargs)


def test_numbers_from_templates_become_integers() -> None:
    options = ExtractOptions(chunk_rows="1000", chunk_bytes=" 4096 ", stream_rows=0.0, max_worker_restarts="0")  # type: ignore[arg-type]
    assert (options.chunk_rows, options.chunk_bytes, options.stream_rows, options.max_worker_restarts) == (
        1000,
        4096,
        0,
        0,
    )
    assert positive_int("parallelism", 2.0) == 2


def test_options_are_frozen() -> None:
    options = ExtractOptions()
    with pytest.raises(AttributeError):
        options.chunk_rows = 5  # type: ignore[misc]
    assert options.parquet == ParquetOptions("zstd", 65_536, "auto")


def test_chunk_sizer_probes_then_sizes_chunks_to_the_byte_target_within_its_bounds() -> None:
    assert ChunkSizer(500_000).next_rows() == 500_000
    sizer = ChunkSizer(500_000, 10_000_000)
    assert sizer.next_rows() == 10_000  # the first chunk probes the row width
    sizer.observe(10_000, 1_000_000)  # 100 bytes a row
    assert sizer.next_rows() == 100_000
    wide = ChunkSizer(500_000, 1_000)
    wide.observe(10, 100_000)  # 10 kB rows: never fewer than the floor
    assert wide.next_rows() == 1_000
    narrow = ChunkSizer(50_000, 10**12)
    narrow.observe(1_000, 1_000)
    assert narrow.next_rows() == 50_000  # chunk_rows stays the maximum
