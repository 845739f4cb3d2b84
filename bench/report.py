"""The Markdown report and the JSON file of a run (statistics in stats.py, plots in plots.py); re-rendering."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.formats import MIB, _count, _mib, _rate, _s, _secs, _shape
from bench.plots import _plot_flatness, _plot_main
from bench.stats import Job, JobRun, Summary, _overhead_jobs, compute_overhead, summarise

__all__ = ["rerender", "write_flatness", "write_main", "write_planner"]


# -- formatting ------------------------------------------------------------------------------------


def _machine_md(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    v = m["versions"]
    server = meta.get("server", {})
    lines = [
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu_model']} — {m['logical_cores']} logical cores ({m['usable_cores']} usable) |",
        f"| RAM | {m['ram_bytes'] / 2**30:.1f} GiB |",
        f"| OS / Python | {m['platform']} / {m['python']} |",
        f"| PostgreSQL | {server.get('server_version')} ({meta.get('server_kind')}; "
        + ", ".join(f"{k}={val}" for k, val in sorted(server.get("settings", {}).items()))
        + ") |",
        f"| connectorx / pyarrow | {v.get('connectorx')} / {v.get('pyarrow')} |",
        f"| provider / Airflow / postgres provider | {v.get('airflow-provider-cxpg')} / {v.get('apache-airflow')} / "
        f"{v.get('apache-airflow-providers-postgres')} |",
        f"| psycopg / ADBC / pandas | {v.get('psycopg')} / {v.get('adbc-driver-postgresql')} / {v.get('pandas')} |",
        _package_row(meta),
        f"| load average at start / end | {' '.join(str(x) for x in m['load_average_at_start'])} / "
        f"{' '.join(str(x) for x in meta.get('load_average_at_end', []))} |",
    ]
    return lines


def _package_row(meta: dict[str, Any]) -> str:
    if "package" not in meta:
        return "| provider source | not recorded |"
    pkg = meta["package"] or {}
    if not pkg.get("commit"):
        return "| provider source | unknown (not a git checkout) |"
    dirty = pkg.get("uncommitted") or []
    state = f"{len(dirty)} uncommitted file(s) in the package ({', '.join(dirty)})" if dirty else "clean"
    end = meta.get("package_at_end")
    if end is not None and any(end.get(k) != pkg.get(k) for k in ("commit", "uncommitted", "diff_sha256")):
        end_dirty = end.get("uncommitted") or []
        state += (
            f"; **the package CHANGED during the run** (at the end: git {end.get('commit')}, "
            f"{len(end_dirty)} uncommitted file(s)): runs before and after the change are mixed"
        )
    return f"| provider source | git {pkg['commit']} ({pkg.get('subject') or ''}); {state} |"


def _results_md(summaries: Sequence[Summary], basis: str) -> list[str]:
    lines = [
        "| contender | output | work s median (min–max) | process s | CPU s | work CPU s (min–max) | server CPU s "
        "| rows/s | MB/s | peak RSS MiB median (max) | worker peak MiB | growth MiB | × provider | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        if s.ok_runs:
            work = f"{_s(s.work_median)} ({_s(s.work_min)}–{_s(s.work_max)})"
            status = "ok" if s.ok else f"{s.runs - s.ok_runs}/{s.runs} FAILED: {_first_error(s)}"
        else:
            work = "—"
            status = f"FAILED: {_first_error(s)}" if s.runs else "not run"
        if s.notes:
            status += "; " + "; ".join(s.notes)
        label = f"**{s.job.label}**" if s.job.provider else s.job.label
        lines.append(
            f"| {label} | {s.job.sink} | {work} | {_s(s.process_median)} | {_s(s.cpu_median)} | "
            f"{_s(s.work_cpu_median)} ({_s(s.work_cpu_min)}–{_s(s.work_cpu_max)}) | {_s(s.server_cpu_median)} | "
            f"{_rate(s.rows_per_s)} | {_s(s.mb_per_s, 0)} | {_mib(s.peak_rss_median)} ({_mib(s.peak_rss_max)}) | "
            f"{_mib(s.descendants_peak_median)} | {_mib(s.work_rss_median)} | {_s(s.ratio_to_provider)} | {status} |"
        )
    lines.append("")
    lines.append(f"MB/s = {basis}, divided by the median work time (MB = 10⁶ bytes).")
    return lines


def _first_error(s: Summary) -> str:
    """The first failure, shortened to what matters: its cause and the exception's last line."""
    if not s.errors:
        return "?"
    error = s.errors[0]
    if "stderr:" in error:
        head, tail = error.split("stderr:", 1)
        error = f"{head.strip().rstrip(';')}: {tail.split(' | ')[-1].strip()}"
    return error.replace("|", "/").replace("\n", " ")[:160]


def _range(values: Sequence[int | None]) -> str:
    clean = [v for v in values if v is not None]
    return f"{min(clean):,}–{max(clean):,}" if clean else "—"


def _scale_out_md(summaries: Sequence[Summary], runs: Sequence[JobRun], reference: str | None) -> list[str]:
    """One worker (the reference row) vs ``parallelism=N``: time, speed-up, CPU, memory, planning."""
    parallel = [s for s in summaries if s.job.contender == "provider_parallel"]
    if not parallel:
        return []
    ref = next((s for s in summaries if s.job.label == reference), None)
    rows = [s for s in [ref, *parallel] if s is not None]
    lines = [
        "## Scale out: one worker vs N workers",
        "",
        "The same table to Parquet at the same chunk size: the reference row is one worker "
        "(`ConnectorXPostgresHook.extract`, no snapshot: its default); the others are "
        "`PostgresExtractOperator(parallelism=N).execute({})` with the **defaults kept**: "
        '`partition_method="auto"` (histogram bounds here) and **`snapshot=True`** — the parent exports a '
        "snapshot and holds its transaction open for the run, and every worker reads from it (one more "
        "connection; a consistent point-in-time copy). *planning s*: the `job.plan` key-range planning inside "
        "the run (median); *rows/range*: rows per range in the dataset manifest (all rounds). "
        "*worker(s) peak*: the summed RSS of all workers at their peak. Every process — the server's backends, "
        "the N workers and the parent — shares this machine's cores.",
        "",
        "| workers | contender | work s median (min–max) | speed-up vs 1 | CPU s | peak RSS MiB (tree) "
        "| worker(s) peak MiB | planning s | method | rows/range min–max | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        mine = [r for r in runs if r.label == s.job.label and r.ok]
        workers = int(s.job.args[s.job.args.index("--parallelism") + 1]) if "--parallelism" in s.job.args else 1
        speed = ref.work_median / s.work_median if ref and ref.work_median and s.work_median else None
        planning = [r.details.get("planning_s") for r in mine if r.details.get("planning_s") is not None]
        methods = sorted({str(r.details["partition_method"]) for r in mine if r.details.get("partition_method")})
        sizes = [n for r in mine for n in (r.details.get("range_rows") or [])]
        work = f"{_s(s.work_median)} ({_s(s.work_min)}–{_s(s.work_max)})" if s.ok_runs else "—"
        status = "ok" if s.ok else f"{s.runs - s.ok_runs}/{s.runs} FAILED: {_first_error(s)}" if s.runs else "not run"
        lines.append(
            f"| {workers} | {s.job.label} | {work} | {_s(speed)}× | {_s(s.cpu_median)} | {_mib(s.peak_rss_median)} | "
            f"{_mib(s.descendants_peak_median)} | {_s(statistics.median(planning), 3) if planning else '—'} | "
            f"{', '.join(methods) or '—'} | {_range(sizes) if workers > 1 else 'whole table'} | {status} |"
        )
    lines.append("")
    return lines


def _planner_md(planner: dict[str, Any] | None, heading: str = "##") -> list[str]:
    """The planner's own cost: ``plan_key_ranges`` per method and partition count."""
    if not planner:
        return []
    lines = [f"{heading} Planner cost", ""]
    if "error" in planner:
        return [*lines, f"FAILED: {planner['error']}", ""]
    build = planner.get("build_plan_s", {})
    lines += [
        "`airflow_provider_cxpg.planning.key_ranges.plan_key_ranges(conn, plan, partitions, method)` "
        f"on `{planner['table']}`, "
        f"median of {planner['repeats']} calls each, in a fresh process over one autocommit connection (what "
        "`parallelism=N` and `PostgresPartitionPlanOperator` run before any data moves). `histogram`, `sample` and "
        '`ntile` plan the primary key; `ctid` plans the same table with `key_columns=["ctid"]` (heap page ranges). '
        "*rows/range*: the fewest and most rows in one range, counted afterwards with one `count(*)` per range "
        "(`plan.range_condition(lower, upper)`, page bounds for `ctid`; not timed); for `sample`, whose "
        "ranges differ per call, over every call's ranges. *max/min*: their ratio (1.00 = equal ranges). "
        "Building the plan itself (`build_plan`, catalog queries, paid once per run whatever the method): "
        + ", ".join(f"{k} plan {v * 1000:.1f} ms" for k, v in build.items())
        + ".",
        "",
        "| method | partitions | seconds (median) | min–max of 3 | ranges | rows/range min–max | max/min |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in planner.get("entries", []):
        if "error" in e:
            lines.append(f"| {e['method']} | {e['partitions']} | FAILED: {e['error'][:160]} | | | | |")
            continue
        times = e.get("seconds_all") or []
        spread = e["rows_max"] / e["rows_min"] if e.get("rows_min") else None
        counts = sorted(set(e.get("ranges") or []))
        lines.append(
            f"| {e['method']} | {e['partitions']} | {_secs(e['seconds_median'])} | "
            f"{_secs(min(times))}–{_secs(max(times))} | {'/'.join(map(str, counts))} | "
            f"{_range([e.get('rows_min'), e.get('rows_max')])} | {_s(spread)} |"
        )
    lines.append("")
    return lines


def _commits_md(summaries: Sequence[Summary], runs: Sequence[JobRun]) -> list[str]:
    """The table formats' commit per run: the commit alone, from the provider's own clock."""
    rows = []
    for summary in summaries:
        mine = [r for r in runs if r.label == summary.job.label and r.details.get("commit_seconds") is not None]
        if not mine:
            continue
        seconds = sorted(float(r.details["commit_seconds"]) for r in mine)
        median = statistics.median(seconds)
        share = f"{median / summary.work_median * 100:.1f} %" if summary.work_median else "—"
        rows.append(
            f"| {summary.job.label} | {median:.2f} ({seconds[0]:.2f}–{seconds[-1]:.2f}) | {share} | "
            f"{_s(summary.work_median)} |"
        )
    if not rows:
        return []
    return [
        "## Table commits",
        "",
        "The commit of a run to its table (after every chunk is staged and checked), as the provider times it; "
        "median (min–max) over the runs, and its share of the run's work time.",
        "",
        "| contender | commit s | share of work | work s |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def write_main(
    path_stem: Path,
    *,
    meta: dict[str, Any],
    summaries: Sequence[Summary],
    runs: Sequence[JobRun],
    startup: dict[str, Any] | None,
    overhead: dict[str, Any] | None,
    checks: Sequence[dict[str, Any]],
    planner: dict[str, Any] | None = None,
) -> tuple[Path, Path, Path | None]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``; return their paths (png None on failure)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = path_stem.with_suffix(".json")
    md_path = path_stem.with_suffix(".md")
    png_path = path_stem.with_suffix(".png")
    payload = {
        "meta": meta,
        "summaries": [s.to_json() for s in summaries],
        "runs": [asdict(r) for r in runs],
        "worker_startup": startup,
        "per_chunk_overhead": overhead,
        "checks": list(checks),
        "planner": planner,
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    table = meta["table"]
    lines = [
        f"# connectorx-postgres provider benchmark — {_count(table['rows'])} rows",
        "",
        f"Run {meta['started_at']} ({meta['duration_s']:.0f} s), {meta['rounds']} round(s), contenders alternated; "
        f"each measurement is a fresh process. Command: `{meta['command']}`",
        "",
        "## Machine",
        "",
        *_machine_md(meta),
        "",
        "## Data",
        "",
        f"`{table['qualified']}`: {table['rows']:,} rows × {_shape(table)}; "
        f"heap {table['heap_bytes'] / MIB:,.0f} MiB on disk "
        f"({table['total_bytes'] / MIB:,.0f} MiB with the index); Arrow size as connectorx returns it "
        f"{_mib(meta.get('arrow_bytes'))} MiB.",
        "",
        "## Results",
        "",
        "*work s*: from just before the first query to the last byte handled, in the contender's process "
        "(imports excluded; the provider's planning queries and worker spawn included). *process s*: spawn to "
        "exit of the contender process (adds interpreter start and imports; anything importing Airflow pays "
        f"{meta.get('airflow_setup_s') or 0:.1f} s of imports). *peak RSS*: highest sum of RSS over the contender "
        f"process and all its descendants, sampled every {meta['sample_interval_ms']:.0f} ms. *growth*: that peak "
        "minus the contender's own RSS when the work started (interpreter and imports; Airflow alone is a few "
        "hundred MiB), i.e. the memory the work itself added, worker process included. *worker peak*: the peak "
        "of the contender's descendants alone — the provider's worker (summed over all workers for "
        "`provider_parallel*`), without the parent that imports Airflow; — where the contender has no child "
        "process. *CPU s*: user + system CPU "
        "of the contender process and its worker over the whole process (imports included; the server's CPU is "
        "not). *work CPU s*: the same from just before the first query to the end of the work (the client's "
        "cost of the work: parent + every worker it spawned then, a worker's imports included). *server CPU s*: "
        "the PostgreSQL server's processes over the contender's run (every backend, the postmaster's reaped "
        "children, background processes; — when the server is not local). *× provider*: median work "
        "time divided by that of "
        f"`{meta['reference_label']}`. Bold rows are the provider.",
        "",
        *_results_md(summaries, meta["mb_basis"]),
        "",
        *_scale_out_md(summaries, runs, meta.get("reference_label")),
        *_commits_md(summaries, runs),
        *_planner_md(planner),
    ]
    if startup:
        lines += [
            "## Worker start-up",
            "",
            f"`python -P -m airflow_provider_cxpg.worker` with the worker's environment, spawn to its first frame "
            f"(Ready) on the channel, {startup['runs']} runs: median **{startup['median_s'] * 1000:.0f} ms** "
            f"(min {startup['min_s'] * 1000:.0f}, max {startup['max_s'] * 1000:.0f}); of which the worker's own "
            f"import time (as it reports it) median {startup['import_median_s'] * 1000:.0f} ms.",
        ]
        if startup.get("in_provider_median_s") is not None:
            lines.append(
                f"Inside the provider runs (spawned by `WorkerSession.start()` from a process with Airflow loaded, "
                f"after its server check), start to Ready took a median of "
                f"**{startup['in_provider_median_s'] * 1000:.0f} ms** over {startup['in_provider_runs']} runs."
            )
        lines.append("")
    if overhead:
        lines += ["## Per-chunk overhead", ""]
        if overhead.get("per_query_ms") is not None:
            lines += [
                f"`{overhead['small_label']}` median {overhead['small_median_s']:.2f} s ({overhead['small_queries']} "
                f"queries) vs `{overhead['large_label']}` median {overhead['large_median_s']:.2f} s "
                f"({overhead['large_queries']} queries): **{overhead['per_query_ms']:.1f} ms per extra chunk** "
                "(the time difference over the difference in keyset queries, "
                + (
                    "as counted in the provider's query log"
                    if overhead.get("queries_measured")
                    else "taken as ⌊N/c⌋+1 for N rows at chunk size c"
                )
                + "). Smaller chunks also overlap more of the reading with the writing (`read_ahead`), which "
                "the larger probe cannot do when one chunk holds the whole table; so the figure can come out "
                "negative on a small table.",
            ]
        else:
            lines.append(f"not computed: {overhead.get('error')}")
        lines.append("")
    if checks:
        lines += ["## Target checks", "", "| check | measured | target | result |", "|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['name']} | {c['measured']} | {c['target']} | {c['result']} |")
        lines.append("")
    md_path.write_text("\n".join(lines).rstrip("\n") + "\n")
    png = _plot_main(png_path, summaries, meta)
    return json_path, md_path, png


def write_planner(path_stem: Path, *, meta: dict[str, Any], planner: dict[str, Any]) -> tuple[Path, Path]:
    """Write the ``--planner`` report (``<stem>.json`` and ``<stem>.md``)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = path_stem.with_suffix(".json")
    md_path = path_stem.with_suffix(".md")
    json_path.write_text(json.dumps({"meta": meta, "planner": planner}, indent=2, default=str) + "\n")
    table = meta["table"]
    lines = [
        f"# Key-range planner cost — {_count(table['rows'])} rows",
        "",
        f"Run {meta['started_at']} ({meta['duration_s']:.0f} s). Command: `{meta['command']}`",
        "",
        "## Machine",
        "",
        *_machine_md(meta),
        "",
        *_planner_md(planner),
    ]
    md_path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return json_path, md_path


def write_flatness(
    path_stem: Path,
    *,
    meta: dict[str, Any],
    pairs: Sequence[dict[str, Any]],
    summaries: Sequence[Summary],
    runs: Sequence[JobRun],
) -> tuple[Path, Path, Path | None]:
    """Write the ``--flatness`` report: peak RSS per path and chunk size at each table size."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = path_stem.with_suffix(".json")
    md_path = path_stem.with_suffix(".md")
    png_path = path_stem.with_suffix(".png")
    payload = {
        "meta": meta,
        "pairs": list(pairs),
        "summaries": [s.to_json() for s in summaries],
        "runs": [asdict(r) for r in runs],
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    sizes = meta["flatness_rows"]
    lines = [
        "# Memory flatness of the provider",
        "",
        f"Run {meta['started_at']} ({meta['duration_s']:.0f} s), {meta['rounds']} round(s). Peak RSS of the "
        f"contender's process tree (contender + worker), sampled every {meta['sample_interval_ms']:.0f} ms, "
        "median over rounds; the same chunk size on tables of "
        + " and ".join(_count(n) for n in sizes)
        + " rows. Flat means the larger table's peak is within 15 % of the smaller's, for the tree and for the "
        "worker alone (its descendants: worker + reaper, without the parent's Airflow). *growth*: the peak minus the "
        "contender's RSS when the work started (Airflow and pyarrow imported), i.e. what the extraction added.",
        "",
        "## Machine",
        "",
        *_machine_md(meta),
        "",
        "## Peak RSS",
        "",
        "| path | chunk rows | "
        + " | ".join(f"{_count(n)}: peak MiB (growth; work s)" for n in sizes)
        + " | ratio | flat (≤ 1.15) | worker alone: "
        + " / ".join(f"{_count(n)} MiB" for n in sizes)
        + " | worker ratio | worker flat | runs |",
        "|---|---|" + "---|" * len(sizes) + "---|---|---|---|---|---|",
    ]
    for p in pairs:
        cells = [
            f"{_mib(c['peak_rss_median'])} ({_mib(c.get('work_rss_median'))}; {_s(c['work_median'])} s)"
            for c in p["cells"]
        ]
        mine = [
            s
            for s in summaries
            if s.job.contender == p["path"] and s.job.chunk_rows == p["chunk_rows"] and s.job.table_rows in sizes
        ]
        failed = [s for s in mine if not s.ok]
        status = (
            "all ok"
            if not failed
            else "; ".join(
                f"{_count(s.job.table_rows)}: {s.runs - s.ok_runs}/{s.runs} FAILED ({_first_error(s)[:100]})"
                for s in failed
            )
        )
        worker = " / ".join(_mib(c.get("worker_peak_rss_median")) for c in p["cells"])
        lines.append(
            f"| {p['path']} | {p['chunk_rows']:,} | "
            + " | ".join(cells)
            + f" | {_s(p['ratio'])} | {p['result']} | {worker} | {_s(p.get('worker_ratio'))}"
            + f" | {p.get('worker_result', 'n/a')} | {status} |"
        )
    lines += [
        "",
        "Medians are over the successful runs only; a FAILED run is listed with the first line of its error.",
        "",
    ]
    md_path.write_text("\n".join(lines).rstrip("\n") + "\n")
    png = _plot_flatness(png_path, summaries, runs, meta)
    return json_path, md_path, png


# -- re-rendering ----------------------------------------------------------------------------------


def rerender(json_path: Path) -> tuple[Path, ...]:
    """Rewrite the Markdown and PNG next to a results JSON from its raw runs (no measurement)."""
    data = json.loads(json_path.read_text())
    meta: dict[str, Any] = data["meta"]
    if "runs" not in data and "planner" in data:
        return write_planner(json_path.with_suffix(""), meta=meta, planner=data["planner"])
    runs = [JobRun(**{**r, "rss_series": [tuple(x) for x in r.get("rss_series", [])]}) for r in data["runs"]]
    jobs = [Job(**{**s["job"], "args": tuple(s["job"]["args"])}) for s in data["summaries"]]
    stem = json_path.with_suffix("")
    if "pairs" in data:
        summaries = [summarise(j, runs, rows=j.table_rows, data_bytes=None) for j in jobs]
        return write_flatness(stem, meta=meta, pairs=data["pairs"], summaries=summaries, runs=runs)
    rows = int(meta["table"]["rows"])
    data_bytes = meta.get("arrow_bytes") or meta["table"]["heap_bytes"]
    summaries = [summarise(j, runs, rows=rows, data_bytes=data_bytes) for j in jobs]
    ref = next((s for s in summaries if s.job.label == meta.get("reference_label")), None)
    for s in summaries:
        if ref and ref.work_median and s.work_median:
            s.ratio_to_provider = s.work_median / ref.work_median
    overhead = data.get("per_chunk_overhead")
    if overhead is not None:
        overhead = compute_overhead(_overhead_jobs(runs), runs, rows)
    return write_main(
        stem,
        meta=meta,
        summaries=summaries,
        runs=runs,
        startup=data.get("worker_startup"),
        overhead=overhead,
        checks=data.get("checks", []),
        planner=data.get("planner"),
    )


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:] or [str(Path(__file__).resolve().parent / "results" / "latest.json")]:
        print("rewritten:", ", ".join(str(p) for p in rerender(Path(arg)) if p))
