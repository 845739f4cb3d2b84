"""A read that fails is explained by a change of the source when there is one (the live case is in
tests/test_source_changes.py; these are the rules)."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_cxpg.exceptions import (
    DataIntegrityError,
    QueryError,
    ServerConnectionError,
    SourceChangedError,
)
from airflow_provider_cxpg.planning.source_state import SourceState
from airflow_provider_cxpg.run.source_watch import SourceWatch, explained_by_changes

_PLANNED = SourceState('"public"."t"', 10, (("v", "25", "-1", "100", "text", "default", "2"),), ())


def _watch(now: SourceState | Exception) -> SourceWatch:
    def query(_what: str, _fn: Any, stop: Any = None) -> SourceState:
        if isinstance(now, Exception):
            raise now
        return now

    return SourceWatch(_PLANNED, storage=False, query=query)


def test_a_failed_read_of_a_changed_source_is_the_change_from_the_reads_error() -> None:
    changed = SourceState(_PLANNED.name, 10, (("v", "1700", "-1", "0", "numeric", "", "2"),), ())
    read_error = DataIntegrityError("column 'v' holds a value connectorx cannot convert", chunk=3)
    with pytest.raises(SourceChangedError, match=r"column 'v' is now numeric.*Chunk 3") as raised:
        with explained_by_changes(_watch(changed)):
            raise read_error
    assert raised.value.__cause__ is read_error


@pytest.mark.parametrize(
    ("now", "error"),
    [
        (_PLANNED, QueryError("query failed")),  # nothing changed: the read's error stands
        (RuntimeError("monitor gone"), QueryError("query failed")),  # the check failing changes nothing
        (_PLANNED, ServerConnectionError("connection lost")),  # not a read of the data: no check
    ],
)
def test_otherwise_the_reads_error_stands(now: Any, error: Exception) -> None:
    with pytest.raises(type(error)) as raised:
        with explained_by_changes(_watch(now)):
            raise error
    assert raised.value is error


def test_without_a_watch_nothing_is_checked() -> None:
    with pytest.raises(QueryError):
        with explained_by_changes(None):
            raise QueryError("query failed")
