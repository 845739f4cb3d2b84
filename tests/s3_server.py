"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1 with a free port.

moto accepts any credentials until authorisation is switched on (:meth:`S3Server.enforce_iam`), which
makes it check every request against IAM users and policies created through its own IAM API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Server", "s3_process", "start_s3_server"]

#: Distinctive credentials, so a test can prove they never leak into outputs.
ACCESS_KEY = "AKIACXPGTESTKEY7Q2Z9"
SECRET_KEY = "cxpg/S3cret+Value=7f3a9c1e2b"  # a test credential for the local moto server only


@dataclass
class S3Server:
    endpoint: str
    server: ThreadedMotoServer | None = None
    process: subprocess.Popen[bytes] | None = None

    def freeze(self) -> None:
        """SIGSTOP the store's process: connections stay open, nothing answers (only for :func:`s3_process`)."""
        assert self.process is not None, "freeze needs the store in its own process"
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self, service: str = "s3", *, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )

    def storage_options(self, *, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, Any]:
        """fsspec/s3fs options for this server (fresh dict: callers may change it)."""
        return {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": self.endpoint}}

    def create_bucket(self) -> str:
        name = f"cxpg-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def bucket_exists(self, name: str) -> bool:
        return name in {b["Name"] for b in self.client().list_buckets().get("Buckets", [])}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def restricted_user(self, policy: dict[str, Any]) -> tuple[str, str]:
        """Create an IAM user with ``policy`` (while authorisation is off); return its key and secret."""
        iam = self.client("iam")
        name = f"u-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="only-this", PolicyDocument=json.dumps(policy))
        created = iam.create_access_key(UserName=name)["AccessKey"]
        return created["AccessKeyId"], created["SecretAccessKey"]

    def _set_auth(self, initial_no_auth_requests: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=initial_no_auth_requests.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    @contextlib.contextmanager
    def enforce_iam(self) -> Iterator[None]:
        """Check every request against IAM while inside the block (moto-wide)."""
        self._set_auth("0")
        try:
            yield
        finally:
            self._set_auth("inf")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def s3_process() -> Iterator[S3Server]:
    """Run moto's server as a process of its own (so a test can freeze it with SIGSTOP)."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                break
        time.sleep(0.1)
    try:
        yield S3Server(endpoint=endpoint, process=process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def start_s3_server() -> Iterator[S3Server]:
    """Run moto on 127.0.0.1 with a free port for the duration of the block."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint=f"http://{host}:{port}", server=server)
    finally:
        server.stop()
