"""What counts as a change of the source between two chunks (the comparison; the catalog query is tested live)."""

from __future__ import annotations

from airflow_provider_cxpg.planning.source_state import SourceState, source_changes

_TEXT = ("v", "25", "-1", "100", "text", "default", "2")
_KEY = ("k", "25", "-1", "950", "text", "C", "1")


def _state(
    oid: int | None = 10,
    columns: tuple[tuple[str, ...], ...] = (_KEY, _TEXT),
    storage: tuple[tuple[str, ...], ...] = (("10", "5000", "t", ""),),
) -> SourceState:
    return SourceState('"public"."t"', oid, columns, storage)


def test_nothing_changed_is_no_change() -> None:
    assert source_changes(_state(), _state(), storage=True) == []


def test_another_relation_or_none_under_the_name() -> None:
    assert "no longer exists" in source_changes(_state(), _state(oid=None), storage=False)[0]
    assert "dropped and created again" in source_changes(_state(), _state(oid=11), storage=False)[0]


def test_a_type_a_modifier_or_a_collation_that_changed_is_named() -> None:
    numeric = ("v", "1700", "-1", "0", "numeric", "", "2")
    assert source_changes(_state(), _state(columns=(_KEY, numeric)), storage=False) == [
        "column 'v' is now numeric (was text)"
    ]
    posix = ("k", "25", "-1", "951", "text", "POSIX", "1")
    assert source_changes(_state(), _state(columns=(posix, _TEXT)), storage=False) == [
        "column 'k' now has collation POSIX (was C)"
    ]
    assert source_changes(_state(), _state(columns=(_KEY,)), storage=False) == ["column 'v' is gone"]


def test_storage_counts_only_inside_a_snapshot() -> None:
    rewritten = _state(storage=(("10", "5001", "t", ""),))
    assert source_changes(_state(), rewritten, storage=False) == []
    assert "got new storage" in source_changes(_state(), rewritten, storage=True)[0]
    detached = _state(storage=(("10", "0", "t", ""), ("12", "6000", "t_2024", "")))
    partitioned = _state(storage=(("10", "0", "t", ""), ("12", "6000", "t_2024", ""), ("13", "6001", "t_2025", "")))
    assert source_changes(partitioned, detached, storage=True) == [
        "t_2025 is no longer part of it (detached or dropped)"
    ]
    assert source_changes(detached, partitioned, storage=True) == []  # a premade partition: nothing it could miss


def test_a_wider_varchar_is_no_change_but_a_wider_char_or_numeric_is() -> None:
    name = ("n", "1043", "14", "100", "character varying(10)", "default", "3")
    wider = ("n", "1043", "24", "100", "character varying(20)", "default", "3")
    assert source_changes(_state(columns=(name,)), _state(columns=(wider,)), storage=True) == []
    char = ("c", "1042", "14", "100", "character(10)", "default", "3")
    wider_char = ("c", "1042", "24", "100", "character(20)", "default", "3")
    assert source_changes(_state(columns=(char,)), _state(columns=(wider_char,)), storage=False) == [
        "column 'c' is now character(20) (was character(10))"
    ]


def test_a_column_swapped_for_another_of_its_name_counts_in_every_run() -> None:
    """Two renamed into each other's places (a key pages by other values), or dropped and added again."""
    swapped = ("v", "25", "-1", "100", "text", "default", "5")
    for storage in (False, True):
        assert source_changes(_state(), _state(columns=(_KEY, swapped)), storage=storage) == [
            "column 'v' is another column now (renamed or dropped and added again)"
        ]


def test_a_redefined_view_counts_in_every_run() -> None:
    view = _state(storage=(("10", "0", "v", "731"),))
    replaced = _state(storage=(("10", "0", "v", "802"),))
    assert source_changes(view, replaced, storage=False) == ["v was redefined (CREATE OR REPLACE VIEW)"]


def test_a_retry_continues_only_the_same_columns_and_view_definitions() -> None:
    """The identity in the fingerprint: column numbers and view definitions; not storage (a rewrite)."""
    swapped = ("v", "25", "-1", "100", "text", "default", "5")
    assert _state().identity() != _state(columns=(_KEY, swapped)).identity()
    assert _state().identity() == _state(storage=(("10", "5001", "t", ""),)).identity()
    view = _state(storage=(("10", "0", "v", "731"),))
    assert view.identity() != _state(storage=(("10", "0", "v", "802"),)).identity()
