"""The structured query log on its own: redaction everywhere in an event, and a file that stops answering."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from airflow_provider_cxpg import querylog
from airflow_provider_cxpg.conninfo import Redactor
from airflow_provider_cxpg.querylog import QueryLog

SECRET = "s3cr3t-Passw0rd"


def test_a_secret_is_redacted_inside_lists_and_mappings_too(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = QueryLog("r", jsonl_path=path, redactor=Redactor([SECRET]))
    log.emit(
        "server.waiting",
        blocked_by=[f"pid 7 (app): 'ALTER ROLE x PASSWORD {SECRET}'"],
        error={"detail": f"password={SECRET}", "nested": [SECRET, 3]},
        key_from=(1, SECRET),
    )
    text = path.read_text()
    assert SECRET not in text and SECRET not in repr(log.events)
    event = json.loads(text)
    assert event["error"]["nested"] == ["***", 3] and event["key_from"] == [1, "***"]
    assert log.events[0]["key_from"] == (1, "***")  # a tuple stays a tuple


def test_a_log_file_that_stops_answering_costs_the_run_no_time_and_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO nobody reads: opening it for writing blocks, as a write to a hung NFS mount does.

    Each event used to wait 10 s for its line at the first stall: a query timeout fired that much
    late, and the error blamed the server."""
    monkeypatch.setattr(querylog, "FILE_WRITE_SECONDS", 1.0)
    fifo = tmp_path / "log.jsonl"
    os.mkfifo(fifo)
    log = QueryLog("r", jsonl_path=fifo)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        for chunk in range(20):
            log.emit("chunk.commit", chunk=chunk)
        spent = time.monotonic() - started
        assert spent < querylog.LINE_WAIT_SECONDS + 0.3, f"events waited {spent:.2f}s behind the stuck file"
        assert "query_log_path given up" not in caplog.text  # stuck for less than FILE_WRITE_SECONDS
        time.sleep(1.1)
        for chunk in range(20, 25):
            log.emit("chunk.commit", chunk=chunk)
    assert [e["chunk"] for e in log.events] == list(range(25))  # the task log still has every event
    given_up = [r for r in caplog.records if "query_log_path given up" in r.getMessage()]
    assert len(given_up) == 1 and str(fifo) in given_up[0].getMessage()
    # Unblock the writer thread (it is a daemon either way): it gives up on what is queued.
    with open(fifo, "rb", buffering=0) as reader:
        reader.read(0)


def test_lines_held_up_by_a_short_stall_arrive_in_order(tmp_path: Path) -> None:
    fifo = tmp_path / "log.jsonl"
    os.mkfifo(fifo)
    log = QueryLog("r", jsonl_path=fifo)
    for chunk in range(20):  # the writer is stuck opening the FIFO: nobody reads it yet
        log.emit("chunk.commit", chunk=chunk)
    received = b""
    with open(fifo, "rb", buffering=0) as reader:  # the mount answers again
        deadline = time.monotonic() + 10
        while received.count(b"\n") < 20 and time.monotonic() < deadline:
            received += reader.read(65536)
    assert [json.loads(line)["chunk"] for line in received.splitlines()] == list(range(20))


def test_lines_reach_the_file_in_order_and_at_once(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "log.jsonl"  # the folder is created on the first line
    log = QueryLog("r", jsonl_path=path)
    for chunk in range(50):
        log.emit("chunk.commit", chunk=chunk)
        assert json.loads(path.read_text().splitlines()[-1])["chunk"] == chunk  # written before emit returns
