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
    │   └── StorageError                     writing a chunk or the manifest failed
    └── ExtractionAborted                    stopped on request (on_kill, KeyboardInterrupt, task timeout)
"""

from __future__ import annotations

from typing import Any

__all__ = [
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
    "SourceNotFoundError",
    "StorageError",
    "UnsupportedTypeError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStartError",
]


def _rebuild(cls: type[CxpgError], message: str, details: dict[str, Any]) -> CxpgError:
    return cls(message, **details)


class CxpgError(Exception):
    """Base of every error this provider raises.

    :param message: what happened, for a human; never contains a secret.
    :param details: structured facts (limit that fired, server state, pid...) kept as attributes.
    """

    #: Whether running the same step again may succeed (a dead worker: yes; bad input: no).
    retryable: bool = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
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


class ConnectionConfigError(InvalidInputError):
    """The Airflow connection is missing, of another type, or incomplete."""


class InvalidIdentifierError(InvalidInputError):
    """A name that cannot be a PostgreSQL identifier (empty, NUL byte, too long)."""


class SourceNotFoundError(InvalidInputError):
    """The table, schema or a column does not exist (or is not visible to the login)."""


class InvalidKeyError(InvalidInputError):
    """The chunking key cannot page exactly: nullable, not unique, or of an unsupported type."""


class UnsupportedTypeError(InvalidInputError):
    """A column type the provider cannot read without loss."""


class DestinationConflictError(InvalidInputError):
    """The destination already holds output of a different extraction."""


class ExtractionError(CxpgError):
    """A failure while data moves."""


class WorkerError(ExtractionError):
    """The worker process failed."""

    retryable = True


class WorkerStartError(WorkerError):
    """The worker did not start, or did not report ready in time."""


class WorkerCrashedError(WorkerError):
    """The worker process died; ``exitcode`` holds its status (negative: the signal number)."""


class HeartbeatLostError(WorkerError):
    """No heartbeat from the worker within ``heartbeat_timeout`` (frozen or stopped)."""


class DeadlineExceededError(ExtractionError, TimeoutError):
    """A deadline fired."""

    retryable = True


class QueryTimeoutError(DeadlineExceededError):
    """One query ran past ``query_timeout``."""


class JobTimeoutError(DeadlineExceededError):
    """The whole job ran past its overall deadline."""


class QueryError(ExtractionError):
    """The server or connectorx rejected a query."""


class QueryCancelledError(QueryError):
    """The server cancelled the query (``statement_timeout`` or ``pg_cancel_backend``)."""

    retryable = True


class ServerConnectionError(QueryError):
    """The connection failed, or the server terminated the backend."""

    retryable = True


class ReadPanicError(ExtractionError):
    """connectorx panicked while reading (a Rust panic, e.g. an unsupported type)."""


class DataIntegrityError(ExtractionError):
    """The data broke a promise the extraction relies on (NULL or duplicate key, ±infinity)."""


class StorageError(ExtractionError):
    """Writing a chunk file or the manifest failed."""

    retryable = True


class ExtractionAborted(CxpgError):
    """The extraction was stopped on request (``on_kill``, KeyboardInterrupt, task timeout)."""

    @classmethod
    def because(cls, reason: str) -> ExtractionAborted:
        """The error for a stop requested with ``reason`` (e.g. ``"on_kill"``)."""
        return cls(f"extraction aborted: {reason}", reason=reason)
