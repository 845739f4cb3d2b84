"""What the table formats share: a staged file, the unsigned-integer rule, and a bounded, scrubbed call.

Every call on a table or its catalog runs on a helper thread under a deadline (a stalled store
cannot hold the task), and an error it raises becomes a :class:`StorageError` whose message has the
run's secrets scrubbed out (a store's or catalog's error may quote a request, an access key id, a
catalog URI with its password): the original is neither chained nor kept as the context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa

from airflow_provider_cxpg.bounded import CallRaised, CallTimedOut, SerialCalls
from airflow_provider_cxpg.conninfo import Redactor
from airflow_provider_cxpg.exceptions import STORE_UNANSWERED, CxpgError, InvalidInputError, StorageError

__all__ = ["StagedFile", "TableCalls", "has_unsigned_integers", "new_columns_or_refuse"]

T = TypeVar("T")


@dataclass(frozen=True)
class StagedFile:
    """One committed chunk file, relative to the staging root."""

    path: str
    size: int
    rows: int


def has_unsigned_integers(dtype: pa.DataType) -> bool:
    """Whether a column type is, or holds, an unsigned integer (``oid``, ``xid``): no table format has them."""
    if pa.types.is_unsigned_integer(dtype):
        return True
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return has_unsigned_integers(dtype.value_type)
    return False


def new_columns_or_refuse(
    theirs: Mapping[str, pa.DataType],
    ours: Mapping[str, pa.DataType],
    table: str,
    *,
    same: Callable[[pa.DataType, pa.DataType], bool] = lambda a, b: a == b,
    addable: str = "new columns",
) -> list[str]:
    """The source columns the table lacks; refuse, naming them, columns the source lost or retyped.

    :param theirs: the table's columns and types; ``ours``: the source's, in the table format's types.
    :param same: whether two types are the same column type in the format.
    """
    lost = [name for name in theirs if name not in ours]
    changed = [f"{n} ({theirs[n]} -> {ours[n]})" for n in ours if n in theirs and not same(theirs[n], ours[n])]
    if lost or changed:
        problems = []
        if lost:
            problems.append(f"the table has column(s) the source no longer returns: {', '.join(lost)}")
        if changed:
            problems.append(f"column type(s) changed: {', '.join(changed)}")
        raise InvalidInputError(
            f"the source's schema no longer fits the table {table}: {'; '.join(problems)}. "
            f"Only {addable} can be added; write to a new table (or alter this one) first"
        )
    return [name for name in ours if name not in theirs]


class TableCalls:
    """Calls on one table, one at a time on a helper thread, each under a deadline.

    :param name: names the helper thread (``cxpg-io-<name>``).
    :param target: names the table in messages.
    :param timeout: the default deadline of a call (``storage_timeout``); None: no limit.
    :param secrets: returns the strings to scrub from error messages (asked at each failure:
        renewed credentials are scrubbed too).
    :param unanswered: what a timed-out call means, for its message.
    """

    def __init__(
        self,
        name: str,
        target: str,
        *,
        timeout: float | None,
        secrets: Callable[[], Iterable[str]],
        unanswered: str = STORE_UNANSWERED,
    ) -> None:
        self._calls = SerialCalls(name)
        self.target = target
        self.timeout = timeout
        self._secrets = secrets
        self._unanswered = unanswered

    def __call__(self, operation: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        try:
            return self._calls.call(f"{operation} {self.target}", fn, timeout or self.timeout, wrap_errors=True)
        except CallTimedOut as exc:
            raise StorageError(f"{exc}: {self._unanswered}", operation=operation, limit="storage_timeout") from None
        except CallRaised as raised:  # the call's own error; one raised into this wait (a timeout) goes on as it is
            if isinstance(raised.error, CxpgError):
                raise raised.error from None
            message = str(raised)
        # Raised outside the except block, so the original is not kept as the context either.
        scrubbed = Redactor([s for s in self._secrets() if s])(message)  # raw and URL-encoded forms
        raise StorageError(f"{operation} {self.target} failed: {scrubbed}", operation=operation)

    def close(self) -> None:
        self._calls.close()
