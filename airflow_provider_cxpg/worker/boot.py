"""The worker's first steps, taken before pyarrow and connectorx are imported.

In this order, each for a measured reason:

1. SIGINT is ignored (connectorx only sees it after a read returns; the parent decides when the
   worker stops). Descriptor 1 becomes the private message channel and ``sys.stdout`` is pointed at
   stderr, so a stray ``print`` in a library can never corrupt a frame.
2. :class:`Configure` is read: the parent sends it right after the spawn, so it is already in the
   pipe.
3. The reaper is forked (``reaper.py``). Forking here, with only the standard library and this
   package's protocol modules loaded, keeps it small: forked after pyarrow and connectorx it
   carried their 34 MiB of resident pages (shared with the worker, yet counted in both processes'
   RSS, which is what container limits and memory monitors add up), forked here ~11 MiB. It is
   also the cleanest moment to fork: one thread, no native library loaded.
4. :func:`import_data_libraries` loads pyarrow and connectorx without NumPy, which the worker never
   uses: 10 MiB and ~0.1 s less per worker start (``pyarrow.lib`` and ``pyarrow._compute`` each
   import it when it is there). pyarrow 18 and later declare NumPy optional; an older pyarrow
   requires it and gets it.
5. :func:`finish_imports` loads pyarrow's compute and Parquet modules in a thread, then makes NumPy
   importable again; the worker waits for it (:func:`wait_for_imports`) before its first read, so
   no storage or data code of a chunk ever runs while NumPy is held back.

Only then does :mod:`.server` import the data path and send :class:`Ready`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

_T0 = time.perf_counter()

from airflow_provider_cxpg.worker.protocol import Configure, FrameReader, FrameWriter  # noqa: E402
from airflow_provider_cxpg.worker.reaper import Reaper, start_reaper  # noqa: E402

__all__ = ["EXIT_PROTOCOL_ERROR", "Boot", "boot", "finish_imports", "import_data_libraries", "wait_for_imports"]

EXIT_PROTOCOL_ERROR = 72


@dataclass
class Boot:
    """What the first steps set up, for :func:`airflow_provider_cxpg.worker.server.main`.

    :param started: ``time.perf_counter()`` when the worker's own code began (start-up is measured from it).
    :param parent_pid: the task process, as it saw itself (see :class:`Configure.task_pid`).
    :param reaper: the forked reaper's handle; None when the run has no application name or the fork failed.
    """

    started: float
    writer: FrameWriter
    reader: FrameReader
    config: Configure
    parent_pid: int
    reaper: Reaper | None


def boot() -> Boot:
    """Take the channel, read :class:`Configure`, fork the reaper; exit when no Configure comes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_pid = os.getppid()
    channel = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    writer = FrameWriter(channel)
    reader = FrameReader(sys.stdin.buffer)
    try:
        config = reader.receive()
    except Exception:  # noqa: BLE001  a torn or foreign frame: nothing to configure from
        config = None
    if not isinstance(config, Configure):  # the parent closed the pipe, or is not our parent
        os._exit(EXIT_PROTOCOL_ERROR)
    # The parent as it saw itself: a parent that died before this line has left the worker to
    # init already, and os.getppid() above may be pid 1.
    parent_pid = config.task_pid or parent_pid
    reaper = start_reaper(config, parent_pid, (0, channel))
    return Boot(_T0, writer, reader, config, parent_pid, reaper)


def import_data_libraries() -> None:
    """Import pyarrow and connectorx with NumPy held back (see the module docstring).

    NumPy stays unimportable until :func:`finish_imports` has loaded pyarrow's compute and Parquet
    modules (they import it too when they can); then it is importable again, for an fsspec plugin
    that wants it. pyarrow's NumPy interop stays off in this process: the worker does not use it.
    A pyarrow that requires NumPy (before 18) is imported the ordinary way.
    """
    if "numpy" not in sys.modules and not _pyarrow_requires_numpy():
        sys.modules["numpy"] = None  # type: ignore[assignment]  # `import numpy` raises ImportError
    import connectorx  # noqa: F401  (imports no NumPy of its own; its arrow path needs none)
    import pyarrow  # noqa: F401


def _pyarrow_requires_numpy() -> bool:
    """Whether the installed pyarrow declares NumPy a requirement (up to 17 it does; 18 and later do not).

    Asked of its metadata, not found out by a failed import: an extension module cannot be
    imported twice.
    """
    from importlib.metadata import PackageNotFoundError, requires

    try:
        needs = requires("pyarrow") or []
    except PackageNotFoundError:
        return True
    return any(r.split(";")[0].strip().lower().startswith("numpy") and "extra" not in r for r in needs)


def finish_imports() -> None:
    """Load what the first chunk needs beyond :func:`import_data_libraries`, then release NumPy.

    Started in a thread at ``Ready``, while the parent sends its first request (the first chunk
    would otherwise pay ~80 ms for these modules on its critical path).
    """
    try:
        import pyarrow.compute
        import pyarrow.parquet  # noqa: F401
    finally:
        _release_numpy()
        _IMPORTED.set()


def wait_for_imports(timeout: float = 60.0) -> None:
    """Return once :func:`finish_imports` is done (at once after the first time).

    Called before each read: NumPy must be importable again before a chunk's storage code runs
    (an fsspec plugin may import it), and only this thread's order can promise that.
    """
    _IMPORTED.wait(timeout)


_IMPORTED = threading.Event()


def _release_numpy() -> None:
    if "numpy" in sys.modules and sys.modules["numpy"] is None:
        del sys.modules["numpy"]
