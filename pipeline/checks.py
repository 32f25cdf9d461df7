"""Data-quality checks on embedding tables; Dagster asset checks call these and report their details."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import polars as pl

from pipeline.embed import embedding_matrix


class CheckOutcome(NamedTuple):
    passed: bool
    description: str
    details: dict


def check_finite(df: pl.DataFrame) -> CheckOutcome:
    m = embedding_matrix(df)
    bad = int((~np.isfinite(m)).any(axis=1).sum()) if m.size else 0
    examples = df.filter(pl.Series(~np.isfinite(m).all(axis=1)))["key"].head(5).to_list() if bad else []
    return CheckOutcome(bad == 0, f"{bad} of {df.height} embeddings have NaN or inf", {"bad_rows": bad,
                                                                                         "examples": examples})


def check_unit_norm(df: pl.DataFrame, tol: float = 1e-3) -> CheckOutcome:
    m = embedding_matrix(df)
    if not m.size:
        return CheckOutcome(True, "empty table", {"bad_rows": 0})
    norms = np.linalg.norm(m.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > tol
    return CheckOutcome(not off.any(), f"{int(off.sum())} of {df.height} norms differ from 1 by more than {tol}",
                        {"bad_rows": int(off.sum()), "min_norm": float(norms.min()), "max_norm": float(norms.max())})


def check_unique_keys(df: pl.DataFrame, expected_keys: list[str] | None = None,
                      quarantined_keys: list[str] | None = None) -> CheckOutcome:
    """No key twice and, when the inputs are given, every unique input accounted for exactly once: as a row of
    the table, or as a quarantined key (a non-finite embedding) that is not also in the table."""
    held = set(quarantined_keys or [])
    have = set(df["key"].to_list())
    dup = df.height - len(have) + len(have & held)
    missing = extra = 0
    if expected_keys is not None:
        want = set(expected_keys)
        missing, extra = len(want - have - held), len((have | held) - want)
    ok = dup == 0 and missing == 0 and extra == 0
    return CheckOutcome(ok, f"{dup} duplicate, {missing} missing, {extra} unexpected keys among {df.height} rows "
                            f"and {len(held)} quarantined", {"duplicates": dup, "missing": missing,
                                                             "unexpected": extra, "quarantined": len(held)})


EMBEDDING_CHECKS = {
    "finite": check_finite,
    "unit_norm": check_unit_norm,
    "one_row_per_input": check_unique_keys,
}
