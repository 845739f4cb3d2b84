"""What libpq would take from the environment and from files, resolved once in the parent.

The parent plans through libpq, which fills every parameter a connection leaves unset from ``PG*``
environment variables, the password file or a service file. connectorx in the worker reads none of
them (and the worker's environment is an allowlist). So the parent resolves them here, into the
:class:`~airflow_provider_cxpg.conninfo.PostgresEndpoint` both sides connect with, and refuses, before
any data moves, what would make libpq connect elsewhere, as another role or more securely than the
worker can follow.

=====================================  ============================================================
``PGUSER``, ``PGDATABASE``, ``PGPORT``  the role, database and port when the connection has none
``PGPASSWORD``, passfile               the password when the connection has none (libpq's rules)
``PGAPPNAME``, ``PGCONNECT_TIMEOUT``,  folded into the parameters the connection leaves unset, as
``PGTARGETSESSIONATTRS``,              ``PGSSL*`` are (:meth:`PostgresEndpoint.with_ssl_environment`)
``PGCHANNELBINDING``,
``PGSSLNEGOTIATION``
``PGHOSTADDR``, ``PGSERVICE``, ...     refused (see :data:`REFUSED`), as extras or variables
=====================================  ============================================================

``PGDATESTYLE`` and ``PGTZ`` are not connection parameters: :func:`~airflow_provider_cxpg.conninfo.connect`
sets both once connected. ``PGOPTIONS`` and ``PGCLIENTENCODING`` lose to the values the parent
always passes. Pure Python with no Airflow import.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from airflow_provider_cxpg.bounded import CallTimedOut
from airflow_provider_cxpg.conninfo import PostgresEndpoint, connect
from airflow_provider_cxpg.control import ControlConnection, address_count, connect_deadline
from airflow_provider_cxpg.exceptions import ConnectionConfigError, ServerConnectionError

__all__ = ["FOLDED_ENV", "REFUSED", "passfile_password", "reached_host", "read_passfile", "resolve_endpoint"]

#: Environment variables folded into the endpoint's parameters where the connection sets none, so
#: that the worker uses what the parent's libpq would (each is then checked like the extra).
FOLDED_ENV: dict[str, str] = {
    "PGAPPNAME": "application_name",
    "PGCONNECT_TIMEOUT": "connect_timeout",
    "PGTARGETSESSIONATTRS": "target_session_attrs",
    "PGCHANNELBINDING": "channel_binding",
    "PGSSLNEGOTIATION": "sslnegotiation",
}

_ANY: Callable[[str], bool] = bool

#: Parameters (an extra, or libpq's environment variable) the worker cannot follow: the variable,
#: which values are refused, and what to do instead.
REFUSED: dict[str, tuple[str, Callable[[str], bool], str]] = {
    "hostaddr": (
        "PGHOSTADDR",
        _ANY,
        "libpq would connect to that address and the worker to the host; put the address in the connection's host",
    ),
    "service": (
        "PGSERVICE",
        _ANY,
        "a service file fills host, port, user and more for libpq only; put them in the Airflow connection",
    ),
    "require_auth": (
        "PGREQUIREAUTH",
        _ANY,
        "the worker (tokio-postgres) accepts whatever authentication the server asks for; remove it",
    ),
    "requirepeer": ("PGREQUIREPEER", _ANY, "the worker cannot check the server process's user; remove it"),
    "sslcrl": ("PGSSLCRL", _ANY, "the worker checks no certificate revocation list; remove it to connect without"),
    "sslcrldir": (
        "PGSSLCRLDIR",
        _ANY,
        "the worker checks no certificate revocation list; remove it to connect without",
    ),
    "gssencmode": (
        "PGGSSENCMODE",
        lambda value: value == "require",
        "the worker has no GSSAPI encryption; use sslmode=require (or stronger) instead",
    ),
    "sslcertmode": (
        "PGSSLCERTMODE",
        lambda value: value == "require",
        "the worker cannot insist that the server asks for a client certificate; remove it",
    ),
    "ssl_min_protocol_version": (
        "PGSSLMINPROTOCOLVERSION",
        lambda value: value.lower() == "tlsv1.3",
        "the worker's TLS library sets no such minimum; remove it (libpq's default is TLSv1.2)",
    ),
    "load_balance_hosts": (
        "PGLOADBALANCEHOSTS",
        lambda value: value == "random",
        "the parent and the worker would each pick a server at random; list the hosts in the order to try",
    ),
}

#: The socket directory libpq's password-file lookup calls ``localhost``: libpq's built-in default
#: (``DEFAULT_PGSOCKET_DIR``), measured as /var/run/postgresql for psycopg-binary's libpq 18 (and
#: Debian's and Red Hat's builds); upstream's default is /tmp.
DEFAULT_SOCKET_DIR = "/var/run/postgresql"


def resolve_endpoint(
    *,
    host: str,
    port: int | None,
    dbname: str | None,
    user: str | None,
    password: str | None,
    params: Mapping[str, str],
    extra: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> PostgresEndpoint:
    """Build the endpoint libpq would connect with, everything it would read by itself made explicit.

    :param host: the host, a host list (``a,b``) or a Unix-socket directory.
    :param port: the connection's port; None: ``PGPORT``, else 5432.
    :param dbname: the database; None: ``PGDATABASE``, else the user's name (libpq's default).
    :param user: the login; None: ``PGUSER``, else the effective OS user's name.
    :param password: the password; None: ``PGPASSWORD``, else the password file's entry.
    :param params: the forwarded parameters (:data:`~airflow_provider_cxpg.conninfo.FORWARDED_PARAMS`).
    :param extra: the connection's whole ``extra``: read only for :data:`REFUSED` and ``passfile``.
    :param environ: the environment (default: ``os.environ``).
    :raises ConnectionConfigError: something in the connection or the environment the worker cannot
        follow, named, with what to do instead.
    """
    environ = os.environ if environ is None else environ
    _refuse_unfollowable(extra, environ)
    folded = dict(params)
    for variable, name in FOLDED_ENV.items():
        if environ.get(variable) and not folded.get(name):
            folded[name] = environ[variable]
            try:  # checked alone first, so that a refusal names the variable
                PostgresEndpoint(host=host, params={name: folded[name]}).checked()
            except ConnectionConfigError as exc:
                raise ConnectionConfigError(f"environment variable {variable}: {exc}") from None
    user = user or environ.get("PGUSER") or _os_user()
    endpoint = PostgresEndpoint(
        host=host,
        port=_port(port, environ),
        dbname=dbname or environ.get("PGDATABASE") or user,
        user=user,
        password=password or "",
        params=folded,
    ).with_ssl_environment(environ)
    endpoint = endpoint.checked()
    if not endpoint.password:
        found = environ.get("PGPASSWORD") or passfile_password(endpoint, _passfile(extra, environ))
        endpoint = replace(endpoint, password=found or "")
    return endpoint


def reached_host(endpoint: PostgresEndpoint) -> PostgresEndpoint:
    """A host list narrowed to the one host libpq reaches now (``target_session_attrs`` applied).

    libpq and the worker's client (tokio-postgres) fail over differently: tokio-postgres moves on to
    the next host on any connection error (a connection limit, a restart, a slow first host), where
    libpq had reached, and planned on, the first. The parent then planned on one server and the
    worker read another: a standby behind it, green. So everything one endpoint serves reads the
    server libpq picks here; a later run (a retry) picks again.

    :raises ServerConnectionError: no host of the list could be reached in time.
    """
    if len(endpoint.hosts) < 2:
        return endpoint
    per_host = float(endpoint.params.get("connect_timeout") or 0) or 10.0  # libpq: 0 is no limit
    per_host = max(per_host, 2.0)  # libpq's own minimum
    limit = connect_deadline(
        address_count(endpoint.host, endpoint.port, per_host), per_host, 5.0, names=len(endpoint.hosts)
    )
    reached: list[tuple[str, int]] = []

    def open_one() -> Any:
        conn = connect(endpoint, connect_timeout=per_host)
        reached.append((conn.info.host, int(conn.info.port)))
        return conn

    try:
        ControlConnection.open(open_one, timeout=limit, name="cxpg-choose-host").close(5.0)
    except CallTimedOut:
        raise ServerConnectionError(
            f"none of the hosts {endpoint.host} accepted a connection within {limit:.0f}s",
            endpoint=endpoint.redacted_uri(),
        ) from None
    host, port = reached[0]
    return replace(endpoint, host=host, port=port)


def _refuse_unfollowable(extra: Mapping[str, Any], environ: Mapping[str, str]) -> None:
    for name, (variable, refused, instead) in REFUSED.items():
        for source, value in (
            (f"extra {name!r}", extra.get(name)),
            (f"environment variable {variable}", environ.get(variable)),
        ):
            text = "" if value is None else str(value).strip()
            if text and refused(text):
                raise ConnectionConfigError(
                    f"{source} ({name}={text!r}): connectorx, which reads the data in the worker, cannot follow it: "
                    f"{instead}"
                )


def _port(port: int | None, environ: Mapping[str, str]) -> int:
    if port:
        return int(port)
    text = (environ.get("PGPORT") or "").strip()
    if not text:
        return 5432
    if not text.isdigit():
        raise ConnectionConfigError(
            f"environment variable PGPORT={text!r} is not one port number; set the port in the Airflow connection"
        )
    return int(text)


def _os_user() -> str:
    """The effective OS user's name, as libpq takes it when neither a login nor ``PGUSER`` is given."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise ConnectionConfigError(
            f"the connection has no login, PGUSER is not set and the OS user id {os.geteuid()} has no name; "
            "set the connection's login"
        ) from None


def _passfile(extra: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """libpq's password file: the ``passfile`` parameter, ``PGPASSFILE``, else ``~/.pgpass``."""
    named = str(extra.get("passfile") or "") or environ.get("PGPASSFILE")
    if named:
        return named
    home = environ.get("HOME")  # libpq takes HOME first (measured), then the passwd entry
    if not home:
        try:
            home = pwd.getpwuid(os.geteuid()).pw_dir
        except KeyError:
            return None
    return os.path.join(home, ".pgpass")


def passfile_password(endpoint: PostgresEndpoint, path: str | None) -> str | None:
    """The password file's password for ``endpoint``, as libpq looks it up for each host it tries.

    libpq may use another password for each host of a list; the worker has one password for all,
    so hosts that need different ones are refused.

    :raises ConnectionConfigError: the hosts of a list need different passwords.
    """
    entries = read_passfile(path) if path else []
    if not entries:
        return None
    found = {
        host: _lookup(entries, _passfile_host(host), str(endpoint.port), endpoint.dbname, endpoint.user)
        for host in endpoint.hosts
    }
    if len(set(found.values())) > 1:
        raise ConnectionConfigError(
            f"the password file {path} gives the hosts {', '.join(endpoint.hosts)} different passwords (or none for "
            "some); the worker uses one password for every host: set it in the Airflow connection"
        )
    return next(iter(found.values()))


def _passfile_host(host: str) -> str:
    # libpq looks up its default socket directory as "localhost", any other directory as itself.
    return "localhost" if host == DEFAULT_SOCKET_DIR else host


def read_passfile(path: str) -> list[list[str]]:
    """The entries of a password file, each ``[host, port, dbname, user, password]``, as libpq reads it.

    libpq ignores a file that is not a regular file or that the group or others may read or write
    (it warns); lines starting with ``#`` are comments; ``\\`` escapes the next character (``\\:``,
    ``\\\\``). A line with fewer than five fields matches nothing.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            return []
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().split("\n")
    except OSError:
        return []
    entries = []
    for line in lines:
        line = line.rstrip("\r")
        if not line or line.startswith("#"):
            continue
        fields = _split_fields(line)
        if len(fields) >= 5:
            entries.append(fields[:5])
    return entries


def _split_fields(line: str) -> list[str]:
    """Split on unescaped ``:``, keeping ``*`` alone as the wildcard (an escaped ``\\*`` is a star)."""
    fields: list[str] = []
    current: list[str] = []
    escaped_star = False
    chars = iter(line)
    for char in chars:
        if char == "\\":
            following = next(chars, None)
            if following is None:  # a trailing backslash stays one (libpq keeps it)
                current.append("\\")
                break
            current.append(following)
            escaped_star = escaped_star or (following == "*" and not current[:-1])
        elif char == ":":
            fields.append(_field(current, escaped_star))
            current, escaped_star = [], False
        else:
            current.append(char)
    fields.append(_field(current, escaped_star))
    return fields


_WILDCARD = "\0*"  # never a real host, port, database or user name (none can hold a NUL byte)


def _field(chars: list[str], escaped_star: bool) -> str:
    text = "".join(chars)
    return _WILDCARD if text == "*" and not escaped_star else text


def _lookup(entries: list[list[str]], host: str, port: str, dbname: str, user: str) -> str | None:
    wanted = (host, port, dbname, user)
    for entry in entries:
        if all(field in (_WILDCARD, value) for field, value in zip(entry[:4], wanted, strict=True)):
            return entry[4] if entry[4] != _WILDCARD else "*"
    return None
