"""Structured query log: one event per query, chunk and lifecycle step, with stable field names.

Events go to the task logger as key-value fields (Airflow 3's structlog shows them as such; a stdlib
logger, as in Airflow 2, gets ``event key=value ...`` text and the fields in ``extra``) and, when a
path is given, as JSON lines to a file. Every string field, also inside a list or a mapping (the
sessions a lock wait names, an error's details), passes through the run's
:class:`~airflow_provider_cxpg.conninfo.Redactor`, so no password reaches a log.

The file is written by a thread of its own (:class:`_LineWriter`). An event waits for its line (a
reader such as ``tail -f`` sees each line as it happens) at most :data:`LINE_WAIT_SECONDS`, and not
at all while the writer is stuck on an earlier line: a log on a mount that stops answering (a hung
NFS server) must not spend the run's deadlines, which the same thread checks (waiting 10 s per stall
delayed a query timeout, and the error then blamed the server). Lines wait in order meanwhile; once
the writer has been stuck for :data:`FILE_WRITE_SECONDS` the file is given up for the rest of the
run, and the task log says so once; the events still reach the task log.

Field names (stable, documented in the README): ``extraction_id``, ``event``, ``chunk``, ``query_id``,
``worker_pid``, ``backend_pid``, ``rows``, ``bytes``, ``seconds``, ``rows_per_s``, ``key_from``,
``key_to``, ``sql``, ``state``, ``wait_event``, ``limit``, ``error``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_provider_cxpg.conninfo import Redactor

__all__ = ["EVENTS", "FILE_WRITE_SECONDS", "LINE_WAIT_SECONDS", "QueryLog"]

#: How long the writer may be stuck on one line before the query-log file is given up.
FILE_WRITE_SECONDS = 10.0
#: How long an event waits for its line to be written (not at all while the writer is stuck).
LINE_WAIT_SECONDS = 0.2
#: Seconds an idle file-writer thread waits for another line before it closes the file and ends.
_WRITER_IDLE_SECONDS = 5.0

#: Every event name the provider emits.
EVENTS: frozenset[str] = frozenset(
    {
        "job.start",
        "job.plan",
        "job.resume",
        "job.done",
        "job.failed",
        "job.progress",
        "worker.start",
        "worker.ready",
        "worker.exit",
        "worker.heartbeat_missed",
        "worker.waiting",
        "worker.crash",
        "worker.killed",
        "worker.restart",
        "worker.stderr",
        "query.start",
        "query.done",
        "query.failed",
        "query.timeout",
        "server.waiting",
        "server.terminate",
        "chunk.commit",
    }
)

_WARNING_EVENTS = frozenset(
    {
        "job.failed",
        "worker.heartbeat_missed",
        "worker.crash",
        "worker.killed",
        "worker.restart",
        "query.failed",
        "query.timeout",
        "server.waiting",
        "server.terminate",
    }
)


def _json_default(value: object) -> object:
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    return str(value)


def _scrub(value: Any, redact: Redactor) -> Any:
    """``value`` with every string in it redacted (lists, tuples and mappings walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_scrub(v, redact) for v in value]
    if isinstance(value, tuple):
        return tuple(_scrub(v, redact) for v in value)
    if isinstance(value, dict):
        return {k: _scrub(v, redact) for k, v in value.items()}
    return value


class _LineWriter:
    """Appends lines to one file from a thread of its own; the caller waits for its line briefly.

    :meth:`put` and :meth:`wait` may run in a signal handler that interrupted them on the same
    thread (``on_kill`` logs): they take only a re-entrant lock, put on a :class:`queue.SimpleQueue`
    (re-entrant) and wait on an event of their own. The thread opens the file on its first line
    (creating its folder), keeps it open while lines come, and closes it once idle.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[tuple[str, threading.Event]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Guards queueing a line against the idle thread's exit (a line put while it decides to end
        # would be left unwritten). Re-entrant: a signal handler may log inside put() on this thread.
        self._lock = threading.RLock()
        self.failed: str | None = None
        self._writing_since: float | None = None  # monotonic start of the line being written

    def stuck_for(self) -> float:
        """Seconds the writer has been on its current line (0 when idle)."""
        since = self._writing_since
        return 0.0 if since is None else time.monotonic() - since

    def put(self, line: str) -> threading.Event | None:
        """Queue ``line``; the event is set once it is written (None: the file was given up)."""
        if self.failed is not None:
            return None
        written = threading.Event()
        with self._lock:
            self._queue.put((line, written))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cxpg-querylog-file", daemon=True)
                self._thread.start()
        return written

    def wait(self, written: threading.Event | None) -> bool:
        """Wait briefly for the line behind ``written``; False once the file is given up.

        Never waits behind a stuck line: the line stays queued, in order, and the caller goes on.
        """
        if written is None:
            return False
        if self.stuck_for() < LINE_WAIT_SECONDS and written.wait(LINE_WAIT_SECONDS):
            return self.failed is None
        stuck = self.stuck_for()
        if stuck >= FILE_WRITE_SECONDS:
            self.failed = self.failed or f"{self.path} did not take a line for {stuck:.0f}s"
        return self.failed is None

    def _run(self) -> None:
        handle = None
        try:
            while True:
                try:
                    line, written = self._queue.get(timeout=_WRITER_IDLE_SECONDS)
                except queue.Empty:
                    with self._lock:
                        if self._queue.empty():
                            self._thread = None
                            return
                    continue
                try:
                    if self.failed is None:
                        self._writing_since = time.monotonic()
                        if handle is None:
                            self.path.parent.mkdir(parents=True, exist_ok=True)
                            handle = self.path.open("a", encoding="utf-8")
                        handle.write(line)
                        handle.flush()  # a reader (a test, tail -f) sees whole lines as they come
                except OSError as exc:
                    self.failed = f"{self.path}: {exc}"
                finally:
                    self._writing_since = None
                    written.set()
        finally:
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()


class QueryLog:
    """Emit structured events for one run.

    :param run_id: identifies the extraction in every event (its ``extraction_id`` field).
    :param logger: a stdlib or structlog logger; default ``airflow_provider_cxpg.querylog``.
    :param jsonl_path: also append each event as one JSON line to this file.
    :param redactor: scrubs secrets from string fields.
    :param sink: also hand each event (a dict) to this callable (the demo prints them).
    """

    def __init__(
        self,
        run_id: str,
        *,
        logger: Any = None,
        jsonl_path: str | Path | None = None,
        redactor: Redactor | None = None,
        sink: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self._logger = logger if logger is not None else logging.getLogger("airflow_provider_cxpg.querylog")
        self._jsonl = _LineWriter(Path(jsonl_path)) if jsonl_path else None
        self._redact = redactor or Redactor()
        self._sink = sink
        # Re-entrant: on_kill may log from a signal handler that interrupted this thread's emit.
        self._lock = threading.RLock()
        self.events: list[dict[str, Any]] = []  # kept for the run summary and tests
        self._once: set[str] = set()

    def with_redactor(self, redactor: Redactor) -> None:
        self._redact = redactor

    @property
    def jsonl_path(self) -> Path | None:
        """The file each event is also appended to (None: none)."""
        return self._jsonl.path if self._jsonl is not None else None

    def first(self, what: str) -> bool:
        """True the first time it is asked about ``what`` (things logged once per run)."""
        with self._lock:
            if what in self._once:
                return False
            self._once.add(what)
            return True

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Record one event; ``None`` fields are dropped."""
        if event not in EVENTS:
            raise ValueError(f"unknown query-log event {event!r}")
        # ``extraction_id``, not ``run_id``: in Airflow 3's structured task logs ``run_id`` is the DAG
        # run's, and a field of ours by that name would overwrite it (log search by DAG run breaks).
        record: dict[str, Any] = {"event": event, "extraction_id": self.run_id}
        for key, value in fields.items():
            if value is None:
                continue
            record[key] = _scrub(value, self._redact)
        if "rows" in record and record.get("seconds"):
            record.setdefault("rows_per_s", round(record["rows"] / record["seconds"], 1))
        if isinstance(record.get("seconds"), float):
            record["seconds"] = round(record["seconds"], 4)
        level = logging.WARNING if event in _WARNING_EVENTS else logging.INFO
        jsonl, written = self._jsonl, None
        with self._lock:  # the file gets the lines in the order of self.events
            self.events.append(record)
            self._log(level, record)
            if jsonl is not None and jsonl.failed is None:
                line = json.dumps({"ts": dt.datetime.now(dt.UTC).isoformat(), **record}, default=_json_default)
                written = jsonl.put(line + "\n")
        # Waited for outside the lock: a file that stopped answering holds no other thread's event.
        given_up = jsonl is not None and written is not None and not jsonl.wait(written)
        if given_up and self.first("querylog-file-failed"):
            self._logger.warning("cxpg query_log_path given up, the task log keeps every event: %s", jsonl.failed)
        if self._sink is not None:
            self._sink(record)
        return record

    def _log(self, level: int, record: dict[str, Any]) -> None:
        fields = {k: v for k, v in record.items() if k != "event"}
        if isinstance(self._logger, (logging.Logger, logging.LoggerAdapter)):
            text = " ".join(f"{k}={_format(v)}" for k, v in fields.items())
            self._logger.log(level, "cxpg %s %s", record["event"], text, extra={"cxpg": record})
        else:  # structlog (Airflow 3 task logs): real key-value fields
            self._logger.log(level, f"cxpg {record['event']}", **fields)


def _format(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=_json_default)
    return json.dumps(text) if (" " in text or not text) else text
