"""Where the files go and what records them.

``destination`` (local paths and fsspec URLs, every call under ``storage_timeout``), ``manifest``
(``_manifest.json``: what was committed, for resume and for readers), ``verify`` (the output
check against the files themselves), ``storage_env`` (the object-store credentials a worker
receives), ``delta`` and ``iceberg`` (a run's files committed to a lakehouse table, exactly once).

May import: ``worker.protocol`` (the sink descriptions) and the shared leaves; never ``planning``,
``run``, ``supervisor``, ``hooks`` or ``operators``.
"""
