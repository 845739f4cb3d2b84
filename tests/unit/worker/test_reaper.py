"""The reaper's own rule, with real processes (no server): it ends with its worker, however early."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

_WORKER_THAT_DIES_AT_ONCE = """
import os, sys
from airflow_provider_cxpg.conninfo import PostgresEndpoint
from airflow_provider_cxpg.worker.protocol import Configure
from airflow_provider_cxpg.worker.reaper import process_identity, start_reaper

task = int(sys.argv[1])
config = Configure(
    endpoint=PostgresEndpoint(host="127.0.0.1"),
    run_application_name="cxpg-reaper-race",
    task_pid=task,
    task_started=process_identity(task),
)
reaper = start_reaper(config, task, ())
os.write(1, str(reaper.pid).encode())
os._exit(0)  # gone before the reaper (usually) ran a line: as a worker stopped during its boot
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in {"Z", "X"}
    except FileNotFoundError:
        return False


def test_a_reaper_whose_worker_dies_right_after_the_fork_exits_too() -> None:
    """The task process (this one) lives on: only the worker's death may end the reaper.

    A reaper that asked for its parent after the worker had died got init, took it for its worker
    and stayed for the task process's lifetime (3 of 20 such reapers, before the fix; seen on CI).
    """
    reapers = []
    for _ in range(12):
        out = subprocess.run(
            [sys.executable, "-c", _WORKER_THAT_DIES_AT_ONCE, str(os.getpid())],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        reapers.append(int(out.stdout))
    deadline = time.monotonic() + 3.0  # the reaper looks every 0.5 s
    while time.monotonic() < deadline and any(_alive(pid) for pid in reapers):
        time.sleep(0.05)
    left = [pid for pid in reapers if _alive(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"{len(left)} of {len(reapers)} reapers outlived their worker"
