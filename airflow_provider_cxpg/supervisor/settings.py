"""The settings of one supervised worker (deadlines, intervals, environment), validated once.

Their user-facing defaults are declared in :mod:`airflow_provider_cxpg.durations`, which the
operators' and the hook's signatures name as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from airflow_provider_cxpg.durations import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_QUERY_TIMEOUT,
    DEFAULT_STORAGE_TIMEOUT,
    as_seconds,
)
from airflow_provider_cxpg.exceptions import InvalidInputError

__all__ = ["WorkerSettings"]


_DURATIONS = (
    "heartbeat_interval",
    "heartbeat_timeout",
    "query_timeout",
    "job_timeout",
    "start_timeout",
    "deadline_grace",
    "cancel_grace",
    "kill_grace",
    "monitor_interval",
    "report_wait_after",
    "report_wait_every",
    "storage_timeout",
    "control_timeout",
    "credentials_refresh_interval",
)
_OPTIONAL = frozenset({"query_timeout", "job_timeout", "storage_timeout", "credentials_refresh_interval"})
_MAY_BE_ZERO = frozenset({"deadline_grace", "cancel_grace", "kill_grace", "report_wait_after"})


@dataclass(frozen=True)
class WorkerSettings:
    """Tunables of one supervised worker; every wait is bounded by one of them.

    Every duration takes seconds (a number, or a numeric string from a template) or a
    ``datetime.timedelta``, as Airflow's own ``execution_timeout`` does.

    :param heartbeat_interval: seconds between worker heartbeats.
    :param heartbeat_timeout: declare the worker dead after this long without any message.
    :param query_timeout: per-query limit, enforced by the parent and as server ``statement_timeout``;
        None for no limit.
    :param job_timeout: limit for the whole job (many queries, planning included); None for no limit.
    :param start_timeout: spawn to ready.
    :param deadline_grace: the parent's query deadline is ``query_timeout + deadline_grace``, so the
        server's own timeout (more precise, and it leaves the worker usable) normally fires first.
    :param cancel_grace: how long a cancelled query may take to stop before its backend is terminated,
        and how long one cancel request may take to go out.
    :param kill_grace: how long SIGTERM may take before SIGKILL.
    :param monitor_interval: seconds between ``pg_stat_activity`` samples while a query runs.
    :param report_wait_after: report a backend that waits on a lock after this many seconds, and
        again every ``report_wait_every`` seconds while it waits.
    :param protocol: connectorx protocol, ``binary`` (default) or ``cursor``.
    :param worker_env: extra environment variables for the worker (explicit: nothing is inherited
        beyond :data:`~airflow_provider_cxpg.supervisor.session.ENV_ALLOWLIST`).
    :param storage_timeout: seconds each operation on the destination may take: a chunk's open,
        write and commit in the worker, and the parent's manifest writes, listings and removals;
        None for no limit.
    :param control_timeout: client-side deadline of each statement on the parent's monitoring
        connections, and (twice it, plus ``deadline_grace``) of connecting a control connection, so
        a blackholed network cannot stall the deadlines.
    :param credentials_refresh_interval: renew the password (an IAM token) when older than this;
        None: only after an authentication failure. The hook sets it for IAM connections.
    """

    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    query_timeout: float | None = DEFAULT_QUERY_TIMEOUT
    job_timeout: float | None = None
    start_timeout: float = 60.0
    deadline_grace: float = 2.0
    cancel_grace: float = 3.0
    kill_grace: float = 5.0
    monitor_interval: float = 1.0
    report_wait_after: float = 5.0
    report_wait_every: float = 10.0
    protocol: str = "binary"
    worker_env: Mapping[str, str] = field(default_factory=dict)
    storage_timeout: float | None = DEFAULT_STORAGE_TIMEOUT
    control_timeout: float = 10.0
    credentials_refresh_interval: float | None = None

    def __post_init__(self) -> None:
        # Durations as Airflow users pass them: seconds or a timedelta (see durations.py).
        for name in _DURATIONS:
            value = as_seconds(name, getattr(self, name), allow_none=name in _OPTIONAL, allow_zero=name in _MAY_BE_ZERO)
            object.__setattr__(self, name, value)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise InvalidInputError(
                f"heartbeat_timeout ({self.heartbeat_timeout}s) must exceed heartbeat_interval "
                f"({self.heartbeat_interval}s)"
            )
        if self.protocol not in {"binary", "cursor"}:
            raise InvalidInputError(
                f"protocol must be 'binary' or 'cursor', got {self.protocol!r} "
                "('csv' turns empty strings into NULL and 'simple' panics on json)"
            )
