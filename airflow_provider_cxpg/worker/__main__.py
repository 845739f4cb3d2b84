"""Entry point: ``python -P -m airflow_provider_cxpg.worker``."""

from __future__ import annotations

from airflow_provider_cxpg.worker.server import main

if __name__ == "__main__":
    main()
