"""The committed-window state, without a server."""

from __future__ import annotations

from airflow_provider_cxpg.planning.watermark_state import WatermarkState, spec_for_run


class MemoryStore(dict):
    def set(self, key: str, value: str, description: str) -> None:
        self[key] = value


def test_state_reads_a_dag_runs_own_window_again_and_never_moves_back() -> None:
    kept = WatermarkState("cxpg_watermark.test.t", store=MemoryStore())
    first = {"column": "v", "start": None, "high_watermark": "10", "boundary_keys": [[10]], "end": "10"}
    second = {"column": "v", "start": "10", "high_watermark": "20", "boundary_keys": [[20]], "end": "20"}
    kept.commit(first, "run-1")
    kept.commit(second, "run-2")
    assert spec_for_run(kept, "v", dag_run_id="run-1").recorded == first  # a re-run of run-1
    following = spec_for_run(kept, "v", dag_run_id="run-3")
    assert (following.start, following.start_inclusive, following.start_keys) == ("20", True, ((20,),))
    kept.commit(first, "run-1")  # run-1 re-run and committed again: the next start stays at 20
    assert kept.last_window()["high_watermark"] == "20"


def test_the_chain_of_windows_decides_what_moves_the_next_start_not_the_values_sort_order() -> None:
    """A text watermark sorts by its collation ('B' after 'a' under en_US; before it in Python).

    Values compared as Python strings once kept a newer window from moving the state (its rows read
    again by the next run) and let an older one's re-run move it back.
    """
    kept = WatermarkState("cxpg_watermark.test.text", store=MemoryStore())
    first = {"column": "code", "high_watermark": "a", "end": "a", "sequence": 1}
    kept.commit(first, "run-1")
    after = spec_for_run(kept, "code", dag_run_id="run-2")
    assert after.sequence == 2
    second = {"column": "code", "start": "a", "high_watermark": "B", "end": "B", "sequence": 2}
    kept.commit(second, "run-2")
    assert kept.last_window()["high_watermark"] == "B"  # the newer window moves it ("B" < "a" in Python)
    kept.commit(first, "run-1")  # a re-run of run-1: recorded for its run, the next start stays
    assert kept.last_window()["high_watermark"] == "B"
    assert spec_for_run(kept, "code", dag_run_id="run-3").sequence == 3


def test_windows_recorded_before_sequences_still_compare_by_value() -> None:
    kept = WatermarkState("cxpg_watermark.test.legacy", store=MemoryStore())
    kept.commit({"column": "v", "high_watermark": "20"}, "run-2")
    kept.commit({"column": "v", "high_watermark": "10"}, "run-1")
    assert kept.last_window()["high_watermark"] == "20"
    assert spec_for_run(kept, "v", dag_run_id="run-3").sequence is None


def test_a_re_run_of_a_dag_run_whose_window_is_no_longer_kept_is_refused() -> None:
    """Twelve hourly runs, then the first cleared: its window was no longer kept, it read the window
    after the last one into its own output (replacing its rows) and moved the state on, green."""
    import pytest

    from airflow_provider_cxpg.exceptions import InvalidInputError

    kept = WatermarkState("cxpg_watermark.test.old", store=MemoryStore())
    for hour in range(12):
        window = {"column": "v", "high_watermark": str(hour), "end": str(hour), "sequence": hour + 1}
        kept.commit(window, f"run-{hour}", source="s1")
    assert spec_for_run(kept, "v", dag_run_id="run-5", source="s1").recorded is not None
    with pytest.raises(InvalidInputError, match="no longer keeps"):
        spec_for_run(kept, "v", dag_run_id="run-0", source="s1")
    # Runs that never committed (a manual run, a backfill) go on after the last window, whatever their dates.
    newer = spec_for_run(kept, "v", dag_run_id="manual__2024-05-01", source="s1")
    assert newer.start == "11" and newer.sequence == 13
    # The windows of a source the task no longer reads are dropped too: a re-run of one is refused as well.
    kept.commit({"column": "v", "high_watermark": "100", "end": "100", "sequence": 1}, "run-12", source="other")
    with pytest.raises(InvalidInputError, match="no longer keeps"):
        spec_for_run(kept, "v", dag_run_id="run-7", source="other")
