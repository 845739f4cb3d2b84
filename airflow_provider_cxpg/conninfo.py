"""A resolved PostgreSQL endpoint: connectorx URI, libpq keywords, and redacted forms of both.

Pure Python with no Airflow import: the worker unpickles :class:`PostgresEndpoint` from the parent.
The password lives only in the ``password`` field; ``repr``, ``str`` and :meth:`redacted_uri` never
show it, and :class:`Redactor` scrubs it (raw and percent-encoded) from any text that leaves us.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import quote, quote_plus

__all__ = [
    "FORWARDED_PARAMS",
    "REDACTED",
    "SESSION_SETTINGS",
    "PostgresEndpoint",
    "Redactor",
]

REDACTED = "***"

#: Connection parameters forwarded from a connection's ``extra`` (an allowlist: anything else,
#: e.g. ``iam`` or ``cursor``, is Airflow's business, not the server's). Each is understood by both
#: libpq (psycopg) and connectorx (rust-postgres plus connectorx's own TLS arguments).
FORWARDED_PARAMS: tuple[str, ...] = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "options",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
)

#: Session settings every provider connection uses, so that SQL literals and text casts mean the
#: same thing on every server whatever its defaults: literals are rendered for standard strings,
#: ``timestamptz`` text and literals are UTC, dates are ISO.
SESSION_SETTINGS: dict[str, str] = {
    "standard_conforming_strings": "on",
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
}

_MAX_APPLICATION_NAME = 63  # NAMEDATALEN - 1: the server truncates longer names silently


def _options_arg(name: str, value: str) -> str:
    # libpq splits ``options`` on spaces; a backslash keeps a space (or backslash) in a value.
    escaped = value.replace("\\", "\\\\").replace(" ", "\\ ")
    return f"-c {name}={escaped}"


@dataclass(frozen=True)
class PostgresEndpoint:
    """Where and as whom to connect.

    :param host: host name or IP, or a Unix-socket directory (starts with ``/``).
    :param port: TCP port (also names the socket file for a Unix-socket host).
    :param dbname: database name.
    :param user: login role.
    :param password: password or IAM token; never shown by ``repr``.
    :param params: allowlisted libpq parameters (see :data:`FORWARDED_PARAMS`).
    """

    host: str
    port: int = 5432
    dbname: str = "postgres"
    user: str = ""
    password: str = field(default="", repr=False)
    params: Mapping[str, str] = field(default_factory=dict)

    # -- derived endpoints -------------------------------------------------------------------------

    def with_session(
        self,
        *,
        application_name: str | None = None,
        statement_timeout_ms: int | None = None,
        lock_timeout_ms: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> PostgresEndpoint:
        """Return a copy whose connections carry our session settings and a per-run application name.

        Settings travel in the startup packet (``options=-c ...``), so they cover every connection
        connectorx opens, including its metadata query that ``pre_execution_query`` does not reach.
        """
        params = dict(self.params)
        opts = [params["options"]] if params.get("options") else []
        merged = dict(SESSION_SETTINGS)
        merged.update(settings or {})
        if statement_timeout_ms is not None:
            merged["statement_timeout"] = str(int(statement_timeout_ms))
        if lock_timeout_ms is not None:
            merged["lock_timeout"] = str(int(lock_timeout_ms))
        opts.extend(_options_arg(k, v) for k, v in merged.items())
        params["options"] = " ".join(opts)
        if application_name is not None:
            params["application_name"] = application_name[:_MAX_APPLICATION_NAME]
        return replace(self, params=params)

    @property
    def application_name(self) -> str | None:
        return self.params.get("application_name")

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith("/")

    # -- renderings --------------------------------------------------------------------------------

    def connectorx_uri(self) -> str:
        """Return the connectorx source URI, password included. Never log it: use :meth:`redacted_uri`."""
        return self._uri(self.password)

    def redacted_uri(self) -> str:
        """Return the URI with the password replaced by ``***``."""
        return self._uri(REDACTED if self.password else "")

    def _uri(self, password: str) -> str:
        # Every part is percent-encoded with ``quote(..., safe="")``: measured, connectorx fails
        # auth with quote_plus ('+' for space) and fails to parse raw '@', ':', '/', '#', '?'.
        auth = quote(self.user, safe="")
        if password:
            auth += ":" + (password if password == REDACTED else quote(password, safe=""))
        query = dict(self.params)
        if self.is_unix_socket:
            # The socket directory goes in the authority, percent-encoded: as a ``?host=`` parameter
            # beside a netloc host, connectorx would treat it as a second host and try TCP first.
            netloc_host = quote(self.host, safe="")
        else:
            netloc_host = f"[{self.host}]" if ":" in self.host else self.host
        uri = f"postgresql://{auth}@{netloc_host}:{int(self.port)}/{quote(self.dbname, safe='')}"
        if query:
            uri += "?" + "&".join(f"{quote(k, safe='')}={quote(str(v), safe='')}" for k, v in query.items())
        return uri

    def libpq_kwargs(self) -> dict[str, str | int]:
        """Return keyword arguments for ``psycopg.connect`` (password included)."""
        kwargs: dict[str, str | int] = {"host": self.host, "port": int(self.port), "dbname": self.dbname}
        if self.user:
            kwargs["user"] = self.user
        if self.password:
            kwargs["password"] = self.password
        kwargs.update(self.params)
        return kwargs

    def secrets(self) -> list[str]:
        """Return the strings that must never appear in output: the password and its encodings."""
        return Redactor.variants([self.password]) if self.password else []

    def __str__(self) -> str:
        return self.redacted_uri()


class Redactor:
    """Replace secrets (and their URL-encoded forms) in text by ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = tuple(s for s in secrets if s)
        variants = self.variants(self.secrets)
        # Longest first so that a secret containing another is replaced whole.
        self._pattern = (
            re.compile("|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True))) if variants else None
        )

    @staticmethod
    def variants(secrets: Iterable[str]) -> list[str]:
        out: set[str] = set()
        for secret in secrets:
            if len(secret) < 3:  # redacting 'a' would shred every message and protect nothing
                continue
            out.update({secret, quote(secret, safe=""), quote_plus(secret), quote(secret)})
        return sorted(out)

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(REDACTED, text)
