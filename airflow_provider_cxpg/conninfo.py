"""A resolved PostgreSQL endpoint: connectorx URI, libpq keywords, and redacted forms of both.

Pure Python with no Airflow import: the worker unpickles :class:`PostgresEndpoint` from the parent.
The password lives only in the ``password`` field; ``repr``, ``str`` and :meth:`redacted_uri` never
show it, and :class:`Redactor` scrubs it (raw and percent-encoded) from any text that leaves us.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, quote_plus

from airflow_provider_cxpg.exceptions import ConnectionConfigError, ServerConnectionError

__all__ = [
    "FORWARDED_PARAMS",
    "LIBPQ_SSL_ENV",
    "REDACTED",
    "SESSION_SETTINGS",
    "PostgresEndpoint",
    "Redactor",
    "connect",
    "liveness_settings",
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
    "channel_binding",
    "sslnegotiation",
)

#: The values each parameter may take, where the worker (tokio-postgres) accepts fewer than libpq:
#: anything else fails there as ``invalid connection string`` after the parent planned (measured,
#: connectorx 0.4.6). libpq's ``primary``, ``standby`` and ``prefer-standby`` have no worker equivalent.
_CHOICES: dict[str, tuple[str, ...]] = {
    "target_session_attrs": ("any", "read-write", "read-only"),
    "channel_binding": ("disable", "prefer", "require"),
    "sslnegotiation": ("postgres", "direct"),
}
#: Integer parameters: libpq allows spaces around the number, tokio-postgres does not (and
#: ``keepalives`` must not be negative there), so they are normalised to the bare integer.
_INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle")
_INTEGER = re.compile(r"\s*([+-]?\d+)\s*")

#: Session settings every provider connection uses, so that SQL literals and text casts mean the
#: same thing on every server whatever its defaults: literals are rendered for standard strings,
#: ``timestamptz`` text and literals are UTC, dates are ISO. DateStyle names its field order too:
#: ``ISO`` alone keeps the order of the server's default or of ``PGDATESTYLE`` (``ISO, DMY``), and
#: the two sides must read an ambiguous date such as ``01/02/2024`` alike.
SESSION_SETTINGS: dict[str, str] = {
    "standard_conforming_strings": "on",
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",  # exact float text on every server (1 is enough only from PostgreSQL 12)
}

_NO_PASSFILE = "/dev/null/no-password-file"
_MAX_APPLICATION_NAME = 63  # NAMEDATALEN - 1: the server truncates longer names silently

#: libpq's TLS environment variables and the connection parameters they stand for. The parent's
#: libpq reads them by itself; connectorx in the worker does not, so they are folded into the
#: endpoint's parameters (where the connection does not set the parameter): both sides then use the
#: same TLS settings.
LIBPQ_SSL_ENV: dict[str, str] = {
    "PGSSLMODE": "sslmode",
    "PGSSLROOTCERT": "sslrootcert",
    "PGSSLCERT": "sslcert",
    "PGSSLKEY": "sslkey",
    "PGSSLCRL": "sslcrl",
    "PGSSLCRLDIR": "sslcrldir",
}
#: TLS parameters the parent's libpq accepts but connectorx cannot honour: a run refuses them.
_UNSUPPORTED_BY_WORKER = ("sslcrl", "sslcrldir")


def liveness_settings(server_version_num: int) -> dict[str, str]:
    """Session settings that make a backend notice a client that is gone, for this server version.

    A backend waiting on a lock (or running a long query) writes nothing to its client, so it does
    not notice when the client was killed (SIGKILL, OOM): it waits on, and then runs the query, until
    ``statement_timeout``. ``client_connection_check_interval`` (PostgreSQL 14+) makes it poll the
    socket while it works and end the query when the client is gone; the server-side keepalive and
    ``tcp_user_timeout`` settings find a peer that vanished without closing its socket (a dropped
    network). Older servers reject unknown settings at connection time, so these depend on the
    version; there the worker's own clean-up is the fallback (see ``worker/server.py``).
    """
    settings: dict[str, str] = {}
    if server_version_num >= 120000:
        settings.update(tcp_keepalives_idle="10", tcp_keepalives_interval="5", tcp_keepalives_count="3")
        settings["tcp_user_timeout"] = "20000"
    if server_version_num >= 140000:
        settings["client_connection_check_interval"] = "2000"
    return settings


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

    def with_settings(self, settings: Mapping[str, str]) -> PostgresEndpoint:
        """A copy whose connections also carry ``settings`` (startup ``options``), nothing else changed."""
        if not settings:
            return self
        params = dict(self.params)
        opts = [params["options"]] if params.get("options") else []
        opts.extend(_options_arg(k, v) for k, v in settings.items())
        params["options"] = " ".join(opts)
        return replace(self, params=params)

    def with_password(self, password: str) -> PostgresEndpoint:
        """A copy with a new password (a fresh IAM token, a rotated secret)."""
        return replace(self, password=password)

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
        if application_name is not None:  # the server keeps 63 bytes: cut on a character boundary
            cut = application_name.encode()[:_MAX_APPLICATION_NAME].decode("utf-8", errors="ignore")
            params["application_name"] = cut
        return replace(self, params=params)

    @property
    def application_name(self) -> str | None:
        return self.params.get("application_name")

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith("/")

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts libpq tries in turn (``host`` may be a comma-separated list); ``port`` is each one's."""
        return tuple(self.host.split(","))

    def checked(self) -> PostgresEndpoint:
        """Return a copy whose parameters both sides read alike, or refuse them before any data moves.

        :raises ConnectionConfigError: naming the parameter and the values the worker accepts.
        """
        if any(not host for host in self.hosts):
            raise ConnectionConfigError(
                f"host {self.host!r} has an empty entry in its list; name every host (libpq would take an empty "
                "one as its default socket directory, which the worker does not know)"
            )
        params = dict(self.params)
        for name, choices in _CHOICES.items():
            if params.get(name) and params[name] not in choices:
                raise ConnectionConfigError(
                    f"{name}={params[name]!r}: connectorx, which reads the data in the worker, accepts only "
                    f"{', '.join(choices)}"
                    + (
                        "; use read-write for a primary or read-only for a standby"
                        if name == "target_session_attrs"
                        else ""
                    )
                )
        for name in _INTEGERS:
            if params.get(name) is None:
                continue
            match = _INTEGER.fullmatch(params[name])
            if match is None or (name == "keepalives" and int(match[1]) < 0):
                raise ConnectionConfigError(
                    f"{name}={params[name]!r} is not a whole number (of seconds, or 0/1 for keepalives)"
                )
            params[name] = str(int(match[1]))
        return replace(self, params=params)

    # -- renderings --------------------------------------------------------------------------------

    def with_ssl_environment(self, environ: Mapping[str, str] | None = None) -> PostgresEndpoint:
        """A copy with libpq's ``PGSSL*`` environment variables folded into unset TLS parameters."""
        environ = os.environ if environ is None else environ
        params = dict(self.params)
        for variable, name in LIBPQ_SSL_ENV.items():
            if environ.get(variable) and not params.get(name):
                params[name] = environ[variable]
        return replace(self, params=params)

    def check_worker_tls(self) -> None:
        """Refuse TLS settings the worker (connectorx) would honour less strictly than libpq.

        connectorx verifies the server's certificate chain when it has a root certificate, but never
        the host name, and checks no revocation list; ``verify-full`` or a CRL would silently become
        less there.

        :raises ConnectionConfigError: naming the setting and what to do instead.
        """
        mode = (self.params.get("sslmode") or "").lower()
        if mode == "verify-full":
            raise ConnectionConfigError(
                "sslmode=verify-full: connectorx, which reads the data in the worker, cannot verify the server's host "
                "name, so the worker would connect with less than libpq does. Use sslmode=verify-ca with sslrootcert "
                "(the certificate chain is verified on both sides) or sslmode=require"
            )
        for name in _UNSUPPORTED_BY_WORKER:
            if self.params.get(name):
                raise ConnectionConfigError(
                    f"{name}: connectorx, which reads the data in the worker, checks no certificate revocation list; "
                    f"remove {name} (or PG{name.upper()}) to connect without it"
                )
        if mode == "verify-ca" and not self._root_cert():
            raise ConnectionConfigError(
                "sslmode=verify-ca needs sslrootcert (or ~/.postgresql/root.crt) so that the worker can verify the "
                "server's certificate chain too"
            )

    def _root_cert(self) -> str | None:
        if self.params.get("sslrootcert"):
            return self.params["sslrootcert"]
        default = os.path.expanduser("~/.postgresql/root.crt")  # libpq's default root certificate
        return default if os.path.isfile(default) else None

    def _worker_params(self) -> dict[str, str]:
        """The parameters as connectorx must see them to verify what libpq verifies.

        connectorx has no ``verify-ca``: its ``require`` with a root certificate verifies the chain
        (as libpq's own ``require`` does when a root certificate exists). libpq's default certificate
        files are passed explicitly, as libpq would use them.
        """
        params = dict(self.params)
        mode = (params.get("sslmode") or "").lower()
        if mode in {"verify-ca", "require"} and self._root_cert():
            params["sslmode"] = "require"
            params["sslrootcert"] = self._root_cert() or ""
        elif mode == "allow":  # libpq's allow tries clear text first; connectorx knows prefer, which is not less
            params["sslmode"] = "prefer"
        if mode not in {"", "disable"} and not params.get("sslcert"):
            cert, key = (
                os.path.expanduser("~/.postgresql/postgresql.crt"),
                os.path.expanduser("~/.postgresql/postgresql.key"),
            )
            if os.path.isfile(cert) and os.path.isfile(key):
                params["sslcert"], params["sslkey"] = cert, key
        return params

    def connectorx_uri(self) -> str:
        """Return the connectorx source URI, password included. Never log it: use :meth:`redacted_uri`."""
        return self._uri(self.password, self._worker_params())

    def redacted_uri(self) -> str:
        """Return the URI with the password replaced by ``***``."""
        return self._uri(REDACTED if self.password else "", self.params)

    def _uri(self, password: str, query: Mapping[str, str]) -> str:
        # Every part is percent-encoded with ``quote(..., safe="")``: measured, connectorx fails
        # auth with quote_plus ('+' for space) and fails to parse raw '@', ':', '/', '#', '?'.
        auth = quote(self.user, safe="")
        if password:
            auth += ":" + (password if password == REDACTED else quote(password, safe=""))
        first, *others = self.hosts
        # A socket directory goes in the authority, percent-encoded (connectorx parses the authority
        # as a URL's, where a raw '/' ends it); an IPv6 literal in brackets.
        netloc_host = quote(first, safe="") if first.startswith("/") else f"[{first}]" if ":" in first else first
        uri = f"postgresql://{auth}@{netloc_host}:{int(self.port)}/{quote(self.dbname, safe='')}"
        # A host list: the first host is in the authority, each other one is a ``host`` and ``port``
        # pair, which tokio-postgres appends in order (measured). ``h1,h2:P`` in the authority gave
        # h1 the default port 5432 (another server); ``h1:P,h2:P`` does not parse as a URL.
        pairs = [(k, v) for host in others for k, v in (("host", host), ("port", str(int(self.port))))]
        pairs.extend((k, str(v)) for k, v in query.items())
        if pairs:
            uri += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
        return uri

    def libpq_kwargs(self) -> dict[str, str | int]:
        """Return keyword arguments for ``psycopg.connect`` (password included).

        ``PGSSL*`` variables are folded into the endpoint already (:meth:`with_ssl_environment`).
        """
        kwargs: dict[str, str | int] = {"host": self.host, "port": int(self.port), "dbname": self.dbname}
        if self.user:
            kwargs["user"] = self.user
        if self.password:
            kwargs["password"] = self.password
        else:
            # The password file was read in the parent already (libpq_defaults) and gave none: libpq
            # must not find one the worker lacks (in ~/.pgpass, when the connection named another
            # file). A path that cannot exist: libpq skips it without a word.
            kwargs["passfile"] = _NO_PASSFILE
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
        self.secrets: tuple[str, ...] = ()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        """Also scrub ``secrets`` from now on (a refreshed token); shared redactors learn it everywhere."""
        new = tuple(dict.fromkeys(s for s in secrets if s and s not in self.secrets))
        if not new and self.secrets:
            return
        known = self.secrets + new
        variants = self.variants(known)
        # Longest first so that a secret containing another is replaced whole.
        pattern = (
            re.compile("|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True))) if variants else None
        )
        self.secrets, self._pattern = known, pattern  # each assignment is atomic for readers in other threads

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


#: Client-side liveness for the parent's connections over TCP (libpq parameters; the user's win): a
#: network that drops packets (no RST) fails a statement within seconds, not the kernel's ~15 minutes.
_CLIENT_SOCKET = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def connect(
    endpoint: PostgresEndpoint,
    *,
    connect_timeout: float = 10.0,
    statement_timeout_ms: int = 10_000,
    settings: dict[str, str] | None = None,
) -> Any:
    """Open an autocommit psycopg connection with deadlines on connecting, the socket and every statement.

    :param settings: more session settings, set once connected.
    :raises ServerConnectionError: the server cannot be reached or refuses the login (no secret in
        the message).
    """
    import psycopg

    kwargs: dict[str, Any] = endpoint.libpq_kwargs()
    kwargs["connect_timeout"] = max(1, round(connect_timeout))
    # Text as UTF-8 whatever the database's encoding, as connectorx reads it: on a SQL_ASCII database
    # psycopg would otherwise return names as bytes, and planning said the table does not exist.
    kwargs.setdefault("client_encoding", "UTF8")
    if not endpoint.is_unix_socket:
        for name, value in _CLIENT_SOCKET.items():
            kwargs.setdefault(name, value)
    own = f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout={int(statement_timeout_ms)}"
    kwargs["options"] = f"{kwargs['options']} {own}" if kwargs.get("options") else own
    try:
        conn = psycopg.connect(autocommit=True, **kwargs)
    except psycopg.Error as exc:
        redact = Redactor(endpoint.secrets())
        detail = redact(str(exc).strip()) or type(exc).__name__
        raise ServerConnectionError(
            f"cannot connect to {endpoint.redacted_uri()}: {detail}", endpoint=endpoint.redacted_uri()
        ) from None
    # libpq sends PGDATESTYLE and PGTZ from the task's environment as startup parameters, which the
    # server applies after ``options``: planning then read '01/02/2024' as another day than the
    # worker. Set once connected, nothing in the environment can change them.
    pinned = {name: SESSION_SETTINGS[name] for name in ("DateStyle", "TimeZone")}
    wanted = {**liveness_settings(conn.info.server_version), **pinned, **(settings or {})}
    if wanted:
        assignments = ", ".join("set_config(%s, %s, false)" for _ in wanted)
        conn.execute(f"SELECT {assignments}", [v for pair in wanted.items() for v in pair])
    return conn
