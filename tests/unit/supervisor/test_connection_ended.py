"""Which server errors mean the monitor's connection is gone (tried once more) and which do not."""

from __future__ import annotations

import psycopg
import pytest

from airflow_provider_cxpg.supervisor.monitor import connection_ended


@pytest.mark.parametrize(
    ("error", "ended"),
    [
        (psycopg.errors.IdleSessionTimeout("terminating connection due to idle-session timeout"), True),
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),  # no SQLSTATE: libpq's own
        (psycopg.errors.ConnectionFailure("connection failure"), True),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (psycopg.errors.InsufficientPrivilege("permission denied"), False),
    ],
)
def test_only_a_session_the_server_ended_counts_as_gone(error: Exception, ended: bool) -> None:
    assert connection_ended(error) is ended
