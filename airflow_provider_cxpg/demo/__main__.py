"""``python -m airflow_provider_cxpg.demo``: see :mod:`airflow_provider_cxpg.demo`."""

from __future__ import annotations

from airflow_provider_cxpg.demo import main

raise SystemExit(main())
