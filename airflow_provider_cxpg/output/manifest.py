"""The manifest: what an extraction has committed, and where a resumed one continues.

``_manifest.json`` lives beside the chunk files and is rewritten atomically after every committed
chunk. A chunk counts as committed only once it is listed here; a file without an entry (a worker
killed between renaming its file and the parent's update) is removed when the run completes.

A manifest is *resumable* by a later attempt when its status is ``running`` or ``failed`` and its
``fingerprint`` (source, columns, key, bounds, chunking) matches: the new attempt continues after
``chunks[-1].last_key``. A ``complete`` manifest, or one of a different extraction *of the same
source* (another window, other columns, a re-run), is replaced. A destination that holds the output
of a *different source* is not taken over: :class:`~airflow_provider_cxpg.exceptions.DestinationConflictError`.

A source is "the same" when it is the same table (schema and name as the catalog resolves them), the
same query text, or was written by the same task (``owner``: ``dag_id.task_id``, so a task whose
templated query differs from run to run still replaces its own output).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_provider_cxpg.exceptions import StorageError
from airflow_provider_cxpg.output.destination import Destination

__all__ = [
    "DATASET_MANIFEST",
    "MANIFEST_NAME",
    "SUCCESS_MARKER",
    "ChunkEntry",
    "Manifest",
    "chunk_file_name",
    "dataset_planning",
    "fingerprint",
    "is_chunk_file",
    "is_range_dir",
    "planned_range_dirs",
    "range_dir",
    "read_by_readers",
    "source_id",
]

MANIFEST_NAME = "_manifest.json"
#: The marker Spark, Hadoop and many readers check: present only while the output is complete.
SUCCESS_MARKER = "_SUCCESS"
FORMAT = "cxpg-manifest/1"
_CHUNK_FILE = re.compile(r"^part-(\d{6,})\.parquet$")
#: A fanned-out dataset's record, on top of its ``range=NNNN/`` folders (see
#: :mod:`~airflow_provider_cxpg.run.parallel`).
DATASET_MANIFEST = "_dataset_manifest.json"
_RANGE_DIR = re.compile(r"^range=\d{4,}$")
#: ``Destination.write_json``'s temporary of a record (``_manifest.json.1a2b3c4d.tmp``).
_RECORD_TEMPORARY = re.compile(r"^_(?:dataset_)?manifest\.json\.[0-9a-f]{8}\.tmp$")


def range_dir(index: int) -> str:
    return f"range={index:04d}"


def is_range_dir(name: str) -> bool:
    return bool(_RANGE_DIR.match(name))


def planned_range_dirs(record: Mapping[str, Any]) -> set[str]:
    """The ``range=NNNN`` folder names a dataset record plans."""
    return {entry.get("path") or range_dir(entry["index"]) for entry in record.get("ranges") or ()}


def dataset_planning(destination: Destination) -> tuple[Destination, dict[str, Any]] | None:
    """The fanned-out dataset whose record plans ``destination`` as one of its ranges: (folder, record).

    None when ``destination`` is not a ``range=NNNN`` folder, has no dataset record above it, or is a
    folder that record does not plan (a stray range of an older, larger plan).
    """
    if not is_range_dir(destination.name):
        return None
    parent = destination.parent()
    record = parent.read_json(DATASET_MANIFEST) if parent is not None else None
    if parent is None or record is None or destination.name not in planned_range_dirs(record):
        return None
    return parent, record


def chunk_file_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def is_chunk_file(name: str) -> bool:
    return bool(_CHUNK_FILE.match(name))


def read_by_readers(names: list[str], folders: list[str]) -> list[str]:
    """Those of ``names`` (files) and ``folders`` a dataset reader reads: Spark, Hive and pyarrow's
    datasets skip names starting with ``_`` or ``.`` (markers, manifests, temporaries), none other."""
    seen = [n for n in names if not n.startswith(("_", "."))]
    return sorted(seen + [f"{d}/" for d in folders if not d.startswith(("_", "."))])


def source_id(table: tuple[str, str] | None, sql: str | None) -> str:
    """``table:<schema>.<name>`` or ``sql:<hash of the query text, whitespace collapsed>``."""
    if table is not None:
        return f"table:{table[0]}.{table[1]}"
    text = " ".join((sql or "").split())
    return "sql:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable hash of what defines an extraction's output."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class ChunkEntry:
    """One committed chunk file."""

    index: int
    file: str
    rows: int
    bytes: int
    first_key: list[Any] | None
    last_key: list[Any] | None
    seconds: float
    committed_at: str = field(default_factory=_now)


@dataclass
class Manifest:
    """The extraction's record (see the module docstring)."""

    run_id: str
    fingerprint: str
    source: dict[str, Any]
    key_columns: list[str]
    schema: list[dict[str, str]]
    chunk_rows: int
    window: dict[str, Any] | None = None
    bounds: dict[str, Any] | None = None
    status: str = "running"
    chunks: list[ChunkEntry] = field(default_factory=list)
    attempts: int = 1
    started_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    completed_at: str | None = None
    error: str | None = None
    format: str = FORMAT
    source_id: str | None = None
    owner: str | None = None
    #: For a table format: the commit of this run's files (``format``, ``uri``, ``version``, ``write_mode``).
    table: dict[str, Any] | None = None
    #: For a table source: the relation read (``cluster``, ``database``, ``oid``; see
    #: :func:`~airflow_provider_cxpg.planning.catalog.relation_identity`).
    relation: dict[str, Any] | None = None
    #: The Airflow DAG run that wrote it (None: outside one); only that DAG run continues it.
    dag_run_id: str | None = None
    #: ``[oid, label, enum type]`` of every enum value the columns read can hold, as the run planned
    #: them: a retry (or a fan-out range) that finds one renamed read it under another label.
    enum_labels: list[list[str]] | None = None

    # -- derived -----------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.chunks)

    @property
    def files(self) -> list[str]:
        return [c.file for c in self.chunks if c.file]

    @property
    def next_index(self) -> int:
        return self.chunks[-1].index + 1 if self.chunks else 0

    @property
    def last_key(self) -> list[Any] | None:
        for chunk in reversed(self.chunks):
            if chunk.last_key is not None:
                return chunk.last_key
        return None

    @property
    def first_key(self) -> list[Any] | None:
        for chunk in self.chunks:
            if chunk.first_key is not None:
                return chunk.first_key
        return None

    def resumable_by(self, fp: str) -> bool:
        return self.fingerprint == fp and self.status in {"running", "failed"}

    def same_source(self, source_id: str | None, owner: str | None) -> bool:
        """Whether an extraction of ``source_id`` by ``owner`` may replace this one's files."""
        if owner is not None and owner == self.owner:
            return True
        if self.source_id is None:  # written before sources were recorded (0.1): ours, replace it
            return True
        return source_id is not None and source_id == self.source_id

    # -- persistence -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = self.rows
        data["bytes"] = self.bytes
        data["files"] = self.files
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise StorageError(f"unknown manifest format {data.get('format')!r}")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["chunks"] = [ChunkEntry(**c) for c in data.get("chunks", [])]
        return cls(**values)

    def save(self, destination: Destination, *, timeout: float | None = None, abortable: bool = True) -> None:
        self.updated_at = _now()
        destination.write_json(MANIFEST_NAME, self.to_json(), timeout=timeout, abortable=abortable)

    @classmethod
    def load(cls, destination: Destination, *, timeout: float | None = None, abortable: bool = True) -> Manifest | None:
        data = destination.read_json(MANIFEST_NAME, timeout=timeout, abortable=abortable)
        return None if data is None else cls.from_json(data)

    def overtaken_by(self, stored: Manifest | None) -> bool:
        """Whether ``stored`` (the destination's manifest now) is another attempt's later work than this.

        Two attempts of one task can write one destination (a zombie and its retry): the retry
        resumes the zombie's manifest, completes, and the zombie, failing late, wrote its older
        copy over the retry's, ``failed`` beside ``_SUCCESS`` and missing most chunks.
        """
        if stored is None:  # every run saves its manifest before anything else: someone removed it since
            return True
        return stored.status == "complete" or stored.run_id != self.run_id or len(stored.chunks) > len(self.chunks)

    def stray_files(self, names: list[str]) -> list[str]:
        """Chunk files and temporaries in ``names`` that this manifest does not list."""
        listed = set(self.files)
        return [
            n
            for n in names
            if (_CHUNK_FILE.match(n) and n not in listed)
            or (n.startswith(".part-") and n.endswith(".tmp"))
            or _RECORD_TEMPORARY.match(n)  # a manifest write that failed half-way (a full disk)
        ]
