"""``parallelism=N`` inside one task: N supervised workers on disjoint key ranges, one dataset.

::

    <destination>/_dataset_manifest.json     the ranges, then the totals when every range is complete
    <destination>/range=0000/_manifest.json  one ordinary extraction per range (own worker, own resume)
    <destination>/range=0000/part-000000.parquet ...

The ranges come from :mod:`~airflow_provider_cxpg.planning.key_ranges` and are recorded before any
data moves; a retried task reuses
them, so every range resumes from its own manifest. Each range runs in a thread of this process
driving its own worker (own deadlines, heartbeats, application name and log events with
``worker=i``). When one fails, the others are aborted (their server queries cancelled, their workers
stopped) and the first error is raised. The main thread only waits, so Airflow's
``AirflowTaskTimeout`` and ``KeyboardInterrupt`` reach it and stop everything.

Consistency: by default (``snapshot=True``) every range reads from one exported snapshot, so the
dataset is one point-in-time copy even while rows change (see :mod:`~airflow_provider_cxpg.planning.snapshot`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from typing import Any

from airflow_provider_cxpg.exceptions import (
    CxpgError,
    DestinationConflictError,
    ExtractionAborted,
    InvalidInputError,
    StorageError,
)
from airflow_provider_cxpg.output.destination import Destination
from airflow_provider_cxpg.output.manifest import (
    DATASET_MANIFEST,
    MANIFEST_NAME,
    SUCCESS_MARKER,
    Manifest,
    fingerprint,
    is_range_dir,
    range_dir,
    read_by_readers,
)
from airflow_provider_cxpg.output.verify import output_problems, unlisted_files
from airflow_provider_cxpg.planning.incremental import WatermarkSpec, check_watermark, wal_position
from airflow_provider_cxpg.planning.key_ranges import plan_key_ranges
from airflow_provider_cxpg.planning.plan import CTID
from airflow_provider_cxpg.planning.source_state import relabelled
from airflow_provider_cxpg.run.extraction import Extraction, ExtractResult, new_run_id
from airflow_provider_cxpg.run.options import positive_int

__all__ = [
    "DATASET_MANIFEST",
    "ParallelExtraction",
    "changed_ranges",
    "plan_or_reuse_ranges",
    "range_dir",
    "recorded_window",
    "validate_dataset",
    "window_reference",
]

_FORMAT = "cxpg-dataset/1"


#: What must be equal between the dataset's window and each range's (the keys decide which rows).
_WINDOW_FIELDS = ("column", "start", "start_inclusive", "start_keys", "end", "end_mode", "end_keys", "first_run")


def _same_window(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return all(a.get(f) == b.get(f) for f in _WINDOW_FIELDS)


def validate_dataset(
    destination: Destination,
    ranges: list[dict[str, Any]],
    *,
    window: dict[str, Any] | None = None,
    planned: dict[str, Any] | None = None,
    check_files: bool = True,
) -> dict[str, Any]:
    """Check that the dataset is complete and return its totals.

    Checks that every range's extraction is complete with the planned bounds and ``window``, that the
    ranges tile the key space, that no ``range=NNNN/`` folder outside the plan remains, that each
    manifest lists its chunks 0..n-1, that no file a reader would read lies outside the ranges' files,
    and (with ``check_files``) that every file each manifest lists is there, whole, and its own (see
    :mod:`~airflow_provider_cxpg.output.verify`) and that its folder holds no other. With ``planned``
    (the dataset manifest's record), also that every range read the planned source, ``where`` and
    key, and that all ranges wrote one schema: a mapped range given another table or filter would
    otherwise pass with the wrong rows.

    :raises StorageError: naming every problem found.
    """
    problems: list[str] = []
    partitions: list[dict[str, Any]] = []
    schema: list[dict[str, str]] | None = None
    in_plan = {entry.get("path") or range_dir(entry["index"]) for entry in ranges}
    folders = destination.list_dirs()
    stale = sorted(d for d in folders if is_range_dir(d) and d not in in_plan)
    if stale:
        problems.append(f"folders outside the plan remain: {', '.join(stale)} (an earlier plan's ranges?)")
    foreign = read_by_readers(destination.list_names(), [d for d in folders if not is_range_dir(d)])
    if foreign:
        problems.append(f"{destination.url} holds {', '.join(foreign)}, which no range wrote: readers would read it")
    for position, entry in enumerate(ranges):
        if position and entry.get("lower") != ranges[position - 1].get("upper"):
            problems.append(f"range {position}: lower bound {entry.get('lower')} is not the previous upper bound")
        sub = destination.sub(entry.get("path") or range_dir(entry["index"]))
        manifest = Manifest.load(sub)
        if manifest is None:
            problems.append(f"range {position}: no manifest in {sub.url}")
            continue
        if manifest.status != "complete":
            problems.append(f"range {position}: status {manifest.status!r} in {sub.url}")
        bounds = manifest.bounds or {"lower": None, "upper": None}
        if [bounds.get("lower"), bounds.get("upper")] != [entry.get("lower"), entry.get("upper")]:
            problems.append(f"range {position}: manifest bounds {bounds} differ from the plan")
        if not _same_window(window, manifest.window):
            problems.append(
                f"range {position}: read the window {_window_text(manifest.window)}, the plan fixed "
                f"{_window_text(window)}"
            )
        if planned is not None:
            problems.extend(f"range {position}: {p}" for p in _source_problems(manifest, planned))
        if schema is None:
            schema = manifest.schema
        elif manifest.schema != schema:
            problems.append(f"range {position}: its schema {_schema_text(manifest.schema)} is not range 0's")
        # Keyset chunks are numbered 0..n-1; page ranges skip the numbers of ranges without a live row.
        numbered = bool(manifest.key_columns)
        misplaced = next((n for n, chunk in enumerate(manifest.chunks) if numbered and chunk.index != n), None)
        if misplaced is not None:
            problems.append(
                f"range {position}: its manifest lists chunk {manifest.chunks[misplaced].index} where chunk "
                f"{misplaced} belongs (a chunk is missing)"
            )
        if check_files:
            problems.extend(f"range {position}: {p}" for p in output_problems(sub, manifest))
            extra = unlisted_files(sub, manifest)
            if extra:
                problems.append(f"range {position}: {sub.url} holds {', '.join(extra)}, which its manifest omits")
        partitions.append(
            {
                "index": position,
                "path": sub.url,
                "lower": entry.get("lower"),
                "upper": entry.get("upper"),
                "rows": manifest.rows,
                "bytes": manifest.bytes,
                "files": [f"{range_dir(position)}/{f}" for f in manifest.files],
                "run_id": manifest.run_id,
            }
        )
    first_lower = ranges[0].get("lower") if ranges else None
    if ranges and (first_lower not in (None, [0]) or ranges[-1].get("upper") is not None):  # [0]: page ranges
        problems.append("the ranges do not cover the whole key space (open first lower / last upper bound)")
    if problems:
        raise StorageError("the dataset is not complete: " + "; ".join(problems), problems=problems)
    return {
        "partitions": partitions,
        "rows": sum(p["rows"] for p in partitions),
        "bytes": sum(p["bytes"] for p in partitions),
        "files": [f for p in partitions for f in p["files"]],
    }


def _source_problems(manifest: Manifest, planned: dict[str, Any]) -> list[str]:
    """How a range's extraction differs from the plan in what decides its rows (source, where, key)."""
    problems = []
    sid, got_sid = planned.get("source_id"), manifest.source_id
    if sid and got_sid and got_sid != sid:
        problems.append(f"it read {got_sid}, the plan is of {sid}")
    where = (planned.get("source") or {}).get("where") or None
    got_where = (manifest.source or {}).get("where") or None
    if got_where != where:
        problems.append(
            f"it read where={got_where!r}, the plan's is where={where!r} (pass the planner's to every range)"
        )
    problems.extend(
        f"it read {change} since the plan (read the whole dataset again: planner and ranges)"
        for change in relabelled(planned.get("enum_labels") or [], manifest.enum_labels or [])
    )
    relation, got_relation = planned.get("relation"), manifest.relation
    if relation and got_relation and not _same_relation(relation, got_relation):
        problems.append(
            f"it read relation {got_relation['oid']} of database {got_relation['database']!r} (cluster "
            f"{got_relation['cluster']}), the plan is of relation {relation['oid']} of database "
            f"{relation['database']!r} (cluster {relation['cluster']}): another table of that name"
        )
    keys = planned.get("key_columns")
    got_keys = manifest.key_columns or ["ctid"]  # page ranges record no key column
    if keys and got_keys != keys:
        problems.append(f"it paged by {got_keys}, the ranges are of {keys}")
    return problems


def _same_relation(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """One relation: the same OID in the same database, of one cluster where both clusters are known
    (a role that may not read the control data records none; a physical replica shares its primary's)."""
    clusters = (a.get("cluster"), b.get("cluster"))
    return (
        a.get("oid") == b.get("oid")
        and a.get("database") == b.get("database")
        and (None in clusters or clusters[0] == clusters[1])
    )


def _schema_text(schema: list[dict[str, Any]]) -> str:
    return "(" + ", ".join(f"{c.get('name')} {c.get('pg_type')}" for c in schema) + ")"


def _window_text(window: dict[str, Any] | None) -> str:
    if window is None:
        return "none (no watermark)"
    return f"{window.get('column')} from {window.get('start')!r} to {window.get('end')!r} ({window.get('end_mode')})"


def changed_ranges(destination: Destination, partitions: list[dict[str, Any]]) -> list[str]:
    """The ranges whose extraction is no longer the one :func:`validate_dataset` checked.

    A cleared range may start again while the validator works: checked once more after the dataset
    is marked complete, so that the marker is withdrawn at once rather than left over a range
    being rewritten.
    """
    changed = []
    for partition in partitions:
        sub = Destination(partition["path"], destination.storage_options, timeout=destination.timeout)
        manifest = Manifest.load(sub)
        if manifest is None or manifest.run_id != partition["run_id"] or manifest.status != "complete":
            changed.append(f"range {partition['index']} ({sub.url})")
    return changed


def window_reference(record: dict[str, Any], dataset_url: str) -> dict[str, Any]:
    """What the planner hands each mapped range instead of the window itself.

    The window's edge keys can be many (every row tied at a coarse end value): copied into every
    range's arguments they would multiply in XCom. The dataset manifest is the one place it lives.
    """
    window = record["window"]
    return {"column": window["column"], "dataset": dataset_url, "run_id": record["run_id"]}


def recorded_window(destination: Destination, reference: dict[str, Any]) -> dict[str, Any]:
    """The window a :func:`window_reference` names, read from the dataset manifest it points to.

    :raises InvalidInputError: no dataset manifest there, no window in it, or another plan's (the
        planner ran again since this range's arguments were made).
    """
    record = destination.read_json(DATASET_MANIFEST)
    window = (record or {}).get("window")
    if record is None or window is None:
        raise InvalidInputError(
            f"{destination.url} holds no planned window ({DATASET_MANIFEST}): the planner's dataset is gone",
            destination=destination.url,
        )
    if reference.get("run_id") not in (None, record.get("run_id")):
        raise InvalidInputError(
            f"{destination.url} was planned again (plan {record.get('run_id')}, this range's arguments are from "
            f"{reference.get('run_id')}): re-run the planner's downstream tasks",
            destination=destination.url,
        )
    if window.get("column") != reference.get("column"):
        raise InvalidInputError(
            f"{destination.url}'s window is for {window.get('column')!r}, not {reference.get('column')!r}",
            destination=destination.url,
        )
    return dict(window)


def plan_or_reuse_ranges(
    coordinator: Extraction, destination: Destination, partitions: int, method: str, dag_run_id: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ranges recorded by an unfinished run of the same extraction, or new ones (then recorded).

    Reusing them is what lets every range resume from its own manifest after a retry. A complete
    dataset planned by the same DAG run (``dag_run_id``: its planner cleared and run again) is
    reused as it is: planned again, its ranges were removed while its window stayed committed, and
    the rows were in no dataset once the next run started after that window. A new plan
    replaces an earlier dataset of the same source (its ``range=NNNN/`` folders are removed first, so
    none of them outlives it); another source's dataset, or a single extraction's files, are not
    taken over.

    :raises DestinationConflictError: the destination holds another source's output.
    """
    plan = coordinator.build_plan()
    if coordinator.watermark is not None:
        check_watermark(plan, coordinator.watermark)  # bad input: refused before anything is written
    sid = coordinator.source_id(plan)
    watermark = coordinator.watermark.identity() if coordinator.watermark is not None else None
    parts = {
        "source": plan.source.describe(),
        "key": list(plan.key_names),
        "n": partitions,
        "method": method,
        "watermark": watermark,  # another requested window is another dataset, never the recorded one
    }
    if plan.table is not None:  # the relation the name resolved to (see ``Extraction.fingerprint``)
        parts["relation"] = coordinator.relation_parts(plan)
    order = plan.key_order()
    if order is not None:  # ranges planned in one key order do not tile another
        parts["key_order"] = order
    fp = fingerprint(parts)
    # The same plan whatever window a re-run asks for (a re-run asks for the recorded one again).
    layout = fingerprint({k: v for k, v in parts.items() if k != "watermark"})
    existing = destination.read_json(DATASET_MANIFEST)
    renamed = relabelled((existing or {}).get("enum_labels") or [], coordinator.enum_labels() or [])
    if renamed:  # its ranges would read some values under the old labels and some under the new
        note = "enum values were renamed since the plan: planning again; " + "; ".join(renamed)
        coordinator.log.emit("job.plan", note=note)
    if existing and existing.get("fingerprint") == fp and existing.get("status") == "running" and not renamed:
        coordinator.log.emit("job.resume", note="reusing the recorded key ranges", ranges=len(existing["ranges"]))
        return existing["ranges"], existing
    spec = coordinator.watermark
    if (
        existing
        and existing.get("status") == "complete"
        and dag_run_id is not None
        and existing.get("dag_run_id") == dag_run_id
        and existing.get("layout") == layout
        # the same window: the state's record of this DAG run's own (never a one-off or a first run)
        and (spec is None or (spec.recorded is not None and _same_window(dict(spec.recorded), existing.get("window"))))
    ):
        coordinator.log.emit(
            "job.plan", note=f"this DAG run's dataset is complete: reusing its plan ({len(existing['ranges'])} ranges)"
        )
        return existing["ranges"], existing
    if existing and existing.get("source_id") not in (None, sid) and existing.get("owner") != coordinator.owner:
        raise DestinationConflictError(
            f"{destination.url} holds a dataset of another source ({existing.get('source_id')}): not replacing it; "
            "choose another destination or remove it first",
            destination=destination.url,
        )
    single = Manifest.load(destination)
    if single is not None and not single.same_source(sid, coordinator.owner):
        raise DestinationConflictError(
            f"{destination.url} holds a single extraction of another source ({single.source_id}): not replacing it",
            destination=destination.url,
        )
    folders, names = destination.list_dirs(), destination.list_names()
    replaced = [*single.files, *single.stray_files(names)] if single is not None else []  # its own, all of them
    foreign = read_by_readers([n for n in names if n not in replaced], [d for d in folders if not is_range_dir(d)])
    if foreign:  # refused now, before anything is removed: the validator would refuse the dataset at the end
        raise DestinationConflictError(
            f"{destination.url} holds {', '.join(foreign)}, which no range would write and every dataset reader "
            "would read: remove them or choose another destination",
            destination=destination.url,
        )
    if single is not None:  # the same source's single extraction: the dataset replaces it
        if SUCCESS_MARKER in destination.list_entries():  # first: never a marker over removed files
            destination.remove(SUCCESS_MARKER)
        for name in [*replaced, MANIFEST_NAME]:
            destination.remove(name)
    with coordinator.control_connection("partition") as conn:
        ranges, used, seconds = plan_key_ranges(conn, plan, partitions, method)
        # Every range is read on a server that has replayed this far (Extraction.build_plan): one read on
        # a standby behind the planner's server missed rows the plan counted on, green.
        planned_at = wal_position(conn)
    coordinator.log.emit(
        "job.plan", note=f"{len(ranges)} key ranges by {used} in {seconds:.3f}s", partition_method=used, seconds=seconds
    )
    destination.ensure()
    if SUCCESS_MARKER in destination.list_entries():
        destination.remove(SUCCESS_MARKER)  # a new plan: the dataset is not complete any more
    for name in destination.list_dirs():
        if is_range_dir(name):  # an earlier plan's ranges: none may outlive the new plan
            destination.remove_tree(name)
    record = {
        "format": _FORMAT,
        "status": "running",
        "fingerprint": fp,
        "layout": layout,
        "dag_run_id": dag_run_id,
        "source_id": sid,
        "owner": coordinator.owner,
        "run_id": coordinator.run_id,
        "source": plan.source.describe(),
        "relation": coordinator.relation,
        "enum_labels": coordinator.enum_labels(),
        "wal_position": planned_at,
        "key_columns": list(plan.key_names) or ["ctid"],
        "partition_method": used,
        "planning_seconds": round(seconds, 4),
        "ranges": [dict(r.to_json(), path=range_dir(r.index)) for r in ranges],
    }
    destination.write_json(DATASET_MANIFEST, record)
    return record["ranges"], record


class ParallelExtraction:
    """Run one extraction per key range, ``parallelism`` at a time, into sub-prefixes of ``destination``.

    :param hook: the :class:`~airflow_provider_cxpg.hooks.connectorx.ConnectorXPostgresHook`.
    :param parallelism: workers (and ranges).
    :param partition_method: see :mod:`~airflow_provider_cxpg.planning.key_ranges` (``auto`` default).
    :param snapshot: all ranges read one exported snapshot (default True).
    :param kwargs: everything else :meth:`ConnectorXPostgresHook.prepare_extraction` takes.
    """

    def __init__(
        self,
        hook: Any,
        *,
        parallelism: int,
        destination: Any,
        partition_method: str = "auto",
        snapshot: bool = True,
        lower: Any = None,
        upper: Any = None,
        **kwargs: Any,
    ) -> None:
        parallelism = positive_int("parallelism", parallelism)
        if lower is not None or upper is not None:
            raise InvalidInputError("parallelism > 1 plans its own key ranges: do not combine it with lower/upper_key")
        self.hook = hook
        self.parallelism = parallelism
        self.partition_method = partition_method
        self.snapshot = snapshot
        self.kwargs = kwargs
        self.run_id = kwargs.pop("run_id", None) or new_run_id()
        self.coordinator: Extraction = hook.prepare_extraction(destination=destination, run_id=self.run_id, **kwargs)
        if not snapshot and self.coordinator.spec.key_columns == (CTID,):
            raise InvalidInputError(
                "page ranges (key_columns=['ctid']) in parallel need snapshot=True: without one snapshot an "
                "UPDATE moves a row between ranges (read twice or missed)"
            )
        self.destination = self.coordinator.destination  # with the run's storage_timeout
        self.children: list[Extraction] = []
        self._aborted: str | None = None
        # Re-entrant: abort() runs from on_kill's signal handler, maybe inside run()'s own `with`.
        self._lock = threading.RLock()

    def abort(self, reason: str) -> None:
        """Stop every range now (``on_kill``)."""
        self._aborted = reason
        self.coordinator.abort(reason)  # cancels a range-planning query waiting on a lock
        with self._lock:
            children = list(self.children)
        for child in children:
            with contextlib.suppress(Exception):
                child.abort(reason)

    def _ranges(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return plan_or_reuse_ranges(self.coordinator, self.destination, self.parallelism, self.partition_method)

    def run(self) -> ExtractResult:
        started = time.monotonic()
        job_timeout = self.coordinator.settings.job_timeout
        self.coordinator.job_deadline = started + job_timeout if job_timeout else None  # the planning's statements
        with contextlib.ExitStack() as stack:
            snapshot_id: str | None = None
            if self.snapshot:
                holder = stack.enter_context(self.coordinator.exported_snapshot())
                snapshot_id = holder.id
                self.coordinator.snapshot_id = snapshot_id
            ranges, record = self._ranges()
            window: dict[str, Any] | None = None
            if self.coordinator.watermark is not None:  # one window for every range, fixed once
                self.coordinator.windowed(self.coordinator.build_plan(), record.get("window"))
                assert self.coordinator.window is not None
                window = self.coordinator.window.to_json()
                record["window"] = window
                self.destination.write_json(DATASET_MANIFEST, record)
            results = self._run_ranges(ranges, snapshot_id, window)
        # Each range checked its own files before it reported success; here: completeness and tiling.
        totals = validate_dataset(self.destination, ranges, window=window, planned=record, check_files=False)
        record.update(
            status="complete",
            rows=totals["rows"],
            bytes=totals["bytes"],
            files=totals["files"],
            partitions=totals["partitions"],
        )
        self.destination.write_json(DATASET_MANIFEST, record)
        self.destination.write_marker(SUCCESS_MARKER)
        resolved = self.coordinator.window
        result = ExtractResult(
            run_id=self.run_id,
            destination=self.destination.url,
            rows=totals["rows"],
            chunks=sum(r.chunks for r in results),
            files=[f for r in results for f in r.files],
            bytes=totals["bytes"],
            first_key=next((r.first_key for r in results if r.first_key is not None), None),
            last_key=next((r.last_key for r in reversed(results) if r.last_key is not None), None),
            seconds=time.monotonic() - started,
            manifest=self.destination.child_url(DATASET_MANIFEST),
            worker_restarts=sum(r.worker_restarts for r in results),
            window=window,
            window_summary=resolved.summary() if resolved else None,
            high_watermark=resolved.high_watermark if resolved else None,
            extra={
                "parallelism": self.parallelism,
                "partitions": len(ranges),
                "partition_method": record.get("partition_method"),
            },
        )
        self.coordinator.log.emit(
            "job.done",
            rows=result.rows,
            chunks=result.chunks,
            bytes=result.bytes,
            seconds=result.seconds,
            destination=self.destination.url,
            partitions=len(ranges),
        )
        return result

    def _run_ranges(
        self, ranges: list[dict[str, Any]], snapshot_id: str | None, window: dict[str, Any] | None
    ) -> list[ExtractResult]:
        kwargs = {k: v for k, v in self.kwargs.items() if k not in {"watermark", "snapshot"}}
        if window is not None:  # every range reads exactly the coordinator's window (and records it)
            kwargs["watermark"] = WatermarkSpec.again(window)
        with self._lock:
            for entry in ranges:
                self.children.append(
                    self.hook.prepare_extraction(
                        destination=self.destination.sub(entry["path"]).url,
                        lower=entry["lower"],
                        upper=entry["upper"],
                        snapshot=snapshot_id or False,
                        run_id=f"{self.run_id}-{entry['index']}",
                        worker_index=entry["index"],
                        **kwargs,
                    )
                )
        futures = _run_on_daemon_threads([child.run for child in self.children], self.parallelism)
        settings = self.coordinator.settings
        # After an abort each range stops its worker (cancel, then kill) and its storage waits end at
        # once; past that, a range still running holds nothing the task must wait for.
        stopping = settings.cancel_grace + settings.kill_grace + settings.deadline_grace + 5.0
        try:
            while True:
                done, pending = concurrent.futures.wait(
                    futures, timeout=0.2, return_when=concurrent.futures.FIRST_EXCEPTION
                )
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
                if not pending:
                    return [f.result() for f in futures]
                if self._aborted:
                    raise ExtractionAborted.because(self._aborted)
        except BaseException as exc:
            self.abort(f"{type(exc).__name__} in another range" if isinstance(exc, CxpgError) else type(exc).__name__)
            concurrent.futures.wait(futures, timeout=stopping)
            raise
        finally:
            for future in futures:
                future.cancel()  # a range not started yet never starts


def _run_on_daemon_threads(calls: list[Any], threads: int) -> list[concurrent.futures.Future[Any]]:
    """Run ``calls`` on at most ``threads`` daemon threads; one future each.

    Not a ``ThreadPoolExecutor``: the interpreter joins its threads at exit, so a range still waiting
    on a store that stopped answering (``storage_timeout=None``: forever) held the process after the
    task had failed.
    """
    futures: list[concurrent.futures.Future[Any]] = [concurrent.futures.Future() for _ in calls]
    work = list(zip(calls, futures, strict=True))
    lock = threading.Lock()

    def runner() -> None:
        while True:
            with lock:
                if not work:
                    return
                call, future = work.pop(0)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001  handed to the waiting caller
                future.set_exception(exc)

    for index in range(max(1, min(threads, len(calls)))):
        threading.Thread(target=runner, name=f"cxpg-range_{index}", daemon=True).start()
    return futures
