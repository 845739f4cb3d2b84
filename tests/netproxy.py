"""A TCP proxy in front of PostgreSQL, for faults that live in the network.

Run as its own process (``python -m tests.netproxy``) so a test can freeze it with SIGSTOP: the
kernel keeps every connection open and even acknowledges what the client sends, but nothing comes
back, exactly as a frozen gateway or an overloaded load balancer behaves. Killing it closes every
connection at once.

It can also route: a connection whose startup packet's ``application_name`` ends with one of the
``--route-suffix`` values goes to ``--alternate``, every other one to ``--upstream``, as a load
balancer in front of a primary and a replica would split them. ``--raw`` forwards any protocol
(an S3 endpoint) without looking at it.

Prints ``listening <port>`` when ready.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


def _pump(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    for sock in (source, target):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _read_startup(client: socket.socket) -> bytes:
    """Read the client's first message(s) up to the startup packet (an SSLRequest is refused)."""
    while True:
        header = client.recv(8, socket.MSG_WAITALL)
        if len(header) < 8:
            return header
        length, code = struct.unpack("!ii", header)
        body = client.recv(length - 8, socket.MSG_WAITALL) if length > 8 else b""
        if code in (80877103, 80877104):  # SSLRequest / GSSENCRequest: say no, the client goes on in clear
            client.sendall(b"N")
            continue
        return header + body


def _application_name(startup: bytes) -> str:
    parts = startup[8:].split(b"\x00")
    pairs = dict(zip(parts[0::2], parts[1::2], strict=False))
    return pairs.get(b"application_name", b"").decode(errors="replace")


def serve(
    port: int, upstream: tuple[str, int], alternate: tuple[str, int] | None, suffixes: list[str], raw: bool
) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    print(f"listening {listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_connect, args=(client, upstream, alternate, suffixes, raw), daemon=True).start()


def _connect(
    client: socket.socket,
    upstream: tuple[str, int],
    alternate: tuple[str, int] | None,
    suffixes: list[str],
    raw: bool,
) -> None:
    try:
        startup = b"" if raw else _read_startup(client)
        target = upstream
        if alternate and any(_application_name(startup).endswith(s) for s in suffixes):
            target = alternate
        server = socket.create_connection(target)
        if startup:
            server.sendall(startup)
    except OSError:
        client.close()
        return
    threading.Thread(target=_pump, args=(client, server), daemon=True).start()
    _pump(server, client)


@dataclass
class Proxy:
    """A running proxy process; ``port`` is where to connect."""

    process: subprocess.Popen[str]
    port: int

    def freeze(self) -> None:
        """Stop the proxy, and return once every one of its threads is stopped.

        SIGSTOP takes effect per thread as each next leaves the kernel: on a loaded machine a pump
        thread could still forward the next statement (and its answer) after ``send_signal`` returned.
        """
        import signal

        self.process.send_signal(signal.SIGSTOP)
        tasks = f"/proc/{self.process.pid}/task"
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                states = [_thread_state(f"{tasks}/{t}/stat") for t in os.listdir(tasks)]
            except OSError:  # a thread ended while listed: look again
                continue
            if all(state in ("T", "t") for state in states):
                return
            time.sleep(0.002)

    def thaw(self) -> None:
        import signal

        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        import signal

        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=10)


@contextlib.contextmanager
def running_proxy(
    upstream: tuple[str, int],
    alternate: tuple[str, int] | None = None,
    route_suffixes: tuple[str, ...] = (),
    *,
    raw: bool = False,
) -> Iterator[Proxy]:
    cmd = [sys.executable, "-m", "tests.netproxy", "--upstream", f"{upstream[0]}:{upstream[1]}"]
    if raw:
        cmd.append("--raw")
    if alternate:
        cmd += ["--alternate", f"{alternate[0]}:{alternate[1]}"]
    for suffix in route_suffixes:
        cmd.append(f"--route-suffix={suffix}")  # "=": a suffix may start with "-"
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 20
    line = ""
    while time.monotonic() < deadline and not line.startswith("listening"):
        line = process.stdout.readline()
    if not line.startswith("listening"):
        process.kill()
        raise RuntimeError("the proxy did not start")
    proxy = Proxy(process, int(line.split()[1]))
    try:
        yield proxy
    finally:
        proxy.stop()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", type=_address, required=True)
    parser.add_argument("--alternate", type=_address)
    parser.add_argument("--route-suffix", action="append", default=[])
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args()
    serve(args.port, args.upstream, args.alternate, args.route_suffix, args.raw)


if __name__ == "__main__":
    main()


def _thread_state(path: str) -> str:
    """The state letter of ``/proc/<pid>/task/<tid>/stat`` (after the command name in parentheses)."""
    with open(path) as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]
