"""Kept so ``python -m airflow_provider_cxpg.embedded_postgres`` and imports from this path (both
documented before the layout moved) still work; the code lives in
:mod:`airflow_provider_cxpg.demo.embedded_postgres`."""

from __future__ import annotations

from airflow_provider_cxpg.demo.embedded_postgres import (
    EmbeddedPostgres,
    _main,
    find_postgres_bindir,
    interrupt_on_termination,
)

__all__ = ["EmbeddedPostgres", "find_postgres_bindir", "interrupt_on_termination"]

if __name__ == "__main__":
    _main()
