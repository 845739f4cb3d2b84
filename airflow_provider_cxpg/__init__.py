"""Apache Airflow provider: extract large PostgreSQL tables through connectorx, supervised.

This package's top level imports nothing heavy (no Airflow, no connectorx): the worker process
imports it and must start fast. Public entry points:

* :class:`airflow_provider_cxpg.hooks.connectorx.ConnectorXPostgresHook`
* :class:`airflow_provider_cxpg.operators.extract.PostgresExtractOperator`
* :mod:`airflow_provider_cxpg.exceptions` (the error tree)

The tree follows the data path, parent -> worker -> sink:

* ``hooks/``, ``operators/`` — the Airflow face: the hook, the operators, assets;
* ``planning/`` — before data moves: SQL text and literals, types, catalog, the plan, incremental
  windows and their state, key ranges, snapshot export;
* ``run/`` — driving an extraction: the extraction loop, chunk pipelining, ``iter_chunks`` /
  ``read_arrow``, parallel ranges, progress;
* ``supervisor/`` — the parent side of one worker: settings, spawn and stop, the request/reply
  session, deadlines and heartbeats, the server monitor, credential renewal;
* ``worker/`` — the child process: protocol, server loop, chunk reads, sinks, reaper;
* ``output/`` — the destination, manifests, the output check, storage credentials;
* ``demo/`` — the demo and the embedded PostgreSQL it runs on;
* shared leaves at the top (``exceptions``, ``conninfo``, ``libpq_defaults``, ``querylog``, ``bounded``, ``durations``,
  ``get_provider_info``): they import nothing above them.
"""

from __future__ import annotations

__version__ = "0.1.0"
