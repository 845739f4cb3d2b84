"""Structured query log: one event per query, chunk and lifecycle step, with stable field names.

Events go to the task logger as key-value fields (Airflow 3's structlog shows them as such; a stdlib
logger, as in Airflow 2, gets ``event key=value ...`` text and the fields in ``extra``) and, when a
path is given, as JSON lines to a file. Every string field passes through the run's
:class:`~airflow_provider_cxpg.conninfo.Redactor`, so no password reaches a log.

Field names (stable, documented in the README): ``extraction_id``, ``event``, ``chunk``, ``query_id``,
``worker_pid``, ``backend_pid``, ``rows``, ``bytes``, ``seconds``, ``rows_per_s``, ``key_from``,
``key_to``, ``sql``, ``state``, ``wait_event``, ``limit``, ``error``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_provider_cxpg.conninfo import Redactor

__all__ = ["EVENTS", "QueryLog"]

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
        self._jsonl = Path(jsonl_path) if jsonl_path else None
        self._redact = redactor or Redactor()
        self._sink = sink
        # Re-entrant: on_kill may log from a signal handler that interrupted this thread's emit.
        self._lock = threading.RLock()
        self.events: list[dict[str, Any]] = []  # kept for the run summary and tests
        self._once: set[str] = set()
        if self._jsonl:
            self._jsonl.parent.mkdir(parents=True, exist_ok=True)

    def with_redactor(self, redactor: Redactor) -> None:
        self._redact = redactor

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
            record[key] = self._redact(value) if isinstance(value, str) else value
        if "rows" in record and record.get("seconds"):
            record.setdefault("rows_per_s", round(record["rows"] / record["seconds"], 1))
        if isinstance(record.get("seconds"), float):
            record["seconds"] = round(record["seconds"], 4)
        level = logging.WARNING if event in _WARNING_EVENTS else logging.INFO
        with self._lock:
            self.events.append(record)
            self._log(level, record)
            if self._jsonl:
                line = {"ts": dt.datetime.now(dt.UTC).isoformat(), **record}
                with self._jsonl.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(line, default=_json_default) + "\n")
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
