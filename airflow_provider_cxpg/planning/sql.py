"""SQL text we generate: quoted identifiers and exact literals.

connectorx takes no bind parameters, so every value we put in a query (the last key of a chunk, a
watermark bound) is rendered here as a literal with an explicit cast: ``'<text form>'::<type>``. The
text form is PostgreSQL's own input syntax for that type, so the server parses back exactly the value
it sent us. Connections use ``standard_conforming_strings=on`` (see :mod:`~airflow_provider_cxpg.conninfo`), so doubling
single quotes is the complete escape for string literals.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import uuid
from collections.abc import Sequence

from airflow_provider_cxpg.exceptions import InvalidIdentifierError, InvalidInputError

__all__ = [
    "literal",
    "parse_qualified_name",
    "qualified",
    "quote_ident",
    "quote_string",
    "row_comparison",
    "text_form",
]

_MAX_IDENTIFIER_BYTES = 63
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def quote_ident(name: str) -> str:
    """Return ``name`` as a quoted identifier (``"a""b"``), whatever characters it holds.

    :raises InvalidIdentifierError: empty, longer than 63 bytes, or containing a NUL byte.
    """
    if not isinstance(name, str) or not name:
        raise InvalidIdentifierError(f"identifier must be a non-empty string, got {name!r}")
    if "\x00" in name:
        raise InvalidIdentifierError(f"identifier {name!r} contains a NUL byte")
    if len(name.encode()) > _MAX_IDENTIFIER_BYTES:
        raise InvalidIdentifierError(
            f"identifier {name!r} is longer than {_MAX_IDENTIFIER_BYTES} bytes (PostgreSQL would truncate it)"
        )
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str | None, name: str) -> str:
    """Return ``"schema"."name"`` (or ``"name"``)."""
    return f"{quote_ident(schema)}.{quote_ident(name)}" if schema else quote_ident(name)


def parse_qualified_name(text: str) -> tuple[str | None, str]:
    """Split ``schema.table`` into its parts, honouring double quotes (``"my.schema"."T"``).

    Unquoted parts are folded to lower case, as PostgreSQL does.

    :raises InvalidIdentifierError: for anything that is not one or two identifiers.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidIdentifierError(f"table name must be a non-empty string, got {text!r}")
    parts: list[str] = []
    i, n = 0, len(text)
    text = text.strip()
    n = len(text)
    while i < n:
        if text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise InvalidIdentifierError(f"unterminated quoted identifier in {text!r}")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and text[j] != ".":
                j += 1
            raw = text[i:j]
            if not raw or raw != raw.strip() or '"' in raw:
                raise InvalidIdentifierError(f"cannot parse table name {text!r}")
            parts.append(raw.translate(_ASCII_LOWER))  # PostgreSQL folds only A-Z in UTF-8 names
            i = j
        if i < n:
            if text[i] != ".":
                raise InvalidIdentifierError(f"cannot parse table name {text!r}")
            i += 1
            if i >= n:
                raise InvalidIdentifierError(f"table name {text!r} ends with '.'")
    if len(parts) > 2:
        raise InvalidIdentifierError(f"table name {text!r} has {len(parts)} parts; use 'table' or 'schema.table'")
    for part in parts:
        quote_ident(part)  # validates length and NUL
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def quote_string(text: str) -> str:
    """Return a standard-conforming string literal."""
    if "\x00" in text:
        raise InvalidInputError("a PostgreSQL string literal cannot contain a NUL byte")
    return "'" + text.replace("'", "''") + "'"


def text_form(value: object) -> str:
    """PostgreSQL's input syntax for ``value`` (exact: the server parses back the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)  # shortest repr round-trips exactly through float8in
    if isinstance(value, decimal.Decimal):
        if value.is_nan():
            return "NaN"
        return format(value, "f")
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
            return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds") + "+00"
        return value.isoformat(sep=" ", timespec="microseconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dt.time):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, str):
        return value
    raise InvalidInputError(f"cannot render a {type(value).__name__} value as a SQL literal")


def literal(value: object, pg_type: str) -> str:
    """Render ``value`` as ``'<text>'::<pg_type>``, exact for every key type we allow.

    :param value: a Python value as pyarrow returns it (int, Decimal, str, date, datetime, ...), or
        the PostgreSQL text form of the value (for columns read as text).
    :param pg_type: the SQL type name, e.g. ``bigint`` or ``timestamp with time zone``; trusted (it
        comes from ``format_type`` in the catalog, not from the user).
    """
    if value is None:
        return f"NULL::{pg_type}"
    return f"{quote_string(text_form(value))}::{pg_type}"


def row_comparison(columns: Sequence[str], literals: Sequence[str], op: str = ">") -> str:
    """Return ``(c1, c2) > (v1, v2)``; a single column compares without the row constructor.

    Row comparison is lexicographic in PostgreSQL and can use a composite B-tree index, which is
    what makes keyset pages cheap.
    """
    if op not in {">", ">=", "<", "<="}:
        raise ValueError(op)
    if len(columns) != len(literals) or not columns:
        raise ValueError("columns and literals must be non-empty and of equal length")
    if len(columns) == 1:
        return f"{columns[0]} {op} {literals[0]}"
    return f"({', '.join(columns)}) {op} ({', '.join(literals)})"
