"""Benchmark harness for airflow-provider-cxpg: ``python -m bench --help`` (see bench/README.md)."""

from __future__ import annotations
