"""The benchmark's targets as a table of checks: a ratio of two contenders' medians against a limit.

Each row names its contenders (``{main}`` is the provider at the first ``--chunk-rows``), the
measure of each side, and the limit; a row whose limit is None is reported without a verdict, and
an optional row is left out when either side was not measured. Adding a target is adding a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import Summary

__all__ = ["TARGETS", "Target", "target_checks"]

_SECONDS = {"work", "work_cpu", "server_cpu"}


@dataclass(frozen=True)
class Target:
    """``numerator``'s measure over ``denominator``'s must be at most ``limit`` (below it, if ``strict``)."""

    name: str
    numerator: str
    denominator: str
    measure: str  # a Summary field without its ``_median`` suffix
    limit: float | None
    target: str
    denominator_measure: str | None = None  # when the two sides are measured differently
    strict: bool = False
    optional: bool = False

    def check(self, by: dict[str, Summary], main: str) -> dict[str, Any] | None:
        name = self.name.format(main=main)
        top, bottom = by.get(self.numerator.format(main=main)), by.get(self.denominator)
        over = self.denominator_measure or self.measure
        a = getattr(top, f"{self.measure}_median", None) if top else None
        b = getattr(bottom, f"{over}_median", None) if bottom else None
        if not a or not b:
            return None if self.optional else _row(name, "not measured", self.target, None)
        ratio = a / b
        ok = None if self.limit is None else (ratio < self.limit if self.strict else ratio <= self.limit)
        return _row(name, _measured(self.measure, over, top, bottom, a, b, ratio), self.target, ok)


def _row(name: str, measured: str, target: str, ok: bool | None) -> dict[str, Any]:
    return {
        "name": name,
        "measured": measured,
        "target": target,
        "result": "n/a" if ok is None else "PASS" if ok else "FAIL",
    }


def _measured(measure: str, over: str, top: Any, bottom: Any, a: float, b: float, ratio: float) -> str:
    if measure in _SECONDS:
        text = f"{a:.2f} s / {b:.2f} s = {ratio:.2f}×"
        lows = getattr(top, f"{measure}_min", None), getattr(bottom, f"{over}_min", None)
        highs = getattr(top, f"{measure}_max", None), getattr(bottom, f"{over}_max", None)
        if None not in lows and None not in highs:  # the machine's noise beside the medians
            text += f" (min–max {lows[0]:.2f}–{highs[0]:.2f} / {lows[1]:.2f}–{highs[1]:.2f})"
        return text
    return f"{a / 2**20:,.0f} MiB / {b / 2**20:,.0f} MiB = {ratio:.2f}"


_VS_SINGLE = "{main} vs cx_single_parquet"
_LOW = "provider_parquet@250k"

TARGETS: tuple[Target, ...] = (
    Target(f"{_VS_SINGLE} (time)", "{main}", "cx_single_parquet", "work", 1.15, "≤ 1.15×"),
    Target(f"{_VS_SINGLE} (time, issue 13)", "{main}", "cx_single_parquet", "work", 0.85, "≤ 0.85×"),
    Target(
        f"{_VS_SINGLE} (client CPU in the work, issue 13)",
        "{main}",
        "cx_single_parquet",
        "work_cpu",
        1.0,
        "≤ 1.00×",
        optional=True,
    ),
    Target(
        f"{_VS_SINGLE} (server CPU, reported)", "{main}", "cx_single_parquet", "server_cpu", None, "—", optional=True
    ),
    Target(
        "{main} vs cx_offset_parquet (time)", "{main}", "cx_offset_parquet", "work", 1.0, "provider faster", strict=True
    ),
    Target(
        f"{_LOW} peak RSS (whole tree) vs cx_single_parquet", _LOW, "cx_single_parquet", "peak_rss", 1 / 3, "≤ 0.33"
    ),
    Target(
        f"{_LOW} worker-only peak RSS vs cx_single_parquet",
        _LOW,
        "cx_single_parquet",
        "descendants_peak",
        1 / 3,
        "≤ 0.33",
        denominator_measure="peak_rss",
    ),
    Target(
        f"{_LOW} worker-only peak RSS vs cx_single_read (the read alone)",
        _LOW,
        "cx_single_read",
        "descendants_peak",
        1 / 3,
        "≤ 0.33",
        denominator_measure="peak_rss",
        optional=True,
    ),
    Target(
        "(supplementary) the same with growth during the work (imports excluded)",
        _LOW,
        "cx_single_parquet",
        "work_rss",
        1 / 3,
        "≤ 0.33",
        optional=True,
    ),
)


def target_checks(summaries: Sequence[Summary], main: str) -> list[dict[str, Any]]:
    """Every target's row for this run; ``main`` is the provider contender the targets are about."""
    by = {s.job.label: s for s in summaries}
    return [row for row in (t.check(by, main) for t in TARGETS) if row is not None]
