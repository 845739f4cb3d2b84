"""Delta Lake: one table version per run, from the chunk files the worker already wrote, exactly once.

The worker writes a run's chunk files as for Parquet output, into ``<table>/cxpg-<run key>/`` beside
the table's ``_delta_log`` (a staging directory with its own manifest, so a retried try resumes it).
When every chunk is committed and checked, the parent commits them in one Delta transaction:

* ``append`` / ``overwrite``: the files are *added* as they are (no rewrite); ``overwrite`` removes
  every earlier file in the same commit, so a reader sees the old table or the new one.
* ``merge``: the staged files are the source of one ``MERGE`` by the key (update matched rows,
  insert new ones); delta-rs writes the merged files, and the staged ones are removed afterwards.

Exactly once: every commit carries a Delta *app transaction* ``(app_id, 1)`` whose ``app_id`` names
the run (``cxpg:<run key>``), and custom metadata with the same id. Before extracting and again
before committing, :meth:`DeltaTarget.committed` asks the table for that transaction: a retry of a
run whose commit landed (the task died after the commit, before it could report) finds it and
commits nothing (delta-rs refuses only a *concurrent* commit of the same transaction, not a later
one, so the check is ours).

Schema: the planned Arrow schema becomes the table's. :meth:`DeltaTarget.check_schema` runs before
any data moves: a column Delta cannot store (``time``, unsigned integers), a column the table has
that the source lost, or a changed type is refused naming the columns; a new source column is added
to the table (Delta allows adding a nullable column) in a metadata commit just before the data
commit (a reader of that version sees no new rows, only the new, empty column).

Every call on the table runs under ``storage_timeout`` on a helper thread (a stalled store cannot
hold the task); a commit that timed out may still land, and the transaction check on retry finds it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from airflow_provider_cxpg.exceptions import InvalidInputError, StorageError
from airflow_provider_cxpg.output.table_calls import (
    StagedFile,
    TableCalls,
    has_unsigned_integers,
    new_columns_or_refuse,
)

__all__ = [
    "APP_PREFIX",
    "UNKNOWN_VERSION",
    "WRITE_MODES",
    "DeltaTarget",
    "StagedFile",
    "delta_storage_options",
    "require_deltalake",
]

APP_PREFIX = "cxpg:"
WRITE_MODES = ("append", "overwrite", "merge")
_METADATA_APP_ID = "cxpg.app_id"
_SECRET_OPTIONS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: ``committed()`` of a run whose transaction is in the table but whose commit file was cleaned up.
UNKNOWN_VERSION = -1
#: How many of the newest commit files are searched for a run's commit before the history.
_LOG_SCAN = 1_000
#: Table properties of CHECK constraints (``delta.constraints.<name>``: a SQL expression).
_CONSTRAINT = "delta.constraints."
#: Field metadata of columns a writer computes or checks: ``delta.invariants``,
#: ``delta.generationExpression``, ``delta.identity.*``.
_COMPUTED_COLUMN = ("delta.invariants", "delta.generationExpression", "delta.identity.")


def require_deltalake() -> Any:
    """Import ``deltalake``, or say which extra installs it (before any data moves)."""
    try:
        import deltalake
    except ImportError as exc:
        raise InvalidInputError(
            "table_format='delta' needs the deltalake package: pip install 'airflow-provider-cxpg[delta]'"
        ) from exc
    return deltalake


def delta_storage_options(url: str, fsspec_options: Mapping[str, Any]) -> dict[str, str]:
    """delta-rs (object_store) options for an S3 table from the fsspec options the worker gets.

    The same credentials write the chunk files (s3fs, in the worker) and the commit (delta-rs, in
    the parent); only the spelling differs. Local tables need none.
    """
    if not url.startswith(("s3://", "s3a://")):
        return {}
    options: dict[str, str] = {}
    spelled = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN"}
    for name, env in spelled.items():
        if fsspec_options.get(name):
            options[env] = str(fsspec_options[name])
    client = dict(fsspec_options.get("client_kwargs") or {})
    endpoint = fsspec_options.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = str(endpoint)
        if str(endpoint).startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    region = client.get("region_name") or fsspec_options.get("region_name") or ("us-east-1" if endpoint else None)
    if region:
        options["AWS_REGION"] = str(region)
    if fsspec_options.get("anon"):
        options["AWS_SKIP_SIGNATURE"] = "true"
    if fsspec_options.get("profile"):
        options["AWS_PROFILE"] = str(fsspec_options["profile"])
    # S3 has no atomic rename; delta-rs commits with a conditional put (S3 and most S3-compatible
    # stores support it), so no locking provider is needed.
    options.setdefault("AWS_CONDITIONAL_PUT", "etag")
    return options


class DeltaTarget:
    """A Delta table that runs are committed to.

    :param uri: the table's root (local path or ``s3://bucket/prefix``).
    :param storage_options: delta-rs options (see :func:`delta_storage_options`), or a function that
        returns them: called before each call on the table, so credentials that expire (STS, IRSA,
        instance profiles) are the current ones when the run commits, hours after it started.
    :param timeout: seconds each call on the table may take (``storage_timeout``); None: no limit.
    :param commit_timeout: seconds a MERGE may take (it reads the run and rewrites files); default ``timeout``.
    :param compression: the codec of the files a MERGE writes (the run's Parquet codec).
    """

    def __init__(
        self,
        uri: str,
        storage_options: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None,
        *,
        timeout: float | None,
        commit_timeout: float | None = None,
        compression: str = "zstd",
        fsspec_options: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self._options = storage_options if callable(storage_options) else (lambda: dict(storage_options or {}))
        self.storage_options: dict[str, str] = {}
        # What the worker wrote the staged files with (fsspec's options: a profile, a CA bundle,
        # proxies, addressing), for reading them back in a merge and for reading the log.
        self._fsspec_options = fsspec_options or (lambda: {})
        self.reader_options: dict[str, Any] = {}
        self.timeout = timeout
        self.commit_timeout = commit_timeout or timeout
        self.compression = compression
        self._call = TableCalls(
            "delta",
            self.uri,
            timeout=timeout,
            secrets=lambda: [self.storage_options.get(name, "") for name in _SECRET_OPTIONS],
        )
        self._deltalake = require_deltalake()

    # -- opening the table (every call through TableCalls: bounded, scrubbed) ------------------------

    def _open(self) -> Any | None:
        deltalake = self._deltalake
        self.storage_options = dict(self._options())  # renewed credentials, before each table
        self.reader_options = dict(self._fsspec_options())

        def load() -> Any | None:
            try:
                return deltalake.DeltaTable(self.uri, storage_options=self.storage_options or None)
            except deltalake.exceptions.TableNotFoundError:
                return None

        return self._call("opening the Delta table", load)

    # -- before data moves -------------------------------------------------------------------------

    def committed(self, app_id: str) -> int | None:
        """The table version that committed ``app_id``'s run, or None when none did."""
        table = self._open()
        if table is None or self._call("reading the Delta log", lambda: table.transaction_version(app_id)) is None:
            return None
        return self._call("finding the commit in the Delta log", lambda: self._version_of(table, app_id))

    def _version_of(self, table: Any, app_id: str) -> int:
        # The commit files themselves, newest first: reading known keys works on every store (a
        # history() listing hangs on some S3-compatible servers), and the run's commit is nearly
        # always the newest one.
        filesystem, root = _filesystem(self.uri, self.reader_options, self.timeout)
        latest = int(table.version())
        for version in range(latest, max(-1, latest - _LOG_SCAN), -1):
            try:
                lines = _read_bytes(filesystem, f"{root}/_delta_log/{version:020d}.json").decode("utf-8").splitlines()
            except FileNotFoundError:  # cleaned up after a checkpoint
                break
            for line in lines:
                action = json.loads(line) if line.strip() else {}
                if action.get("txn", {}).get("appId") == app_id:
                    return version
        for entry in table.history():  # older than the scan: the commit info names the run too
            if entry.get(_METADATA_APP_ID) == app_id:
                return int(entry["version"])
        # Committed, but the log was cleaned up past it (a month-old run cleared): committed all the
        # same, at a version the log no longer says.
        return UNKNOWN_VERSION

    def check_schema(self, schema: pa.Schema, *, write_mode: str, key: Sequence[str]) -> list[str]:
        """Refuse what the table cannot take; return the source columns the table will gain."""
        deltalake = self._deltalake
        unstorable = []
        for field in schema:
            try:
                # delta-rs maps unsigned integers (oid, xid) to signed ones its readers then refuse
                # values of (measured: uint32 3000000000), so they are refused here
                if has_unsigned_integers(field.type):
                    raise TypeError(field.type)
                deltalake.Schema.from_arrow(pa.schema([field]))
            except Exception:  # noqa: BLE001  delta-rs says only "unsupported type"
                unstorable.append(f"{field.name} ({field.type})")
        if unstorable:
            raise InvalidInputError(
                f"Delta Lake cannot store column(s) {', '.join(unstorable)}: read them as another type "
                "with column_casts (e.g. {'col': 'text'} or {'col': 'bigint'})"
            )
        missing_key = [k for k in key if k not in schema.names]
        if write_mode == "merge" and missing_key:
            raise InvalidInputError(f"write_mode='merge' needs the key column(s) {missing_key} in the output")
        table = self._open()
        if table is None:
            return []
        self._refuse_what_added_files_cannot_honour(table, write_mode)
        existing = self._call("reading the Delta schema", lambda: table.schema().to_arrow())
        existing = pa.schema(existing)
        theirs = {f.name: f.type for f in existing}
        ours = {f.name: _delta_type(deltalake, f) for f in schema}
        return new_columns_or_refuse(theirs, ours, f"(Delta) {self.uri}", same=_same, addable="new nullable columns")

    def _refuse_what_added_files_cannot_honour(self, table: Any, write_mode: str) -> None:
        """The commit adds the staged files as they are: a table that needs more of its writers is refused.

        delta-rs's own writer evaluates these; adding files bypasses it. Measured: files added to a
        table partitioned by ``region`` read back with ``region`` NULL in every row, and rows breaking
        a CHECK constraint or an invariant were committed.
        """
        metadata = self._call("reading the Delta metadata", lambda: table.metadata())
        configuration = dict(metadata.configuration or {})
        problems = []
        if metadata.partition_columns:
            problems.append(
                f"it is partitioned by {list(metadata.partition_columns)} (the files carry no partition values)"
            )
        checks = {k.removeprefix(_CONSTRAINT): v for k, v in configuration.items() if k.startswith(_CONSTRAINT)}
        if checks:
            problems.append(f"it has CHECK constraints {checks} (adding files evaluates none)")
        if write_mode != "append" and configuration.get("delta.appendOnly", "false").lower() == "true":
            problems.append(f"it is append-only (delta.appendOnly), and write_mode={write_mode!r} removes rows")
        mapping = configuration.get("delta.columnMapping.mode", "none")
        if mapping != "none":
            problems.append(
                f"it maps column names (delta.columnMapping.mode={mapping}; the files use the logical names)"
            )
        fields = self._call("reading the Delta schema", lambda: table.schema().fields)
        for field in fields:
            computed = sorted(k for k in (field.metadata or {}) if k.startswith(_COMPUTED_COLUMN))
            if computed:
                problems.append(
                    f"column {field.name!r} has {', '.join(computed)} (adding files computes or checks none)"
                )
        if problems:
            raise InvalidInputError(
                f"the Delta table {self.uri} cannot take the run's files as they are: {'; '.join(problems)}. "
                "Write to a table without these, or to a new one the run creates"
            )

    def required_columns(self) -> list[str]:
        """The table's NOT NULL columns (none before the table exists): the commit checks no value."""
        table = self._open()
        if table is None:
            return []
        fields = self._call("reading the Delta schema", lambda: table.schema().fields)
        return [f.name for f in fields if not f.nullable]

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
    ) -> tuple[int, bool]:
        """Commit the run's files as one version (after adding new columns).

        :returns: the version, and whether the table references the staged files (False after a
            MERGE, which writes files of its own: the staged ones may then be removed).
        """
        deltalake = self._deltalake
        from deltalake.transaction import CommitProperties, Transaction, create_table_with_add_actions

        properties = CommitProperties(
            app_transactions=[Transaction(app_id, 1)],
            custom_metadata={_METADATA_APP_ID: app_id, **{k: str(v) for k, v in metadata.items()}},
        )
        actions = [self._add_action(f) for f in files if f.rows > 0]
        delta_schema = deltalake.Schema.from_arrow(schema)
        table = self._open()
        merged = False
        if table is None:  # a first run, whatever the mode: the files become the table
            self._call(
                "creating the Delta table",
                lambda: create_table_with_add_actions(
                    self.uri,
                    delta_schema,
                    actions,
                    mode="error",
                    storage_options=self.storage_options or None,
                    commit_properties=properties,
                ),
            )
        else:
            new_columns = self.check_schema(schema, write_mode=write_mode, key=key)
            if new_columns:
                fields = [f for f in delta_schema.fields if f.name in new_columns]
                self._call("adding columns to the Delta table", lambda: table.alter.add_columns(fields))
                table = self._open()
                assert table is not None
            if write_mode == "merge" and any(f.rows for f in files):
                self._merge(table, files, key, properties)
                merged = True
            elif write_mode == "merge":  # nothing changed: a version of no files, so a retry sees it done
                table_schema = self._call("reading the Delta schema", lambda: table.schema())
                self._call(
                    "committing to the Delta table",
                    lambda: table.create_write_transaction([], "append", table_schema, commit_properties=properties),
                )
            else:
                table_schema = self._call("reading the Delta schema", lambda: table.schema())
                self._call(
                    "committing to the Delta table",
                    lambda: table.create_write_transaction(
                        actions, write_mode, table_schema, commit_properties=properties
                    ),
                )
        version = self.committed(app_id)
        if version is None:
            raise StorageError(f"the Delta commit of {app_id} to {self.uri} is not in the table's log")
        return version, not merged

    def _add_action(self, staged: StagedFile) -> Any:
        from deltalake.transaction import AddAction

        # Readers skip nothing without min/max, but numRecords lets them count without opening files.
        return AddAction(
            staged.path, staged.size, {}, int(time.time() * 1000), True, json.dumps({"numRecords": staged.rows})
        )

    @contextlib.contextmanager
    def _local_copies(self, paths: list[str]) -> Iterator[list[str]]:
        """The staged files as local paths: as they are for a local table; from an object store,
        copied by Python (fsspec, on this helper thread) into a temporary folder removed afterwards.

        Not pyarrow's S3 layer, which at interpreter exit waits for every request in flight (an
        abandoned merge held the task process's exit on a frozen store).
        """
        filesystem, root = _filesystem(self.uri, self.reader_options, self.timeout)
        if not self.uri.startswith(("s3://", "s3a://")):
            yield [p.replace(self.uri, root, 1) for p in paths]
            return
        folder = tempfile.mkdtemp(prefix="cxpg-merge-")
        _TEMPORARY.add(folder)  # rows of the source: removed at exit if the merge never returns
        try:
            local = []
            for index, path in enumerate(paths):
                target = os.path.join(folder, f"{index:06d}.parquet")
                with open(target, "wb") as handle:
                    handle.write(_read_bytes(filesystem, path.replace(self.uri, root, 1)))
                local.append(target)
            yield local
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            _TEMPORARY.discard(folder)

    def _merge(self, table: Any, files: Sequence[StagedFile], key: Sequence[str], properties: Any) -> None:
        paths = [f"{self.uri}/{f.path}" for f in files if f.rows > 0]
        if not paths:
            return
        predicate = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in key)

        def merge() -> Any:
            import pyarrow.dataset as ds
            from deltalake import WriterProperties

            codec = "UNCOMPRESSED" if self.compression == "none" else self.compression.upper()
            with self._local_copies(paths) as local:
                # Local files, read by pyarrow's C++ alone: delta-rs pulls the batches from threads
                # of its own, and a source that called back into Python from there (fsspec, or a
                # Python generator) could crash a task process exiting with the merge abandoned.
                source = ds.dataset(local, format="parquet").scanner().to_reader()
                return (
                    table.merge(
                        source=source,
                        predicate=predicate,
                        source_alias="s",
                        target_alias="t",
                        writer_properties=WriterProperties(compression=codec),  # type: ignore[arg-type]
                        commit_properties=properties,
                    )
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute()
                )

        self._call("merging into the Delta table", merge, self.commit_timeout)

    def close(self) -> None:
        self._call.close()


def _quote(name: str) -> str:
    # delta-rs parses predicates as SQL (DataFusion): double quotes keep case and odd characters.
    return '"' + name.replace('"', '""') + '"'


def _delta_type(deltalake: Any, field: pa.Field) -> pa.DataType:
    """The Arrow type a column reads back as once stored in Delta (e.g. large_string -> string)."""
    stored = pa.schema(deltalake.Schema.from_arrow(pa.schema([field])).to_arrow())
    return stored.field(0).type


def _same(a: pa.DataType, b: pa.DataType) -> bool:
    def normal(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return pa.string()
        if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
            return pa.binary()
        return t

    return normal(a) == normal(b)


#: Temporary copies of staged files a merge is reading (removed when it returns, or at exit).
_TEMPORARY: set[str] = set()


@atexit.register
def _remove_temporary() -> None:
    for folder in list(_TEMPORARY):
        shutil.rmtree(folder, ignore_errors=True)


def _filesystem(uri: str, fsspec_options: Mapping[str, Any], timeout: float | None) -> tuple[Any, str]:
    """A filesystem for the staged files and the log, and the table root in its terms.

    On S3, fsspec's with the options the worker wrote with, not pyarrow's: pyarrow's S3 layer
    finalizes at interpreter exit by waiting for every request in flight, so a read abandoned on a
    store that stopped answering held the task process's exit (its socket read timeout is ignored on
    Linux); fsspec's session closes without waiting. Socket timeouts follow ``storage_timeout``.
    """
    if uri.startswith(("s3://", "s3a://")):
        import fsspec

        options = dict(fsspec_options)
        if timeout is not None:
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("connect_timeout", timeout)
            config.setdefault("read_timeout", timeout)
            options["config_kwargs"] = config
        options["skip_instance_cache"] = True  # its own instance: another run's credentials are not these
        return fsspec.filesystem("s3", **options), uri.split("://", 1)[1]
    from pyarrow import fs

    return fs.LocalFileSystem(), uri.removeprefix("file://")


def _read_bytes(filesystem: Any, path: str) -> bytes:
    """A whole file, through fsspec's or pyarrow's filesystem (FileNotFoundError when it is not there)."""
    if hasattr(filesystem, "open_input_stream"):  # pyarrow's
        with filesystem.open_input_stream(path) as handle:
            return bytes(handle.read())
    with filesystem.open(path, "rb") as handle:
        return bytes(handle.read())
