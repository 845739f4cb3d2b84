"""Kept so ``python -m airflow_provider_cxpg.embedded_postgres`` (documented before the layout
moved) still works; the code lives in :mod:`airflow_provider_cxpg.demo.embedded_postgres`."""

from __future__ import annotations

from airflow_provider_cxpg.demo.embedded_postgres import *  # noqa: F403
from airflow_provider_cxpg.demo.embedded_postgres import _main

if __name__ == "__main__":
    _main()
