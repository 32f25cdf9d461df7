"""Scores, greedy diverse selection and proposals (pipeline/selection.py) against hand values and a
brute-force reference that follows SPEC §2.6 literally."""

import math

import numpy as np
import pytest

from pipeline.selection import (
    combined_score,
    greedy_diverse,
    mean_pairwise_latent_distance,
    proposal,
    select_batch,
    select_by_similarity,
    select_from_gallery,
    select_random,
    semantic_deviation,
)


def reference_greedy(s, Z, K, lam):
    """SPEC §2.6 in plain Python: S = [argmax s]; then argmax_{i not in S} s_i + lam * min_{j in S}(1 - cos(z_i, z_j)).
    Ties to the lowest index; cos with a zero code is 0."""
    s = [float(x) for x in s]
    Z = [[float(x) for x in row] for row in Z]

    def cos(a, b):
        na = math.sqrt(sum(x * x for x in a))
        nb = math.sqrt(sum(x * x for x in b))
        if na == 0 or nb == 0:
            return 0.0
        return sum(x * y for x, y in zip(a, b)) / (na * nb)

    C = len(s)
    S = []
    while len(S) < min(K, C):
        best, best_val = None, None
        for i in range(C):
            if i in S:
                continue
            val = s[i] if not S else s[i] + lam * min(1 - cos(Z[i], Z[j]) for j in S)
            if best_val is None or val > best_val:
                best, best_val = i, val
        S.append(best)
    return S


def random_instance(rng, C, k, sparse=False):
    s = rng.random(C)
    Z = rng.standard_normal((C, k))
    if sparse:  # SAE-like: non-negative, mostly zero, some all-zero rows
        Z = np.maximum(Z, 0) * (rng.random((C, k)) < 0.3)
    return s, Z


@pytest.mark.parametrize("seed", range(60))
def test_greedy_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    C = int(rng.integers(1, 40))
    k = int(rng.integers(1, 12))
    K = int(rng.integers(1, 8))
    lam = float(rng.choice([0.0, 0.1, 0.5, 1.0, 3.0, 10.0]))
    s, Z = random_instance(rng, C, k, sparse=bool(seed % 2))
    got = greedy_diverse(s, Z, K=K, lambda_div=lam)
    assert got.indices.tolist() == reference_greedy(s, Z, K, lam)
    assert got.shortfall == max(0, K - C)
    assert got.indices.dtype == np.int64


def test_greedy_lambda_zero_is_topk_and_k1_is_argmax():
    rng = np.random.default_rng(1)
    for _ in range(20):
        s, Z = random_instance(rng, 30, 8)
        top = np.argsort(-s, kind="stable")[:5].tolist()
        assert greedy_diverse(s, Z, K=5, lambda_div=0.0).indices.tolist() == top
        assert greedy_diverse(s, Z, K=1, lambda_div=2.0).indices.tolist() == [int(np.argmax(s))]


def test_greedy_prefers_diverse_codes():
    # two near-identical high scorers and one orthogonal slightly lower one: diversity picks the orthogonal
    s = np.array([1.0, 0.99, 0.9])
    Z = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    assert greedy_diverse(s, Z, K=2, lambda_div=0.5).indices.tolist() == [0, 2]
    assert greedy_diverse(s, Z, K=2, lambda_div=0.0).indices.tolist() == [0, 1]


def test_greedy_ties_and_zero_codes():
    s = np.ones(5)
    Z = np.zeros((5, 3))  # all zero codes: distance 1 to everything, all objectives equal
    got = greedy_diverse(s, Z, K=3, lambda_div=0.5)
    assert got.indices.tolist() == [0, 1, 2] and got.shortfall == 0


def test_greedy_k_larger_than_pool():
    rng = np.random.default_rng(3)
    s, Z = random_instance(rng, 4, 5)
    got = greedy_diverse(s, Z, K=10, lambda_div=0.5)
    assert sorted(got.indices.tolist()) == [0, 1, 2, 3]
    assert got.shortfall == 6
    assert got.indices.tolist() == reference_greedy(s, Z, 10, 0.5)


def test_greedy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="K="):
        greedy_diverse(np.ones(3), np.ones((3, 2)), K=0)
    with pytest.raises(ValueError, match="lambda_div"):
        greedy_diverse(np.ones(3), np.ones((3, 2)), lambda_div=-1)
    with pytest.raises(ValueError, match="must be"):
        greedy_diverse(np.ones(3), np.ones((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        greedy_diverse(np.array([1.0, np.nan]), np.ones((2, 2)))


def test_combined_score_hand_values():
    recon = np.array([1.0, 2.0, 4.0])
    dev = np.array([3.0, 0.0, 6.0])
    np.testing.assert_allclose(combined_score(recon, dev), [0.75, 0.5, 2.0])
    np.testing.assert_allclose(combined_score(recon, dev, w_rec=2.0, w_dev=0.5), [0.75, 1.0, 2.5])
    # max == 0: that term contributes nothing instead of dividing by zero
    np.testing.assert_allclose(combined_score(recon, np.zeros(3)), [0.25, 0.5, 1.0])
    np.testing.assert_allclose(combined_score(np.zeros(3), np.zeros(3)), [0.0, 0.0, 0.0])
    # rounding negatives of the rank-one error are clamped at zero
    np.testing.assert_allclose(combined_score(np.array([-1e-8, 2.0]), np.array([1.0, 1.0])), [1.0, 2.0])


def test_combined_score_padded_rows():
    recon = np.array([[1.0, 2.0, 100.0], [3.0, np.nan, np.nan]])
    dev = np.array([[1.0, 1.0, 100.0], [2.0, np.nan, np.nan]])
    valid = np.array([[True, True, False], [True, False, False]])
    s = combined_score(recon, dev, valid=valid)  # the padded 100s must not enter the maxima
    np.testing.assert_allclose(s[0, :2], [1.5, 2.0])
    np.testing.assert_allclose(s[1, :1], [2.0])
    assert np.isnan(s[~valid]).all()


def test_semantic_deviation_is_l1():
    codes = np.array([[1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(semantic_deviation(codes), [3.0, 0.0])


def test_proposal_properties():
    rng = np.random.default_rng(0)
    s = rng.random(50) * 3
    q = proposal(s)
    assert q.sum() == pytest.approx(1.0)
    order = np.argsort(s)
    assert (np.diff(q[order]) >= 0).all()  # monotone in s
    np.testing.assert_allclose(q, np.exp(s) / np.exp(s).sum())
    sharp = proposal(s, tau=1e-4)
    assert sharp[np.argmax(s)] > 0.999
    flat = proposal(s, tau=1e6)
    np.testing.assert_allclose(flat, np.full(50, 1 / 50), rtol=1e-4)
    huge = proposal(np.array([1e4, 1e4 - 1.0, 0.0]))  # no overflow
    assert np.isfinite(huge).all() and huge.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tau"):
        proposal(s, tau=0.0)


def test_proposal_padded_and_empty_rows():
    s = np.array([[1.0, 2.0, np.nan], [np.nan, np.nan, np.nan]])
    valid = np.array([[True, True, False], [False, False, False]])
    q = proposal(s, valid=valid)
    assert q[0].sum() == pytest.approx(1.0) and q[0, 2] == 0.0
    assert (q[1] == 0).all()


def test_similarity_and_random_rules():
    sims = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    got = select_by_similarity(sims, K=3)
    assert got.indices.tolist() == [1, 3, 2] and got.shortfall == 0
    assert select_by_similarity(sims, K=7).shortfall == 2
    a = select_random(20, 5, 7)
    b = select_random(20, 5, np.random.default_rng(7))
    assert a.indices.tolist() == b.indices.tolist()
    assert len(set(a.indices.tolist())) == 5 and a.indices.max() < 20
    assert select_random(3, 5, 0).shortfall == 2
    with pytest.raises(ValueError, match="rng"):
        select_random(5, 2, None)


def test_mean_pairwise_latent_distance():
    Z = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # pairs: (0,1) 1, (0,2) 2, (1,2) 1
    assert mean_pairwise_latent_distance(Z) == pytest.approx(4 / 3)
    assert math.isnan(mean_pairwise_latent_distance(Z[:1]))
    batch = np.stack([Z, Z[[0, 0, 1]]])
    valid = np.array([[True, True, True], [True, True, False]])
    np.testing.assert_allclose(mean_pairwise_latent_distance(batch, valid=valid), [4 / 3, 0.0], atol=1e-12)


def test_select_batch_matches_per_example():
    rng = np.random.default_rng(5)
    E, C, k, K = 12, 20, 6, 3
    recon = rng.random((E, C))
    codes = np.maximum(rng.standard_normal((E, C, k)), 0)
    counts = rng.integers(0, C + 1, size=E)
    counts[0], counts[1] = C, 2  # a full pool and one smaller than K
    valid = np.arange(C)[None] < counts[:, None]
    # garbage on the padding must be ignored
    recon[~valid] = np.nan
    codes[~valid] = 1e9
    out = select_batch(recon, codes, counts, K=K, lambda_div=0.5, tau=0.7)
    for e in range(E):
        c = counts[e]
        s = combined_score(recon[e, :c], semantic_deviation(codes[e, :c]))
        np.testing.assert_allclose(out.score[e, :c], s)
        assert np.isnan(out.score[e, c:]).all() and (out.q[e, c:] == 0).all()
        if c:
            np.testing.assert_allclose(out.q[e, :c], proposal(s, 0.7))
        ref = reference_greedy(s, codes[e, :c], K, 0.5)
        assert out.selected[e, :len(ref)].tolist() == ref
        assert (out.selected[e, len(ref):] == -1).all()
        assert out.n_selected[e] == len(ref) and out.shortfall[e] == K - len(ref)
    assert out.shortfall[1] == 1
    sims = rng.random((E, C))
    by_sim = select_batch(recon, codes, counts, clip_sims=sims, rule="similarity", K=K)
    assert by_sim.selected[0].tolist() == np.argsort(-sims[0])[:K].tolist()
    r1 = select_batch(recon, codes, counts, rule="random_neighbours", K=K, rng=3)
    r2 = select_batch(recon, codes, counts, rule="random_neighbours", K=K, rng=3)
    assert (r1.selected == r2.selected).all()
    for e in range(E):
        picks = r1.selected[e][r1.selected[e] >= 0]
        assert len(set(picks.tolist())) == min(K, counts[e]) and (picks < counts[e]).all()


def test_greedy_is_more_diverse_than_similarity():
    rng = np.random.default_rng(11)
    E, C, k = 40, 64, 16
    # candidates come in 8 tight code clusters; the highest CLIP-similar ones share a cluster
    centres = rng.standard_normal((8, k))
    labels = rng.integers(0, 8, size=(E, C))
    codes = np.abs(centres[labels] + 0.05 * rng.standard_normal((E, C, k)))
    recon = rng.random((E, C))
    sims = np.where(labels == 0, 0.9, 0.5) + 0.01 * rng.random((E, C))
    counts = np.full(E, C)
    g = select_batch(recon, codes, counts, K=3, lambda_div=0.5)
    s = select_batch(recon, codes, counts, clip_sims=sims, rule="similarity", K=3)
    assert np.nanmean(g.diversity) > np.nanmean(s.diversity) + 0.05


def test_select_batch_rejects_bad_inputs():
    recon, codes, counts = np.ones((2, 4)), np.ones((2, 4, 3)), np.array([4, 4])
    with pytest.raises(ValueError, match="rule"):
        select_batch(recon, codes, counts, rule="best")
    with pytest.raises(ValueError, match="clip_sims"):
        select_batch(recon, codes, counts, rule="similarity")
    with pytest.raises(ValueError, match="counts"):
        select_batch(recon, codes, np.array([5, 1]))
    with pytest.raises(ValueError, match="codes"):
        select_batch(recon, codes[:, :3], counts)
    bad = recon.copy()
    bad[0, 1] = np.inf
    with pytest.raises(ValueError, match="recon"):
        select_batch(bad, codes, counts)


def test_random_pool_draws_from_the_whole_gallery_not_the_neighbours():
    """`random_pool` (the papers' random baseline) draws uniformly from the gallery, so almost all of its
    negatives lie outside an example's m nearest neighbours, where `random_neighbours` (the old `random`) always
    stays; the positive and its near-duplicates are never drawn."""
    rng = np.random.default_rng(0)
    n, m, K, E = 400, 16, 3, 200
    emb = rng.standard_normal((n, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    positive = 0
    order = np.argsort(-(emb @ emb[positive]))  # positive first, then its neighbours
    neighbours = set(order[1:m + 1].tolist())
    near_dup = int(order[1])  # pretend the nearest one is a near-duplicate: it must never be drawn
    excluded = [lambda rows: (rows == positive) | (rows == near_dup)] * E
    drawn = select_from_gallery(n, K, 7, excluded)
    assert drawn.shape == (E, K) and (drawn >= 0).all()
    assert all(len(set(row)) == K for row in drawn.tolist())  # without replacement within an example
    flat = drawn.ravel().tolist()
    assert positive not in flat and near_dup not in flat
    outside = np.mean([r not in neighbours for r in flat])
    assert outside > 0.9  # expected 1 - (m - 1) / (n - 2) = 0.96
    # uniform over the gallery: the mean similarity rank of a draw is about the middle (n / 2 = 200)
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    assert abs(rank[drawn].mean() - n / 2) < 20
    # reproducible from the seed; the neighbour rule, given the same m candidates, never leaves them
    assert (select_from_gallery(n, K, 7, excluded) == drawn).all()
    cand_rows = order[1:m + 1]
    codes = rng.random((E, m, 4))
    near = select_batch(rng.random((E, m)), codes, np.full(E, m), rule="random_neighbours", K=K, rng=7)
    assert all(int(cand_rows[j]) in neighbours for j in near.selected.ravel().tolist())
    # a tiny gallery runs out: -1 padding
    small = select_from_gallery(3, K, 0, [lambda rows: rows == 0])
    assert sorted(small[0].tolist()) == [-1, 1, 2]
    with pytest.raises(ValueError, match="rng"):
        select_from_gallery(n, K, None, excluded)
