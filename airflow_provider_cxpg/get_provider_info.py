"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_provider_cxpg import __version__


def get_provider_info() -> dict[str, Any]:
    """Return the provider description Airflow lists in ``airflow providers list``."""
    return {
        "package-name": "airflow-provider-cxpg",
        "name": "PostgreSQL via connectorx (supervised)",
        "description": "Extract large PostgreSQL tables to Parquet with connectorx, in a spawned, "
        "supervised worker: keyset chunks, deadlines, heartbeats, resume.",
        "versions": [__version__],
        "state": "ready",
        "integrations": [
            {
                "integration-name": "PostgreSQL via connectorx",
                "external-doc-url": "https://github.com/sfu-db/connector-x",
                "tags": ["software"],
            }
        ],
        "hooks": [
            {
                "integration-name": "PostgreSQL via connectorx",
                "python-modules": ["airflow_provider_cxpg.hooks.connectorx"],
            }
        ],
        "operators": [
            {
                "integration-name": "PostgreSQL via connectorx",
                "python-modules": [
                    "airflow_provider_cxpg.operators.extract",
                    "airflow_provider_cxpg.operators.partition",
                ],
            }
        ],
    }
