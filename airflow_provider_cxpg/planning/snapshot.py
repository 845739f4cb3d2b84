"""One exported snapshot for every chunk of a run: a point-in-time copy across chunks and workers.

The parent opens a ``REPEATABLE READ READ ONLY`` transaction on its own connection and exports its
snapshot (``pg_export_snapshot()``); each worker connection imports it before reading
(``SET TRANSACTION SNAPSHOT``, sent by connectorx as ``pre_execution_query``). Every chunk, in every
worker, then sees the database exactly as it was at that moment, whatever commits meanwhile.
Measured with connectorx 0.4.6: the import reaches its data connections (also for ``partition_on``),
and exporting works on a hot standby too.

The holding transaction stays open for the run: it keeps VACUUM from removing rows it can still see,
and on a standby a long one can be cancelled by a recovery conflict. A retried Airflow task cannot
reuse the snapshot of the attempt that died; its resumed chunks see a newer moment.
"""

from __future__ import annotations

import contextlib
from typing import Any

from airflow_provider_cxpg.conninfo import PostgresEndpoint, connect
from airflow_provider_cxpg.exceptions import ServerConnectionError
from airflow_provider_cxpg.planning.sql import quote_string

__all__ = ["ExportedSnapshot", "import_statements"]


def import_statements(snapshot_id: str) -> tuple[str, str]:
    """Statements that make a new connection's next query read from ``snapshot_id``."""
    return (
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        f"SET TRANSACTION SNAPSHOT {quote_string(snapshot_id)}",
    )


class ExportedSnapshot:
    """Hold a snapshot open for the duration of a ``with`` block; ``id`` names it."""

    def __init__(self, endpoint: PostgresEndpoint, application_name: str) -> None:
        self._endpoint = endpoint.with_session(
            application_name=application_name, settings={"idle_in_transaction_session_timeout": "0"}
        )
        self._conn: Any = None
        self.id: str | None = None

    def __enter__(self) -> ExportedSnapshot:
        self._conn = connect(self._endpoint)
        try:
            self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            self.id = str(self._conn.execute("SELECT pg_export_snapshot()").fetchone()[0])
        except Exception as exc:  # noqa: BLE001  any server error: say what failed
            self._conn.close()
            raise ServerConnectionError(f"cannot export a snapshot: {str(exc).strip()}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self._conn.execute("ROLLBACK")
        with contextlib.suppress(Exception):
            self._conn.close()
