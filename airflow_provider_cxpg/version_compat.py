"""Airflow version switches, in one place (the Airflow providers' own ``version_compat.py`` is the model).

Code that must behave differently on Airflow 2.11 and 3.x asks these constants instead of parsing
``airflow.__version__`` itself or guessing from an ``ImportError``. Imports Airflow: parent-side
code and tests only (the worker never imports it).
"""

from __future__ import annotations


def get_base_airflow_version_tuple() -> tuple[int, int, int]:
    """Airflow's ``major, minor, micro`` (pre-releases and local parts dropped)."""
    from airflow import __version__
    from packaging.version import Version

    version = Version(__version__)
    return version.major, version.minor, version.micro


AIRFLOW_V_3_0_PLUS = get_base_airflow_version_tuple() >= (3, 0, 0)
AIRFLOW_V_3_2_PLUS = get_base_airflow_version_tuple() >= (3, 2, 0)
AIRFLOW_V_3_3_PLUS = get_base_airflow_version_tuple() >= (3, 3, 0)

__all__ = ["AIRFLOW_V_3_0_PLUS", "AIRFLOW_V_3_2_PLUS", "AIRFLOW_V_3_3_PLUS", "get_base_airflow_version_tuple"]
