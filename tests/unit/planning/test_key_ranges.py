"""Key-range bounds without a server."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_cxpg.exceptions import DataIntegrityError
from airflow_provider_cxpg.planning.key_ranges import _typed


def _plan(*typnames: str) -> Any:
    return SimpleNamespace(key=tuple(SimpleNamespace(typname=t) for t in typnames))


def test_integer_bounds_become_ints_and_others_keep_their_text() -> None:
    assert _typed(_plan("int8", "text"), [["12", "b"], ["30", "a"]]) == [[12, "b"], [30, "a"]]


def test_a_null_bound_is_refused_not_turned_into_a_range_that_holds_no_row() -> None:
    # ntile's last key per bucket under `k DESC` is NULL when a bucket holds NULL keys: `k <= NULL`
    # would match nothing, and those rows would be skipped silently.
    with pytest.raises(DataIntegrityError, match="NULL"):
        _typed(_plan("text"), [["004"], [None]])
    with pytest.raises(DataIntegrityError, match="NULL"):
        _typed(_plan("int4", "int4"), [[1, None]])
