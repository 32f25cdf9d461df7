"""FAISS candidate retrieval (pipeline/retrieval.py): exclusion rules against brute-force numpy, and the
recall of the approximate indexes."""

import faiss
import numpy as np
import pytest

from pipeline.retrieval import Candidates, build_index, recall_at_m, retrieve_candidates


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_pool(n, d, seed=0):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered(n, d, n_clusters, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    return unit(centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, d)))


def at_cosine(q, c, seed):
    """A unit vector with cosine exactly c to unit q."""
    w = np.random.default_rng(seed).standard_normal(q.shape[0])
    w -= (w @ q) * q
    w /= np.linalg.norm(w)
    return (c * q + np.sqrt(1 - c * c) * w).astype(np.float32)


def brute_force(pool, q, excluded_rows, m, rank_min, dup_threshold):
    sims = pool @ q
    order = [i for i in np.argsort(-sims, kind="stable") if i not in excluded_rows and sims[i] < dup_threshold]
    keep = order[rank_min:rank_min + m]
    return keep, sims[keep]


def ids(n):
    return [f"img{i:05d}" for i in range(n)]


def check_layout(c: Candidates, m):
    b = c.counts.shape[0]
    assert c.indices.shape == (b, m) and c.sims.shape == (b, m)
    for i in range(b):
        n = c.counts[i]
        assert (c.indices[i, :n] >= 0).all() and (c.indices[i, n:] == -1).all()
        assert np.isnan(c.sims[i, n:]).all() and np.isfinite(c.sims[i, :n]).all()
        assert (np.diff(c.sims[i, :n]) <= 0).all()  # nearest first
        assert len(set(c.indices[i, :n].tolist())) == n
    np.testing.assert_array_equal(c.shortfall, m - c.counts)


@pytest.mark.parametrize("rank_min", [0, 3])
def test_matches_bruteforce_and_excludes_positive(rank_min):
    pool = random_pool(600, 24, seed=1)
    pool_ids = ids(600)
    q_rows = np.arange(0, 600, 37)
    queries = pool[q_rows]  # the positives are in the pool
    index = build_index(pool)
    c = retrieve_candidates(index, pool_ids, pool, queries, [pool_ids[r] for r in q_rows], m=20,
                            rank_min=rank_min)
    check_layout(c, 20)
    assert (c.counts == 20).all() and c.warnings == ()
    for i, r in enumerate(q_rows):
        assert r not in c.indices[i]
        keep, sims = brute_force(pool, queries[i], {r}, 20, rank_min, 0.98)
        assert c.indices[i].tolist() == keep
        np.testing.assert_allclose(c.sims[i], sims, atol=1e-5)


def test_rank_min_skips_leading_ranks():
    pool = random_pool(300, 16, seed=2)
    queries = random_pool(5, 16, seed=3)
    index = build_index(pool)
    qids = [f"q{i}" for i in range(5)]
    full = retrieve_candidates(index, ids(300), pool, queries, qids, m=30)
    skipped = retrieve_candidates(index, ids(300), pool, queries, qids, m=25, rank_min=5)
    np.testing.assert_array_equal(skipped.indices, full.indices[:, 5:])


def test_near_duplicates_and_content_ids():
    d = 32
    rng = np.random.default_rng(4)
    q = unit(rng.standard_normal(d))
    pool = random_pool(200, d, seed=5)
    pool[10] = at_cosine(q, 0.99, seed=6)  # near-duplicate: dropped
    pool[11] = at_cosine(q, 0.97, seed=7)  # close but distinct: kept, and ranked first
    pool[12] = q  # the positive under another name, known by its content id
    sha = [f"sha{i}" for i in range(200)]
    index = build_index(pool)
    c = retrieve_candidates(index, ids(200), pool, q[None], ["positive.png"], m=8, dup_threshold=None,
                            exclude_ids=[["sha12"]], pool_alt_ids=sha)
    assert 12 not in c.indices[0] and c.indices[0, :2].tolist() == [10, 11]
    c = retrieve_candidates(index, ids(200), pool, q[None], ["sha12"], m=8, pool_alt_ids=sha)
    assert 10 not in c.indices[0] and 12 not in c.indices[0]
    assert c.indices[0, 0] == 11 and c.sims[0, 0] == pytest.approx(0.97, abs=1e-5)
    # the threshold is the rule, not the planted rows: at 0.995 the 0.99 copy is a candidate again
    c = retrieve_candidates(index, ids(200), pool, q[None], ["sha12"], m=8, pool_alt_ids=sha, dup_threshold=0.995)
    assert c.indices[0, :2].tolist() == [10, 11]
    # a single string works as the per-query exclusion too
    c = retrieve_candidates(index, ids(200), pool, q[None], ["positive.png"], m=8, exclude_ids=["img00012"])
    assert 12 not in c.indices[0]


def test_many_duplicates_force_a_retry():
    d = 16
    q = random_pool(1, d, seed=8)[0]
    pool = random_pool(400, d, seed=9)
    for i in range(150):  # 150 copies crowd the top ranks: the first fetch cannot fill m
        pool[i] = at_cosine(q, 0.999, seed=100 + i)
    c = retrieve_candidates(build_index(pool), ids(400), pool, q[None], ["q"], m=20)
    assert c.counts[0] == 20 and (c.indices[0] >= 150).all()
    keep, _ = brute_force(pool, q, set(), 20, 0, 0.98)
    assert c.indices[0].tolist() == keep


def test_small_pool_gives_shortfall_not_crash():
    pool = random_pool(10, 8, seed=10)
    pool_ids = ids(10)
    c = retrieve_candidates(build_index(pool), pool_ids, pool, pool[:3], pool_ids[:3], m=64, rank_min=2)
    check_layout(c, 64)
    np.testing.assert_array_equal(c.counts, [7, 7, 7])  # 10 - the positive - 2 skipped ranks
    np.testing.assert_array_equal(c.shortfall, [57, 57, 57])
    assert len(c.warnings) == 1 and "fewer than m=64" in c.warnings[0]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_match_bruteforce_rules(kind):
    pool = clustered(2000, 32, 20, seed=11)
    queries = clustered(30, 32, 20, seed=12)
    index = build_index(pool, kind, nprobe=16, ef_search=256)
    c = retrieve_candidates(index, ids(2000), pool, queries, [f"q{i}" for i in range(30)], m=16)
    check_layout(c, 16)
    assert (c.counts == 16).all()
    agree = [len(set(c.indices[i]) & set(brute_force(pool, queries[i], set(), 16, 0, 0.98)[0])) / 16
             for i in range(30)]
    assert np.mean(agree) > 0.9


def test_recall_of_approximate_indexes():
    pool = clustered(5000, 32, 50, seed=13)
    queries = clustered(200, 32, 50, seed=14)
    flat = build_index(pool)
    assert recall_at_m(flat, build_index(pool, "flat"), queries, 64) == 1.0
    ivf = build_index(pool, "ivf", nprobe=32, seed=0)
    assert ivf.params["nlist"] == round(4 * np.sqrt(5000))
    assert recall_at_m(ivf, flat, queries, 64) > 0.9
    assert recall_at_m(build_index(pool, "ivf", nlist=ivf.params["nlist"], nprobe=ivf.params["nlist"]),
                       flat, queries, 64) == pytest.approx(1.0)
    hnsw = build_index(pool, "hnsw", hnsw_m=32, ef_search=256)
    assert recall_at_m(hnsw, flat, queries, 64) > 0.9
    assert not flat.on_gpu and flat.metadata()["kind"] == "flat"


def test_cpu_faiss_never_errors_on_auto_gpu():
    pool = random_pool(50, 8)
    assert build_index(pool, use_gpu="auto").index.ntotal == 50
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="faiss-gpu"):
            build_index(pool, use_gpu=True)
    with pytest.raises(ValueError, match="GPU HNSW"):
        build_index(pool, "hnsw", use_gpu=True)


def test_input_validation():
    pool = random_pool(20, 8)
    with pytest.raises(ValueError, match="2-D"):
        build_index(pool[0])
    with pytest.raises(ValueError, match="empty"):
        build_index(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        build_index(np.ones((3, 8), dtype=np.int64))
    bad = pool.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(bad)
    with pytest.raises(ValueError, match="L2-normalise"):
        build_index(pool * 3)
    with pytest.raises(ValueError, match="kind"):
        build_index(pool, "lsh")
    with pytest.raises(ValueError, match="nlist"):
        build_index(pool, "ivf", nlist=50)
    index = build_index(pool.astype(np.float64))  # float64 is cast, not refused
    with pytest.raises(ValueError, match="dimension"):
        retrieve_candidates(index, ids(20), pool, random_pool(2, 4), ["a", "b"])
    with pytest.raises(ValueError, match="query_ids"):
        retrieve_candidates(index, ids(20), pool, pool[:2], ["a"])
    with pytest.raises(ValueError, match="pool_ids"):
        retrieve_candidates(index, ids(19), pool, pool[:2], ["a", "b"])
    with pytest.raises(ValueError, match="index holds"):
        retrieve_candidates(index, ids(10), pool[:10], pool[:2], ["a", "b"])
    with pytest.raises(ValueError, match="m="):
        retrieve_candidates(index, ids(20), pool, pool[:2], ["a", "b"], m=0)
    with pytest.raises(ValueError, match="exclude_ids"):
        retrieve_candidates(index, ids(20), pool, pool[:2], ["a", "b"], exclude_ids=[["x"]])


def test_exact_fallback_when_the_index_cannot_fill(monkeypatch):
    pool = random_pool(400, 16, seed=15)
    queries = random_pool(6, 16, seed=16)
    qids = [f"q{i}" for i in range(6)]
    # 200 lists of ~2 vectors and nprobe=1: the IVF index returns -1 holes long before m
    starved = build_index(pool, "ivf", nlist=200, nprobe=1)
    c = retrieve_candidates(starved, ids(400), pool, queries, qids, m=16)
    assert c.n_exact_fallback == 6 and (c.counts == 16).all()
    for i in range(6):
        assert c.indices[i].tolist() == brute_force(pool, queries[i], set(), 16, 0, 0.98)[0]
    # a GPU index refuses large k: queries that need more than its limit are answered exactly
    import pipeline.retrieval as retrieval

    monkeypatch.setattr(retrieval, "GPU_MAX_K", 30)
    pool[:100] = np.repeat(queries[:1], 100, axis=0)  # 100 duplicates of query 0 exceed k = 30
    fake_gpu = retrieval.PoolIndex(build_index(pool).index, "flat", on_gpu=True)
    c = retrieve_candidates(fake_gpu, ids(400), pool, queries, qids, m=16)
    assert c.n_exact_fallback >= 1 and (c.counts == 16).all()
    assert c.indices[0].tolist() == brute_force(pool, queries[0], set(), 16, 0, 0.98)[0]
