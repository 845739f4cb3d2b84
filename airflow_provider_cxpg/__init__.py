"""Apache Airflow provider: extract large PostgreSQL tables through connectorx, supervised.

This package's top level imports nothing heavy (no Airflow, no connectorx): the worker process
imports it and must start fast. Public entry points:

* :class:`airflow_provider_cxpg.hooks.connectorx.ConnectorXPostgresHook`
* :class:`airflow_provider_cxpg.operators.extract.PostgresExtractOperator`
* :mod:`airflow_provider_cxpg.exceptions` (the error tree)
"""

from __future__ import annotations

__version__ = "0.1.0"
