"""Checks on a preference shard (docs/shards.md); the `preference_shards` asset reports each as an asset check."""

from __future__ import annotations

import polars as pl

from pipeline.checks import CheckOutcome


def _ids(df: pl.DataFrame, failing: pl.Expr) -> list[str]:
    return df.filter(failing)["example_id"].head(5).to_list()


def check_negative_not_positive(df: pl.DataFrame) -> CheckOutcome:
    neg = df.select("example_id", "image_path", pl.col("negatives").list.eval(pl.element().struct.field("path"))
                    .alias("neg_paths"))
    bad = neg.with_columns(pl.col("neg_paths").list.contains(pl.col("image_path")).alias("bad"))
    n = int(bad["bad"].sum())
    return CheckOutcome(n == 0, f"{n} examples have their positive among their negatives",
                        {"bad_examples": n, "examples": _ids(bad, pl.col("bad"))})


def check_no_duplicate_negatives(df: pl.DataFrame) -> CheckOutcome:
    ids = pl.col("negatives").list.eval(pl.element().struct.field("image_id"))
    bad = df.with_columns((ids.list.len() != ids.list.unique().list.len()).alias("bad"))
    n = int(bad["bad"].sum())
    return CheckOutcome(n == 0, f"{n} examples repeat a negative", {"bad_examples": n,
                                                                   "examples": _ids(bad, pl.col("bad"))})


def check_k_or_shortfall(df: pl.DataFrame, k: int) -> CheckOutcome:
    bad = df.with_columns(((pl.col("negatives").list.len() + pl.col("shortfall")) != k).alias("bad"))
    n = int(bad["bad"].sum())
    short = int((df["shortfall"] > 0).sum())
    return CheckOutcome(n == 0, f"{short} examples have fewer than K={k} negatives (recorded); {n} unaccounted",
                        {"unaccounted": n, "examples_with_shortfall": short})


def check_finite_scores(df: pl.DataFrame) -> CheckOutcome:
    fields = ("clip_sim", "recon_error", "deviation", "score", "q")
    flat = df.select(pl.col("pool").list.explode(empty_as_null=True).struct.unnest()).select(fields) if df.height else None
    n = 0 if flat is None else int(flat.select(pl.any_horizontal(~pl.col(f).is_finite() for f in fields).sum())
                                  .item() or 0)
    return CheckOutcome(n == 0, f"{n} candidates have a non-finite score field", {"bad_candidates": n})


def check_q_sums_to_one(df: pl.DataFrame, tol: float = 1e-3) -> CheckOutcome:
    sums = df.select("example_id", pl.col("pool").list.eval(pl.element().struct.field("q")).list.sum()
                     .alias("q_sum"), pl.col("pool").list.len().alias("n"))
    bad = sums.filter((pl.col("n") > 0) & ((pl.col("q_sum") - 1).abs() > tol))
    return CheckOutcome(bad.height == 0, f"{bad.height} pools whose proposal does not sum to 1 (tol {tol})",
                        {"bad_examples": bad.height, "examples": bad["example_id"].head(5).to_list()})


def shard_checks(df: pl.DataFrame, k: int) -> dict[str, CheckOutcome]:
    return {
        "negative_is_not_positive": check_negative_not_positive(df),
        "no_duplicate_negatives": check_no_duplicate_negatives(df),
        "k_negatives_or_shortfall": check_k_or_shortfall(df, k),
        "finite_scores": check_finite_scores(df),
        "q_sums_to_one": check_q_sums_to_one(df),
    }


SHARD_CHECK_NAMES = ("negative_is_not_positive", "no_duplicate_negatives", "k_negatives_or_shortfall",
                     "finite_scores", "q_sums_to_one")
