"""An object in a process of its own: every wait bounded, the child killed whenever a call is left."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_cxpg.exceptions import ExtractionAborted, StorageError
from airflow_provider_cxpg.output.isolated import IsolatedObject

SECRET = "Pa55-in-the-error"


@pytest.fixture
def echo() -> Iterator[IsolatedObject]:
    obj = IsolatedObject(
        "tests.isolated_target:Echo",
        {"greeting": "hello"},
        target="echo",
        secrets=lambda: [SECRET],
        unanswered="the echo is not answering",
        name="the echo's process",
    )
    yield obj
    obj.close()


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_calls_return_values_and_scrubbed_errors(echo: IsolatedObject) -> None:
    assert echo.call("echoing", "ident", {"a": [1, 2]}, timeout=30) == {"a": [1, 2]}
    with pytest.raises(StorageError, match=r"echoing echo failed: RuntimeError: bad \*\*\*") as failure:
        echo.call("echoing", "fail", f"bad {SECRET}", timeout=30)
    assert SECRET not in str(failure.value) and failure.value.__context__ is None
    assert echo.call("echoing", "ident", "after", timeout=30) == "after"  # the same child goes on


def test_a_step_past_its_deadline_kills_the_child_and_names_the_step(echo: IsolatedObject) -> None:
    echo.call("warming up", "ident", 1, timeout=30)
    pid = echo.pid
    assert pid is not None
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"sleeping echo did not return within 0\.5s: the echo is not answering"):
        echo.call("echoing", "slow", 30, step_timeout=0.5, timeout=30)
    assert time.monotonic() - started < 2
    assert _gone(pid)
    assert echo.call("echoing", "ident", "new child", timeout=30) == "new child" and echo.pid != pid


def test_abort_ends_a_call_whose_request_waits_on_a_frozen_childs_full_pipe(echo: IsolatedObject) -> None:
    """A request bigger than the pipe, to a child that stopped reading: the send never holds the
    caller (it was a blocking write, deaf to abort), and abort kills the child."""
    echo.call("warming up", "ident", 1, timeout=30)
    pid = echo.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(1.0, echo.abort, args=("on_kill",)).start()
    started = time.monotonic()
    with pytest.raises(ExtractionAborted, match="on_kill"):
        echo.call("sending", "size", b"x" * 1_000_000, timeout=600)
    assert time.monotonic() - started < 3
    assert _gone(pid)


def test_an_exception_raised_into_the_wait_kills_the_child_so_no_reply_is_taken_for_another(
    echo: IsolatedObject,
) -> None:
    """SIGALRM (execution_timeout) or Ctrl+C inside the wait: the child's call went on, and its late
    reply was taken as the next call's."""

    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError("execution_timeout")

    echo.call("warming up", "ident", 1, timeout=30)
    pid = echo.pid
    assert pid is not None
    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(TimeoutError):
            echo.call("echoing", "slow", 1.5, timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert _gone(pid)
    time.sleep(1.5)  # the interrupted call would have answered by now
    assert echo.call("echoing", "ident", "B", timeout=30) == "B"
    assert echo.call("echoing", "ident", "C", timeout=30) == "C"


def test_the_child_gets_no_airflow_secrets_and_finds_the_parents_modules(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from airflow_provider_cxpg.output.isolated import child_environment, parent_path

    monkeypatch.setenv("AIRFLOW_CONN_SOMEWHERE", "postgres://u:pw@h/db")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://u:pw@h/airflow")
    monkeypatch.setenv("PYICEBERG_CATALOG__X__URI", "sqlite:///x.db")
    env = child_environment()
    assert not [k for k in env if k.startswith(("AIRFLOW_CONN_", "AIRFLOW__", "AIRFLOW_VAR_"))]
    assert env["PYICEBERG_CATALOG__X__URI"] == "sqlite:///x.db"
    monkeypatch.setattr("sys.path", [*__import__("sys").path, tmp_path, ""])
    assert str(tmp_path) in parent_path() and "" not in parent_path()
