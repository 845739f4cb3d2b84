"""Entry point: ``python -P -m airflow_provider_cxpg.worker``.

The first steps (channel, Configure, the reaper's fork) run before pyarrow and connectorx are
imported, and those two load without NumPy: see :mod:`airflow_provider_cxpg.worker.boot`.
"""

from __future__ import annotations

from airflow_provider_cxpg.worker.boot import boot, import_data_libraries

if __name__ == "__main__":
    started = boot()
    import_data_libraries()
    from airflow_provider_cxpg.worker.server import main

    main(started)
