"""After every chunk a run reads: is its source still what the run planned?

See :mod:`~airflow_provider_cxpg.planning.source_state` for why. The check runs in the parent, on a
control connection of its own, opened at the first check and held for the run (one small catalog
query per chunk, ~1 ms), outside the run's snapshot: it must see the latest catalog.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow_provider_cxpg.exceptions import SourceChangedError
from airflow_provider_cxpg.planning.source_state import SourceState, read_source_state, source_changes

__all__ = ["SourceWatch"]


class SourceWatch:
    """Compares the source with its planned state; raises before a chunk read after a change is kept.

    :param planned: the state recorded when the run planned.
    :param storage: compare the storage too (the run reads inside one exported snapshot).
    :param connect: opens the connection for the checks: an object with ``execute(query, params)``
        (under the run's deadlines) and ``close()``.
    """

    def __init__(self, planned: SourceState, *, storage: bool, connect: Callable[[], Any]) -> None:
        self.planned, self.storage, self._connect = planned, storage, connect
        self._statements: Any = None

    def check(self, chunk: int) -> None:
        """:raises SourceChangedError: naming what changed; chunk ``chunk`` (read after it) is not kept."""
        if self._statements is None:
            self._statements = self._connect()
        try:
            now = read_source_state(self._statements, self.planned.name, [c[0] for c in self.planned.columns])
        except BaseException:
            self.close()  # a statement may still run: give the connection up, a next check opens another
            raise
        changes = source_changes(self.planned, now, storage=self.storage)
        if changes:
            raise SourceChangedError(
                f"{self.planned.name} changed while the run read it: {'; '.join(changes)}. Chunk {chunk}, read "
                "after the change, is not kept; a retry plans the source again (and starts over when the "
                "columns it reads changed)",
                changes=changes,
            )

    def close(self) -> None:
        statements, self._statements = self._statements, None
        if statements is not None:
            statements.close()
