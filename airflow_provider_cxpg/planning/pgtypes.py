"""How each PostgreSQL type is read: natively by connectorx, or as its text form.

Measured with connectorx 0.4.6 (see ``docs/types.md``): many types are exact natively; some panic
(interval, timetz, cidr, uuid[], ...), fail (``"char"``, xid), or are silently wrong (every numeric is
read as decimal128(38,10), rounding anything finer). The rule here is simple and never lossy:

* a type in :data:`NATIVE` is read by connectorx and cast to the precise Arrow type in the worker
  (the stream path widens int2/int4/float4 and numeric; the cast puts the declared type back);
* ``numeric(p, s)`` is written as the narrowest decimal that holds every value the column accepts:
  ``decimal128(p, s)`` when ``0 <= s <= p`` (``s <= 10``, ``p - s <= 28``); ``decimal128(s, s)``
  when ``s > p`` (PostgreSQL 15+: only fractional digits, ``s <= 10``); ``decimal128(p - s, 0)``
  when ``s < 0`` (PostgreSQL 15+: integers rounded to ``10^-s``, ``p - s <= 28``). Parquet's
  DECIMAL needs ``0 <= scale <= precision``, so ``decimal128(p, s)`` itself would be unwritable in
  the last two cases. It is read natively only where connectorx's decoder holds every value (at
  most 18 integer digits: it rescales every value to 10 decimals in a 96-bit mantissa); a wider one
  (``numeric(20,0)``, ``numeric(38,10)``) is read as text and the worker's cast parses it into the
  same decimal, refusing any loss;
* every other type, unconstrained ``numeric`` included, is selected as ``expr::text``: PostgreSQL's
  own text form, exact by construction. ``json``/``jsonb`` are among them (connectorx re-parses
  their numbers as 64-bit floats and reorders json keys), and ``inet`` (connectorx rewrites some
  addresses, e.g. ``::1.2.3.4`` as ``::102:304``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

__all__ = [
    "KEY_TYPES",
    "NATIVE",
    "ColumnRead",
    "PgType",
    "numeric_decimal_type",
    "numeric_reads_natively",
    "plan_column",
]

#: typname -> Arrow type for the types connectorx reads exactly.
NATIVE: dict[str, pa.DataType] = {
    "int2": pa.int16(),
    "int4": pa.int32(),
    "int8": pa.int64(),
    "oid": pa.uint32(),
    "float4": pa.float32(),
    "float8": pa.float64(),
    "bool": pa.bool_(),
    "text": pa.string(),
    "varchar": pa.string(),
    "bpchar": pa.string(),
    "name": pa.string(),
    "uuid": pa.string(),
    "bytea": pa.large_binary(),
    "date": pa.date32(),
    "time": pa.time64("us"),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
}

#: Array element types connectorx reads exactly (one-dimensional arrays only).
_NATIVE_ARRAY_ELEMENTS: dict[str, pa.DataType] = {
    "int2": pa.int16(),
    "int4": pa.int32(),
    "int8": pa.int64(),
    "float4": pa.float32(),
    "float8": pa.float64(),
    "bool": pa.bool_(),
    "text": pa.string(),
    "varchar": pa.string(),
}

#: Types allowed in a keyset key: ordered by a B-tree, with an exact literal form.
KEY_TYPES: frozenset[str] = frozenset(
    {
        "int2",
        "int4",
        "int8",
        "oid",
        "numeric",
        "float4",
        "float8",
        "text",
        "varchar",
        "bpchar",
        "name",
        "uuid",
        "date",
        "time",
        "timestamp",
        "timestamptz",
        "bytea",
        "bool",
        "citext",  # the extension's type: paged by its text form under "C" (see plan.py)
    }
)

# connectorx decodes every numeric into a 96-bit decimal mantissa (|m| < 2^96 ~ 7.9e28) rescaled to
# 10 decimals, then decimal128(38, 10): a value of 10^18 or more (19 integer digits + 10 decimals = 29
# digits) fails the read ("decimal scale is not equal to expected scale"), streamed reads panic.
# Measured: numeric(19,0) holding 7922816251426433759 reads, ...760 fails. So the integer digits
# (p - s) decide, not p.
_CX_DECIMAL_SCALE = 10
_CX_DECIMAL_DIGITS = 28
_CX_NATIVE_INTEGER_DIGITS = 18


@dataclass(frozen=True)
class PgType:
    """What the catalog says about one result column's type.

    :param typname: ``pg_type.typname`` of the (domain-resolved) type, e.g. ``int4`` or ``_text``.
    :param sql_name: ``format_type(oid, typmod)``, e.g. ``numeric(12,2)``; used in casts.
    :param typtype: ``b`` base, ``e`` enum, ``c`` composite, ``r`` range, ``p`` pseudo, ...
    :param element: typname of the element type for arrays, else None.
    :param precision: numeric precision from the type modifier, None when unconstrained.
    :param scale: numeric scale from the type modifier.
    :param unmodified_name: ``format_type(oid, -1)``, the type without its modifier (``numeric``,
        ``bpchar``), for literals compared with the column: see :attr:`literal_type`.
    """

    typname: str
    sql_name: str
    typtype: str = "b"
    element: str | None = None
    precision: int | None = None
    scale: int | None = None
    unmodified_name: str | None = None

    @property
    def literal_type(self) -> str:
        """The type a bound compared with this column is cast to: without the modifier.

        A modifier rounds or truncates the literal before the comparison, so a bound between two
        values moved onto one of them: ``'10:00:00.6'::timestamp(0)`` is 10:00:01, ``'1.005'::numeric(10,2)``
        is 1.01, ``'abcdefgh'::varchar(5)`` is ``'abcde'``, and ``x > bound`` lost the row holding it.
        (``-1``, not NULL: ``format_type(bpchar, NULL)`` is ``character``, which means ``char(1)``.)
        """
        return self.unmodified_name or self.sql_name


@dataclass(frozen=True)
class ColumnRead:
    """How one output column is read and written.

    :param name: output column name.
    :param pg: the source type.
    :param as_text: select ``expr::text`` instead of ``expr``.
    :param arrow_type: the type written to Parquet / returned to Python.
    """

    name: str
    pg: PgType
    as_text: bool
    arrow_type: pa.DataType

    @property
    def read_as(self) -> str:
        return "text" if self.as_text else "native"


def numeric_decimal_type(precision: int | None, scale: int | None) -> pa.DataType | None:
    """The exact Arrow decimal ``numeric(precision, scale)`` is written as, or None (a string)."""
    if precision is None or scale is None:
        return None
    if scale < 0:  # integers: p - s digits, none after the point
        digits = precision - scale
        return pa.decimal128(digits, 0) if digits <= _CX_DECIMAL_DIGITS else None
    if scale > _CX_DECIMAL_SCALE:
        return None
    if scale > precision:  # only fractional digits: |v| < 10^(p - s)
        return pa.decimal128(scale, scale)
    if precision - scale > _CX_DECIMAL_DIGITS:
        return None
    return pa.decimal128(max(precision, 1), scale)


def numeric_reads_natively(precision: int | None, scale: int | None) -> bool:
    """Whether connectorx decodes every value ``numeric(precision, scale)`` can hold (see above); the
    others travel as text and the worker parses them into the same decimal, refusing any loss."""
    if numeric_decimal_type(precision, scale) is None:
        return False
    assert precision is not None and scale is not None
    return precision - scale <= _CX_NATIVE_INTEGER_DIGITS


def plan_column(name: str, pg: PgType) -> ColumnRead:
    """Decide how to read one column (see the module docstring)."""
    if pg.typtype == "e":  # enums arrive as their label over the binary protocol
        return ColumnRead(name, pg, False, pa.string())
    if pg.typname == "numeric":
        decimal = numeric_decimal_type(pg.precision, pg.scale)
        native = numeric_reads_natively(pg.precision, pg.scale)
        return ColumnRead(name, pg, not native, decimal or pa.string())
    if pg.typname in NATIVE:
        return ColumnRead(name, pg, False, NATIVE[pg.typname])
    if pg.element is not None and pg.element in _NATIVE_ARRAY_ELEMENTS:
        return ColumnRead(name, pg, False, pa.large_list(_NATIVE_ARRAY_ELEMENTS[pg.element]))
    return ColumnRead(name, pg, True, pa.string())
