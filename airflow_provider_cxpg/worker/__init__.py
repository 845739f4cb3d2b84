"""The worker process: runs connectorx in a fresh interpreter that never imports Airflow.

Start it with ``python -P -m airflow_provider_cxpg.worker`` (the parent does, see
:mod:`airflow_provider_cxpg.supervisor`). Its modules: :mod:`.protocol` (messages and framing),
:mod:`.server` (the loop and the heartbeat thread), :mod:`.chunk` (one query) and :mod:`.sinks`
(atomic Parquet / Arrow IPC files).
"""
