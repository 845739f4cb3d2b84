"""What a table source is, as the catalog says now: a run compares it after every chunk it reads.

A run plans once (each column's type, the key's collation) and then reads for minutes or hours,
while DDL may commit between two of its chunks. A chunk read after such a change is read under the
new catalog, silently:

* ``ALTER COLUMN … TYPE`` (a migration): connectorx decodes the new type and the worker casts it to
  the planned one where Arrow can (decimal to string is a "safe" cast): values altered, run green;
* ``ALTER COLUMN … COLLATE`` on a key: later chunks page in another order, and the keys between the
  two orders were skipped;
* under an exported snapshot, ``TRUNCATE`` and the rewriting forms of ``ALTER TABLE`` are not
  MVCC-safe: the snapshot sees the new files empty and the rest of the run read nothing (a
  partition detached mid-run went missing the same way).

So the planner records, on its own connection (inside the snapshot when there is one), the relation
the name resolves to; the type, modifier, collation and number of every column the run reads or
filters by (the key, the watermark): another number under the same name is another column (two
renamed into each other's places); and every relation whose rows it returns (partitions and
children, and what a view's ``_RETURN`` rule reads), with the version of a view's definition
(``CREATE OR REPLACE VIEW``) and the storage (``relfilenode``): one created or attached since is no
change, a snapshot sees in it only rows it could see. And the
labels of every enum those columns hold (directly, in arrays, domains, composites or ranges): a row
stores an enum's OID, and its label is looked up in the catalog as of now, snapshot or not, so
``ALTER TYPE … RENAME VALUE`` mid-run wrote one value under two labels.
After every chunk read the run reads the same again on its worker session's monitor connection
(autocommit, outside any snapshot: the latest catalog), and stops before it keeps that chunk when anything differs
(:class:`~airflow_provider_cxpg.exceptions.SourceChangedError`). A read and a DDL statement that
conflicts with it exclude each other (the read holds ``ACCESS SHARE`` on the table until it ends), so
a change that reached a read has committed before the check after it.

Storage counts without a snapshot too: a chunk's ``COPY`` takes its snapshot before it waits for
the table's lock, so a chunk that waited on ``TRUNCATE`` or a rewriting ``ALTER TABLE`` read the new
storage with a snapshot older than it, saw no rows, and the run ended there, green (found by CI).
``VACUUM FULL``, ``CLUSTER`` and ``SET TABLESPACE`` give a table new storage too but keep its row
versions, so such a read still sees them; a run stops on them anyway (loud, and its retry resumes
after the last chunk it kept). A ``varchar`` given another length is no change (no value read changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SourceState", "read_source_state", "relabelled", "source_changes"]

#: ``character varying``: a new length changes no value read (a shorter one is refused while a value
#: does not fit), so a migration that widens one is no reason to stop a run.
_VARCHAR = "1043"

#: The relation, the columns, and every relation whose rows it returns: partitions and inheritance
#: children, and the relations a view reads (its rewrite rule's dependencies), all levels down.
_STATE_SQL = """
WITH RECURSIVE rel(oid) AS (SELECT to_regclass(%(name)s)::oid),
tree(oid) AS (
    SELECT oid FROM rel WHERE oid IS NOT NULL
  UNION
    SELECT below.oid FROM tree t, LATERAL (
        SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = t.oid
      UNION ALL
        SELECT d.refobjid FROM pg_catalog.pg_rewrite r
        JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
         AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> t.oid
        WHERE r.ev_class = t.oid AND r.rulename = '_RETURN'  -- what the view returns, not its other rules
          -- a view's: a materialized view holds rows of its own until REFRESH
          AND (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = t.oid) = 'v'
    ) below(oid)
),
types(oid) AS (  -- the types the watched columns hold, all levels down: an enum's labels are catalog data
    SELECT a.atttypid FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = (SELECT oid FROM rel) AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname = ANY(%(columns)s::text[])
  UNION
    SELECT below.oid FROM types t JOIN pg_catalog.pg_type ty ON ty.oid = t.oid, LATERAL (
        SELECT ty.typelem WHERE ty.typelem <> 0
      UNION ALL
        SELECT ty.typbasetype WHERE ty.typbasetype <> 0
      UNION ALL
        SELECT a.atttypid FROM pg_catalog.pg_attribute a
         WHERE ty.typrelid <> 0 AND a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped
      UNION ALL
        -- a multirange's range (rngmultitypid exists from PostgreSQL 14 on: read through jsonb, NULL before)
        SELECT r.rngsubtype FROM pg_catalog.pg_range r
         WHERE r.rngtypid = ty.oid OR (to_jsonb(r) ->> 'rngmultitypid')::oid = ty.oid
    ) below(oid)
)
SELECT (SELECT oid FROM rel),
       (SELECT coalesce(array_agg(ARRAY[a.attname::text, a.atttypid::text, a.atttypmod::text,
                                        a.attcollation::text, format_type(a.atttypid, a.atttypmod),
                                        coalesce(co.collname::text, ''), a.attnum::text] ORDER BY a.attname), '{}')
          FROM pg_catalog.pg_attribute a
          LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
         WHERE a.attrelid = (SELECT oid FROM rel) AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname = ANY(%(columns)s::text[])),
       (SELECT coalesce(array_agg(ARRAY[c.oid::text, c.relfilenode::text, c.relname::text,
                                        coalesce((SELECT r.xmin::text FROM pg_catalog.pg_rewrite r
                                                  WHERE r.ev_class = c.oid AND r.rulename = '_RETURN'), '')]
                                  ORDER BY c.oid), '{}')
          FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid
         WHERE c.relkind <> 'S'),  -- a sequence a view calls nextval() on holds no rows
       (SELECT coalesce(array_agg(ARRAY[e.oid::text, e.enumlabel::text, format_type(e.enumtypid, NULL)]
                                  ORDER BY e.oid), '{}')
          FROM pg_catalog.pg_enum e WHERE e.enumtypid IN (SELECT oid FROM types))
"""


@dataclass(frozen=True)
class SourceState:
    """A table source as the catalog describes it (see the module docstring).

    :param name: the qualified name the run reads (``"public"."orders"``).
    :param oid: the relation it resolves to (None: none).
    :param columns: ``(name, type oid, modifier, collation oid, type as SQL, collation name, attnum)`` of
        each column watched (read, key, watermark), by name.
    :param storage: ``(oid, relfilenode, name, view definition's version)`` of the relation and of
        every relation whose rows it returns.
    :param labels: ``(oid, label, enum type)`` of each value of every enum the watched columns hold.
    """

    name: str
    oid: int | None
    columns: tuple[tuple[str, ...], ...]
    storage: tuple[tuple[str, ...], ...]
    labels: tuple[tuple[str, ...], ...] = ()

    def identity(self) -> list[Any]:
        """What a retry must find unchanged to continue the run (part of its fingerprint): the watched
        columns with their numbers, and each view's definition; not storage (a rewrite does not move
        a key, and a retry reads in a snapshot of its own). Enum labels are not in it: a value added
        is no change, so a resume compares the labels it recorded itself (:func:`relabelled`)."""
        return [
            [[*c[:4], c[6]] for c in self.columns],  # name, type, modifier, collation, number
            [[s[0], s[3]] for s in self.storage if s[3]],  # each view's definition version
        ]


def read_source_state(conn: Any, name: str, columns: Sequence[str]) -> SourceState:
    """The state of the relation ``name`` (qualified) and of ``columns``, in ``conn``'s view of the catalog."""
    row = conn.execute(_STATE_SQL, {"name": name, "columns": list(columns)}).fetchone()
    oid, attributes, storage, labels = row if row is not None else (None, [], [], [])
    return SourceState(
        name=name,
        oid=None if oid is None else int(oid),
        columns=tuple(tuple(a) for a in attributes or ()),
        storage=tuple(tuple(s) for s in storage or ()),
        labels=tuple(tuple(v) for v in labels or ()),
    )


def relabelled(before: Sequence[Sequence[str]], after: Sequence[Sequence[str]]) -> list[str]:
    """The enum values of ``before`` (``(oid, label, type)``) whose label ``after`` gives differently; a
    value added since changes no row read before."""
    now = {v[0]: v for v in after}
    return [
        f"enum {enum}: the value {label!r} is now labelled {now[value][1]!r} (ALTER TYPE … RENAME VALUE)"
        for value, label, enum in before
        if value in now and now[value][1] != label
    ]


def source_changes(planned: SourceState, now: SourceState, *, storage: bool) -> list[str]:
    """What differs between ``planned`` and ``now``, one line each (empty: nothing that matters).

    :param storage: compare the storage too (a run inside one snapshot).
    """
    if now.oid != planned.oid:
        if now.oid is None:
            return [f"{planned.name} no longer exists"]
        return [f"{planned.name} is now another relation (OID {now.oid}, was {planned.oid}): dropped and created again"]
    changes: list[str] = []
    was = {c[0]: c for c in planned.columns}
    is_ = {c[0]: c for c in now.columns}
    for column, before in was.items():
        after = is_.get(column)
        if after is None:
            changes.append(f"column {column!r} is gone")
        elif after[1] != before[1] or (after[2] != before[2] and before[1] != _VARCHAR):
            changes.append(f"column {column!r} is now {after[4]} (was {before[4]})")
        elif after[3] != before[3]:
            changes.append(f"column {column!r} now has collation {after[5] or 'none'} (was {before[5] or 'none'})")
        elif after[6:] != before[6:]:
            # Another column of the same name and type: two renamed into each other's places (a key
            # then pages by other values), or added, filled and renamed after the old one was dropped
            # (which a snapshot's row versions do not hold: read as NULL).
            changes.append(f"column {column!r} is another column now (renamed or dropped and added again)")
    changes.extend(relabelled(planned.labels, now.labels))
    old = {s[0]: s for s in planned.storage}
    new = {s[0]: s for s in now.storage}
    for oid in sorted(old.keys() & new.keys()):
        if old[oid][3:] != new[oid][3:]:  # the xmin of a view's _RETURN rule: CREATE OR REPLACE VIEW
            changes.append(f"{new[oid][2]} was redefined (CREATE OR REPLACE VIEW)")
    if storage and now.storage != planned.storage:
        # A partition created or attached since is left alone: the snapshot sees in it only rows it
        # could see anyway, and partition maintenance (pg_partman's premade partitions) creates them.
        for oid in sorted(old):
            if oid not in new:
                changes.append(f"{old[oid][2]} is no longer part of it (detached or dropped)")
            elif old[oid][1] != new[oid][1]:
                changes.append(
                    f"{new[oid][2]} got new storage (TRUNCATE, a rewriting ALTER TABLE, VACUUM FULL or CLUSTER), "
                    "which a read whose snapshot is older than it sees empty"
                )
    return changes
