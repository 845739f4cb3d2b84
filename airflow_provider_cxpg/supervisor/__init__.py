"""The parent side of one worker process.

``settings`` (``WorkerSettings``: deadlines and intervals, validated once), ``session`` (spawn with
an allowlisted environment, the request/reply session, deadlines, heartbeats, stop and reap),
``monitor`` (the server-side view of the worker's backend: lock waits and their blockers, cancel,
terminate) and ``credentials`` (IAM token renewal).

May import: ``worker.protocol`` (the messages), ``worker.reaper`` (process identity) and the shared
leaves; never ``planning``, ``run``, ``output``, ``hooks`` or ``operators``.
"""

from __future__ import annotations

# The path the README gave before the layout moved (``airflow_provider_cxpg.supervisor.WorkerSettings``).
from airflow_provider_cxpg.supervisor.settings import WorkerSettings

__all__ = ["WorkerSettings"]
