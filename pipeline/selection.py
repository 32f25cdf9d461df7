"""Scores, greedy diverse selection and proposals over each example's candidate pool (SPEC §2.5-2.7).

Everything is numpy and vectorised over candidates; the batched entry point `select_batch` is also
vectorised over examples (ragged pools as padded (E, C) arrays + `counts`, as `retrieval.Candidates` gives
them), so the only Python loop is over the K greedy steps. Indices returned are positions in an example's
pool (columns of the padded arrays), not pool rows: `cands.indices[e, selected[e, j]]` is the pool row.

Cosine of a zero code: a candidate whose SAE code is all zeros (every latent off, possible with TopK)
has no direction, so we define cos(z_i, z_j) = 0, i.e. latent distance 1 - cos = 1, to anything.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

RULES = ("greedy", "similarity", "random_pool", "random_neighbours")
"""Selection rules. `random_pool`: K uniform draws from the whole gallery (the random-negative baseline of the
papers); the other three choose among an example's m retrieved candidates (`random_neighbours`: uniform among
them, which are harder than random gallery images)."""
NEIGHBOUR_RULES = ("greedy", "similarity", "random_neighbours")
"""The rules `select_batch` applies to the candidate pool; `random_pool` is `select_from_gallery`."""


class Selection(NamedTuple):
    indices: np.ndarray  # (K',) int64 positions in the pool, in selection order; K' = min(K, C)
    shortfall: int  # K - K': how many the pool could not supply (0 when it had K candidates)


class MinedSelection(NamedTuple):
    """`select_batch` output for E examples whose pools are padded to C candidates."""

    selected: np.ndarray  # (E, K) int64 pool positions in selection order; -1 after n_selected[e]
    n_selected: np.ndarray  # (E,) int64 min(K, counts)
    shortfall: np.ndarray  # (E,) int64 K - n_selected
    recon: np.ndarray  # (E, C) float64 l_i as given (negative rounding clamped at 0); NaN on padding
    deviation: np.ndarray  # (E, C) float64 v_i = ||z_i||_1; NaN on padding
    score: np.ndarray  # (E, C) float64 s_i; NaN on padding
    q: np.ndarray  # (E, C) float64 proposal softmax(s / tau) over the pool; 0 on padding (a row sums to 1)
    diversity: np.ndarray  # (E,) mean pairwise latent distance of the selected; NaN when fewer than 2


# ---------------------------------------------------------------- helpers


def _check_k(K) -> int:
    if not isinstance(K, (int, np.integer)) or K < 1:
        raise ValueError(f"K={K!r} must be an integer >= 1 (the number of negatives per example)")
    return int(K)


def _valid_mask(shape: tuple[int, ...], valid) -> np.ndarray:
    if valid is None:
        return np.ones(shape, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != shape:
        raise ValueError(f"valid has shape {valid.shape}; expected {shape} like the scores")
    return valid


def _unit(codes: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero, so their cosine with anything is 0 (module docstring)."""
    norms = np.linalg.norm(codes, axis=-1, keepdims=True)
    return np.divide(codes, norms, out=np.zeros_like(codes), where=norms > 0)


def _finite_where(x: np.ndarray, valid: np.ndarray, name: str) -> np.ndarray:
    bad = valid & ~np.isfinite(x)
    if bad.any():
        where = np.argwhere(bad)[:3].tolist()
        raise ValueError(f"{name} has NaN/inf at candidate positions {where}; check the SAE scoring of those rows")
    return np.where(valid, x, 0.0)


# ---------------------------------------------------------------- scores (SPEC §2.5)


def semantic_deviation(codes) -> np.ndarray:
    """v_i = ||z_i||_1: codes (..., C, k) -> (..., C)."""
    return np.abs(np.asarray(codes, dtype=np.float64)).sum(-1)


def combined_score(recon, dev, w_rec: float = 1.0, w_dev: float = 1.0, *, valid=None) -> np.ndarray:
    """s_i = w_rec l_i / max_j l_j + w_dev v_i / max_j v_j over the same pool; (..., C) in, (..., C) out.

    A term whose pool maximum is 0 contributes 0 (nothing to normalise by). `valid` (..., C) marks real
    candidates in padded pools: maxima ignore the rest, whose score is NaN.
    """
    l_ec = np.asarray(recon, dtype=np.float64)
    v_ec = np.asarray(dev, dtype=np.float64)
    if l_ec.shape != v_ec.shape or l_ec.ndim == 0:
        raise ValueError(f"recon {l_ec.shape} and dev {v_ec.shape} must have the same (..., C) shape")
    valid = _valid_mask(l_ec.shape, valid)
    # The rank-one SAE error is a difference of large terms and is not clamped (sae/rank_one.py), so a
    # perfect reconstruction can come out as -1e-7; a squared norm is >= 0.
    l_ec = np.maximum(_finite_where(l_ec, valid, "recon"), 0.0)
    v_ec = _finite_where(v_ec, valid, "dev")
    if (v_ec < 0).any():
        raise ValueError("dev has negative entries; pass the L1 norm of the codes (semantic_deviation)")

    def normalised(x):
        top = x.max(-1, keepdims=True)
        return np.divide(x, top, out=np.zeros_like(x), where=top > 0)

    s = w_rec * normalised(l_ec) + w_dev * normalised(v_ec)
    return np.where(valid, s, np.nan)


def proposal(scores, tau: float = 1.0, *, valid=None) -> np.ndarray:
    """q = softmax(s / tau) over the pool (..., C); 0 on invalid entries. Max-subtracted, so large s is safe."""
    if not tau > 0:
        raise ValueError(f"tau={tau} must be > 0 (small tau concentrates q on the best-scored candidate)")
    s = np.asarray(scores, dtype=np.float64)
    valid = _valid_mask(s.shape, valid)
    z = np.where(valid, _finite_where(s, valid, "scores") / tau, -np.inf)
    top = z.max(-1, keepdims=True)
    e = np.exp(z - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)  # an empty pool gets all zeros


# ---------------------------------------------------------------- selection rules (SPEC §2.6)


def _greedy(scores_ec: np.ndarray, unit_eck: np.ndarray, valid_ec: np.ndarray, K: int,
            lambda_div: float) -> np.ndarray:
    """Greedy diverse picks for E pools at once -> (E, K) positions, -1 where a pool ran out.

    A running min-distance vector (E, C) is updated with one cosine row per pick: O(E C k K).
    np.argmax returns the first maximum, which is the lowest-index tie-break.
    """
    e_n, c_n = scores_ec.shape
    rows = np.arange(e_n)
    n_take = np.minimum(valid_ec.sum(1), K)
    selected = np.full((e_n, K), -1, dtype=np.int64)
    available = valid_ec.copy()
    min_dist = np.full((e_n, c_n), np.inf)
    for step in range(min(K, c_n)):
        # step 0 is argmax s alone (no selected set yet; also avoids 0 * inf when lambda_div = 0)
        objective = scores_ec if step == 0 else scores_ec + lambda_div * min_dist
        pick = np.where(available, objective, -np.inf).argmax(1)
        active = step < n_take
        selected[active, step] = pick[active]
        available[rows[active], pick[active]] = False
        cos_ec = np.einsum("ek,eck->ec", unit_eck[rows, pick], unit_eck)
        min_dist = np.minimum(min_dist, 1.0 - cos_ec)
    return selected


def greedy_diverse(scores, codes, K: int = 3, lambda_div: float = 0.5) -> Selection:
    """SPEC §2.6: first argmax s; then argmax over unselected of s_i + lambda_div min_{j in S} (1 - cos(z_i, z_j)).

    scores (C,), codes (C, k). Ties go to the lowest index. K > C returns all C, with shortfall K - C.
    """
    K = _check_k(K)
    s_c = np.asarray(scores, dtype=np.float64)
    z_ck = np.asarray(codes, dtype=np.float64)
    if s_c.ndim != 1 or z_ck.ndim != 2 or z_ck.shape[0] != s_c.shape[0]:
        raise ValueError(f"scores {s_c.shape} and codes {z_ck.shape} must be (C,) and (C, k)")
    if not (np.isfinite(lambda_div) and lambda_div >= 0):
        raise ValueError(f"lambda_div={lambda_div} must be finite and >= 0 (0 = top-K by score)")
    valid = np.ones(s_c.shape, dtype=bool)
    s_c = _finite_where(s_c, valid, "scores")
    z_ck = _finite_where(z_ck, np.ones(z_ck.shape, dtype=bool), "codes")
    picks = _greedy(s_c[None], _unit(z_ck)[None], valid[None], K, lambda_div)[0]
    picks = picks[picks >= 0]
    return Selection(picks, K - picks.size)


def _top_by(values_ec: np.ndarray, valid_ec: np.ndarray, K: int) -> np.ndarray:
    """(E, K) positions of the K largest valid values, descending, ties to the lowest index; -1 padding."""
    keyed = np.where(valid_ec, -values_ec, np.inf)
    order = np.argsort(keyed, axis=1, kind="stable")[:, :K]
    taken = np.take_along_axis(valid_ec, order, 1)
    out = np.full((values_ec.shape[0], K), -1, dtype=np.int64)
    out[:, :order.shape[1]] = np.where(taken, order, -1)
    return out


def select_by_similarity(clip_sims, K: int = 3) -> Selection:
    """Ablation: the K candidates most similar to the positive (CLIP cosine), most similar first."""
    K = _check_k(K)
    sims = np.asarray(clip_sims, dtype=np.float64)
    if sims.ndim != 1:
        raise ValueError(f"clip_sims has shape {sims.shape}; expected (C,)")
    valid = np.ones(sims.shape, dtype=bool)
    picks = _top_by(_finite_where(sims, valid, "clip_sims")[None], valid[None], K)[0]
    picks = picks[picks >= 0]
    return Selection(picks, K - picks.size)


def _random_keys(rng, shape) -> np.ndarray:
    if rng is None:
        raise ValueError("random selection needs rng (a numpy Generator or an int seed) so that it is reproducible")
    return np.random.default_rng(rng).random(shape)


def select_random(C: int, K: int, rng) -> Selection:
    """Ablation: K of C candidates uniformly without replacement, in draw order. rng: Generator or int seed."""
    K = _check_k(K)
    if C < 0:
        raise ValueError(f"C={C} must be >= 0")
    # ordering by i.i.d. uniform keys is a uniformly random permutation; select_batch does the same per row
    picks = _top_by(_random_keys(rng, (1, C)), np.ones((1, C), dtype=bool), K)[0]
    picks = picks[picks >= 0]
    return Selection(picks, K - picks.size)


# ---------------------------------------------------------------- diversity


def mean_pairwise_latent_distance(codes_selected, valid=None):
    """Mean of 1 - cos(z_i, z_j) over pairs i < j: (K, k) -> float, or (E, K, k) -> (E,). NaN below 2 codes.

    `valid` (..., K) masks padding (e.g. `selected >= 0`). Used to compare the diversity of selection rules.
    """
    z = np.asarray(codes_selected, dtype=np.float64)
    if z.ndim not in (2, 3):
        raise ValueError(f"codes_selected has shape {z.shape}; expected (K, k) or (E, K, k)")
    single = z.ndim == 2
    z = z[None] if single else z
    valid = _valid_mask(z.shape[:2], None if valid is None else np.asarray(valid).reshape(z.shape[:2]))
    u = _unit(np.where(valid[..., None], z, 0.0))
    dist = 1.0 - np.einsum("eik,ejk->eij", u, u)
    upper = np.triu(np.ones(dist.shape[1:], dtype=bool), k=1)
    pairs = upper & valid[:, :, None] & valid[:, None, :]
    n_pairs = pairs.sum((1, 2))
    mean = np.divide(np.where(pairs, dist, 0.0).sum((1, 2)), n_pairs,
                     out=np.full(z.shape[0], np.nan), where=n_pairs > 0)
    return float(mean[0]) if single else mean


# ---------------------------------------------------------------- batched: score -> select -> propose


def select_batch(recon, codes, counts, *, clip_sims=None, rule: str = "greedy", K: int = 3,
                 lambda_div: float = 0.5, tau: float = 1.0, w_rec: float = 1.0, w_dev: float = 1.0,
                 rng=None) -> MinedSelection:
    """Score, select and propose for E examples at once.

    recon (E, C) reconstruction errors l_i and codes (E, C, k) SAE codes z_i of each example's candidates,
    padded to C; counts (E,) real candidates per example (positions >= counts[e] are ignored, whatever they
    hold). rule: `greedy` (SPEC §2.6), `similarity` (top-K clip_sims (E, C), needs clip_sims) or `random`
    (`random_neighbours`, needs rng). Scores and proposals are computed for every rule, so shards of any rule
    carry them. (`random_pool` draws outside the pool: `select_from_gallery`.)
    """
    if rule not in NEIGHBOUR_RULES:
        raise ValueError(f"rule={rule!r}; select_batch chooses among the candidates with one of {NEIGHBOUR_RULES} "
                         "(random_pool: select_from_gallery)")
    K = _check_k(K)
    l_ec = np.asarray(recon, dtype=np.float64)
    z_eck = np.asarray(codes, dtype=np.float64)
    if l_ec.ndim != 2 or z_eck.ndim != 3 or z_eck.shape[:2] != l_ec.shape:
        raise ValueError(f"recon {l_ec.shape} and codes {z_eck.shape} must be (E, C) and (E, C, k)")
    e_n, c_n = l_ec.shape
    counts_e = np.asarray(counts)
    if counts_e.shape != (e_n,) or not np.issubdtype(counts_e.dtype, np.integer):
        raise ValueError(f"counts must be an integer array of shape ({e_n},), got {counts_e.dtype} {counts_e.shape}")
    if (counts_e < 0).any() or (counts_e > c_n).any():
        raise ValueError(f"counts must lie in [0, C={c_n}]; got min {counts_e.min()} max {counts_e.max()}")
    if not (np.isfinite(lambda_div) and lambda_div >= 0):
        raise ValueError(f"lambda_div={lambda_div} must be finite and >= 0 (0 = top-K by score)")
    valid = np.arange(c_n)[None, :] < counts_e[:, None]
    z_eck = _finite_where(z_eck, np.broadcast_to(valid[..., None], z_eck.shape), "codes")

    v_ec = semantic_deviation(z_eck)
    s_ec = combined_score(l_ec, v_ec, w_rec, w_dev, valid=valid)
    q_ec = proposal(s_ec, tau, valid=valid)
    unit = _unit(z_eck)
    if rule == "greedy":
        selected = _greedy(np.where(valid, s_ec, 0.0), unit, valid, K, lambda_div)
    elif rule == "similarity":
        if clip_sims is None:
            raise ValueError("rule='similarity' needs clip_sims (E, C), e.g. Candidates.sims")
        sims = np.asarray(clip_sims, dtype=np.float64)
        if sims.shape != (e_n, c_n):
            raise ValueError(f"clip_sims has shape {sims.shape}; expected {(e_n, c_n)}")
        selected = _top_by(_finite_where(sims, valid, "clip_sims"), valid, K)
    else:
        selected = _top_by(_random_keys(rng, (e_n, c_n)), valid, K)

    n_sel = (selected >= 0).sum(1).astype(np.int64)
    picked = np.take_along_axis(z_eck, np.maximum(selected, 0)[..., None], 1)
    diversity = mean_pairwise_latent_distance(picked, valid=selected >= 0)
    return MinedSelection(
        selected=selected, n_selected=n_sel, shortfall=K - n_sel,
        recon=np.where(valid, np.maximum(l_ec, 0.0), np.nan), deviation=np.where(valid, v_ec, np.nan),
        score=s_ec, q=q_ec, diversity=diversity,
    )


# ---------------------------------------------------------------- whole-gallery random (the papers' random baseline)


def select_from_gallery(n_gallery: int, K: int, rng, excluded) -> np.ndarray:
    """K gallery rows per example drawn uniformly without replacement from the whole gallery of `n_gallery`
    images, skipping `excluded(e, rows) -> bool mask` (the positive itself and its near-duplicates: the caller
    knows the content hashes and embeddings). Returns (E, K) rows in draw order, -1 where the gallery ran out.

    `excluded` is a list of E callables. Rejection sampling: a batch of draws is made, excluded ones are
    dropped, and more are drawn until K are kept, so the cost is O(K) per example, not O(n_gallery)."""
    K = _check_k(K)
    if n_gallery < 0:
        raise ValueError(f"n_gallery={n_gallery} must be >= 0")
    gen = np.random.default_rng(rng) if rng is not None else None
    if gen is None:
        raise ValueError("random_pool selection needs rng (a numpy Generator or an int seed) so it is reproducible")
    out = np.full((len(excluded), K), -1, dtype=np.int64)
    for e, is_excluded in enumerate(excluded):
        # a uniformly random order of the gallery, read in chunks: the kept rows are a uniform K-subset
        order = gen.permutation(n_gallery) if n_gallery <= 4 * K + 64 else None
        kept: list[int] = []
        seen: set[int] = set()
        while len(kept) < K and len(seen) < n_gallery:
            if order is not None:
                chunk = order[len(seen):len(seen) + 2 * K]
            else:
                chunk = np.array([r for r in gen.integers(0, n_gallery, size=2 * K + 8).tolist() if r not in seen],
                                 dtype=np.int64)
                chunk = np.array(list(dict.fromkeys(chunk.tolist())), dtype=np.int64)
            if chunk.size == 0:
                continue
            seen.update(chunk.tolist())
            bad = np.asarray(is_excluded(chunk), dtype=bool)
            kept.extend(chunk[~bad].tolist()[:K - len(kept)])
        out[e, :len(kept)] = kept
    return out
