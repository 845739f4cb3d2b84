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
