"""The key a ``write_mode="merge"`` run upserts by, refused where stored values cannot stand for it.

A merge matches each staged row to a table row by comparing *stored* values (Arrow, in delta-rs's
MERGE or pyiceberg's ``upsert``), never by PostgreSQL's equality. Two rules follow:

* **The row's identity, not the paging key.** A table's primary key names a row across runs; a
  paging key that is not unique had the primary key appended as a tie-breaker, and a merge by
  ``(changed_at, id)`` added a second row for ``id`` whenever ``changed_at`` changed. A table with
  a primary key is merged by it (its columns must be in the output); other sources by the key.
* **Stored values equal exactly when PostgreSQL's are.** Where PostgreSQL compares two different
  stored forms equal, an update that turned one into the other (``1.0`` into ``1.00`` of a
  ``numeric`` read as text, ``0`` into ``-0``, ``'A'`` into ``'a'`` under a case-insensitive
  collation) left the old row beside the new one. Such a key is refused before any data moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from airflow_provider_cxpg.exceptions import InvalidInputError
from airflow_provider_cxpg.planning.catalog import query_column_collation
from airflow_provider_cxpg.planning.plan import SOURCE_ALIAS, ExtractPlan
from airflow_provider_cxpg.planning.sql import quote_ident

__all__ = ["MergeKey", "merge_key"]

#: The key types (see ``planning.pgtypes.KEY_TYPES``) that carry a collation.
_COLLATABLE = frozenset({"text", "varchar", "bpchar", "name"})


@dataclass(frozen=True)
class MergeKey:
    """:param names: the columns a merge matches rows by.
    :param unique: the catalog proves them unique over every row read (else the run is checked)."""

    names: tuple[str, ...]
    unique: bool


def merge_key(conn: Any, plan: ExtractPlan) -> MergeKey:
    """The key ``plan``'s run merges by; :class:`InvalidInputError` where a merge by it would be inexact."""
    if not plan.key_names:
        raise InvalidInputError("write_mode='merge' needs a key: the source has none (key_columns=['ctid'])")
    table = plan.table
    if table is not None and table.primary_key:
        names = tuple(table.primary_key)
        unique = table.indexes_cover_rows and not table.foreign_descendants  # as for a key given (plan.py)
        missing = [n for n in names if n not in {c.name for c in plan.columns}]
        if missing:
            raise InvalidInputError(
                f"write_mode='merge' upserts {table.schema}.{table.name} by its primary key {list(names)}: "
                f"add {missing} to `columns`"
            )
    else:
        names, unique = plan.key_names, plan.key_unique
    inexact = [reason for name in names if (reason := _inexact(conn, plan, name))]
    if inexact:
        raise InvalidInputError(
            f"write_mode='merge' by {list(names)} would match rows by their stored values, and "
            + "; ".join(inexact)
            + ": an update that turns one form into the other would leave the old row beside the new one. "
            "Merge by a key of exact values, or use append or overwrite"
        )
    return MergeKey(names, unique)


def _inexact(conn: Any, plan: ExtractPlan, name: str) -> str | None:
    """Why PostgreSQL can find two different stored values of column ``name`` equal (None: it cannot)."""
    column = next(c for c in plan.columns if c.name == name)
    typname = column.pg.typname
    if typname in ("float4", "float8"):
        return f"{name!r} is {typname}: PostgreSQL compares 0 and -0 equal, and NaN equal to NaN"
    if typname == "numeric" and not pa.types.is_decimal(column.arrow_type):
        return f"{name!r} is numeric without a fixed scale, stored as text: PostgreSQL compares '1.0' and '1.00' equal"
    if typname == "citext":
        return f"{name!r} is citext: PostgreSQL compares 'A' and 'a' equal"
    if typname not in _COLLATABLE:
        return None
    collation, deterministic = query_column_collation(conn, plan.from_clause, f"{SOURCE_ALIAS}.{quote_ident(name)}")
    if deterministic is False:
        return f"{name!r} has the nondeterministic collation {collation}: PostgreSQL compares some other strings equal"
    return None
