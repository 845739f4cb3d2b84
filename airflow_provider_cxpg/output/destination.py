"""The parent's view of an output location: a local directory or an fsspec URL prefix.

The worker writes chunk files (see :mod:`~airflow_provider_cxpg.worker.sinks`); the parent writes
the manifest, lists and
removes files. Both resolve the same URL with the same ``storage_options``, so object storage works
through one code path whether the user gave ``s3://...`` or an Airflow ``ObjectStoragePath``.

Every operation here has a deadline, ``timeout`` (the run's ``storage_timeout``): a store that stops
answering raises :class:`StorageError` naming the destination and the operation, instead of holding
the task (see :mod:`~airflow_provider_cxpg.bounded`). Operations run one at a time, in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

from airflow_provider_cxpg.bounded import CallRaised, CallStopped, CallTimedOut, SerialCalls
from airflow_provider_cxpg.durations import DEFAULT_STORAGE_TIMEOUT
from airflow_provider_cxpg.exceptions import STORE_UNANSWERED, ExtractionAborted, InvalidInputError, StorageError
from airflow_provider_cxpg.worker.protocol import OBJECT_STORES

__all__ = ["DamagedFile", "Destination", "local_path"]

T = TypeVar("T")


def _split_object_storage_path(path: Any) -> tuple[str, dict[str, Any]]:
    """Accept an Airflow ``ObjectStoragePath`` (or any UPath) without importing Airflow here."""
    fs = getattr(path, "fs", None)
    options = dict(getattr(fs, "storage_options", {}) or {})
    protocol = getattr(path, "protocol", "") or "file"
    if protocol in {"file", "local"}:
        return str(path), options
    # str() of an ObjectStoragePath with a conn_id is "s3://<conn_id>@bucket/key": the URL is
    # protocol + path (the connection's credentials are in the filesystem's options).
    inner = getattr(path, "path", None)
    text = f"{protocol}://{str(inner).lstrip('/')}" if inner else str(path)
    return text, options


#: Bytes read from a Parquet file's end to find its footer in one request (most footers are smaller).
_FOOTER_GUESS = 64 * 1024


class Destination:
    """A directory of chunk files plus a manifest.

    :param location: local path, ``file://``, any fsspec URL, or an ``ObjectStoragePath``.
    :param storage_options: fsspec options (credentials, endpoint) for remote URLs.
    :param timeout: seconds each operation may take (None: no limit).
    """

    def __init__(
        self,
        location: Any,
        storage_options: dict[str, Any] | None = None,
        *,
        timeout: float | None = DEFAULT_STORAGE_TIMEOUT,
    ) -> None:
        if location is None or (isinstance(location, str) and not location.strip()):
            raise InvalidInputError("`destination` is empty")
        options: dict[str, Any] = {}
        if not isinstance(location, (str, os.PathLike)) or hasattr(location, "fs"):
            location, options = _split_object_storage_path(location)
        url = os.fspath(location).strip() if not isinstance(location, str) else location.strip()
        self.storage_options = {**options, **(storage_options or {})}
        self.is_local = "://" not in url or url.startswith("file://")
        if self.is_local:
            self.root = os.path.abspath(os.path.expanduser(local_path(url)))
            self.url = self.root
            self._fs: Any = None
        else:
            import fsspec

            try:
                self._fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
            except Exception as exc:
                raise InvalidInputError(f"cannot open destination {url!r}: {exc}") from exc
            self.root = root.rstrip("/")
            self.url = url.rstrip("/")
        self.timeout = timeout
        self._io = SerialCalls("destination")
        #: Asked while a call waits: a reason (``on_kill``) ends the wait with ExtractionAborted.
        self.stop: Callable[[], str | None] | None = None
        # The operation that passed its deadline, shared with every destination above or below this
        # one: after it, calls anywhere in the tree fail at once instead of each waiting its own
        # deadline (a validator walking eight ranges of a frozen store waited eight times).
        self._stuck: list[str | None] = [None]

    def __repr__(self) -> str:
        return f"Destination({self.url!r})"

    # -- names -------------------------------------------------------------------------------------

    def child_url(self, name: str) -> str:
        """URL the worker writes ``name`` to."""
        return os.path.join(self.root, name) if self.is_local else f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name) if self.is_local else posixpath.join(self.root, name)

    def sub(self, name: str) -> Destination:
        """A destination one level below this one (a partition's own prefix)."""
        return self._related(self.child_url(name))

    def _related(self, url: str) -> Destination:
        """A destination in the same tree: same options, deadline, ``stop`` and stuck operation."""
        other = Destination(url, self.storage_options, timeout=self.timeout)
        other.stop, other._stuck = self.stop, self._stuck
        return other

    @property
    def name(self) -> str:
        """The last segment of the location (``range=0003`` for a fanned-out range)."""
        return os.path.basename(self.root) if self.is_local else posixpath.basename(self.root)

    def parent(self) -> Destination | None:
        """The destination one level up, or None at a bucket's or filesystem's root."""
        if self.is_local:
            up = os.path.dirname(self.root)
            return None if up == self.root else self._related(up)
        head, _, _ = self.url.rpartition("/")
        if not head or head.endswith(":/"):  # "s3://bucket" splits into "s3:/" and "bucket"
            return None
        return self._related(head)

    def _bounded(
        self, operation: str, fn: Callable[[], T], timeout: float | None = None, *, abortable: bool = True
    ) -> T:
        """Run ``fn`` under the deadline; errors become :class:`StorageError` naming what failed.

        :param abortable: whether :attr:`stop` ends the wait (not for the record of a failure,
            written after the abort itself).
        """
        what = f"{operation} at {self.url}"
        limit = self.timeout if timeout is None else timeout
        earlier = self._stuck[0]
        if earlier is not None:
            raise StorageError(
                f"{what} was not attempted: an earlier operation ({earlier}) never returned",
                operation=operation,
                destination=self.url,
                limit="storage_timeout",
            )
        try:
            return self._io.call(what, fn, limit, wrap_errors=True, stop=self.stop if abortable else None)
        except CallStopped as stopped:
            raise ExtractionAborted.because(stopped.reason) from None
        except CallTimedOut as exc:
            if exc.earlier:
                detail = f"{what} was not attempted: an earlier operation ({exc.earlier}) never returned"
            else:
                self._stuck[0] = what
                detail = (
                    f"{what} did not finish within "
                    + (f"storage_timeout={limit}s" if limit == self.timeout else f"{limit}s")
                    + f": {STORE_UNANSWERED}"
                )
            raise StorageError(detail, operation=operation, destination=self.url, limit="storage_timeout") from None
        except CallRaised as raised:  # the call's own error; one raised into this wait (a timeout) goes on as it is
            if isinstance(raised.error, StorageError):
                raise raised.error from None
            raise StorageError(
                f"{what} failed: {raised.error}", operation=operation, destination=self.url
            ) from raised.error

    # -- operations --------------------------------------------------------------------------------

    @property
    def is_object_store(self) -> bool:
        protocols = self._fs.protocol if self._fs is not None else ()
        protocols = protocols if isinstance(protocols, (tuple, list)) else (protocols,)
        return bool(set(protocols) & OBJECT_STORES)

    def ensure(self) -> None:
        """Create the directory (local, other filesystems); for object stores check the bucket exists.

        Object stores need no directories, and ``makedirs`` on a missing bucket would *create* it:
        a typo in the bucket name must fail instead.
        """

        def ensure() -> None:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
            elif self.is_object_store:
                bucket = self.root.split("/", 1)[0]
                if not self._fs.exists(bucket):
                    raise StorageError(f"bucket {bucket!r} of destination {self.url} does not exist")
            else:
                self._fs.makedirs(self.root, exist_ok=True)

        self._bounded("creating the destination", ensure)

    def read_json(self, name: str, *, timeout: float | None = None, abortable: bool = True) -> dict[str, Any] | None:
        path = self._path(name)

        def read() -> dict[str, Any] | None:
            if self.is_local:
                if not os.path.exists(path):
                    return None
                with open(path, encoding="utf-8") as handle:
                    return json.load(handle)
            if not self._fs.exists(path):
                return None
            with self._fs.open(path, "rb") as handle:
                return json.loads(handle.read().decode("utf-8"))

        return self._bounded(f"reading {name}", read, timeout, abortable=abortable)

    def write_json(
        self, name: str, data: dict[str, Any], *, timeout: float | None = None, abortable: bool = True
    ) -> None:
        """Replace ``name`` atomically (rename locally; a single PUT on object stores).

        :param timeout: a shorter deadline than the destination's (a best-effort failure record).
        :param abortable: whether an abort ends the wait (see :meth:`_bounded`).
        """
        payload = json.dumps(data, indent=2, sort_keys=False, default=str).encode("utf-8")
        path = self._path(name)

        def write() -> None:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
                tmp = f"{path}.{secrets.token_hex(4)}.tmp"
                try:
                    with open(tmp, "wb") as handle:
                        handle.write(payload)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):  # a full disk must not keep half a manifest forever
                        os.unlink(tmp)
                    raise
            else:
                self._fs.pipe_file(path, payload)

        self._bounded(f"writing {name}", write, timeout, abortable=abortable)

    def write_marker(self, name: str) -> None:
        """Write an empty file (``_SUCCESS``): a reader's sign that the output is complete."""

        def write() -> None:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
                with open(self._path(name), "wb") as handle:
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                self._fs.pipe_file(self._path(name), b"")

        self._bounded(f"writing {name}", write)

    def list_entries(self) -> dict[str, int]:
        """Files directly under the destination and their sizes (empty when it does not exist)."""

        def entries() -> dict[str, int]:
            if self.is_local:
                if not os.path.isdir(self.root):
                    return {}
                found = {}
                for entry in os.scandir(self.root):
                    if entry.is_file(follow_symlinks=False):
                        found[entry.name] = entry.stat(follow_symlinks=False).st_size
                return found
            if not self._fs.exists(self.root):
                return {}
            self._fs.invalidate_cache(self.root)
            here = self.root.rstrip("/")
            return {
                posixpath.basename(info["name"].rstrip("/")): int(info.get("size") or 0)
                for info in self._fs.ls(self.root, detail=True)
                # a "folder" marker (a zero-byte "prefix/" object of a console or S3A) is no file
                if info.get("type") != "directory"
                and not info["name"].endswith("/")
                and info["name"].rstrip("/") != here
            }

        return self._bounded("listing", entries)

    def list_names(self) -> list[str]:
        """File names directly under the destination (empty when it does not exist)."""
        return sorted(self.list_entries())

    def list_dirs(self) -> list[str]:
        """Names of the directories (prefixes) directly under the destination."""

        def dirs() -> list[str]:
            if self.is_local:
                if not os.path.isdir(self.root):
                    return []
                return sorted(e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False))
            if not self._fs.exists(self.root):
                return []
            self._fs.invalidate_cache(self.root)
            return sorted(
                posixpath.basename(info["name"].rstrip("/"))
                for info in self._fs.ls(self.root, detail=True)
                if info.get("type") == "directory"
            )

        return self._bounded("listing", dirs)

    def remove(self, name: str) -> None:
        path = self._path(name)

        def remove() -> None:
            if self.is_local:
                if os.path.exists(path):
                    os.unlink(path)
            elif self._fs.exists(path):
                self._fs.rm(path)

        self._bounded(f"removing {name}", remove)

    def remove_tree(self, name: str) -> None:
        """Remove the directory ``name`` below the destination and everything in it."""
        path = self._path(name)

        def remove() -> None:
            if self.is_local:
                if os.path.isdir(path):
                    shutil.rmtree(path)
            elif self._fs.exists(path):
                self._fs.rm(path, recursive=True)

        self._bounded(f"removing {name}/", remove)

    def size(self, name: str) -> int:
        path = self._path(name)
        return self._bounded(
            f"sizing {name}", lambda: os.path.getsize(path) if self.is_local else int(self._fs.size(path))
        )

    def read_columns(self, name: str, columns: list[str]) -> Any:
        """Some columns of a Parquet file, as a ``pyarrow.Table`` (under ``storage_timeout``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        def read() -> Any:
            # The bytes through Python, then parsed in memory (see _read_range).
            return pq.read_table(pa.BufferReader(self._read_range(name)), columns=columns)

        return self._bounded(f"reading {', '.join(columns)} of {name}", read)

    def read_footer(self, name: str) -> tuple[int, dict[str, str]]:
        """A Parquet file's row count and key-value metadata, from its footer (no data pages read)."""

        def footer() -> tuple[int, dict[str, str]]:
            meta = self._footer(name)
            try:
                pairs = {
                    k.decode(): v.decode() for k, v in (meta.metadata or {}).items() if not k.startswith(b"ARROW:")
                }
            except UnicodeDecodeError as exc:
                raise DamagedFile(f"not a Parquet file (its footer does not parse: {exc})") from exc
            return int(meta.num_rows), pairs

        return self._bounded(f"reading the footer of {name}", footer)

    def read_metadata(self, name: str) -> Any:
        """A Parquet file's footer as ``pyarrow.parquet.FileMetaData`` (no data pages read)."""
        return self._bounded(f"reading the footer of {name}", lambda: self._footer(name))

    def _footer(self, name: str) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._path(name)  # on the helper thread: not through self.size(), which queues behind it
        size = os.path.getsize(path) if self.is_local else int(self._fs.size(path))
        tail = self._read_range(name, max(0, size - _FOOTER_GUESS), size)
        if len(tail) < 12 or tail[-4:] != b"PAR1":
            raise DamagedFile(f"not a Parquet file ({size} bytes, no footer)")
        length = int.from_bytes(tail[-8:-4], "little")
        if length + 12 > size:
            raise DamagedFile(f"not a Parquet file (a footer of {length} bytes in {size})")
        if length + 8 > len(tail):
            tail = self._read_range(name, size - length - 8, size)
        try:  # the footer alone, framed as a file: the data pages are never read
            return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(length + 8) :]))
        except Exception as exc:  # bytes that were read but do not parse (pyarrow says OSError for some)
            raise DamagedFile(f"not a Parquet file (its footer does not parse: {exc})") from exc

    def _read_range(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes of ``name`` (all, or ``[start, end)``), read by Python, not by pyarrow.

        pyarrow reading a Python file object calls back into Python from C++ frames; a helper
        thread abandoned there past its deadline and woken while the interpreter exits was unwound
        through those frames: ``Fatal Python error: PyGILState_Release`` (SIGABRT) at exit.
        """
        path = self._path(name)
        if self.is_local:
            with open(path, "rb") as handle:
                if start:
                    handle.seek(start)
                return handle.read() if end is None else handle.read(end - (start or 0))
        return bytes(self._fs.cat_file(path, start=start, end=end))


class DamagedFile(ValueError):
    """The bytes of a file were read and are not what they should be (the store answered)."""


def local_path(url: str) -> str:
    """The path a local destination names: a plain path, ``file:///p``, ``file://localhost/p`` or ``file:/p``.

    ``file:/p`` (Spark's and Hadoop's form) has no ``//``: taken as a plain path it was a folder
    named ``file:`` under the task's working directory, and the run wrote there, green.
    """
    if not url.startswith("file:"):
        return url
    rest = url[len("file:") :]
    if rest.startswith("//"):
        host, slash, tail = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise InvalidInputError(f"destination {url!r} names a file on another host ({host!r}): give a local path")
        rest = slash + tail
    if not rest.startswith("/"):
        raise InvalidInputError(f"destination {url!r} is not an absolute file URL: give a local path")
    return rest
