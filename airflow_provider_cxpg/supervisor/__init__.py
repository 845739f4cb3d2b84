"""The parent side of one worker process.

``session`` (settings, spawn with an allowlisted environment, the request/reply session, deadlines,
heartbeats, stop and reap), ``monitor`` (the parent's psycopg connection and the server-side view
of the worker's backend: lock waits, cancel, terminate) and ``credentials`` (IAM token renewal).

May import: ``worker.protocol`` (the messages) and the shared leaves; never ``planning``, ``run``,
``output``, ``hooks`` or ``operators``.
"""
