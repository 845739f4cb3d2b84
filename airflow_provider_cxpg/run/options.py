"""How one extraction reads and writes, validated here and nowhere else.

The operator, the hook, ``iter_chunks``/``read_arrow`` and parallel runs all build their
:class:`ExtractOptions` through this module, so an argument means the same and fails with the same
message whichever door it came in by, before any data moves. The worker's deadlines have their own
frozen object (:class:`~airflow_provider_cxpg.supervisor.settings.WorkerSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow_provider_cxpg.exceptions import InvalidInputError

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_STREAM_ROWS",
    "ExtractOptions",
    "ParquetOptions",
    "non_negative_int",
    "positive_int",
]

DEFAULT_CHUNK_ROWS = 500_000
#: 0: each chunk is read as one table; N > 0 streams it in batches of N rows (docs/architecture.md).
DEFAULT_STREAM_ROWS = 0
COMPRESSIONS = frozenset({"zstd", "snappy", "gzip", "brotli", "lz4", "none"})


def _integer(name: str, value: Any, requirement: str) -> int:
    # A numeric string is accepted: Airflow templates and params render numbers as text.
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidInputError(f"{name} must be {requirement}, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be {requirement}, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` as an integer > 0, or :class:`InvalidInputError` naming ``name``."""
    number = _integer(name, value, "a positive integer")
    if number <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return number


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an integer >= 0, or :class:`InvalidInputError` naming ``name``."""
    number = _integer(name, value, "an integer >= 0")
    if number < 0:
        raise InvalidInputError(f"{name} must be an integer >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class ParquetOptions:
    """How chunk files are encoded.

    :param compression: Parquet codec: ``zstd`` (default), ``snappy``, ``gzip``, ``brotli``, ``lz4``, ``none``.
    :param row_group_rows: rows per row group.
    :param dictionary: ``"auto"`` (default): dictionary-encode only the columns whose first row group
        of each file is repetitive (at most half distinct values); True/False: all or none.
    """

    compression: str = "zstd"
    row_group_rows: int = 65_536
    dictionary: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise InvalidInputError(f"compression must be one of {sorted(COMPRESSIONS)}, got {self.compression!r}")
        object.__setattr__(self, "row_group_rows", positive_int("row_group_rows", self.row_group_rows))
        if not (self.dictionary == "auto" or isinstance(self.dictionary, bool)):
            raise InvalidInputError(f"parquet_dictionary must be 'auto', True or False, got {self.dictionary!r}")


@dataclass(frozen=True)
class ExtractOptions:
    """Chunking, memory and restarts of one extraction, and its Parquet encoding.

    :param chunk_rows: rows per chunk and file (the maximum when ``chunk_bytes`` is set).
    :param chunk_bytes: size chunks to about this many in-memory Arrow bytes instead.
    :param stream_rows: 0 reads each chunk as one table; N > 0 streams it in batches of N rows.
    :param read_ahead: with ``stream_rows=0``: read the next chunk while this one is written.
    :param max_worker_restarts: replace a dead worker this many times before failing.
    :param parquet: the files' encoding.
    """

    chunk_rows: int = DEFAULT_CHUNK_ROWS
    chunk_bytes: int | None = None
    stream_rows: int = DEFAULT_STREAM_ROWS
    read_ahead: bool = True
    max_worker_restarts: int = 2
    parquet: ParquetOptions = field(default_factory=ParquetOptions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk_rows", positive_int("chunk_rows", self.chunk_rows))
        if self.chunk_bytes is not None:
            object.__setattr__(self, "chunk_bytes", positive_int("chunk_bytes", self.chunk_bytes))
        object.__setattr__(self, "stream_rows", non_negative_int("stream_rows", self.stream_rows))
        object.__setattr__(
            self, "max_worker_restarts", non_negative_int("max_worker_restarts", self.max_worker_restarts)
        )
        if isinstance(self.read_ahead, int):  # bool, or 0/1 as older callers passed it
            object.__setattr__(self, "read_ahead", bool(self.read_ahead))
        else:
            raise InvalidInputError(f"read_ahead must be True or False, got {self.read_ahead!r}")
        if not isinstance(self.parquet, ParquetOptions):
            raise InvalidInputError(f"parquet must be ParquetOptions, got {self.parquet!r}")
