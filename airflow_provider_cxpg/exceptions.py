"""The provider's errors, catchable by meaning.

Every error can cross the process boundary: the worker pickles it, the parent re-raises it with the
worker's traceback attached as ``__cause__`` (a :class:`RemoteTraceback`).

::

    CxpgError
    ├── InvalidInputError (also ValueError)  bad input, raised before any data moves
    │   ├── ConnectionConfigError            unknown / wrong-type connection, missing host
    │   ├── InvalidIdentifierError           a table or column name that cannot be a PostgreSQL name
    │   ├── SourceNotFoundError              unknown table, column or schema
    │   ├── InvalidKeyError                  nullable, non-unique or unsupported key
    │   ├── UnsupportedTypeError             a column type that cannot be read faithfully
    │   └── DestinationConflictError         the destination holds another extraction
    ├── ExtractionError                      a failure while data moves
    │   ├── WorkerError                      the worker process failed
    │   │   ├── WorkerStartError             it did not start or did not say it was ready
    │   │   ├── WorkerCrashedError           it died (exit status / signal)
    │   │   └── HeartbeatLostError           it stopped sending heartbeats (frozen)
    │   ├── DeadlineExceededError (also TimeoutError)
    │   │   ├── QueryTimeoutError            one query ran past ``query_timeout``
    │   │   └── JobTimeoutError              the whole job ran past its deadline
    │   ├── QueryError                       the server or connectorx rejected a query
    │   │   ├── QueryCancelledError          the server cancelled it (statement_timeout, cancel)
    │   │   └── ServerConnectionError        the connection failed or the backend was terminated
    │   ├── ReadPanicError                   connectorx panicked (a Rust panic, not an Exception)
    │   ├── DataIntegrityError               the data broke a promise (NULL or duplicate key, ±infinity)
    │   │   └── SourceChangedError           DDL changed the source between two chunks of a run
    │   └── StorageError                     writing a chunk or the manifest failed
    └── ExtractionAborted                    stopped on request (on_kill, KeyboardInterrupt, task timeout)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "STORE_UNANSWERED",
    "ConnectionConfigError",
    "CxpgError",
    "DataIntegrityError",
    "DeadlineExceededError",
    "DestinationConflictError",
    "ExtractionAborted",
    "ExtractionError",
    "HeartbeatLostError",
    "InvalidIdentifierError",
    "InvalidInputError",
    "InvalidKeyError",
    "JobTimeoutError",
    "QueryCancelledError",
    "QueryError",
    "QueryTimeoutError",
    "ReadPanicError",
    "RemoteTraceback",
    "ServerConnectionError",
    "SourceChangedError",
    "SourceNotFoundError",
    "StorageError",
    "UnsupportedTypeError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStartError",
]


#: How a storage deadline's error ends. A store that stops answering and one that keeps failing look
#: alike from here: its client (botocore, s3fs) retries 503 SlowDown and the like until the deadline.
STORE_UNANSWERED = (
    "the store did not answer, or kept failing the request (its client retries errors such as 503 SlowDown "
    "until the deadline)"
)


def _rebuild(cls: type[CxpgError], message: str, details: dict[str, Any]) -> CxpgError:
    return cls(message, **details)


def _declared(cls: type) -> set[str]:
    """The attributes ``cls`` and its bases declare (their annotations)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(vars(klass).get("__annotations__", {}))
    return names - {"message", "details"}


class CxpgError(Exception):
    """Base of every error this provider raises.

    :param message: what happened, for a human; never contains a secret.
    :param details: structured facts, each one an attribute the class declares (the limit that
        fired, the server's state, the worker's pid...); an undeclared name is a ``TypeError``.
        Undeclared facts read as None.
    """

    #: The server's SQLSTATE, when the server said why.
    sqlstate: str | None = None

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        unknown = sorted(set(details) - _declared(type(self)))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no attribute {', '.join(unknown)}")
        self.message = message
        self.details = details
        for key, value in details.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Default exception pickling replays ``args`` only and would drop the details.
        return (_rebuild, (type(self), self.message, self.details))

    def __str__(self) -> str:
        return self.message


class RemoteTraceback(Exception):
    """The worker's formatted traceback, attached as ``__cause__`` of the re-raised error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n--- traceback in the worker process ---\n" + self.tb


class InvalidInputError(CxpgError, ValueError):
    """Bad input: raised before any data moves."""

    #: The destination concerned, when the input is about it.
    destination: str | None = None


class ConnectionConfigError(InvalidInputError):
    """The Airflow connection is missing, of another type, or incomplete."""

    conn_id: str | None = None


class InvalidIdentifierError(InvalidInputError):
    """A name that cannot be a PostgreSQL identifier (empty, NUL byte, too long)."""


class SourceNotFoundError(InvalidInputError):
    """The table, schema or a column does not exist (or is not visible to the login)."""

    #: The missing column, when a column is missing.
    column: str | None = None


class InvalidKeyError(InvalidInputError):
    """The chunking key cannot page exactly: nullable, not unique, or of an unsupported type."""


class UnsupportedTypeError(InvalidInputError):
    """A column type the provider cannot read without loss."""


class DestinationConflictError(InvalidInputError):
    """The destination already holds output of a different extraction."""

    #: What the output already there was extracted from (its manifest's ``source``).
    existing_source: Any = None


class ExtractionError(CxpgError):
    """A failure while data moves."""

    #: The chunk being read or written, when one was.
    chunk: int | None = None
    #: The setting whose deadline fired (``query_timeout``, ``storage_timeout``, ...), if one did.
    limit: str | None = None


class WorkerError(ExtractionError):
    """The worker process failed."""

    #: The worker's process id.
    pid: int | None = None


class WorkerStartError(WorkerError):
    """The worker did not start, or did not report ready in time."""


class WorkerCrashedError(WorkerError):
    """The worker process died."""

    #: Its exit status; negative: the signal that ended it.
    exitcode: int | None = None


class HeartbeatLostError(WorkerError):
    """No heartbeat from the worker within ``heartbeat_timeout`` (frozen or stopped)."""


class DeadlineExceededError(ExtractionError, TimeoutError):
    """A deadline fired."""

    #: What the run's backend was doing when it fired, as ``pg_stat_activity`` showed it.
    server_activity: str | None = None


class QueryTimeoutError(DeadlineExceededError):
    """One query ran past ``query_timeout``."""


class JobTimeoutError(DeadlineExceededError):
    """The whole job ran past its overall deadline."""


class QueryError(ExtractionError):
    """The server or connectorx rejected a query."""

    #: Why, in one word, when known (``statement_timeout``, ``authentication``, ``terminated``...).
    reason: str | None = None


class QueryCancelledError(QueryError):
    """The server cancelled the query (``statement_timeout`` or ``pg_cancel_backend``)."""


class ServerConnectionError(QueryError):
    """The connection failed, or the server terminated the backend."""

    #: The server, as a URI without its password.
    endpoint: str | None = None


class ReadPanicError(ExtractionError):
    """connectorx panicked while reading (a Rust panic, e.g. an unsupported type)."""


class DataIntegrityError(ExtractionError):
    """The data broke a promise the extraction relies on (NULL or duplicate key, ±infinity)."""

    #: The column at fault (a NULL key, ±infinity).
    column: str | None = None
    #: The key columns, when the key is at fault (not unique).
    key: list[str] | None = None
    #: The guard column whose check failed (a window edge, a tie).
    guard: str | None = None
    #: Rows the output holds, and rows the source holds, when they differ.
    rows: int | None = None
    source_rows: int | None = None
    #: The key ranges that changed while the dataset was validated.
    ranges: list[Any] | None = None


class SourceChangedError(DataIntegrityError):
    """DDL changed the source between two chunks of a run: the chunk read after it is not kept.

    A column's type or collation changed, the name now names another relation, or (in a snapshot)
    the table or one of its partitions got new storage, which the snapshot sees empty.
    """

    #: What differs, one line each.
    changes: list[str] | None = None


class StorageError(ExtractionError):
    """Writing a chunk file or the manifest failed."""

    #: The file or URL concerned.
    destination: str | None = None
    #: The operation that failed or hung (``writing``, ``committing``, ``listing``, ...).
    operation: str | None = None
    #: What the output check found wrong, one line per problem.
    problems: list[str] | None = None


class ExtractionAborted(CxpgError):
    """The extraction was stopped on request (``on_kill``, KeyboardInterrupt, task timeout)."""

    #: Who asked (``on_kill``, ``KeyboardInterrupt``, ...).
    reason: str | None = None

    @classmethod
    def because(cls, reason: str) -> ExtractionAborted:
        """The error for a stop requested with ``reason`` (e.g. ``"on_kill"``)."""
        return cls(f"extraction aborted: {reason}", reason=reason)
