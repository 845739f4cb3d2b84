"""A throw-away PostgreSQL server on 127.0.0.1 for the demo, the test suite and the benchmarks.

The server binaries come from the ``pgserver`` wheel when it is installed (no system package, works
as root), otherwise from the system (``pg_config --bindir`` or ``/usr/lib/postgresql/*/bin``).
PostgreSQL refuses to run as root, so when we are root the cluster is initialised and started as an
unprivileged user (``postgres`` if it exists, else ``cxpg`` which is created).

The server listens on TCP 127.0.0.1 with a free port (connectorx and psycopg both reach it) and on a
Unix socket in its own directory. Authentication over TCP is ``scram-sha-256`` so tests exercise real
passwords; the Unix socket trusts local users.

Nothing here imports Airflow: the benchmark and demo processes use it too.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["EmbeddedPostgres", "find_postgres_bindir", "interrupt_on_termination"]

#: Settings for a disposable server: durability is irrelevant, speed and observability matter.
_SERVER_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "wal_level": "replica",
    "max_wal_senders": "5",
    "hot_standby": "on",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "unix_socket_permissions": "0777",
}


def find_postgres_bindir() -> Path:
    """Return a directory that holds ``initdb``, ``pg_ctl`` and ``postgres``.

    :raises FileNotFoundError: when no PostgreSQL server binaries can be found.
    """
    candidates: list[Path] = []
    # Locate pgserver's binaries without importing it: its import has side effects (lock files,
    # runtime-dir warnings) that a library should not trigger.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
    candidates.extend(Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    for bindir in candidates:
        if all((bindir / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise FileNotFoundError(
        "no PostgreSQL server binaries found: install the 'pgserver' wheel "
        "(pip install 'airflow-provider-cxpg[demo]') or a PostgreSQL server package"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_account() -> pwd.struct_passwd | None:
    """Return the unprivileged account to run PostgreSQL as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "cxpg"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "cxpg"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return pwd.getpwnam("cxpg")


def _make_traversable(path: Path) -> None:
    """Let other users traverse every parent of ``path`` (the server account must reach the binaries)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXOTH | stat.S_IXGRP
        if parent.is_dir() and mode != wanted:
            parent.chmod(wanted)


@dataclass
class EmbeddedPostgres:
    """A private PostgreSQL cluster in a temporary directory.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The cluster is deleted on stop
    and at interpreter exit, so no server outlives the process that started it.

    :param port: TCP port on 127.0.0.1; a free one is chosen when 0.
    :param password: superuser password; a random one when empty.
    :param settings: extra ``postgresql.conf`` settings.
    """

    port: int = 0
    password: str = ""
    user: str = "postgres"
    database: str = "postgres"
    settings: dict[str, str] = field(default_factory=dict)
    base_dir: Path | None = None
    bindir: Path | None = None
    datadir: Path = field(init=False)
    socket_dir: Path = field(init=False)
    _account: pwd.struct_passwd | None = field(init=False, default=None)
    _started: bool = field(init=False, default=False)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        """Initialise the cluster and start the server; return self once it accepts connections."""
        self.bindir = self.bindir or find_postgres_bindir()
        self.password = self.password or secrets.token_urlsafe(18)
        self._account = _server_account()
        root = Path(tempfile.mkdtemp(prefix="cxpg-pg-", dir=self.base_dir))
        self.datadir = root / "data"
        self.socket_dir = root / "sock"
        self.socket_dir.mkdir()
        root.chmod(0o755)
        self.socket_dir.chmod(0o777)
        if self._account is not None:
            _make_traversable(self.bindir)
            _make_traversable(root)
            os.chown(root, self._account.pw_uid, self._account.pw_gid)
            os.chown(self.socket_dir, self._account.pw_uid, self._account.pw_gid)
        atexit.register(self.stop)
        pwfile = root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._account is not None:
            os.chown(pwfile, self._account.pw_uid, self._account.pw_gid)
        self._run(
            "initdb",
            "-D", str(self.datadir),
            "-U", self.user,
            "--pwfile", str(pwfile),
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            timeout=timeout,
        )  # fmt: skip
        pwfile.unlink()
        settings = {**_SERVER_SETTINGS, **self.settings}
        with (self.datadir / "postgresql.auto.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = '{value}'\n")
        self._start_server(timeout)
        self._started = True
        return self

    def _start_server(self, timeout: float) -> None:
        last_error: Exception | None = None
        for _attempt in range(5):  # a free port can be taken between choosing and binding it
            port = self.port or _free_port()
            try:
                self._pg_ctl_start(port, timeout)
            except subprocess.CalledProcessError as exc:
                last_error = exc
                if self.port:
                    break
                continue
            self.port = port
            return
        log = self.log_text()
        raise RuntimeError(f"embedded PostgreSQL did not start: {last_error}\n{log}")

    def _pg_ctl_start(self, port: int, timeout: float) -> None:
        opts = f"-h 127.0.0.1 -p {port} -k {self.socket_dir}"
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir / "server.log"),
            "-o", opts, "-w", "-t", str(int(timeout)), "start",
            timeout=timeout + 10,
        )  # fmt: skip
        self._current_port = port

    def create_replica(self, timeout: float = 120.0) -> EmbeddedPostgres:
        """Clone this server with ``pg_basebackup`` and start the clone as a hot standby.

        The standby streams from this server over TCP (``primary_conninfo`` written by ``-R``) and
        serves read-only queries; stop it like any other :class:`EmbeddedPostgres`.
        """
        replica = EmbeddedPostgres(
            password=self.password, user=self.user, database=self.database, base_dir=self.base_dir, bindir=self.bindir
        )
        replica.bindir = self.bindir
        replica._account = self._account
        root = Path(tempfile.mkdtemp(prefix="cxpg-pg-replica-", dir=self.base_dir))
        replica.datadir = root / "data"
        replica.socket_dir = root / "sock"
        replica.socket_dir.mkdir()
        root.chmod(0o755)
        replica.socket_dir.chmod(0o777)
        if self._account is not None:
            os.chown(root, self._account.pw_uid, self._account.pw_gid)
            os.chown(replica.socket_dir, self._account.pw_uid, self._account.pw_gid)
        atexit.register(replica.stop)
        self._run(
            "pg_basebackup", "-D", str(replica.datadir), "-h", self.host, "-p", str(self.port),
            "-U", self.user, "-R", "-X", "stream", "--checkpoint=fast", "--no-sync",
            timeout=timeout, env={"PGPASSWORD": self.password},
        )  # fmt: skip
        replica._start_server(timeout)
        replica._started = True
        return replica

    def restart(self, timeout: float = 60.0) -> None:
        """Restart the server in fast mode (kills every backend), keeping port and data."""
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", str(int(timeout)), "stop",
            timeout=timeout + 10,
        )  # fmt: skip
        self._pg_ctl_start(self.port, timeout)

    def stop(self) -> None:
        """Stop the server (fast shutdown, then kill) and delete the cluster. Safe to call twice."""
        if not getattr(self, "datadir", None):
            return
        root = self.datadir.parent
        if (self.datadir / "postmaster.pid").exists():
            try:
                self._run(
                    "pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30", "stop",
                    timeout=40,
                )  # fmt: skip
            except (subprocess.SubprocessError, OSError):
                self._kill_postmaster()
        shutil.rmtree(root, ignore_errors=True)
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def _kill_postmaster(self) -> None:
        pidfile = self.datadir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 9)

    def __enter__(self) -> EmbeddedPostgres:
        return self if self._started else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, database: str | None = None, user: str | None = None, password: str | None = None) -> str:
        """Return a ``postgresql://`` URI for TCP on 127.0.0.1 (password percent-encoded)."""
        user = user or self.user
        password = self.password if password is None else password
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(database or self.database, safe='')}"

    def log_text(self) -> str:
        """Return the server log (useful in failure messages)."""
        with contextlib.suppress(OSError):
            return (self.datadir / "server.log").read_text(errors="replace")[-4000:]
        return ""

    @property
    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        return None

    # -- helpers -----------------------------------------------------------------------------------

    def _run(self, exe: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> None:
        assert self.bindir is not None
        kwargs: dict[str, object] = {"env": {**os.environ, **env}} if env else {}
        if self._account is not None:
            kwargs.update(user=self._account.pw_uid, group=self._account.pw_gid, extra_groups=[])
        # Output goes to files, not pipes: pg_ctl's server child inherits the descriptors and a
        # pipe would never reach EOF while the server runs.
        with tempfile.TemporaryFile() as out:
            proc = subprocess.run(
                [str(self.bindir / exe), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                cwd="/",
                check=False,
                **kwargs,  # type: ignore[arg-type]
            )
            if proc.returncode != 0:
                out.seek(0)
                text = out.read().decode(errors="replace")
                raise subprocess.CalledProcessError(proc.returncode, [exe, *args], output=text)


def interrupt_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into :class:`KeyboardInterrupt`, so ``finally`` blocks stop the server.

    The server runs in its own session (``pg_ctl``), so a plain ``kill`` of the Python process that
    started it would otherwise end that process at once and leave the server running, orphaned.
    Call from the main thread of a command-line entry point.
    """

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def _main() -> None:
    """Start a server and print its DSN until interrupted.

    ``python -m airflow_provider_cxpg.demo.embedded_postgres`` (or the older
    ``python -m airflow_provider_cxpg.embedded_postgres``).
    """
    interrupt_on_termination()
    with EmbeddedPostgres() as server:
        print(server.dsn(), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    _main()
