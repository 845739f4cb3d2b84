"""The error tree's facts are declared attributes: typed, pickled across the pipe, never invented."""

from __future__ import annotations

import pickle

import pytest

from airflow_provider_cxpg import exceptions
from airflow_provider_cxpg.exceptions import (
    CxpgError,
    DataIntegrityError,
    ExtractionAborted,
    QueryTimeoutError,
    StorageError,
    WorkerCrashedError,
)


def test_facts_survive_the_pipe_as_attributes() -> None:
    error = WorkerCrashedError("died", pid=42, exitcode=-9, chunk=3)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is WorkerCrashedError and str(copy) == "died"
    assert (copy.pid, copy.exitcode, copy.chunk, copy.limit) == (42, -9, 3, None)


def test_an_undeclared_fact_is_refused() -> None:
    with pytest.raises(TypeError, match="QueryTimeoutError has no attribute bogus"):
        QueryTimeoutError("late", limit="query_timeout", bogus=1)


def test_unset_facts_read_as_none() -> None:
    error = DataIntegrityError("tie", key=["id"])
    assert error.key == ["id"] and error.column is None and error.rows is None and error.sqlstate is None
    assert StorageError("gone").operation is None
    assert ExtractionAborted.because("on_kill").reason == "on_kill"


def test_every_error_class_declares_its_facts_with_types() -> None:
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        if isinstance(cls, type) and issubclass(cls, CxpgError):
            for attribute, annotation in vars(cls).get("__annotations__", {}).items():
                assert annotation, f"{name}.{attribute} has no type"
                assert hasattr(cls, attribute), f"{name}.{attribute} has no default"
    assert not hasattr(CxpgError, "retryable")
