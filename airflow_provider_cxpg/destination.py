"""The parent's view of an output location: a local directory or an fsspec URL prefix.

The worker writes chunk files (see :mod:`.worker.sinks`); the parent writes the manifest, lists and
removes files. Both resolve the same URL with the same ``storage_options``, so object storage works
through one code path whether the user gave ``s3://...`` or an Airflow ``ObjectStoragePath``.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
from typing import Any

from airflow_provider_cxpg.exceptions import InvalidInputError, StorageError

__all__ = ["OBJECT_STORES", "Destination"]

#: fsspec protocols whose objects appear only when an upload completes (atomic by themselves).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2"})


def _split_object_storage_path(path: Any) -> tuple[str, dict[str, Any]]:
    """Accept an Airflow ``ObjectStoragePath`` (or any UPath) without importing Airflow here."""
    fs = getattr(path, "fs", None)
    options = dict(getattr(fs, "storage_options", {}) or {})
    protocol = getattr(path, "protocol", "") or "file"
    text = str(path)
    if "://" not in text and protocol not in {"file", "local"}:
        text = f"{protocol}://{text.lstrip('/')}"
    return text, options


class Destination:
    """A directory of chunk files plus a manifest.

    :param location: local path, ``file://``, any fsspec URL, or an ``ObjectStoragePath``.
    :param storage_options: fsspec options (credentials, endpoint) for remote URLs.
    """

    def __init__(self, location: Any, storage_options: dict[str, Any] | None = None) -> None:
        if location is None or (isinstance(location, str) and not location.strip()):
            raise InvalidInputError("`destination` is empty")
        options: dict[str, Any] = {}
        if not isinstance(location, (str, os.PathLike)) or hasattr(location, "fs"):
            location, options = _split_object_storage_path(location)
        url = os.fspath(location).strip() if not isinstance(location, str) else location.strip()
        self.storage_options = {**options, **(storage_options or {})}
        self.is_local = "://" not in url or url.startswith("file://")
        if self.is_local:
            path = url[len("file://") :] if url.startswith("file://") else url
            self.root = os.path.abspath(os.path.expanduser(path))
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
        return Destination(self.child_url(name), self.storage_options)

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
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
                return
            if self.is_object_store:
                bucket = self.root.split("/", 1)[0]
                if not self._fs.exists(bucket):
                    raise StorageError(f"bucket {bucket!r} of destination {self.url} does not exist")
                return
            self._fs.makedirs(self.root, exist_ok=True)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot create destination {self.url}: {exc}") from exc

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self._path(name)
        try:
            if self.is_local:
                if not os.path.exists(path):
                    return None
                with open(path, encoding="utf-8") as handle:
                    return json.load(handle)
            if not self._fs.exists(path):
                return None
            with self._fs.open(path, "rb") as handle:
                return json.loads(handle.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {name} in {self.url}: {exc}") from exc

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Replace ``name`` atomically (rename locally; a single PUT on object stores)."""
        payload = json.dumps(data, indent=2, sort_keys=False, default=str).encode("utf-8")
        path = self._path(name)
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
                tmp = f"{path}.{secrets.token_hex(4)}.tmp"
                with open(tmp, "wb") as handle:
                    handle.write(payload)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            else:
                self._fs.pipe_file(path, payload)
        except Exception as exc:
            raise StorageError(f"cannot write {name} to {self.url}: {exc}") from exc

    def list_names(self) -> list[str]:
        """File names directly under the destination (empty when it does not exist)."""
        try:
            if self.is_local:
                return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
            if not self._fs.exists(self.root):
                return []
            self._fs.invalidate_cache(self.root)
            return sorted(posixpath.basename(p.rstrip("/")) for p in self._fs.ls(self.root, detail=False))
        except Exception as exc:
            raise StorageError(f"cannot list {self.url}: {exc}") from exc

    def remove(self, name: str) -> None:
        path = self._path(name)
        try:
            if self.is_local:
                if os.path.exists(path):
                    os.unlink(path)
            elif self._fs.exists(path):
                self._fs.rm(path)
        except Exception as exc:
            raise StorageError(f"cannot remove {name} from {self.url}: {exc}") from exc

    def size(self, name: str) -> int:
        path = self._path(name)
        return os.path.getsize(path) if self.is_local else int(self._fs.size(path))
