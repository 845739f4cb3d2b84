"""Apache Iceberg: one catalog commit per run, from the chunk files the worker already wrote, exactly once.

The table lives in a catalog named by the user (``pyiceberg.catalog.load_catalog``: a SQL catalog on
SQLite or PostgreSQL, REST, Glue, Hive, configured in pyiceberg's own ``.pyiceberg.yaml`` /
``PYICEBERG_CATALOG__*`` variables or by the properties passed here). The worker writes the run's
chunk files into ``<table location>/data/cxpg-<run key>/``; the parent then commits them:

* ``append``: ``add_files`` registers the files as they are (their footers give the statistics);
* ``overwrite``: one transaction deletes every row and adds the files (one catalog commit, which
  Iceberg records as a delete snapshot and an append snapshot: no reader sees the one without the
  other);
* ``merge``: ``upsert`` by the key, with the staged run as the source (held in memory: an
  incremental window, not a whole table).

Exactly once: every snapshot of the run carries ``cxpg.app_id`` in its summary; before extracting
and again before committing, :meth:`IcebergTarget.committed` looks for it, so a retry of a run whose
commit landed commits nothing. Schema: the planned Arrow schema is the table's; a column the table
has and the source lost, or a changed type, fails before data moves naming the columns; a new source
column is added (``union_by_name``, then an empty snapshot in the new schema) just before the data
commit. A run that changes nothing (no rows; an upsert whose rows are all unchanged) still commits
one empty snapshot carrying ``cxpg.app_id``, so its retry sees it done. A first run
creates the table (empty) before its data moves, so its files can be staged in the table's location.

Every catalog and file-system call runs in a process of its own (:mod:`.isolated`), each under
``storage_timeout`` (the commit under its own limit): past a deadline, on ``on_kill`` and when the
run ends, that process is killed with whatever the catalog holds. In a thread of the task process, a
frozen SQL catalog kept a session that Airflow's exit handler then waited on forever.
:class:`IcebergTarget` (the task process) checks the arguments and forwards;
:class:`IcebergTable` (the catalog's process) does the work.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa

from airflow_provider_cxpg.exceptions import InvalidInputError, StorageError
from airflow_provider_cxpg.output.isolated import IsolatedObject
from airflow_provider_cxpg.output.table_calls import StagedFile, has_unsigned_integers, new_columns_or_refuse

__all__ = ["IcebergTable", "IcebergTarget", "require_pyiceberg"]

_APP_ID = "cxpg.app_id"
_SCHEMA_OF = "cxpg.schema_change_of"


_MISSING = "table_format='iceberg' needs the pyiceberg package: pip install 'airflow-provider-cxpg[iceberg]'"


def require_pyiceberg() -> Any:
    """Import ``pyiceberg``, or say which extra installs it (before any data moves)."""
    try:
        import pyiceberg.catalog
    except ImportError as exc:  # not installed, or broken (a dependency missing): say which
        raise InvalidInputError(f"{_MISSING} ({type(exc).__name__}: {exc})") from exc
    return pyiceberg.catalog


def _identifier(table: str) -> tuple[str, str]:
    namespace, _, name = str(table).strip().rpartition(".")
    if not namespace or not name:
        raise InvalidInputError(
            f"for table_format='iceberg' the destination is the table's identifier 'namespace.table', got {table!r}"
        )
    return namespace, name


class IcebergTarget:
    """An Iceberg table in a catalog that runs are committed to: the task process's side.

    Checks the arguments here; every call on the catalog goes to an :class:`IcebergTable` in a
    process of its own (started at the first call, ended by :meth:`close`).

    :param table: ``namespace.table`` (a nested namespace as ``a.b.table``).
    :param catalog: the catalog's name in pyiceberg's configuration.
    :param catalog_properties: more catalog properties (``uri``, ``warehouse``, credentials, ...).
    :param timeout: seconds each call may take (``storage_timeout``); None: no limit.
    :param commit_timeout: seconds the commit itself may take (an upsert reads the run and rewrites
        files: ``job_timeout`` when it is longer); default ``timeout``.
    """

    def __init__(
        self,
        table: str,
        *,
        catalog: str | None,
        catalog_properties: Mapping[str, Any] | None = None,
        timeout: float | None,
        commit_timeout: float | None = None,
    ) -> None:
        self.namespace, self.name = _identifier(table)
        self.commit_timeout = commit_timeout or timeout
        self.identifier = f"{self.namespace}.{self.name}"
        self.catalog_name = catalog or "default"
        self.catalog_properties = {k: str(v) for k, v in (catalog_properties or {}).items()}
        self.timeout = timeout
        if importlib.util.find_spec("pyiceberg") is None:  # the catalog's process imports it, not this one
            raise InvalidInputError(_MISSING)
        self._table = IsolatedObject(
            f"{__name__}:IcebergTable",
            {
                "identifier": self.identifier,
                "catalog": self.catalog_name,
                "catalog_properties": self.catalog_properties,
                "timeout": timeout,
                "commit_timeout": self.commit_timeout,
            },
            target=self.identifier,
            secrets=self.secrets,
            unanswered="the catalog or its store is not answering",
            name="the Iceberg catalog's process",
        )

    @property
    def uri(self) -> str:
        return f"iceberg://{self.catalog_name}/{self.identifier}"

    def secrets(self) -> list[str]:
        """Catalog property values that are credentials (for the run's redactor)."""
        marks = ("password", "secret", "token", "credential", "key")
        found = [v for k, v in self.catalog_properties.items() if any(m in k.lower() for m in marks) and v]
        for name, value in self.catalog_properties.items():
            if "://" not in value:
                continue
            try:
                password = urlsplit(value).password  # a PostgreSQL catalog's scheme://user:pw@host/db
            except ValueError:
                password = None
            if password:
                found += [password, unquote(password)]
            elif "@" in value and name == "uri":  # unparseable: everything between '//user:' and the last '@'
                found.append(value.split("://", 1)[1].rsplit("@", 1)[0].partition(":")[2])
        return [f for f in dict.fromkeys(found) if f]

    @property
    def catalog_pid(self) -> int | None:
        """The catalog's process, while one runs."""
        return self._table.pid

    def committed(self, app_id: str) -> int | None:
        """The snapshot id that ends ``app_id``'s run, or None when no snapshot names it."""
        return self._table.call("opening the Iceberg catalog", "committed", app_id, timeout=self.timeout)

    def check_schema(self, schema: pa.Schema, *, write_mode: str, key: Sequence[str]) -> list[str]:
        """Refuse what the table cannot take; return the source columns the table will gain."""
        return self._table.call(
            "checking the schema of", "check_schema", schema, write_mode=write_mode, key=list(key), timeout=self.timeout
        )

    def staging_root(self, schema: pa.Schema) -> str:
        """Where the run's files go: the table's data directory (a first run creates the table, empty)."""
        return self._table.call("opening the Iceberg catalog", "staging_root", schema, timeout=self.timeout)

    def commit(
        self,
        files: Sequence[StagedFile],
        schema: pa.Schema,
        *,
        write_mode: str,
        key: Sequence[str],
        app_id: str,
        metadata: Mapping[str, Any],
        root: str,
    ) -> tuple[int, bool]:
        """Commit the run's files (after adding new columns): see :meth:`IcebergTable.commit`."""
        return self._table.call(
            "opening the Iceberg catalog",
            "commit",
            list(files),
            schema,
            write_mode=write_mode,
            key=list(key),
            app_id=app_id,
            metadata={k: str(v) for k, v in metadata.items()},
            root=root,
            timeout=self.timeout,
        )

    def abort(self, reason: str) -> None:
        """``on_kill``: a call in progress ends now (the catalog's process is killed) and raises."""
        self._table.abort(reason)

    def close(self) -> None:
        """End the catalog's process (bounded: it is killed when it does not exit at once)."""
        self._table.close()


class IcebergTable:
    """The catalog's side, in its own process: each step announces itself and its deadline first.

    :param steps: tells the task process which operation starts and its deadline in seconds.
    :param identifier: ``namespace.table``.
    :param catalog: the catalog's name; ``catalog_properties``: its properties.
    :param timeout: each operation's deadline; ``commit_timeout``: the data commit's.
    """

    def __init__(
        self,
        *,
        steps: Callable[[str, float | None], None],
        identifier: str,
        catalog: str,
        catalog_properties: Mapping[str, str],
        timeout: float | None,
        commit_timeout: float | None,
    ) -> None:
        self._steps = steps
        self.identifier = identifier
        self.namespace = identifier.rpartition(".")[0]
        self.catalog_name = catalog
        self.catalog_properties = dict(catalog_properties)
        self.timeout = timeout
        self.commit_timeout = commit_timeout
        self._catalogs = require_pyiceberg()
        self._catalog: Any = None

    def _call(self, operation: str, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        self._steps(operation, timeout or self.timeout)
        return fn()

    # -- bounded calls -----------------------------------------------------------------------------

    def _load_catalog(self) -> Any:
        if self._catalog is None:
            self._catalog = self._call(
                "opening the Iceberg catalog",
                lambda: self._catalogs.load_catalog(self.catalog_name, **self.catalog_properties),
            )
        return self._catalog

    def _table(self) -> Any | None:
        catalog = self._load_catalog()
        from pyiceberg.exceptions import NoSuchTableError

        def load() -> Any | None:
            try:
                return catalog.load_table(self.identifier)
            except NoSuchTableError:
                return None

        return self._call("loading the Iceberg table", load)

    # -- before data moves -------------------------------------------------------------------------

    def committed(self, app_id: str) -> int | None:
        """The snapshot id that ends ``app_id``'s run, or None when no snapshot names it."""
        table = self._table()
        if table is None:
            return None
        ours = [s for s in table.snapshots() if (s.summary or {}).get(_APP_ID) == app_id]
        if not ours:
            return None
        # The run's last snapshot is the one no other of its snapshots has as parent (format-v1
        # tables give every snapshot sequence number 0).
        parents = {s.parent_snapshot_id for s in ours}
        last = [s for s in ours if s.snapshot_id not in parents] or ours
        return max(last, key=lambda s: s.timestamp_ms).snapshot_id

    def check_schema(self, schema: pa.Schema, *, write_mode: str, key: Sequence[str]) -> list[str]:
        """Refuse what the table cannot take; return the source columns the table will gain."""
        # pyiceberg's own Arrow-to-Iceberg conversion, as create_table uses it (private in 0.12)
        from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids
        from pyiceberg.transforms import VoidTransform

        unstorable = []
        for field in schema:
            try:
                if has_unsigned_integers(field.type):  # oid, xid: Iceberg has no unsigned integers
                    raise TypeError(field.type)
                _pyarrow_to_schema_without_ids(pa.schema([field]))
            except Exception:  # noqa: BLE001
                unstorable.append(f"{field.name} ({field.type})")
        if unstorable:
            raise InvalidInputError(
                f"Iceberg cannot store column(s) {', '.join(unstorable)}: read them as another type with "
                "column_casts (e.g. {'col': 'bigint'})"
            )
        if write_mode == "merge" and (not key or [k for k in key if k not in schema.names]):
            raise InvalidInputError(f"write_mode='merge' needs the key column(s) {list(key)} in the output")
        table = self._table()
        if table is None:
            return []
        spec = table.spec()
        if any(not isinstance(f.transform, VoidTransform) for f in spec.fields):  # a v1 table's dropped fields: void
            # add_files derives each file's partition from its column statistics, which skip NULLs:
            # a file holding k = 1 and NULLs was recorded as partition k = 1, and readers pruning by
            # partition never saw the NULL rows (a file spanning values fails only at the commit)
            raise InvalidInputError(
                f"the Iceberg table {self.identifier} is partitioned ({spec}): the run's files are added as "
                "they are and hold rows of every partition; write to an unpartitioned table, or a new one"
            )
        required = [f.name for f in table.schema().fields if f.required]
        if required:
            raise InvalidInputError(
                f"the Iceberg table {self.identifier} has required column(s) {', '.join(required)}: the provider "
                "writes nullable columns; make them optional or write to a new table"
            )
        theirs = {f.name: f.type for f in table.schema().as_arrow()}
        ours = {f.name: f.type for f in _pyarrow_to_schema_without_ids(schema).as_arrow()}
        return new_columns_or_refuse(theirs, ours, f"(Iceberg) {self.identifier}")

    def staging_root(self, schema: pa.Schema) -> str:
        """Where the run's files go: the table's data directory (a first run creates the table, empty)."""
        table = self._table()
        if table is None:
            catalog = self._load_catalog()

            def create() -> Any:
                catalog.create_namespace_if_not_exists(self.namespace)
                return catalog.create_table_if_not_exists(self.identifier, schema=schema)

            table = self._call("creating the Iceberg table", create)
        return f"{table.location().rstrip('/')}/data"

    # -- the commit --------------------------------------------------------------------------------

    def commit(
        self,
        files: Sequence[StagedFile],
        schema: pa.Schema,
        *,
        write_mode: str,
        key: Sequence[str],
        app_id: str,
        metadata: Mapping[str, Any],
        root: str,
    ) -> tuple[int, bool]:
        """Commit the run's files (after adding new columns).

        :returns: the run's (last) snapshot id, and whether the table references the staged files
            (False after an upsert, which writes files of its own).
        """
        properties = {_APP_ID: app_id, **{k: str(v) for k, v in metadata.items()}}
        table = self._table()
        assert table is not None, "staging_root() created it"
        new_columns = self.check_schema(schema, write_mode=write_mode, key=key)
        current = table.current_snapshot()
        # A try killed between the two commits below left the schema evolved without its empty
        # snapshot: its retry sees no new column, yet the upsert needs that snapshot as much.
        behind = current is not None and current.schema_id not in (None, table.metadata.current_schema_id)
        if new_columns or behind:

            def evolve() -> None:
                if new_columns:
                    with table.update_schema() as update:
                        update.union_by_name(schema)
                # An empty snapshot in the new schema: pyiceberg's upsert scans the table in the
                # schema of its newest snapshot (measured, 0.12: "field names are not matching"
                # right after union_by_name). No rows; not marked as the run's.
                evolved = self._load_catalog().load_table(self.identifier)
                evolved.append(evolved.schema().as_arrow().empty_table(), snapshot_properties={_SCHEMA_OF: app_id})

            self._call("adding columns to the Iceberg table", evolve)
            table = self._table()
        paths = [f"{root}/{f.path}" for f in files if f.rows > 0]
        upserted = False
        if write_mode == "merge" and table.current_snapshot() is not None and paths:
            import pyarrow.parquet as pq

            def upsert() -> None:
                # In the table's column order and types (a column added by union_by_name is last
                # there, wherever the source has it); upsert casts to the table's schema.
                target = table.schema().as_arrow()
                data = pa.concat_tables([_read(table, p, pq) for p in paths]).select(target.names).cast(target)
                with table.transaction() as tx:
                    outcome = tx.upsert(data, join_cols=list(key), snapshot_properties=properties)
                    if not outcome.rows_updated and not outcome.rows_inserted:  # nothing changed: mark the run
                        tx.append(target.empty_table(), snapshot_properties=properties)

            self._call("merging into the Iceberg table", upsert, self.commit_timeout)
            upserted = True
        elif write_mode == "overwrite":
            from pyiceberg.expressions import AlwaysTrue

            def overwrite() -> None:
                with table.transaction() as tx:
                    if table.current_snapshot() is not None:  # an empty table has nothing to delete
                        tx.delete(AlwaysTrue(), snapshot_properties=properties)
                    if paths:
                        tx.add_files(paths, snapshot_properties=properties)

            self._call("overwriting the Iceberg table", overwrite, self.commit_timeout)
        elif paths:  # append, or a first merge: the files become the table
            self._call(
                "committing to the Iceberg table",
                lambda: table.add_files(paths, snapshot_properties=properties),
                self.commit_timeout,
            )
        if self.committed(app_id) is None:
            # The run wrote no snapshot (no rows, or an overwrite of an empty table): an empty append
            # names it, so a retry sees it done and the run is still one snapshot.
            empty = table.schema().as_arrow().empty_table()
            self._call("committing to the Iceberg table", lambda: table.append(empty, snapshot_properties=properties))
        snapshot = self.committed(app_id)
        if snapshot is None:
            raise StorageError(f"the Iceberg commit of {app_id} to {self.identifier} is not in the table's snapshots")
        return snapshot, not upserted


def _read(table: Any, path: str, pq: Any) -> pa.Table:
    # Through the table's own FileIO (the catalog's credentials), as the table's readers will.
    with table.io.new_input(path).open() as handle:
        return pq.read_table(handle)
