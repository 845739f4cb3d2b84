"""The parent's control statements: none starts after an abort, and none waits past its deadline."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from airflow_provider_cxpg.bounded import CallStopped, CallTimedOut
from airflow_provider_cxpg.exceptions import ExtractionAborted, JobTimeoutError, QueryTimeoutError


class _Extraction:
    """What :class:`_ControlStatements` asks of its extraction."""

    def __init__(self, deadline: tuple[float | None, str] = (5.0, "query_timeout")) -> None:
        self._aborted: str | None = None
        self.deadline = deadline
        self.timed_out: list[tuple[str, str]] = []

    def statement_deadline(self) -> tuple[float | None, str]:
        return self.deadline

    def control_timed_out(self, purpose: str, limit: str, seconds: float, sampler: Any) -> Exception:
        self.timed_out.append((purpose, limit))
        return (JobTimeoutError if limit == "job_timeout" else QueryTimeoutError)(purpose, limit=limit)


class _Control:
    """A connection whose statements return at once, or hang until their deadline or a stop."""

    def __init__(self, hang: bool = False) -> None:
        self.ran: list[tuple[str, float | None]] = []
        self._hang = hang

    def execute(self, query: str, params: Any = None, *, timeout: float | None, what: str, stop: Any = None) -> str:
        self.ran.append((query, timeout))
        if not self._hang:
            return query
        deadline = time.monotonic() + (timeout or 60)
        while time.monotonic() < deadline:
            if stop is not None and stop():
                raise CallStopped(what, stop())
            time.sleep(0.01)
        raise CallTimedOut(what, timeout)


def test_no_control_statement_starts_after_an_abort() -> None:
    from airflow_provider_cxpg.run.extraction import _ControlStatements

    control, extraction = _Control(), _Extraction()
    statements = _ControlStatements(control, extraction, "plan", None)  # type: ignore[arg-type]
    statements.execute("SELECT 1")
    extraction._aborted = "on_kill"
    with pytest.raises(ExtractionAborted, match="on_kill"):
        statements.execute("SELECT max(updated_at) FROM big")
    assert control.ran == [("SELECT 1", 5.0)]


@pytest.mark.parametrize(("limit", "error"), [("query_timeout", QueryTimeoutError), ("job_timeout", JobTimeoutError)])
def test_a_control_statement_past_its_deadline_fails_with_the_limit_that_fired(limit: str, error: type) -> None:
    from airflow_provider_cxpg.run.extraction import _ControlStatements

    control, extraction = _Control(hang=True), _Extraction((0.2, limit))
    statements = _ControlStatements(control, extraction, "plan", None)  # type: ignore[arg-type]
    with pytest.raises(error) as caught:
        statements.execute("SELECT * FROM locked LIMIT 0")
    assert caught.value.limit == limit
    assert control.ran == [("SELECT * FROM locked LIMIT 0", 0.2)]  # the deadline reached the connection
    assert extraction.timed_out == [("plan", limit)]


def test_an_abort_ends_the_wait_for_a_statement_the_server_never_answers() -> None:
    """``on_kill`` runs in a signal handler: it cannot interrupt the wait, and its cancel may never
    reach the server (a frozen gateway). The wait itself must notice the abort."""
    from airflow_provider_cxpg.run.extraction import _ControlStatements

    control, extraction = _Control(hang=True), _Extraction((None, "query_timeout"))  # no deadline at all
    statements = _ControlStatements(control, extraction, "plan", None)  # type: ignore[arg-type]
    threading.Timer(0.2, lambda: setattr(extraction, "_aborted", "on_kill")).start()
    started = time.monotonic()
    with pytest.raises(ExtractionAborted, match="on_kill"):
        statements.execute("SELECT * FROM locked LIMIT 0")
    assert time.monotonic() - started < 5
