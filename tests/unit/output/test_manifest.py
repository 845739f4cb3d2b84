"""The manifest as a record: derived totals, resume rules, who may replace it, its JSON form."""

from __future__ import annotations

import pytest

from airflow_provider_cxpg.exceptions import StorageError
from airflow_provider_cxpg.output.manifest import ChunkEntry, Manifest, chunk_file_name, fingerprint, is_chunk_file


def _manifest(**overrides: object) -> Manifest:
    values: dict[str, object] = {
        "run_id": "r1",
        "fingerprint": fingerprint({"source": "t", "key": ["id"]}),
        "source": {"table": "public.t"},
        "key_columns": ["id"],
        "schema": [{"name": "id", "type": "int64"}],
        "chunk_rows": 10,
        "source_id": "table:public.t",
        "owner": "dag.task",
    }
    values.update(overrides)
    return Manifest(**values)  # type: ignore[arg-type]


def test_totals_and_keys_come_from_the_chunks() -> None:
    manifest = _manifest()
    assert (manifest.rows, manifest.next_index, manifest.last_key, manifest.first_key) == (0, 0, None, None)
    manifest.chunks += [
        ChunkEntry(0, chunk_file_name(0), 10, 100, [1], [10], 0.1),
        ChunkEntry(1, chunk_file_name(1), 3, 40, [11], [13], 0.1),
        ChunkEntry(2, "", 0, 0, None, None, 0.1),  # an empty last chunk: no file, no key
    ]
    assert (manifest.rows, manifest.bytes, manifest.next_index) == (13, 140, 3)
    assert (manifest.first_key, manifest.last_key) == ([1], [13])
    assert manifest.files == ["part-000000.parquet", "part-000001.parquet"]
    assert all(is_chunk_file(name) for name in manifest.files)


def test_only_an_unfinished_run_of_the_same_fingerprint_resumes() -> None:
    manifest = _manifest()
    same = manifest.fingerprint
    assert manifest.resumable_by(same)
    assert not manifest.resumable_by(fingerprint({"source": "t", "key": ["id"], "upper": [5]}))
    manifest.status = "complete"
    assert not manifest.resumable_by(same)
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})  # key order does not matter


def test_another_source_never_replaces_it_but_its_owner_may() -> None:
    manifest = _manifest()
    assert manifest.same_source("table:public.t", None)
    assert not manifest.same_source("table:public.other", "dag.other_task")
    assert not manifest.same_source(None, None)
    assert manifest.same_source("table:public.other", "dag.task")


def test_json_round_trip_and_an_unknown_format_is_refused() -> None:
    manifest = _manifest(chunks=[ChunkEntry(0, chunk_file_name(0), 10, 100, [1], [10], 0.1)])
    data = manifest.to_json()
    assert data["rows"] == 10 and data["files"] == ["part-000000.parquet"]
    assert Manifest.from_json(data) == manifest
    with pytest.raises(StorageError, match="format"):
        Manifest.from_json({**data, "format": "someone-else/1"})
