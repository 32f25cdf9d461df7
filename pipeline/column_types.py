"""One Polars type per extra JSON column, decided over the whole manifest while its rows stream past.

Every shard's table must have the same schema, but a shard only keeps its own rows: so the type of each extra
(unmapped) column is folded row by row into a small signature (`ColumnTypes.add`), and each shard builds its
column with the type the whole manifest agreed on (`ColumnTypes.series`). A column whose values do not share one
type (`1` in one row, `"two"` in another, `1` and `2.5`, objects with different keys, integers beyond int64) is
stored as JSON text in every shard.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import polars as pl

CONFLICT = "conflict"
"""The signature of values that have no common exact type: the column is stored as JSON text."""

_SCALARS = {"bool": pl.Boolean, "int": pl.Int64, "float": pl.Float64, "str": pl.String}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def value_type(value: Any) -> Any:
    """The signature of one JSON value: None (null), a scalar name, ("list", element), ("struct", ((key, sig),
    ...)) or CONFLICT."""
    if value is None:
        return None
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64[0] <= value <= _INT64[1] else CONFLICT
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        element = None
        for item in value:
            element = merge(element, value_type(item))
            if element == CONFLICT:
                return CONFLICT
        return ("list", element)
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) for k in value):
            return CONFLICT
        fields = tuple((k, value_type(v)) for k, v in value.items())
        return CONFLICT if any(sig == CONFLICT for _, sig in fields) else ("struct", fields)
    return CONFLICT


def merge(a: Any, b: Any) -> Any:
    """The signature that holds values of signatures `a` and `b` exactly (null fits anything), or CONFLICT."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    if a == CONFLICT or b == CONFLICT or not (isinstance(a, tuple) and isinstance(b, tuple)) or a[0] != b[0]:
        return CONFLICT
    if a[0] == "list":
        element = merge(a[1], b[1])
        return CONFLICT if element == CONFLICT else ("list", element)
    fields_b = dict(b[1])
    if set(fields_b) != {k for k, _ in a[1]}:
        return CONFLICT  # polars would fill the missing keys with nulls: the values would not come back as given
    fields = tuple((k, merge(sig, fields_b[k])) for k, sig in a[1])
    return CONFLICT if any(sig == CONFLICT for _, sig in fields) else ("struct", fields)


def polars_type(sig: Any) -> pl.DataType:
    """The Polars type of a signature other than CONFLICT (null inside a list or struct: `pl.Null`)."""
    if sig is None:
        return pl.Null
    if isinstance(sig, str):
        return _SCALARS[sig]
    if sig[0] == "list":
        return pl.List(polars_type(sig[1]))
    return pl.Struct({k: polars_type(s) for k, s in sig[1]})


class ColumnTypes:
    """The signatures of the extra columns seen so far, in order of first appearance."""

    def __init__(self) -> None:
        self.signatures: dict[str, Any] = {}

    def add(self, row: dict[str, Any], skip: set[str]) -> None:
        for name, value in row.items():
            if name in skip:
                continue
            was = self.signatures.get(name)
            if was == CONFLICT:
                continue
            self.signatures[name] = merge(was, value_type(value)) if name in self.signatures else value_type(value)

    @property
    def columns(self) -> list[str]:
        return list(self.signatures)

    def describe(self) -> list[tuple[str, str]]:
        """(column, type) pairs, for fingerprints: a change of any column's type changes every shard."""
        return [(name, "json" if sig == CONFLICT else str(self.dtype(name))) for name, sig in self.signatures.items()]

    def dtype(self, name: str) -> pl.DataType | None:
        """The column's type; None when it is stored as JSON text."""
        sig = self.signatures[name]
        if sig == CONFLICT:
            return None
        return pl.String if sig is None else polars_type(sig)

    def series(self, name: str, values: Iterable[Any]) -> pl.Series:
        """Column `name` holding `values` (one shard's), with the type of the whole manifest."""
        values = list(values)
        dtype = self.dtype(name)
        if dtype is None:
            return pl.Series(name, [None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                                    for v in values], dtype=pl.String)
        return pl.Series(name, values, dtype=dtype, strict=True)
