"""Raw runs and their statistics: jobs, one run's measurements, medians and ranges, per-chunk overhead."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    """One thing to measure: a contender with its arguments, under a display label.

    :param label: unique display name, e.g. ``provider_parquet@500k``.
    :param contender: the name in :data:`bench.contender.CONTENDERS`.
    :param args: extra command-line arguments for the contender.
    :param sink: what the contender produces (``parquet``, ``arrow in parent``, ``none``).
    :param section: ``main`` (the results table), ``overhead`` or ``flatness``.
    :param provider: one of the provider's own paths.
    :param table_rows: rows of the table it reads.
    """

    label: str
    contender: str
    args: tuple[str, ...] = ()
    sink: str = "none"
    section: str = "main"
    provider: bool = False
    table_rows: int = 0
    chunk_rows: int | None = None
    description: str = ""


@dataclass
class JobRun:
    """One measurement (one fresh process)."""

    label: str
    round: int
    ok: bool
    error: str | None = None
    work_s: float | None = None
    process_s: float | None = None
    cpu_s: float | None = None
    work_cpu_s: float | None = None
    server_cpu_s: float | None = None
    setup_s: float | None = None
    peak_rss: int | None = None
    root_peak_rss: int | None = None
    descendants_peak_rss: int | None = None
    rss_at_start: int | None = None
    peak_processes: int | None = None
    rss_samples: int = 0
    rows: int | None = None
    arrow_bytes: int | None = None
    files: int | None = None
    file_bytes: int | None = None
    maxrss_self: int | None = None
    maxrss_children: int | None = None
    leftover_processes: int = 0
    leftover_backends: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    rss_series: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class Summary:
    """A job's runs condensed: medians and ranges over the successful runs."""

    job: Job
    runs: int
    ok_runs: int
    errors: list[str]
    work_median: float | None = None
    work_min: float | None = None
    work_max: float | None = None
    process_median: float | None = None
    cpu_median: float | None = None
    work_cpu_median: float | None = None
    work_cpu_min: float | None = None
    work_cpu_max: float | None = None
    server_cpu_median: float | None = None
    setup_median: float | None = None
    peak_rss_median: int | None = None
    peak_rss_max: int | None = None
    work_rss_median: int | None = None
    descendants_peak_median: int | None = None
    rows_per_s: float | None = None
    mb_per_s: float | None = None
    ratio_to_provider: float | None = None
    file_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ok_runs > 0 and self.ok_runs == self.runs

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["job"] = asdict(self.job)
        data["ok"] = self.ok
        return data


def summarise(job: Job, runs: Sequence[JobRun], *, rows: int, data_bytes: int | None) -> Summary:
    mine = [r for r in runs if r.label == job.label]
    good = [r for r in mine if r.ok and r.work_s is not None]
    summary = Summary(job=job, runs=len(mine), ok_runs=len(good), errors=[r.error for r in mine if r.error])
    if not good:
        return summary
    works = [r.work_s for r in good if r.work_s is not None]
    summary.work_median = statistics.median(works)
    summary.work_min = min(works)
    summary.work_max = max(works)
    procs = [r.process_s for r in good if r.process_s is not None]
    summary.process_median = statistics.median(procs) if procs else None
    cpus = [r.cpu_s for r in good if r.cpu_s is not None]
    summary.cpu_median = statistics.median(cpus) if cpus else None
    work_cpus = [r.work_cpu_s for r in good if r.work_cpu_s is not None]
    if work_cpus:
        summary.work_cpu_median = statistics.median(work_cpus)
        summary.work_cpu_min, summary.work_cpu_max = min(work_cpus), max(work_cpus)
    server_cpus = [r.server_cpu_s for r in good if r.server_cpu_s is not None]
    summary.server_cpu_median = statistics.median(server_cpus) if server_cpus else None
    setups = [r.setup_s for r in good if r.setup_s is not None]
    summary.setup_median = statistics.median(setups) if setups else None
    peaks = [r.peak_rss for r in good if r.peak_rss]
    if peaks:
        summary.peak_rss_median = int(statistics.median(peaks))
        summary.peak_rss_max = max(peaks)
    grown = [r.peak_rss - r.rss_at_start for r in good if r.peak_rss and r.rss_at_start is not None]
    if grown:
        summary.work_rss_median = int(statistics.median(grown))
    below = [r.descendants_peak_rss for r in good if r.descendants_peak_rss]
    if below:
        summary.descendants_peak_median = int(statistics.median(below))
    summary.rows_per_s = rows / summary.work_median if summary.work_median else None
    if data_bytes and summary.work_median:
        summary.mb_per_s = data_bytes / 1e6 / summary.work_median
    sizes = [r.file_bytes for r in good if r.file_bytes]
    summary.file_bytes = int(statistics.median(sizes)) if sizes else None
    if sum(r.leftover_processes for r in mine):
        summary.notes.append(f"{sum(r.leftover_processes for r in mine)} leftover process(es) killed")
    if sum(r.leftover_backends for r in mine):
        summary.notes.append(f"{sum(r.leftover_backends for r in mine)} leftover server backend(s)")
    return summary


def compute_overhead(jobs: Sequence[Job], runs: Sequence[JobRun], rows: int) -> dict[str, Any]:
    """Per-chunk overhead: the two probes' median time difference over their difference in queries.

    Query counts are the medians of what the provider's query log recorded (``query.done`` events);
    ⌊N/c⌋ + 1 (a keyset run ending with an empty query) only when the runs did not record them.
    """
    probes = sorted((j for j in jobs if j.section == "overhead" and j.chunk_rows), key=lambda j: j.chunk_rows or 0)
    if len(probes) < 2:
        return {"error": "needs two --overhead-chunks sizes"}
    small, large = probes[0], probes[-1]
    assert small.chunk_rows is not None and large.chunk_rows is not None

    def medians(job: Job, chunk: int) -> tuple[float | None, int, bool]:
        good = [r for r in runs if r.label == job.label and r.ok]
        times = [r.work_s for r in good if r.work_s is not None]
        counted = [int(r.details["queries"]) for r in good if r.details.get("queries")]
        queries = int(statistics.median(counted)) if counted else rows // chunk + 1
        return (statistics.median(times) if times else None), queries, bool(counted)

    t_small, q_small, m_small = medians(small, small.chunk_rows)
    t_large, q_large, m_large = medians(large, large.chunk_rows)
    if t_small is None or t_large is None or q_small == q_large:
        return {"error": "a probe failed, or both chunk sizes need the same number of queries"}
    return {
        "small_label": small.label,
        "large_label": large.label,
        "small_median_s": t_small,
        "large_median_s": t_large,
        "small_queries": q_small,
        "large_queries": q_large,
        "queries_measured": m_small and m_large,
        "per_query_ms": (t_small - t_large) / (q_small - q_large) * 1000,
    }


def _overhead_jobs(runs: Sequence[JobRun]) -> list[Job]:
    """The overhead probes of a stored run, rebuilt from their labels (``overhead_parquet@50k``)."""
    jobs: dict[str, Job] = {}
    for r in runs:
        if r.label.startswith("overhead_parquet@") and r.label not in jobs:
            size = r.label.split("@", 1)[1]
            chunk = round(float(size[:-1]) * {"k": 1_000, "M": 1_000_000}[size[-1]]) if size[-1] in "kM" else int(size)
            jobs[r.label] = Job(r.label, "provider_parquet", section="overhead", provider=True, chunk_rows=chunk)
    return list(jobs.values())
