"""The worker process: runs connectorx in a fresh interpreter that never imports Airflow.

Start it with ``python -P -m airflow_provider_cxpg.worker`` (the parent does, see
:mod:`airflow_provider_cxpg.supervisor.session`). Its modules: :mod:`.boot` (the first steps, before
pyarrow and connectorx load: channel, Configure, the reaper's fork), :mod:`.protocol` (messages and
framing), :mod:`.server` (the loop and the heartbeat thread), :mod:`.chunk` (one query) and :mod:`.sinks`
(atomic Parquet / Arrow IPC files), :mod:`.reaper` (ends the run's backends if the task process dies).

What it may import: the standard library, pyarrow, connectorx, fsspec, its own modules and the
shared leaves at the top of the package (``exceptions``, ``conninfo``, ``bounded``) — never a
parent-side module (``planning``, ``run``, ``supervisor``, ``output``, ``hooks``, ``operators``):
``tests/test_layout.py`` enforces it.
"""
