"""SQL literals without a server."""

from __future__ import annotations

import pytest

from airflow_provider_cxpg.exceptions import (
    InvalidInputError,
)
from airflow_provider_cxpg.planning.sql import literal


def test_literal_refuses_a_nul_byte_and_unknown_python_types() -> None:
    with pytest.raises(InvalidInputError, match="NUL"):
        literal("a\x00b", "text")
    with pytest.raises(InvalidInputError, match="cannot render"):
        literal(object(), "text")
