"""Durations as Airflow users give them: seconds (int, float, a templated numeric string) or a timedelta.

``execution_timeout`` and sensors' ``timeout`` take a ``datetime.timedelta``; so does every duration
of this provider (``query_timeout``, ``job_timeout``, ``storage_timeout``, the heartbeat settings,
``watermark_lag`` for time columns, every :class:`~airflow_provider_cxpg.supervisor.settings.WorkerSettings`
field). Internally they are seconds (float). The defaults of the durations users set are declared
here, once; every signature names them.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from airflow_provider_cxpg.exceptions import InvalidInputError

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_QUERY_TIMEOUT",
    "DEFAULT_STORAGE_TIMEOUT",
    "as_seconds",
]

#: Seconds between the worker's heartbeats.
DEFAULT_HEARTBEAT_INTERVAL = 1.0
#: Seconds without any message from the worker before it is declared dead.
DEFAULT_HEARTBEAT_TIMEOUT = 20.0
#: Seconds one chunk query may run (also the server's ``statement_timeout``).
DEFAULT_QUERY_TIMEOUT = 3600.0
#: Seconds one storage operation may take (a chunk's upload and commit, a manifest write, a listing).
DEFAULT_STORAGE_TIMEOUT = 300.0


def as_seconds(name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False) -> float | None:
    """``value`` in seconds.

    :raises InvalidInputError: not a positive duration (``allow_zero``: non-negative), or None where
        a limit is required.
    """
    if value is None or (isinstance(value, str) and not value.strip() and allow_none):
        if allow_none:
            return None
        raise InvalidInputError(f"{name} is required (seconds or a timedelta)")
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise InvalidInputError(f"{name} must be seconds or a timedelta, got {value!r}")
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            raise InvalidInputError(f"{name} must be seconds or a timedelta, got {value!r}") from None
    else:
        raise InvalidInputError(f"{name} must be seconds or a timedelta, got {value!r}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise InvalidInputError(f"{name} must be a positive number of seconds or a timedelta, got {value!r}")
    return seconds
