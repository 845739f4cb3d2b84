"""The key a ``write_mode="merge"`` run upserts by, refused where stored values cannot stand for it.

A merge matches each staged row to a table row by comparing *stored* values (Arrow, in delta-rs's
MERGE or pyiceberg's ``upsert``), never by PostgreSQL's equality. Two rules follow:

* **The row's identity, not the paging key.** A merge by ``(changed_at, id)`` added a second row
  for ``id`` whenever ``changed_at`` changed (a paging key with the primary key appended as a
  tie-breaker, or given so). A table is merged by the columns of the unique index that proves the
  key given unique (``id`` there), and by its primary key where nothing proves it (a tie-breaker
  was appended, inheritance children, foreign partitions); other sources by their key.
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


@dataclass(frozen=True)
class MergeKey:
    """:param names: the columns a merge matches rows by.
    :param unique: the catalog proves the paging key unique over every row read (else the run's keys
        are checked; the primary key a tie-breaker came from is unique when the paging key is)."""

    names: tuple[str, ...]
    unique: bool


def merge_key(conn: Any, plan: ExtractPlan) -> MergeKey:
    """The key ``plan``'s run merges by; :class:`InvalidInputError` where a merge by it would be inexact."""
    if not plan.key_names:
        raise InvalidInputError("write_mode='merge' needs a key: the source has none (key_columns=['ctid'])")
    names = plan.key_names
    given, table = plan.source.key_columns, plan.table
    if given is not None and table is not None:
        proof = (
            table.proving_index(tuple(given)) if table.indexes_cover_rows and not table.foreign_descendants else None
        )
        if proof is not None:  # the columns that make a row one row: (changed_at, id) is merged by id
            names = tuple(proof.columns)
        elif table.primary_key:  # a tie-breaker was appended, or nothing proves the key given unique
            names = tuple(table.primary_key)
            missing = [n for n in names if n not in {c.name for c in plan.columns}]
            if missing:
                raise InvalidInputError(
                    f"write_mode='merge' by {list(given)}: nothing proves it unique in {table.schema}.{table.name}, "
                    f"so the run merges by the primary key {list(names)}: add {missing} to `columns`"
                )
    inexact = [reason for name in names if (reason := _inexact(conn, plan, name))]
    if inexact:
        raise InvalidInputError(
            f"write_mode='merge' by {list(names)} would match rows by their stored values, and "
            + "; ".join(inexact)
            + ": an update that turns one form into the other would leave the old row beside the new one. "
            "Merge by a key of exact values, or use append or overwrite"
        )
    return MergeKey(names, plan.key_unique)


#: Types whose stored values are equal exactly when PostgreSQL finds them equal.
_EXACT = frozenset({"int2", "int4", "int8", "oid", "uuid", "date", "time", "timestamp", "timestamptz", "bool", "bytea"})


def _inexact(conn: Any, plan: ExtractPlan, name: str) -> str | None:
    """Why PostgreSQL can find two different stored values of column ``name`` equal (None: it cannot)."""
    column = next(c for c in plan.columns if c.name == name)
    pg = column.pg
    if pg.typname in _EXACT or pg.typtype == "e":  # an enum is stored as its label
        return None
    if pg.typname in ("float4", "float8"):
        return f"{name!r} is {pg.typname}: PostgreSQL compares 0 and -0 equal, and NaN equal to NaN"
    if pg.typname == "numeric":
        if pa.types.is_decimal(column.arrow_type):
            return None
        return f"{name!r} is numeric without a fixed scale, stored as text: PostgreSQL compares '1.0' and '1.00' equal"
    if pg.typname == "citext":
        return f"{name!r} is citext: PostgreSQL compares 'A' and 'a' equal"
    if pg.typname == "bpchar" and "(" not in pg.sql_name:
        return f"{name!r} is character without a length: PostgreSQL compares 'a' and 'a ' equal"
    if pg.typname in ("text", "varchar", "name", "bpchar"):
        collation, deterministic = query_column_collation(conn, plan.from_clause, f"{SOURCE_ALIAS}.{quote_ident(name)}")
        if deterministic is False:
            return f"{name!r} has the nondeterministic collation {collation}: PostgreSQL compares other strings equal"
        return None
    return f"{name!r} is {pg.sql_name}, whose equality in PostgreSQL is not that of its stored values"
