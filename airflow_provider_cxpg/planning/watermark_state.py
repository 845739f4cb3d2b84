"""Where an incremental task's next window starts: state the provider keeps itself.

An incremental task must start where its last *successful* run ended, and nowhere else: not at a
sibling map index's end, not at the current run's own end (a retry or a re-run), and not at whichever
earlier run an XCom query happens to return first (on Airflow 3, ``xcom_pull(...,
include_prior_dates=True)`` returns every earlier run and map index, and the current run too, in no
promised order; runs triggered without a logical date do not sort at all). So the provider records
each committed window itself, in one Airflow Variable per task (per map index when mapped)::

    cxpg_watermark.<dag_id>.<task_id>[.<map_index>]  (or ``watermark_state_key``)
    {"format": "cxpg-watermark-state/1",
     "window": {...the last committed window...},          # the next run starts where it ended
     "runs": {"<dag run id>": {...its window...}, ...}}    # a re-run of a DAG run reads its window again

Each window carries ``sequence``, its place in the chain (the window it follows plus one): a window
moves ``window`` only when it comes later in the chain, whatever order the watermark's values sort
in (see ``_advances``).

A task commits its window when it succeeds; the fan-out validator commits the planner's window when
the dataset is complete. A Variable works the same on Airflow 2.11 and 3.x, under ``dag.test()`` and
any executor, and an operator can inspect or reset it in the UI (delete it: the next run is a full
copy). Concurrent runs of one incremental task may read overlapping windows (never lose rows): keep
``max_active_runs=1``, as the example DAGs do.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from airflow_provider_cxpg.exceptions import InvalidInputError
from airflow_provider_cxpg.planning.incremental import WatermarkSpec

__all__ = [
    "AirflowVariables",
    "WatermarkState",
    "default_state_key",
    "describe_window",
    "source_identity",
    "spec_for_run",
    "spec_for_task",
]

FORMAT = "cxpg-watermark-state/1"
#: Windows of this many recent DAG runs are kept, so a re-run of one reads the same window.
_RUNS_KEPT = 10
#: DAG runs whose windows were dropped are remembered (12 hex characters each) this far back.
_FORGOTTEN_KEPT = 5_000


def default_state_key(dag_id: str | None, task_id: str, map_index: int | None = None) -> str:
    key = f"cxpg_watermark.{dag_id or '_'}.{task_id}"
    return f"{key}.{map_index}" if map_index is not None and map_index >= 0 else key


class AirflowVariables:
    """Airflow Variables as the store (through the Task SDK on Airflow 3, the database on Airflow 2)."""

    def get(self, key: str) -> str | None:
        from airflow.providers.common.compat.sdk import Variable

        try:
            value = Variable.get(key, None)  # positional default: Airflow 2 names it default_var
        except KeyError:
            return None
        return None if value is None else str(value)

    def set(self, key: str, value: str, description: str) -> None:
        from airflow.providers.common.compat.sdk import Variable

        Variable.set(key, value, description)


class WatermarkState:
    """The committed windows of one incremental task, in an Airflow Variable.

    :param key: the Variable's key.
    :param store: where it is kept (default: :class:`AirflowVariables`).
    """

    def __init__(self, key: str, store: Any = None) -> None:
        if not key or not isinstance(key, str) or len(key) > 250:
            raise InvalidInputError(
                f"watermark_state_key must be a non-empty string of at most 250 characters: {key!r}"
            )
        self.key = key
        self.store = store if store is not None else AirflowVariables()

    @classmethod
    def for_task(cls, context: Mapping[str, Any], task_id: str, key: str | None = None) -> WatermarkState | None:
        """The state of the task running in ``context`` (None outside a task: nothing to keep).

        A mapped task's map index is always part of the key, a chosen ``key`` too: siblings never
        share one state.
        """
        ti = context.get("ti")
        if ti is None:
            return None
        map_index = getattr(ti, "map_index", None)
        if key:
            return cls(f"{key}.{map_index}" if map_index is not None and map_index >= 0 else key)
        return cls(default_state_key(getattr(ti, "dag_id", None), task_id, map_index))

    # -- reading -----------------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        raw = self.store.get(self.key)
        if raw in (None, ""):
            return {}
        data = json.loads(raw)
        if data.get("format") != FORMAT:
            raise InvalidInputError(
                f"Variable {self.key!r} does not hold cxpg watermark state (format {data.get('format')!r})"
            )
        return data

    def window_of_run(self, dag_run_id: str | None) -> dict[str, Any] | None:
        """The window a DAG run committed (a re-run of that run reads it again), or None."""
        if not dag_run_id:
            return None
        return self.load().get("runs", {}).get(dag_run_id)

    def last_window(self) -> dict[str, Any] | None:
        """The last committed window (the next one starts where it ended), or None before the first."""
        return self.load().get("window")

    # -- writing -----------------------------------------------------------------------------------

    def commit(self, window: Mapping[str, Any], dag_run_id: str | None, source: str | None = None) -> None:
        """Record ``window`` as read, for the next run and for re-runs of ``dag_run_id``.

        A window that ends before the committed one (a re-run of an older DAG run) is recorded for its
        run but does not move the next start back. DAG runs whose windows are no longer kept are
        remembered as such (``forgotten``, a short digest each), so that a re-run of one is refused.
        """
        data = self.load() or {"format": FORMAT, "runs": {}}
        current = data.get("window")
        forgotten: list[str] = list(data.get("forgotten") or [])
        if source is not None and data.get("source") not in (None, source):
            current = None  # another source's windows: this one's replace them
            forgotten += [_digest(r) for r in data.get("runs") or {}]
            data["runs"] = {}
        if current is None or _advances(current, window):
            data["window"] = dict(window)
        if source is not None:
            data["source"] = source
        runs: dict[str, Any] = dict(data.get("runs") or {})
        if dag_run_id:
            runs.pop(dag_run_id, None)
            runs[dag_run_id] = dict(window)
        kept = dict(list(runs.items())[-_RUNS_KEPT:])
        forgotten += [_digest(r) for r in runs if r not in kept]
        if dag_run_id and _digest(dag_run_id) in forgotten:  # committed again: its window is kept once more
            forgotten = [d for d in forgotten if d != _digest(dag_run_id)]
        data["runs"] = kept
        data["forgotten"] = forgotten[-_FORGOTTEN_KEPT:]
        data["updated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.store.set(
            self.key,
            json.dumps(data, default=str),
            "cxpg incremental state: the windows this task has read (delete it to start with a full copy)",
        )


def _advances(current: Mapping[str, Any], window: Mapping[str, Any]) -> bool:
    """Whether ``window`` comes at or after ``current`` in the task's chain of windows.

    By their sequence numbers (a window is the one it follows plus one): a text watermark sorts by
    the column's collation, which Python's string order does not know ('B' < 'a' in Python, not
    under en_US), nor does ``float`` tell large integers apart. Windows recorded before sequences
    existed, and two windows of one place (concurrent runs), compare their high watermarks.
    """
    new_sequence, old_sequence = window.get("sequence"), current.get("sequence")
    if isinstance(new_sequence, int) and isinstance(old_sequence, int) and new_sequence != old_sequence:
        return new_sequence > old_sequence
    new, old = window.get("high_watermark"), current.get("high_watermark")
    if old is None:
        return True
    if new is None:
        return False
    if isinstance(new, (int, float)) and isinstance(old, (int, float)):
        return new >= old
    # Text forms of one column: ISO timestamps and dates order as text; numbers do not, so try them.
    try:
        return float(new) >= float(old)
    except (TypeError, ValueError):
        return str(new) >= str(old)


def source_identity(*, sql: str | None = None, **parts: Any) -> str:
    """What a state's windows are windows *of*: the source as the task names it, and the column.

    A query's text counts with its whitespace collapsed (a reformatted query is the same source).
    """
    import hashlib

    parts["sql"] = " ".join(str(sql).split()) if sql else None
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def spec_for_task(
    context: Any,
    task_id: str,
    column: str,
    *,
    start: Any = None,
    end: Any = None,
    lag: Any = None,
    state_key: str | None = None,
    source: str | None = None,
    log: Any = None,
) -> tuple[WatermarkSpec, WatermarkState | None]:
    """The window a task's run reads, and the state its success moves (None for a one-off window).

    An explicit ``start`` is a one-off window: the state is neither read nor moved.
    """
    if start not in (None, ""):
        return WatermarkSpec(column, start, end, lag, one_off=True), None
    state = WatermarkState.for_task(context, task_id, state_key)
    dag_run = context.get("dag_run")
    spec = spec_for_run(
        state,
        column,
        dag_run_id=getattr(dag_run, "run_id", None),
        end=end,
        lag=lag,
        log=log,
        source=source,
    )
    return spec, state


def spec_for_run(
    state: WatermarkState | None,
    column: str,
    *,
    dag_run_id: str | None,
    end: Any = None,
    lag: Any = None,
    log: Any = None,
    source: str | None = None,
) -> WatermarkSpec:
    """The window a run reads: its own again (a re-run), the one after the last committed, or a first.

    A state kept for another source (the task's table, query, ``where`` or key changed; a mapped
    task's list was reordered) is not continued: the run is a first run, a full copy.

    :raises InvalidInputError: a re-run of a DAG run whose window is no longer kept: the next window
        in its output would replace its rows.
    """
    say = log.info if log is not None else (lambda *a: None)
    if state is None:
        return WatermarkSpec(column, None, end, lag)
    kept = state.load().get("source")
    if source is not None and kept not in (None, source):
        say("Variable %s holds the windows of another source: this run is a first run, a full copy", state.key)
        return WatermarkSpec(column, None, end, lag)
    again = state.window_of_run(dag_run_id)
    if again is not None and again.get("column") == column:
        say("DAG run %s read this window before; reading it again: %s", dag_run_id, describe_window(again))
        return WatermarkSpec.again(again)
    if dag_run_id and _digest(dag_run_id) in (state.load().get("forgotten") or ()):
        raise InvalidInputError(
            f"DAG run {dag_run_id} read a window that Variable {state.key} no longer keeps (the windows of the "
            f"last {_RUNS_KEPT} DAG runs are kept): it cannot read it again, and the next window would put other "
            "rows in place of its own. Give it watermark_start and watermark_end (a one-off window)"
        )
    last = state.last_window()
    if last is None or last.get("column") != column:
        say("no committed window in Variable %s: this first run reads every row", state.key)
        return WatermarkSpec(column, None, end, lag)
    say("continuing after the window committed in Variable %s: %s", state.key, describe_window(last))
    return WatermarkSpec.following(last, end=end, lag=lag)


def _digest(dag_run_id: str) -> str:
    import hashlib

    return hashlib.sha256(dag_run_id.encode("utf-8")).hexdigest()[:12]


def describe_window(window: Mapping[str, Any]) -> str:
    """One line for the task log."""
    bound = "[" if window.get("start_inclusive") else "("
    keys = len(window.get("start_keys") or ())
    skipped = f" (skipping {keys} keys already read there)" if keys else ""
    return (
        f"{window.get('column')} in {bound}{window.get('start')!r}, {window.get('end')!r}]{skipped}, "
        f"next start {window.get('high_watermark')!r}"
    )
