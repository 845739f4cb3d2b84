"""A local destination: the file URL forms it accepts, and what a failed write or read leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airflow_provider_cxpg.exceptions import InvalidInputError, StorageError
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.output.manifest import ChunkEntry, Manifest, chunk_file_name, fingerprint
from airflow_provider_cxpg.output.verify import output_problems


@pytest.mark.parametrize("form", ["{p}", "file://{p}", "file://localhost{p}", "file:{p}"])
def test_every_local_file_url_form_names_the_same_folder(tmp_path: Path, form: str) -> None:
    """``file:/p`` (Spark's form) was a folder named ``file:`` under the working directory."""
    assert Destination(form.format(p=tmp_path / "out")).root == str(tmp_path / "out")


@pytest.mark.parametrize("url", ["file://elsewhere/tmp/out", "file:relative/out"])
def test_a_file_url_of_another_host_or_a_relative_one_is_refused(url: str) -> None:
    with pytest.raises(InvalidInputError, match="destination"):
        Destination(url)


def test_a_failed_record_write_leaves_no_temporary_behind(tmp_path: Path) -> None:
    destination = Destination(str(tmp_path))
    (tmp_path / "_manifest.json").mkdir()  # os.replace onto a non-empty directory fails: a real OS error
    (tmp_path / "_manifest.json" / "x").write_text("x")
    with pytest.raises(StorageError):
        destination.write_json("_manifest.json", {"status": "running"})
    assert sorted(os.listdir(tmp_path)) == ["_manifest.json"]


def test_record_temporaries_of_failed_writes_are_strays() -> None:
    manifest = Manifest("r1", fingerprint({}), {}, ["id"], [], 10)
    names = ["_manifest.json", "_manifest.json.1a2b3c4d.tmp", "_dataset_manifest.json.00ff00ff.tmp", "notes.tmp"]
    assert manifest.stray_files(names) == ["_manifest.json.1a2b3c4d.tmp", "_dataset_manifest.json.00ff00ff.tmp"]


class _RefusingReads(Destination):
    """A destination whose footer reads fail as the store fails them (here: a refused read)."""

    def __init__(self, root: str, error: BaseException) -> None:
        super().__init__(root)
        self.error = error

    def read_footer(self, name: str) -> tuple[int, dict[str, str]]:
        raise StorageError(f"reading the footer of {name} failed: {self.error}") from self.error


def _one_chunk(tmp_path: Path) -> Manifest:
    (tmp_path / chunk_file_name(0)).write_bytes(b"x" * 10)
    manifest = Manifest("r1", fingerprint({}), {}, ["id"], [], 10)
    manifest.chunks.append(ChunkEntry(0, chunk_file_name(0), 5, 10, [1], [5], 0.1))
    return manifest


def test_a_refused_read_is_not_damage_but_a_file_that_is_not_parquet_is(tmp_path: Path) -> None:
    """A retry that took one refused read for damage started over, deleting every committed chunk."""
    manifest = _one_chunk(tmp_path)
    with pytest.raises(StorageError, match="Access Denied"):
        output_problems(_RefusingReads(str(tmp_path), PermissionError("Access Denied")), manifest)
    problems = output_problems(Destination(str(tmp_path)), manifest)  # ten bytes of x: not Parquet
    assert len(problems) == 1 and "not a readable Parquet file" in problems[0]


def test_a_footer_that_does_not_parse_is_damage_whatever_pyarrow_raises(tmp_path: Path) -> None:
    """pyarrow reports some unparsable footers as OSError, as a store's client reports a refused read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3]}), tmp_path / chunk_file_name(0))
    data = bytearray((tmp_path / chunk_file_name(0)).read_bytes())
    length = int.from_bytes(data[-8:-4], "little")
    data[-8 - length : -8] = b"\xff" * length  # the footer's bytes garbled, its length and magic intact
    (tmp_path / chunk_file_name(0)).write_bytes(bytes(data))
    manifest = Manifest("r1", fingerprint({}), {}, ["id"], [], 10)
    manifest.chunks.append(ChunkEntry(0, chunk_file_name(0), 3, len(data), [1], [3], 0.1))
    problems = output_problems(Destination(str(tmp_path)), manifest)
    assert len(problems) == 1 and "not a readable Parquet file" in problems[0]


def test_a_footer_whose_key_value_metadata_is_not_text_is_damage(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [1, 2, 3]}).replace_schema_metadata({b"cxpg.bad": b"\xff\xfe"})
    pq.write_table(table, tmp_path / chunk_file_name(0))
    size = (tmp_path / chunk_file_name(0)).stat().st_size
    manifest = Manifest("r1", fingerprint({}), {}, ["id"], [], 10)
    manifest.chunks.append(ChunkEntry(0, chunk_file_name(0), 3, size, [1], [3], 0.1))
    problems = output_problems(Destination(str(tmp_path)), manifest)
    assert len(problems) == 1 and "not a readable Parquet file" in problems[0]


@pytest.mark.parametrize("form", ["{p}", "file://{p}", "file://localhost{p}", "file:{p}", "{p}/"])
def test_every_local_form_of_one_folder_is_one_asset(tmp_path: Path, form: str) -> None:
    from airflow_provider_cxpg.operators.assets import asset_uri

    assert asset_uri(form.format(p=tmp_path / "out")) == f"file://{tmp_path / 'out'}"
