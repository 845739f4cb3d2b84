"""Benchmark orchestrator: ``python -m bench [--rows 1M] [--rounds 3] [--dsn URI] [--flatness | --planner]``.

Starts (or connects to) PostgreSQL, loads ``public.bench_<rows>`` once, then runs every contender as a
fresh process (``python -m bench.contender``) in each of ``--rounds`` rounds, in a rotated order per
round, while sampling the memory of each contender's whole process tree; then times the key-range
planner in one more fresh process (``python -m bench.planner``; ``--no-planner`` skips it,
``--planner`` runs only it). Writes ``bench/results/<output>.json``, ``.md`` and ``.png`` and prints
the Markdown plus the target checks.

Everything started here is stopped on exit, on Ctrl+C (SIGINT), SIGTERM and on a contender failure:
the contender's process tree is killed by pid (every process the sampler saw), leftover server
backends of the benchmark are terminated, the embedded server is stopped and the work directory
removed. A failing or hanging contender is recorded in the results; the run goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `import bench` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlparse, urlunparse

import psutil
import psycopg

from airflow_provider_cxpg.demo.embedded_postgres import interrupt_on_termination
from bench.data import TableInfo, machine_info, package_state, prepare_table, server_info
from bench.matrix import ALL_CONTENDERS, main_jobs, parse_count, parse_counts, rounds_order, short
from bench.report import write_flatness, write_main, write_planner
from bench.sampler import TreeSampler, tree_cpu_seconds, tree_pids
from bench.stats import Job, JobRun, compute_overhead, summarise
from bench.targets import target_checks

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
APP_NAME = "cxpg-bench"


# -- server and environment ------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """Where the data lives: a libpq URI (with application_name) and its parts."""

    uri: str
    host: str
    port: int
    user: str
    password: str
    dbname: str
    kind: str
    postmaster_pid: int | None = None

    @classmethod
    def from_uri(cls, uri: str, kind: str) -> Server:
        parsed = urlparse(uri)
        query = dict(parse_qsl(parsed.query))
        query.setdefault("application_name", APP_NAME)
        return cls(
            uri=urlunparse(parsed._replace(query=urlencode(query))),
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 5432,
            user=unquote(parsed.username or "postgres"),
            password=unquote(parsed.password or ""),
            dbname=unquote(parsed.path.lstrip("/")) or "postgres",
            kind=kind,
        )

    @property
    def admin_uri(self) -> str:
        parsed = urlparse(self.uri)
        query = dict(parse_qsl(parsed.query))
        query["application_name"] = "bench-admin"
        return urlunparse(parsed._replace(query=urlencode(query)))

    def airflow_conn_json(self) -> str:
        return json.dumps(
            {
                "conn_type": "postgres",
                "host": self.host,
                "port": self.port,
                "login": self.user,
                "password": self.password,
                "schema": self.dbname,
                "extra": {"application_name": APP_NAME},
            }
        )


def contender_env(server: Server, airflow_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "BENCH_PG_URI": server.uri,
            "AIRFLOW_CONN_BENCH_PG": server.airflow_conn_json(),
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
    )
    return env


# -- running contenders ----------------------------------------------------------------------------


def local_postmaster_pid(dsn: str) -> int | None:
    """The server's postmaster pid when it runs on this machine and shows its data directory, else None."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
        with open(os.path.join(str(row[0]) if row else "", "postmaster.pid")) as handle:
            pid = int(handle.readline())
        with open(f"/proc/{pid}/comm") as handle:
            return pid if handle.read().strip() in {"postgres", "postmaster"} else None
    except (OSError, ValueError, psycopg.Error):
        return None


class Runner:
    """Runs jobs one at a time and can always stop the one running now."""

    def __init__(
        self,
        *,
        server: Server,
        workdir: Path,
        env: dict[str, str],
        timeout: float,
        sample_interval: float,
        keep_series: bool,
    ) -> None:
        self.server = server
        self.workdir = workdir
        self.env = env
        self.timeout = timeout
        self.sample_interval = sample_interval
        self.keep_series = keep_series
        self.runs: list[JobRun] = []
        self._counter = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._sampler: TreeSampler | None = None

    def run(self, job: Job, round_no: int, table: TableInfo) -> JobRun:
        self._counter += 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", job.label)
        run_dir = self.workdir / f"{self._counter:03d}-{slug}"
        out = run_dir / "out"
        result_path = run_dir / "result.json"
        run_dir.mkdir(parents=True)
        cmd = [
            sys.executable,
            "-m",
            "bench.contender",
            job.contender,
            "--table",
            table.name,
            "--rows",
            str(table.rows),
            "--out",
            str(out),
            "--result",
            str(result_path),
            "--key",
            table.key,
            *job.args,
        ]
        env = dict(self.env, TMPDIR=str(run_dir))  # the provider's iter_chunks spool lands here too
        record = JobRun(label=job.label, round=round_no, ok=False)
        print(f"  [{round_no}] {job.label:<28}", end=" ", flush=True)
        with (run_dir / "stdout.txt").open("wb") as out_f, (run_dir / "stderr.txt").open("wb") as err_f:
            usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            server0 = tree_cpu_seconds(self.server.postmaster_pid) if self.server.postmaster_pid else None
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                env=env,
                cwd=str(REPO_ROOT),
                start_new_session=True,  # Ctrl+C reaches only us; we stop the contender ourselves
            )
            self._proc = proc
            sampler = TreeSampler(proc.pid, self.sample_interval, keep_series=self.keep_series).start()
            self._sampler = sampler
            try:
                code: int | None = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                code = None
            record.process_s = round(time.perf_counter() - t0, 4)
            if code is None:
                self.kill_current()
            usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU of the contender and every descendant it reaped (the worker): the client side's cost.
            record.cpu_s = round(
                (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
                3,
            )
            if server0 is not None and self.server.postmaster_pid:
                # Every backend the contender opened has exited and been reaped by the postmaster
                # (its CPU is in the postmaster's cutime) or still runs (its own): counted once.
                record.server_cpu_s = round(tree_cpu_seconds(self.server.postmaster_pid) - server0, 3)
            sample = sampler.stop()
            self._proc = self._sampler = None
        record.peak_rss = sample.peak_rss
        record.root_peak_rss = sample.root_peak_rss
        record.descendants_peak_rss = sample.descendants_peak_rss
        record.peak_processes = sample.peak_processes
        record.rss_samples = sample.samples
        record.rss_series = sample.series
        record.leftover_processes = _kill_all(sample.seen.values())
        record.leftover_backends = self.sweep_backends()
        stderr_tail = _tail(run_dir / "stderr.txt")
        if code is None:
            record.error = f"timed out after {self.timeout:.0f}s (killed); stderr: {stderr_tail}"
        elif code != 0 or not result_path.exists():
            record.error = f"exit status {code}; stderr: {stderr_tail}"
        else:
            data = json.loads(result_path.read_text())
            record.work_s = data["work_s"]
            record.work_cpu_s = data.get("work_cpu_s")
            record.setup_s = data["setup_s"]
            record.rss_at_start = data["rss_at_start_bytes"]
            record.rows = data["rows"]
            record.arrow_bytes = data["arrow_bytes"]
            record.files = data["files"]
            record.file_bytes = data["file_bytes"]
            record.maxrss_self = data["maxrss_self_bytes"]
            record.maxrss_children = data["maxrss_children_bytes"]
            record.details = data["details"]
            if record.rows is not None and record.rows != table.rows:
                record.error = f"read {record.rows} rows, the table holds {table.rows}"
            elif record.details.get("id_sum_ok") is False:
                record.error = "iter_chunks: the sum of ids is wrong (rows missing or repeated)"
            else:
                record.ok = True
        if record.ok:
            print(
                f"work {record.work_s:7.2f}s  process {record.process_s:6.2f}s  "
                f"peak {record.peak_rss / 2**20 if record.peak_rss else 0:7.0f} MiB",
                flush=True,
            )
        else:
            print(f"FAILED: {(record.error or '')[:300]}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        self.runs.append(record)
        return record

    def run_planner(self, table: TableInfo, partitions: Sequence[int], repeats: int) -> dict[str, Any]:
        """Run ``python -m bench.planner`` on ``table`` in a fresh process; return its result or an error."""
        self._counter += 1
        run_dir = self.workdir / f"{self._counter:03d}-planner"
        run_dir.mkdir(parents=True)
        result_path = run_dir / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.planner",
            "--table",
            table.qualified,
            "--partitions",
            ",".join(str(n) for n in partitions),
            "--repeats",
            str(repeats),
            "--result",
            str(result_path),
        ]
        t0 = time.perf_counter()
        with (run_dir / "stdout.txt").open("wb") as out_f, (run_dir / "stderr.txt").open("wb") as err_f:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                env=self.env,
                cwd=str(REPO_ROOT),
                start_new_session=True,
            )
            self._proc = proc
            try:
                code: int | None = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                code = None
                self.kill_current()
            self._proc = None
        leftover = self.sweep_backends()
        if code == 0 and result_path.exists():
            result: dict[str, Any] = json.loads(result_path.read_text())
        elif code is None:
            result = {"error": f"timed out after {self.timeout:.0f}s (killed); stderr: {_tail(run_dir / 'stderr.txt')}"}
        else:
            result = {"error": f"exit status {code}; stderr: {_tail(run_dir / 'stderr.txt')}"}
        result["process_s"] = round(time.perf_counter() - t0, 3)
        result["leftover_backends"] = leftover
        shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def kill_current(self) -> None:
        """Kill the running contender and every descendant (by pid; a worker has its own session)."""
        proc, sampler = self._proc, self._sampler
        if proc is None:
            return
        victims: list[psutil.Process] = []
        if sampler is not None:
            victims.extend(sampler.result.seen.values())
        for pid in tree_pids(proc.pid):
            with contextlib.suppress(psutil.Error):
                victims.append(psutil.Process(pid))
        _kill_all(victims)
        with contextlib.suppress(Exception):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)

    def sweep_backends(self, wait: float = 3.0) -> int:
        """Terminate server backends the benchmark's clients left behind; return how many there were."""
        deadline = time.monotonic() + wait
        try:
            with psycopg.connect(self.server.admin_uri, autocommit=True, connect_timeout=5) as conn:
                while True:
                    pids = [
                        r[0]
                        for r in conn.execute(
                            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s "
                            "AND pid <> pg_backend_pid()",
                            (APP_NAME + "%",),
                        ).fetchall()
                    ]
                    if not pids or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)  # a client that just exited: its backend is on its way out
                for pid in pids:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                return len(pids)
        except psycopg.Error as exc:
            print(f"  (could not check server backends: {exc})", flush=True)
            return 0


def _without_password(argument: str) -> str:
    """A ``--dsn`` URI as the report may show it: the password replaced by ``***``."""
    return re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", argument)


def _kill_all(procs: Any) -> int:
    """SIGKILL every process still alive (``psutil.Process`` checks the pid was not reused)."""
    killed = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                killed += 1
    return killed


def _tail(path: Path, limit: int = 600) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-4:])[-limit:] or "(empty)"
    return "(none)"


# -- worker start-up -------------------------------------------------------------------------------


def measure_worker_startup(runs: int) -> dict[str, Any]:
    """Spawn ``python -P -m airflow_provider_cxpg.worker`` as the supervisor does; time it to Ready."""
    from airflow_provider_cxpg.conninfo import PostgresEndpoint
    from airflow_provider_cxpg.supervisor.session import worker_environment
    from airflow_provider_cxpg.worker.protocol import Configure, FrameReader, FrameWriter, Ready, Shutdown
    from airflow_provider_cxpg.worker.reaper import process_identity

    env = worker_environment()
    cmd = [sys.executable, "-P", "-m", "airflow_provider_cxpg.worker"]
    times: list[float] = []
    imports: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        watchdog = threading.Timer(60.0, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None and proc.stdin is not None
            # As WorkerSession.spawn(): Configure goes at once, with a run name, so the worker forks
            # its reaper as in a run (it only watches this process; Shutdown below ends it).
            channel = FrameWriter(proc.stdin.fileno(), owns_fd=False)
            channel.send(
                Configure(
                    endpoint=PostgresEndpoint(host="127.0.0.1"),
                    run_application_name=f"{APP_NAME}-startup",
                    task_pid=os.getpid(),
                    task_started=process_identity(os.getpid()),
                )
            )
            message = FrameReader(cast("BinaryIO", proc.stdout)).receive()
            elapsed = time.perf_counter() - t0
            if not isinstance(message, Ready):
                raise RuntimeError(f"the worker's first frame is {message!r}, not Ready")
            times.append(elapsed)
            imports.append(message.startup_seconds)
            channel.send(Shutdown())  # the worker stops its reaper and exits
            proc.stdin.close()
            proc.wait(timeout=10)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stdin):
                with contextlib.suppress(Exception):
                    if stream is not None:
                        stream.close()
    return {
        "runs": runs,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "import_median_s": statistics.median(imports),
        "all_s": [round(t, 4) for t in times],
    }


# -- the two modes ---------------------------------------------------------------------------------


def measure_planner(args: argparse.Namespace, runner: Runner, table: TableInfo) -> dict[str, Any]:
    """The planner section: ``plan_key_ranges`` per method and partition count (see :mod:`bench.planner`)."""
    print(
        f"planner cost: histogram, sample, ntile, ctid x partitions {','.join(map(str, args.planner_partitions))}, "
        f"median of {args.planner_repeats}...",
        flush=True,
    )
    result = runner.run_planner(table, args.planner_partitions, args.planner_repeats)
    if "error" in result:
        print(f"  FAILED: {result['error'][:300]}", flush=True)
        return result
    for e in result.get("entries", []):
        if "error" in e:
            print(f"  {e['method']:<9} {e['partitions']:>3}: FAILED {e['error'][:200]}", flush=True)
        else:
            print(
                f"  {e['method']:<9} {e['partitions']:>3}: {e['seconds_median'] * 1000:8.1f} ms  "
                f"rows/range {e['rows_min']:,}–{e['rows_max']:,}",
                flush=True,
            )
    return result


def _median(values: Sequence[float | int | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def run_main(args: argparse.Namespace, server: Server, runner: Runner, meta: dict[str, Any]) -> int:
    rows = args.rows
    table = prepare_table(server.admin_uri, rows, jobs=args.load_jobs, reload=args.reload, dataset=args.dataset)
    meta["table"] = table.to_json()
    jobs = main_jobs(args, rows)
    startup = None
    if args.startup_runs > 0:
        print(f"worker start-up: {args.startup_runs} spawns...", flush=True)
        try:
            startup = measure_worker_startup(args.startup_runs)
            print(f"  spawn -> Ready median {startup['median_s'] * 1000:.0f} ms", flush=True)
        except Exception as exc:
            startup = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  FAILED: {startup['error']}", flush=True)
    for round_no, order in rounds_order(jobs, args.rounds):
        print(f"round {round_no}/{args.rounds}", flush=True)
        for job in order:
            runner.run(job, round_no, table)
    planner = None if args.no_planner else measure_planner(args, runner, table)

    arrow_sizes = [
        r.arrow_bytes
        for r in runner.runs
        if r.ok and r.arrow_bytes is not None and r.label in {"cx_single_read", "cx_single_parquet"}
    ]
    if arrow_sizes:
        data_bytes, basis = int(statistics.median(arrow_sizes)), "Arrow size of the table as connectorx returns it"
    else:
        data_bytes, basis = table.heap_bytes, "the table's heap size on disk (pg_table_size)"
    meta["arrow_bytes"] = int(statistics.median(arrow_sizes)) if arrow_sizes else None
    meta["mb_basis"] = f"{data_bytes / 1e6:,.0f} MB ({basis})"
    reference = jobs[0].label if jobs and jobs[0].provider else None
    meta["reference_label"] = reference
    main_summaries = [summarise(j, runner.runs, rows=rows, data_bytes=data_bytes) for j in jobs if j.section == "main"]
    ref = next((s for s in main_summaries if s.job.label == reference), None)
    for s in main_summaries:
        if ref and ref.work_median and s.work_median:
            s.ratio_to_provider = s.work_median / ref.work_median

    in_provider = [
        float(r.details["worker_ready_s"])
        for r in runner.runs
        if r.ok and r.details.get("workers") == 1 and r.details.get("worker_ready_s")
    ]
    if startup and "error" not in startup and in_provider:
        startup["in_provider_median_s"] = statistics.median(in_provider)
        startup["in_provider_runs"] = len(in_provider)
    meta["airflow_setup_s"] = _median(
        [r.setup_s for r in runner.runs if r.ok and r.label.split("@")[0] in {"provider_parquet", "airflow_get_df"}]
    )
    overhead = compute_overhead(jobs, runner.runs, rows) if not args.no_overhead else None
    checks = target_checks(main_summaries, f"provider_parquet@{short(args.chunk_rows[0])}")
    meta["duration_s"] = time.monotonic() - meta.pop("_t0")
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["package_at_end"] = package_state(str(REPO_ROOT))
    stem = RESULTS_DIR / args.output
    paths = write_main(
        stem,
        meta=meta,
        summaries=main_summaries,
        runs=runner.runs,
        startup=startup if startup and "error" not in startup else None,
        overhead=overhead,
        checks=checks,
        planner=planner,
    )
    print()
    print(paths[1].read_text())
    print("Target checks (informational, not asserted):")
    for c in checks:
        print(f"  {c['result']:<4}  {c['name']}: {c['measured']} (target {c['target']})")
    print("\nwritten: " + ", ".join(str(p) for p in paths if p))
    planner_ok = planner is None or ("error" not in planner and not any("error" in e for e in planner["entries"]))
    return 0 if all(r.ok for r in runner.runs) and planner_ok else 1


def run_planner_only(args: argparse.Namespace, server: Server, runner: Runner, meta: dict[str, Any]) -> int:
    """``--planner``: load (or reuse) the table and measure only the planner section."""
    table = prepare_table(server.admin_uri, args.rows, jobs=args.load_jobs, reload=args.reload, dataset=args.dataset)
    meta["table"] = table.to_json()
    planner = measure_planner(args, runner, table)
    meta["duration_s"] = time.monotonic() - meta.pop("_t0")
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["package_at_end"] = package_state(str(REPO_ROOT))
    paths = write_planner(RESULTS_DIR / args.output, meta=meta, planner=planner)
    print()
    print(paths[1].read_text())
    print("written: " + ", ".join(str(p) for p in paths))
    return 0 if "error" not in planner and not any("error" in e for e in planner["entries"]) else 1


def _flatness_ratio(cells: list[dict[str, Any]], key: str) -> float | None:
    """The largest table's median peak over the smallest's (None when either is missing)."""
    first, last = cells[0].get(key), cells[-1].get(key)
    return last / first if first and last else None


def _flat(ratio: float | None) -> str:
    return "n/a" if ratio is None else "PASS" if ratio <= 1.15 else "FAIL"


def run_flatness(args: argparse.Namespace, server: Server, runner: Runner, meta: dict[str, Any]) -> int:
    sizes = sorted(set(args.flatness_rows))
    tables = {
        n: prepare_table(server.admin_uri, n, jobs=args.load_jobs, reload=args.reload, dataset=args.dataset)
        for n in sizes
    }
    meta["flatness_rows"] = sizes
    meta["tables"] = {str(n): t.to_json() for n, t in tables.items()}
    paths = ["provider_parquet", "provider_iter"] if not args.contenders else args.contenders.split(",")
    jobs: list[tuple[Job, TableInfo]] = []
    for path in paths:
        for chunk in args.chunk_rows:
            for n in sizes:
                job = Job(
                    f"{path}@{short(chunk)} on {short(n)}",
                    path,
                    ("--chunk-rows", str(chunk)),
                    sink="Parquet zstd" if path == "provider_parquet" else "Arrow in caller",
                    section="flatness",
                    provider=True,
                    table_rows=n,
                    chunk_rows=chunk,
                )
                jobs.append((job, tables[n]))
    by_label = {job.label: (job, table) for job, table in jobs}
    for round_no, order in rounds_order([j for j, _ in jobs], args.rounds):
        print(f"round {round_no}/{args.rounds}", flush=True)
        for job in order:
            runner.run(job, round_no, by_label[job.label][1])
    summaries = [summarise(j, runner.runs, rows=t.rows, data_bytes=None) for j, t in jobs]
    by_summary = {s.job.label: s for s in summaries}
    pairs: list[dict[str, Any]] = []
    for path in paths:
        for chunk in args.chunk_rows:
            cells = []
            for n in sizes:
                s = by_summary[f"{path}@{short(chunk)} on {short(n)}"]
                cells.append(
                    {
                        "rows": n,
                        "peak_rss_median": s.peak_rss_median,
                        "work_rss_median": s.work_rss_median,
                        "work_median": s.work_median,
                        "worker_peak_rss_median": s.descendants_peak_median,
                    }
                )
            # The tree (parent with Airflow + worker) and the worker alone: issue 13's target is the
            # worker's, and the parent's constant ~170 MiB would dilute its growth.
            ratio = _flatness_ratio(cells, "peak_rss_median")
            worker_ratio = _flatness_ratio(cells, "worker_peak_rss_median")
            pairs.append(
                {
                    "path": path,
                    "chunk_rows": chunk,
                    "cells": cells,
                    "ratio": ratio,
                    "result": _flat(ratio),
                    "worker_ratio": worker_ratio,
                    "worker_result": _flat(worker_ratio),
                }
            )
    meta["duration_s"] = time.monotonic() - meta.pop("_t0")
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["package_at_end"] = package_state(str(REPO_ROOT))
    written = write_flatness(RESULTS_DIR / args.output, meta=meta, pairs=pairs, summaries=summaries, runs=runner.runs)
    print()
    print(written[1].read_text())
    print("Flatness checks (informational, not asserted):")
    for p in pairs:
        text = " vs ".join(
            f"{short(c['rows'])} {c['peak_rss_median'] / 2**20:,.0f} MiB" if c["peak_rss_median"] else "—"
            for c in p["cells"]
        )
        print(f"  {p['result']:<4}  {p['path']}@{short(p['chunk_rows'])}: {text} (ratio {p['ratio'] or 0:.2f}, ≤ 1.15)")
        worker = " vs ".join(
            f"{short(c['rows'])} {peak / 2**20:,.0f} MiB" if (peak := c.get("worker_peak_rss_median")) else "—"
            for c in p["cells"]
        )
        print(
            f"  {p['worker_result']:<4}  {p['path']}@{short(p['chunk_rows'])}, worker alone: {worker} "
            f"(ratio {p['worker_ratio'] or 0:.2f}, ≤ 1.15)"
        )
    print("\nwritten: " + ", ".join(str(p) for p in written if p))
    return 0 if all(r.ok for r in runner.runs) else 1


# -- entry point -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the connectorx PostgreSQL provider against other ways to read a table.",
    )
    p.add_argument("--rows", type=parse_count, default=1_000_000, help="table rows: 1M (default), 5M, 20M or a number")
    p.add_argument(
        "--dataset",
        choices=("bench", "pgbench"),
        default="bench",
        help="bench: the 8-column bench table (default); pgbench: pgbench_accounts as pgbench -i creates it",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds; every contender runs once per round (default 3)")
    p.add_argument("--dsn", help="use this PostgreSQL (postgresql://user:pw@host:port/db) instead of an embedded one")
    p.add_argument(
        "--chunk-rows",
        type=parse_counts,
        default=[500_000, 250_000],
        help="provider chunk sizes; the first is the reference (default 500k,250k)",
    )
    p.add_argument("--contenders", help=f"comma list to run only these (of: {', '.join(ALL_CONTENDERS)})")
    p.add_argument("--skip", help="comma list of contenders to leave out")
    p.add_argument("--flatness", action="store_true", help="only measure the provider's peak RSS at two table sizes")
    p.add_argument(
        "--parallelism",
        type=parse_counts,
        default=[2, 4],
        help="worker counts of the provider_parallel contenders, at the first --chunk-rows (default 2,4)",
    )
    p.add_argument("--planner", action="store_true", help="only measure the key-range planner's cost")
    p.add_argument("--no-planner", action="store_true", help="leave the planner section out of the main run")
    p.add_argument(
        "--planner-partitions", type=parse_counts, default=[4, 16], help="partition counts to plan (default 4,16)"
    )
    p.add_argument("--planner-repeats", type=int, default=3, help="timed plans per method and count (default 3)")
    p.add_argument("--flatness-rows", type=parse_counts, default=[1_000_000, 5_000_000], help="default 1M,5M")
    p.add_argument("--startup-runs", type=int, default=10, help="worker spawn->Ready measurements (0: skip)")
    p.add_argument(
        "--overhead-chunks",
        type=parse_counts,
        default=[50_000, 1_000_000],
        help="two chunk sizes whose time difference gives the per-chunk overhead (default 50k,1M)",
    )
    p.add_argument("--no-overhead", action="store_true", help="skip the per-chunk overhead probes")
    p.add_argument("--offset-page-rows", type=parse_count, default=1_000_000, help="OFFSET/LIMIT page (default 1M)")
    p.add_argument("--stream-batch", type=parse_count, default=100_000, help="arrow_stream batch_size (default 100k)")
    p.add_argument("--max-pandas-rows", type=parse_count, default=5_000_000, help="skip get_df above this (5M)")
    p.add_argument("--timeout", type=float, help="seconds per contender run (default 120 + 90 per million rows)")
    p.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling interval (default 20 ms)")
    p.add_argument("--load-jobs", type=int, default=os.cpu_count() or 2, help="connections loading the table")
    p.add_argument("--reload", action="store_true", help="recreate the table even if a complete one exists")
    p.add_argument(
        "--output", help="results file stem in bench/results (default latest / latest-flatness / latest-planner)"
    )
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.flatness and args.planner:
        raise SystemExit("--flatness and --planner are separate modes: run them one after the other")
    default_output = "latest-flatness" if args.flatness else "latest-planner" if args.planner else "latest"
    args.output = args.output or default_output
    largest = max(args.flatness_rows) if args.flatness else args.rows
    timeout = args.timeout or 120 + 90 * largest / 1e6
    interrupt_on_termination()

    workdir = Path(tempfile.mkdtemp(prefix="cxpg-bench-", dir=args.workdir))
    airflow_home = workdir / "airflow-home"
    airflow_home.mkdir()
    embedded: Any = None
    runner: Runner | None = None
    code = 1
    meta: dict[str, Any] = {
        "_t0": time.monotonic(),
        "started_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench "
        + " ".join(shlex.quote(_without_password(a)) for a in (argv if argv is not None else sys.argv[1:])),
        "rounds": args.rounds,
        "sample_interval_ms": args.sample_ms,
        "machine": machine_info(),
        "package": package_state(str(REPO_ROOT)),
    }
    try:
        if args.dsn:
            server = Server.from_uri(args.dsn, "given by --dsn")
        else:
            from airflow_provider_cxpg.demo.embedded_postgres import EmbeddedPostgres

            print("starting an embedded PostgreSQL...", flush=True)
            embedded = EmbeddedPostgres().start()
            server = Server.from_uri(embedded.dsn(), "embedded, loopback TCP")
        server = dataclasses.replace(server, postmaster_pid=local_postmaster_pid(server.admin_uri))
        meta["server_kind"] = server.kind
        meta["server"] = server_info(server.admin_uri)
        print(f"PostgreSQL {meta['server']['server_version']} at {server.host}:{server.port}", flush=True)
        runner = Runner(
            server=server,
            workdir=workdir,
            env=contender_env(server, airflow_home),
            timeout=timeout,
            sample_interval=args.sample_ms / 1000,
            keep_series=args.flatness,
        )
        if args.flatness:
            code = run_flatness(args, server, runner, meta)
        elif args.planner:
            code = run_planner_only(args, server, runner, meta)
        else:
            code = run_main(args, server, runner, meta)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", flush=True)
        code = 130
    finally:
        # A second Ctrl+C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if runner is not None:
            runner.kill_current()
            with contextlib.suppress(Exception):
                runner.sweep_backends(wait=0.5)
        if embedded is not None:
            print("stopping the embedded PostgreSQL...", flush=True)
            embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
