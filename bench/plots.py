"""The PNG plots; matplotlib is imported here only, when a plot is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.formats import MIB, _columns, _count, _s
from bench.stats import JobRun, Summary


def _plot_main(path: Path, summaries: Sequence[Summary], meta: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    shown = list(summaries)
    labels = [s.job.label for s in shown]
    colors = ["tab:orange" if s.job.provider else "tab:blue" for s in shown]
    rates = [(s.rows_per_s or 0) / 1e6 for s in shown]
    peaks = [(s.peak_rss_median or 0) / MIB for s in shown]
    grown = [min(peaks[i], (s.work_rss_median or 0) / MIB) for i, s in enumerate(shown)]
    base = [peaks[i] - grown[i] for i in range(len(shown))]
    height = max(3.0, 0.42 * len(shown) + 1.2)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    y = list(range(len(shown)))
    ax1.barh(y, rates, color=colors)
    ax1.set_yticks(y, labels)
    ax1.invert_yaxis()
    ax1.set_xlabel("throughput, million rows/s (median work time; higher is better)")
    for i, s in enumerate(shown):
        text = "FAILED" if not s.ok_runs else f"{rates[i]:.2f}  ({_s(s.work_median)} s)"
        ax1.text(rates[i], i, " " + text, va="center", fontsize=8)
    ax2.barh(y, base, color=colors, alpha=0.35, label="process RSS when the work started")
    ax2.barh(y, grown, left=base, color=colors, label="growth during the work")
    ax2.set_xlabel("peak RSS of the process tree, MiB (median; lower is better)")
    ax2.legend(fontsize=8, loc="lower right")
    for i, s in enumerate(shown):
        ax2.text(peaks[i], i, " " + ("FAILED" if not s.ok_runs else f"{peaks[i]:,.0f}"), va="center", fontsize=8)
    for ax in (ax1, ax2):
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3)
    rows = meta["table"]["rows"]
    fig.suptitle(
        f"{_count(rows)} rows × {_columns(meta['table'])}, {meta['rounds']} round(s) — orange: the provider; "
        f"{meta['machine']['logical_cores']} cores, PostgreSQL {meta.get('server', {}).get('server_version')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_flatness(
    path: Path, summaries: Sequence[Summary], runs: Sequence[JobRun], meta: dict[str, Any]
) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, ax = plt.subplots(figsize=(11, 5))
    for s in summaries:
        run = next((r for r in runs if r.label == s.job.label and r.ok and r.rss_series), None)
        if run is None:
            continue
        # x = 0 where the work starts: the contender exits right after its work, so that is about
        # process time minus work time after spawn. Imports before it show as negative time.
        shift = (run.process_s or 0.0) - (run.work_s or 0.0)
        points = [(t - shift, v / MIB) for t, v in run.rss_series if v]
        ax.plot([t for t, _ in points], [v for _, v in points], label=s.job.label, linewidth=1.2)
    ax.axvline(0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("seconds since the work started (first round; negative: interpreter start and imports)")
    ax.set_ylabel("RSS of the process tree, MiB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Provider memory over time: same chunk size, growing table", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
