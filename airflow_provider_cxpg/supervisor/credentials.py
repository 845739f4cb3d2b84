"""The run's password, renewed before it expires and once after an authentication failure.

An RDS or Aurora IAM token opens connections for 15 minutes; Redshift and Azure AD tokens for
similar spans; a secrets backend may rotate a password at any time. connectorx opens new
connections for every chunk, so a token resolved once when the task starts breaks every chunk after
it expires. The parent therefore keeps the current password here: it asks the hook for a fresh one
when the old one is older than ``refresh_interval`` (and once when a connection is refused for
authentication), hands it to the worker for the connections it opens next
(:class:`~airflow_provider_cxpg.worker.protocol.Credentials`), uses it for its own control connections, and teaches it
to every redactor and to Airflow's log masker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from airflow_provider_cxpg.bounded import CallTimedOut, SerialCalls
from airflow_provider_cxpg.conninfo import PostgresEndpoint, Redactor
from airflow_provider_cxpg.exceptions import ServerConnectionError

__all__ = ["CredentialSource", "is_authentication_failure"]

_AUTH_SQLSTATES = frozenset({"28P01", "28000"})
_AUTH_MARKERS = ("password authentication failed", "pam authentication failed", "authentication failed for user")


def is_authentication_failure(exc: BaseException) -> bool:
    """Whether the server refused the login (a stale token or password), as opposed to any other failure."""
    if getattr(exc, "sqlstate", None) in _AUTH_SQLSTATES or getattr(exc, "reason", None) == "authentication":
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _AUTH_MARKERS)


class CredentialSource:
    """The current endpoint of a run, with a renewable password.

    :param endpoint: the endpoint as first resolved.
    :param refresh: returns a freshly resolved endpoint (a new token); None: the password never changes.
    :param refresh_interval: renew a password older than this many seconds (None: only after a failure).
    :param redactor: learns every new password.
    :param timeout: deadline of one renewal.
    """

    def __init__(
        self,
        endpoint: PostgresEndpoint,
        refresh: Callable[[], PostgresEndpoint] | None = None,
        refresh_interval: float | None = None,
        redactor: Redactor | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._endpoint = endpoint
        self._refresh = refresh
        self.refresh_interval = refresh_interval
        self._redactor = redactor
        self._minted = time.monotonic()
        self._lock = threading.Lock()
        self._calls = SerialCalls("credentials")
        self.timeout = timeout
        self.refreshes = 0

    @property
    def renewable(self) -> bool:
        return self._refresh is not None

    def current(self) -> PostgresEndpoint:
        return self._endpoint

    def password_if_due(self) -> str | None:
        """A new password when the current one is older than ``refresh_interval``, else None."""
        if self._refresh is None or self.refresh_interval is None:
            return None
        if time.monotonic() - self._minted < self.refresh_interval:
            return None
        return self.renew()

    def renew(self) -> str | None:
        """Ask for a fresh password now; return it when it differs from the current one.

        The hook's call (an Airflow connection lookup, an STS or Redshift request) runs under a
        deadline, ``timeout``: a token service that does not answer fails the run instead of holding it.
        """
        if self._refresh is None:
            return None
        with self._lock:
            refresh = self._refresh
            try:
                fresh = self._calls.call("renewing the credentials", refresh, self.timeout)
            except CallTimedOut:
                self._calls = SerialCalls("credentials")  # abandon the stuck call
                raise ServerConnectionError(
                    f"renewing the credentials took over {self.timeout}s: the token service does not answer"
                ) from None
            self._minted = time.monotonic()
            self.refreshes += 1
            if fresh.password == self._endpoint.password:
                return None
            if self._redactor is not None:
                self._redactor.add(*fresh.secrets())
            self._endpoint = self._endpoint.with_password(fresh.password)
            return fresh.password
