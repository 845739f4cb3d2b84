"""Peak resident memory of a whole process tree, sampled from ``/proc`` every ~20 ms.

The tree is the contender process and every descendant it has at the moment of the sample (the
provider's worker runs in a session of its own, so a process group would miss it; parent links do
not). RSS of the members is summed, so pages shared between them (Python, pyarrow
and connectorx libraries mapped by both the contender and its worker, a memory-mapped Arrow file)
are counted once per process: the figure is an upper bound of what the tree really holds.

Reading ``/proc/<pid>/task/<tid>/children`` and ``/proc/<pid>/statm`` costs a few microseconds per
process, so sampling at 50 Hz stays well under 1 % of a core (``psutil.Process.children`` scans all
of ``/proc`` and costs milliseconds). When the kernel lacks ``children`` files, psutil is used.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

import psutil

__all__ = ["TreeSample", "TreeSampler", "tree_cpu_seconds", "tree_pids"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_HAVE_CHILDREN_FILES = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{tid}/children") as handle:
            kids.extend(int(p) for p in handle.read().split())
    return kids


def tree_pids(root: int) -> list[int]:
    """``root`` and all its living descendants (best effort: processes come and go)."""
    if not _HAVE_CHILDREN_FILES:
        try:
            proc = psutil.Process(root)
            return [root, *(c.pid for c in proc.children(recursive=True))]
        except psutil.Error:
            return []
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo.extend(_children(pid))
    return found


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of ``root`` and its live descendants, and of the children they reaped.

    A process's exited children move into its ``cutime``/``cstime`` when it reaps them, so summing
    every live process's own and reaped-children CPU counts each once.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return total / tick


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class TreeSample:
    """What the sampler saw: the peak summed RSS and when, and every process it met."""

    peak_rss: int = 0
    peak_at: float = 0.0
    peak_processes: int = 0
    root_peak_rss: int = 0
    descendants_peak_rss: int = 0
    samples: int = 0
    max_processes: int = 0
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    series: list[tuple[float, int]] = field(default_factory=list)


class TreeSampler:
    """Sample a process tree in a background thread until :meth:`stop`.

    :param root: pid of the tree's root (the contender process).
    :param interval: seconds between samples.
    :param keep_series: also keep ``(seconds since start, rss)`` every ``series_every`` samples.
    """

    def __init__(self, root: int, interval: float = 0.02, *, keep_series: bool = True, series_every: int = 5) -> None:
        self.root = root
        self.interval = interval
        self.keep_series = keep_series
        self.series_every = series_every
        self.result = TreeSample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> TreeSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> TreeSample:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.result

    def sample_once(self) -> None:
        res = self.result
        pids = tree_pids(self.root)
        total = descendants = 0
        for pid in pids:
            if pid not in res.seen:
                with contextlib.suppress(psutil.Error):
                    res.seen[pid] = psutil.Process(pid)  # remembers create_time: safe to kill later
            rss = _rss(pid)
            total += rss
            if pid == self.root:
                res.root_peak_rss = max(res.root_peak_rss, rss)
            else:
                descendants += rss
        res.descendants_peak_rss = max(res.descendants_peak_rss, descendants)
        now = time.monotonic() - self._t0
        res.samples += 1
        res.max_processes = max(res.max_processes, len(pids))
        if total > res.peak_rss:
            res.peak_rss, res.peak_at, res.peak_processes = total, now, len(pids)
        if self.keep_series and res.samples % self.series_every == 1:
            res.series.append((round(now, 3), total))

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a busy machine): do not try to catch up in a burst
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)
