"""Deadline calls on a helper thread (pure units): ordering, deadlines, and no parked threads."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from airflow_provider_cxpg import bounded
from airflow_provider_cxpg.bounded import CallStopped, CallTimedOut, SerialCalls


def _helpers(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"cxpg-io-{name}"]


def test_an_idle_helper_thread_ends_and_the_next_call_starts_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bounded, "IDLE_SECONDS", 0.05)
    calls = SerialCalls("idle-test")
    assert calls.call("first", lambda: 1, 5) == 1
    assert _helpers("idle-test")
    deadline = time.monotonic() + 5
    while _helpers("idle-test") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _helpers("idle-test"), "an idle helper thread stayed parked"
    assert calls.call("second", lambda: 2, 5) == 2


def test_calls_racing_the_idle_exit_are_never_stranded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call put just as the idle thread gives up must still run (not wait out its deadline)."""
    monkeypatch.setattr(bounded, "IDLE_SECONDS", 0.001)
    calls = SerialCalls("race-test")
    started = time.monotonic()
    for index in range(300):
        assert calls.call(f"call {index}", lambda i=index: i, 5) == index
        time.sleep(0.001 if index % 2 else 0)
    assert time.monotonic() - started < 10


def test_a_call_past_its_deadline_raises_and_later_calls_fail_at_once() -> None:
    calls = SerialCalls("stuck-test")
    release = threading.Event()
    with pytest.raises(CallTimedOut, match="did not return within 0.1s"):
        calls.call("hanging write", release.wait, 0.1)
    started = time.monotonic()
    with pytest.raises(CallTimedOut, match="hanging write"):
        calls.call("next write", lambda: None, 5)
    assert time.monotonic() - started < 0.5
    release.set()


def test_the_canceller_thread_ends_when_nothing_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_cxpg.supervisor import monitor

    monkeypatch.setattr(monitor, "IDLE_SECONDS", 0.05)
    cancelled: list[str] = []

    class Control:
        def cancel(self, timeout: float) -> bool:
            cancelled.append("sent")
            return True

    cancels = monitor.ControlCancels()
    key = cancels.register(Control())
    time.sleep(0.2)
    assert [t for t in threading.enumerate() if t.name == "cxpg-canceller"], "ended while a query was registered"
    cancels.cancel_all_soon()
    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cancelled == ["sent"]
    cancels.unregister(key)
    while [t for t in threading.enumerate() if t.name == "cxpg-canceller"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "cxpg-canceller"], "an idle canceller stayed parked"
    again = cancels.register(Control())  # a later registration starts a new one
    assert [t for t in threading.enumerate() if t.name == "cxpg-canceller"]
    cancels.unregister(again)


def test_a_stop_ends_the_wait_and_later_calls_fail_at_once() -> None:
    calls = SerialCalls("stop-test")
    release = threading.Event()
    reason: list[str | None] = [None]
    threading.Timer(0.2, lambda: reason.__setitem__(0, "on_kill")).start()
    started = time.monotonic()
    with pytest.raises(CallStopped, match="on_kill"):
        calls.call("hanging statement", release.wait, None, stop=lambda: reason[0])
    assert 0.15 < time.monotonic() - started < 2
    with pytest.raises(CallTimedOut, match="hanging statement"):
        calls.call("next statement", lambda: None, 5)
    release.set()


def test_after_runs_once_the_stuck_call_returns() -> None:
    """How a caller that gave up on a call still closes what the call opened."""
    calls = SerialCalls("after-test")
    release = threading.Event()
    order: list[str] = []
    with pytest.raises(CallTimedOut):
        calls.call("connecting", lambda: (release.wait(), order.append("connected")), 0.1)
    done = threading.Event()
    calls.after("closing", lambda: (order.append("closed"), done.set()))
    assert not done.wait(0.2), "ran before the stuck call returned"
    release.set()
    assert done.wait(5)
    assert order == ["connected", "closed"]


def test_with_wrap_errors_the_calls_error_is_told_apart_from_one_raised_into_the_wait() -> None:
    """On Airflow 2 the SIGALRM of execution_timeout raises an Exception into whatever the task's
    thread waits in: a caller that turns every Exception into its own error swallowed it."""
    from airflow_provider_cxpg.bounded import CallRaised
    from tests.helpers import TaskTimeout, alarm_in

    calls = SerialCalls("wrap-test")

    def fails() -> None:
        raise ValueError("the store said no")

    with pytest.raises(CallRaised) as raised:
        calls.call("failing", fails, 5, wrap_errors=True)
    assert isinstance(raised.value.error, ValueError)
    with alarm_in(0.2), pytest.raises(TaskTimeout):
        calls.call("waiting", lambda: time.sleep(1), 5, wrap_errors=True)
    calls.close()


def test_storage_errors_never_swallow_a_timeout_raised_into_their_wait(tmp_path: Any) -> None:
    """A destination operation and a table-format call waiting when execution_timeout fires: the
    task's timeout goes on as it is, not as a StorageError blaming the store."""
    import os

    from airflow_provider_cxpg.exceptions import StorageError
    from airflow_provider_cxpg.output.destination import Destination
    from airflow_provider_cxpg.output.table_calls import TableCalls
    from tests.helpers import TaskTimeout, alarm_in

    table = TableCalls("wrap-table", "lake.t", timeout=30, secrets=lambda: ["s3cr3t"])
    with alarm_in(0.2), pytest.raises(TaskTimeout):
        table("committing to", lambda: time.sleep(1))
    with pytest.raises(StorageError, match=r"committing to lake.t failed: OSError: no \*\*\*"):
        table("committing to", lambda: (_ for _ in ()).throw(OSError("no s3cr3t")), 30)
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)  # opening it for reading waits for a writer: a mount that stopped answering
    destination = Destination(str(tmp_path), timeout=30)
    with alarm_in(0.3), pytest.raises(TaskTimeout):
        destination.read_json("stuck")
    with open(fifo, "wb"):  # let the helper thread go
        pass
