"""SQL literals without a server."""

from __future__ import annotations

import pytest

from airflow_provider_cxpg.exceptions import (
    InvalidInputError,
)
from airflow_provider_cxpg.planning.sql import literal, parse_qualified_name


def test_literal_refuses_a_nul_byte_and_unknown_python_types() -> None:
    with pytest.raises(InvalidInputError, match="NUL"):
        literal("a\x00b", "text")
    with pytest.raises(InvalidInputError, match="cannot render"):
        literal(object(), "text")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Orders", (None, "orders")),
        ("Sales.ÉMILE", ("sales", "Émile")),  # only A-Z fold, as PostgreSQL folds UTF-8 names
        ('"Sales"."ÉMILE"', ("Sales", "ÉMILE")),
        ("straße", (None, "straße")),
    ],
)
def test_unquoted_names_fold_only_ascii_letters(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_qualified_name(text) == expected
