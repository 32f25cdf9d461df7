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


# ---------------------------------------------------------------------------------------------- silent degradation
# A mining run with a broken or random CLIP does not crash: it produces tables of the right shape and wrong content.
# These checks fail (severity ERROR) on the symptoms, whatever their cause, each naming the likely cause and the knob.

COLLAPSE_THRESHOLD = 0.95
"""Mean pairwise cosine of image embeddings above which they have collapsed. Measured on the tiny world: its trained
world CLIP 0.80-0.82 per shard (synthetic scenes on few backgrounds look alike), a random ViT-B-32 0.56-0.69; a
checkpoint that maps every image to one vector 1.0 (docs/mining.md)."""
MIN_COLLAPSE_ROWS = 16
"""Fewer image rows than this say nothing about collapse (a handful of plain or odd-mode images may well look alike):
the check passes and says so."""
SHORT_MAJORITY = 0.5
"""`enough_candidates` fails when more than this fraction of examples has fewer than K candidates."""
MAX_DEAD_FRACTION = 0.5
"""`sae_live_latents` fails when more than this fraction of latents is dead (`dead_latents`)."""
MIN_LATENT_STD = 1e-3
"""A sigmoid latent whose activation varies less than this over the pairs is dead (the tiny world's healthy SAE:
every latent's standard deviation above 7e-3)."""


def mean_pairwise_cosine(m: np.ndarray) -> float | None:
    """Mean cosine over all pairs i != j of the rows of `m` (N, D), exactly, in O(N D): for unit rows x_i,
    sum_{i,j} x_i . x_j = ||sum_i x_i||^2, and the diagonal adds N. None for fewer than two rows."""
    m = np.asarray(m, dtype=np.float64)
    n = m.shape[0]
    if n < 2:
        return None
    unit = m / np.clip(np.linalg.norm(m, axis=1, keepdims=True), 1e-12, None)
    total = float(np.square(unit.sum(axis=0)).sum())
    return (total - n) / (n * (n - 1))


def check_not_collapsed(df: pl.DataFrame, threshold: float = COLLAPSE_THRESHOLD,
                        min_rows: int = MIN_COLLAPSE_ROWS) -> CheckOutcome:
    m = embedding_matrix(df)
    m = m[np.isfinite(m).all(axis=1)] if m.size else m
    cos = mean_pairwise_cosine(m) if m.size else None
    rows = int(m.shape[0]) if m.size else 0
    details = {"mean_pairwise_cosine": cos, "threshold": threshold, "rows": rows}
    if rows < min_rows:
        return CheckOutcome(True, f"{rows} rows: too few to judge collapse (needs {min_rows})", details)
    if cos is None or cos <= threshold:
        return CheckOutcome(True, f"mean pairwise cosine {cos if cos is None else round(cos, 4)} <= {threshold}",
                            details)
    return CheckOutcome(False, (
        f"embeddings have collapsed: mean pairwise cosine {cos:.4f} > {threshold} (every image looks alike to the "
        "CLIP). Likely cause: a CLIP without trained weights (MISP_CLIP_PRETRAINED=random, or a weights file that "
        "does not match MISP_CLIP_MODEL) or a broken checkpoint; give real weights with MISP_CLIP_MODEL / "
        "MISP_CLIP_PRETRAINED (ClipModel resource). Retrieval, near-duplicate exclusion and the SAE are "
        "meaningless on these embeddings."), details)


def check_enough_candidates(table: pl.DataFrame, k: int, dup_threshold: float, *,
                            majority: float = SHORT_MAJORITY) -> CheckOutcome:
    """Fails when more than `majority` of the examples have fewer than `k` retrieved candidates."""
    counts = table["cand_rows"].list.len() if table.height else pl.Series([], dtype=pl.UInt32)
    short = int((counts < k).sum()) if table.height else 0
    frac = short / table.height if table.height else 0.0
    details = {"examples": table.height, "short_of_k": short, "fraction_short": frac, "k": k,
               "dup_threshold": dup_threshold, "min_candidates": int(counts.min()) if table.height else None}
    if frac <= majority:
        return CheckOutcome(True, f"{short} of {table.height} examples have fewer than K={k} candidates", details)
    return CheckOutcome(False, (
        f"{short} of {table.height} examples ({frac:.0%}) have fewer than K={k} candidates. Likely causes: "
        f"near-duplicate exclusion removed most of the pool (CandidatesConfig.dup_threshold={dup_threshold}: every "
        "candidate at or above that cosine to the positive is dropped), which is what collapsed embeddings from an "
        "unweighted CLIP do (see the pool_embeddings `not_collapsed` check, MISP_CLIP_PRETRAINED); or a pool too "
        "small for the examples (MISP_POOL_DIR), or CandidatesConfig.rank_min skipping too many."), details)


def check_sae_fvu(final_val: dict) -> CheckOutcome:
    """The held-out FVU is finite and at most 1 (1 = no better than predicting the mean difference)."""
    fvu = final_val.get("fvu")
    finite = isinstance(fvu, (int, float)) and bool(np.isfinite(fvu))
    details = {"val_fvu": float(fvu) if finite else str(fvu), "n": final_val.get("n")}
    if finite and fvu <= 1.0:
        return CheckOutcome(True, f"held-out FVU {fvu:.4f} <= 1", details)
    return CheckOutcome(False, (
        f"the SAE's held-out FVU is {fvu!r}: {'not finite' if not finite else 'above 1'}, i.e. worse than predicting "
        "the mean. Likely causes: training diverged (lower SaeTrainingConfig.lr, or fewer max_epochs) or the inputs "
        "are degenerate (collapsed CLIP embeddings: see the `not_collapsed` checks, MISP_CLIP_PRETRAINED)."), details)


def dead_latents(codes: np.ndarray, kind: str, min_std: float = MIN_LATENT_STD) -> np.ndarray:
    """(k,) bool: latents that carry no information over these pairs. `topk`: never non-zero. `sigmoid`: an
    activation that varies by less than `min_std` (standard deviation over the pairs), stuck wherever it sits. Not
    sae.metrics' firing threshold (0.5): a healthy sigmoid SAE trained towards rho = 0.05 keeps its activations near
    rho and may never cross 0.5 (the tiny world's SAE: every latent below 0.09, none constant), so `dead_fraction`
    reads 1.0 on a good sigmoid SAE."""
    codes = np.asarray(codes, dtype=np.float64)
    if kind == "topk":
        return ~(codes != 0).any(axis=0)
    return ~(codes.std(axis=0) >= min_std)


def check_sae_live_latents(codes: np.ndarray, kind: str, max_dead: float = MAX_DEAD_FRACTION) -> CheckOutcome:
    """At most `max_dead` of the latents are dead (`dead_latents`) over the pairs `codes` (N, k) encodes."""
    dead = dead_latents(codes, kind)
    frac = float(dead.mean()) if dead.size else 1.0
    details = {"dead_latents": int(dead.sum()), "latents": int(dead.size), "dead_fraction": frac,
               "max_dead_fraction": max_dead, "kind": kind, "pairs": int(np.shape(codes)[0])}
    if frac <= max_dead:
        how = "never fire" if kind == "topk" else "constant"
        return CheckOutcome(True, f"{int(dead.sum())} of {dead.size} latents dead ({how} over {details['pairs']} "
                                  "pairs)", details)
    return CheckOutcome(False, (
        f"{int(dead.sum())} of {dead.size} SAE latents ({frac:.1%}, more than {max_dead:.0%}) are dead: "
        f"{'they never fire' if kind == 'topk' else 'their activation is constant'} over the {details['pairs']} "
        "pairs. Likely causes: training diverged or saturated (SaeTrainingConfig.lr), too strong a sparsity pressure "
        "(rho / gamma for `sigmoid`, k_active for `topk`) or too many latents (num_latents) for the data; or "
        "degenerate inputs (collapsed CLIP embeddings: see the `not_collapsed` checks, MISP_CLIP_PRETRAINED)."),
        details)
