"""Number formats shared by the Markdown report and the plots."""

from __future__ import annotations

from typing import Any

MIB = 2**20


def _shape(table: dict[str, Any]) -> str:
    if table.get("dataset") == "pgbench":
        return "4 columns (pgbench_accounts as `pgbench -i` creates it: integer PK, 2 integers, char(84) filler)"
    return "8 columns (bigint PK, int, double, text ~20 chars, timestamptz, numeric(12,2), boolean, uuid)"


def _columns(table: dict[str, Any]) -> str:
    return "4 columns (pgbench_accounts)" if table.get("dataset") == "pgbench" else "8 columns"


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:,.0f}"


def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value / 1e3:.0f} k"


def _count(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return f"{n:,}"


def _secs(value: float) -> str:
    return f"{value:.4f}" if value >= 0.0001 else "<0.0001"
