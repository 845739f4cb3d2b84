"""``on_kill`` for the operators: a kill counts wherever ``execute`` is, also before it began.

Airflow 3's task runner installs its SIGTERM handler, which only calls ``on_kill``, before it
clears XComs, renders templates and runs ``pre_execute`` and ``on_execute_callback``; inside
``execute`` the operator validates and looks up connections before it has an extraction to stop.
A kill in either span must still fail the task: remembered here, raised when ``execute`` begins
and as soon as there is an extraction, and forgotten only when ``execute`` ends (an operator object
``dag.test()`` runs again starts clean).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from airflow_provider_cxpg.exceptions import ExtractionAborted

__all__ = ["Killable", "attach", "kill", "killable", "raise_if_killed"]


class Killable(Protocol):
    _killed: str | None  # set by on_kill
    _extraction: Any  # what on_kill stops, once there is one


def kill(operator: Killable) -> None:
    """``on_kill``: remember the kill and stop the extraction, when there is one yet."""
    operator._killed = "on_kill"
    extraction = operator._extraction
    if extraction is not None:
        extraction.abort("on_kill")


def raise_if_killed(operator: Killable) -> None:
    if operator._killed:
        raise ExtractionAborted.because(operator._killed)


def attach(operator: Killable, extraction: Any) -> None:
    """From now on ``on_kill`` stops ``extraction``; a kill that came before it fails the task now."""
    operator._extraction = extraction
    raise_if_killed(operator)  # after the assignment: a handler running between the two sees one or the other


@contextlib.contextmanager
def killable(operator: Killable) -> Iterator[None]:
    """The body of ``execute``: raises at once for a kill that came before it, forgets it at the end."""
    try:
        raise_if_killed(operator)
        yield
    finally:
        operator._killed = None
        operator._extraction = None
