"""The parent side of one worker process.

``settings`` (``WorkerSettings``: deadlines and intervals, validated once); ``session``
(``WorkerSession``: the pump that combines the next three); ``process`` (spawn with an allowlisted
environment, the reader threads, signals, stop and reap); ``requests`` (the request book: what was
sent, what is running, the replies and the errors they carry); ``watchdog`` (deadlines, heartbeats,
the "silent but waiting on the server" rule, lock-wait reports); ``monitor`` (the server-side view
of the run's backends: lock waits and their blockers, cancel, terminate) and ``credentials`` (IAM
token renewal).

May import: ``worker.protocol`` (the messages), ``worker.reaper`` (process identity) and the shared
leaves; never ``planning``, ``run``, ``output``, ``hooks`` or ``operators``.
"""

from __future__ import annotations

# The path the README gave before the layout moved (``airflow_provider_cxpg.supervisor.WorkerSettings``).
from airflow_provider_cxpg.supervisor.settings import WorkerSettings

__all__ = ["WorkerSettings"]
