"""Reading the latents: which items activate each latent most, which ground-truth change it tracks, how often
latents fire. Pure functions on arrays (numpy or torch) -> polars tables; no model, no I/O.

    codes = encode_all(sae, u, t)                                    # (N, k)
    changed = labels(...)                    # (N, A) bool: which attribute changed per pair (e.g. world.changes)
    table = latent_table(codes, changed, attributes, ids=candidate_ids, kind=sae.cfg.kind)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from sae.autoencoder import SIGMOID_FIRE_THRESHOLD

def _codes(codes) -> np.ndarray:
    x = codes.detach().cpu().numpy() if hasattr(codes, "detach") else np.asarray(codes)
    if x.ndim != 2:
        raise ValueError(f"codes has shape {x.shape}; expected (N items, k latents)")
    return x.astype(np.float64)


def _fires(x: np.ndarray, kind: str) -> np.ndarray:
    return x > (SIGMOID_FIRE_THRESHOLD if kind == "sigmoid" else 0.0)


def top_activating(codes, ids: Sequence | None = None, n: int = 10) -> pl.DataFrame:
    """The n items with the largest activation per latent, long format:
    latent, rank (0 = strongest), index (row of `codes`), id (`ids[index]`, or the index as text), activation."""
    x = _codes(codes)
    n = min(n, x.shape[0])
    order = np.argsort(-x, axis=0, kind="stable")[:n]  # (n, k)
    k = x.shape[1]
    index = order.T.reshape(-1)
    id_col = [str(ids[i]) for i in index] if ids is not None else [str(i) for i in index]
    return pl.DataFrame(
        {
            "latent": np.repeat(np.arange(k), n),
            "rank": np.tile(np.arange(n), k),
            "index": index,
            "id": id_col,
            "activation": x[order, np.arange(k)[None, :]].T.reshape(-1),
        }
    )


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of each column of x (N, k), ties sharing their average rank (as in Mann-Whitney)."""
    ranks = np.empty_like(x, dtype=np.float64)
    for j in range(x.shape[1]):
        order = np.argsort(x[:, j], kind="stable")
        _, inverse, counts = np.unique(x[order, j], return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        ranks[order, j] = (ends - (counts - 1) / 2.0)[inverse]
    return ranks


def attribute_association(codes, changed, attributes: Sequence[str]) -> pl.DataFrame:
    """How each latent's activation separates pairs where an attribute changed from pairs where it did not.

    codes (N, k), changed (N, A) bool. One row per (latent, attribute): auroc (P(activation on a changed pair >
    on an unchanged pair), ties count 1/2; null when every pair or no pair changed), mean_changed,
    mean_unchanged, n_changed.
    """
    x = _codes(codes)
    c = np.asarray(changed, dtype=bool)
    if c.ndim != 2 or c.shape[0] != x.shape[0] or c.shape[1] != len(attributes):
        raise ValueError(
            f"changed has shape {c.shape}; expected (N={x.shape[0]}, A={len(attributes)}) to match codes "
            f"{x.shape} and attributes {list(attributes)}"
        )
    n = x.shape[0]
    n_pos = c.sum(0).astype(np.float64)  # (A,)
    rank_sum = c.T.astype(np.float64) @ average_ranks(x)  # (A, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (rank_sum - (n_pos * (n_pos + 1) / 2)[:, None]) / (n_pos * (n - n_pos))[:, None]
        mean_changed = (c.T @ x) / n_pos[:, None]
        mean_unchanged = ((~c).T @ x) / (n - n_pos)[:, None]
    a, k = auroc.shape
    nan_to_null = lambda arr: [None if not np.isfinite(v) else float(v) for v in arr.reshape(-1)]  # noqa: E731
    return pl.DataFrame(
        {
            "latent": np.tile(np.arange(k), a),
            "attribute": np.repeat(np.asarray(list(attributes), dtype=object), k).tolist(),
            "auroc": nan_to_null(auroc),
            "mean_changed": nan_to_null(mean_changed),
            "mean_unchanged": nan_to_null(mean_unchanged),
            "n_changed": np.repeat(n_pos.astype(np.int64), k),
        },
        schema_overrides={"auroc": pl.Float64, "mean_changed": pl.Float64, "mean_unchanged": pl.Float64},
    ).sort("latent", "attribute")


def latent_usage(codes, kind: str) -> pl.DataFrame:
    """Per latent: fire_rate (fraction of items where it fires: topk > 0, sigmoid > 0.5), mean, min, max activation."""
    x = _codes(codes)
    return pl.DataFrame(
        {
            "latent": np.arange(x.shape[1]),
            "fire_rate": _fires(x, kind).mean(0),
            "mean_activation": x.mean(0),
            "min_activation": x.min(0) if len(x) else np.zeros(x.shape[1]),
            "max_activation": x.max(0) if len(x) else np.zeros(x.shape[1]),
        }
    )


def usage_histogram(codes, kind: str, edges: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)) -> pl.DataFrame:
    """How many latents fire at each rate: a `dead` bin (rate 0), then log-spaced bins (lo, hi]."""
    rate = latent_usage(codes, kind)["fire_rate"].to_numpy()
    lows = [0.0, 0.0, *edges[:-1]]
    highs = [0.0, *edges]
    labels, counts = [], []
    for i, (lo, hi) in enumerate(zip(lows, highs)):
        if i == 0:
            labels.append("dead")
            counts.append(int((rate == 0).sum()))
        else:
            labels.append(f"({lo:g}, {hi:g}]")
            counts.append(int(((rate > lo) & (rate <= hi)).sum()))
    return pl.DataFrame({"bin": labels, "lo": lows, "hi": highs, "n_latents": counts})


def latent_table(
    codes, changed, attributes: Sequence[str], *, ids: Sequence | None = None, kind: str, n_top: int = 5
) -> pl.DataFrame:
    """One row per latent: usage, the attribute it tracks best (highest AUROC; null for a latent whose activation
    is the same on every item), that AUROC and the means, and the ids of its top items. The table users read to
    judge whether the SAE found semantic factors."""
    usage = latent_usage(codes, kind)
    best = (
        attribute_association(codes, changed, attributes)
        .filter(pl.col("auroc").is_not_null())
        .sort("auroc", descending=True)
        .group_by("latent", maintain_order=True)
        .first()
        .rename({"attribute": "best_attribute"})
    )
    tops = top_activating(codes, ids, n_top).group_by("latent").agg(pl.col("id").sort_by("rank").alias("top_ids"))
    out = usage.join(best, on="latent", how="left").join(tops, on="latent", how="left").sort("latent")
    return out.with_columns(
        pl.when(pl.col("max_activation") > pl.col("min_activation"))
        .then(pl.col("best_attribute"))
        .otherwise(None)
        .alias("best_attribute")
    )
