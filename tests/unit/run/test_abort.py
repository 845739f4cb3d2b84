"""An aborted run starts no further control statement."""

from __future__ import annotations

import pytest

from airflow_provider_cxpg.exceptions import (
    ExtractionAborted,
)


def test_no_control_statement_starts_after_an_abort() -> None:
    from airflow_provider_cxpg.run.extraction import _AbortChecked

    ran: list[str] = []

    class _Conn:
        def execute(self, sql: str) -> str:
            ran.append(sql)
            return sql

    reason: list[str | None] = [None]
    conn = _AbortChecked(_Conn(), lambda: reason[0])
    conn.execute("SELECT 1")
    reason[0] = "on_kill"
    with pytest.raises(ExtractionAborted, match="on_kill"):
        conn.execute("SELECT max(updated_at) FROM big")
    assert ran == ["SELECT 1"]
