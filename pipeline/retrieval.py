"""Candidate negatives with FAISS (SPEC §2.2): the M pool images nearest to each positive, by cosine.

Embeddings are L2-normalised (docs/data.md), so inner product is cosine and every index here uses the
inner-product metric. Rules, in this order, per query:
  1. drop the positive itself: pool rows whose id equals the query id or one of the query's `exclude_ids`;
  2. drop near-duplicates of the positive: cosine >= `dup_threshold` (a resized or re-encoded copy of the
     positive under another name is not a negative);
  3. rank the rest by cosine (ties: lower pool row first), skip the first `rank_min`, keep the next `m`.
A pool too small to fill `m` gives fewer candidates and a recorded `shortfall`, never an error.
Pure numpy + faiss: no Dagster, no I/O.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
GPU_MAX_K = 2048
"""faiss GPU indexes refuse k above this; queries that need more are answered by exact numpy search."""
NORM_TOLERANCE = 1e-2
"""How far a row norm may be from 1: float16 round trips stay inside, unnormalised features do not."""
_CHUNK_FLOATS = 1 << 24
"""Bound on the floats of one exact-search block (64 MiB), so that big pools never blow memory."""


# ---------------------------------------------------------------- validation


def as_embeddings(x, name: str, *, dim: int | None = None) -> np.ndarray:
    """(rows, dim) C-contiguous float32 from any float array, or a ValueError that says what to fix."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} has shape {arr.shape}; expected a 2-D (rows, dim) array of embeddings")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); embed at least one row before indexing")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} has dtype {arr.dtype}; expected floating embeddings (float32)")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name} has {bad.size} rows with NaN/inf (first rows {bad[:5].tolist()}); "
                         "re-embed or drop them")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, the index has {dim}; use embeddings of the same CLIP")
    norms = np.linalg.norm(arr, axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        bad = np.flatnonzero(off)
        raise ValueError(f"{name} rows {bad[:5].tolist()} have norms {norms[bad[:5]].round(4).tolist()}; "
                         "L2-normalise them (x / ||x||): inner product is cosine only for unit vectors")
    return arr


def _gpu_available() -> bool:
    # faiss-cpu has no StandardGpuResources; get_num_gpus() alone returns 0 there, but be explicit.
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ---------------------------------------------------------------- index


@dataclass
class PoolIndex:
    """A FAISS index over the pool with the settings it was built with (report them as metadata)."""

    index: faiss.Index
    kind: str
    on_gpu: bool
    params: dict = field(default_factory=dict)
    _gpu_resources: object = field(default=None, repr=False)  # must outlive the GPU index that uses it

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def max_k(self) -> int:
        return min(self.ntotal, GPU_MAX_K) if self.on_gpu else self.ntotal

    def search(self, queries_bd: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims (B, k) float32, rows (B, k) int64), nearest first; row -1 where the index found nothing."""
        k = int(min(k, self.ntotal))
        if self.kind == "hnsw" and k > self.params["ef_search"]:
            # HNSW's beam must be at least k wide or it returns -1 holes; widen it for this search only.
            sims, rows = self.index.search(queries_bd, k, params=faiss.SearchParametersHNSW(efSearch=k))
        else:
            sims, rows = self.index.search(queries_bd, k)
        return sims, rows.astype(np.int64, copy=False)

    def metadata(self) -> dict:
        return {"kind": self.kind, "on_gpu": self.on_gpu, "ntotal": self.ntotal, "dim": self.dim, **self.params}


def build_index(pool_emb, kind: str = "flat", *, nlist: int | None = None, nprobe: int | None = None,
                hnsw_m: int = 32, ef_search: int = 128, use_gpu: bool | str = "auto", seed: int = 0) -> PoolIndex:
    """Index (N, D) unit pool embeddings for inner-product search.

    kind: `flat` exact (IndexFlatIP); `ivf` IndexIVFFlat trained on the pool, nlist default round(4 sqrt N),
    nprobe default max(8, nlist // 16) (faiss' own default of 1 loses too much recall for mining);
    `hnsw` IndexHNSWFlat with hnsw_m links per node and ef_search beam width.
    use_gpu: "auto" moves flat/ivf to GPU 0 when faiss has GPU support and sees a GPU, True requires it,
    False keeps CPU. HNSW has no faiss GPU implementation and stays on CPU.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu={use_gpu!r}; choose 'auto', True or False")
    pool_nd = as_embeddings(pool_emb, "pool_emb")
    n, d = pool_nd.shape
    params: dict = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = int(nlist) if nlist is not None else max(1, min(n, round(4 * math.sqrt(n))))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist={nlist} must be in [1, pool size {n}]; lower nlist or use kind='flat'")
        nprobe = int(nprobe) if nprobe is not None else max(8, nlist // 16)
        if nprobe < 1:
            raise ValueError(f"nprobe={nprobe} must be >= 1")
        nprobe = min(nprobe, nlist)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)  # k-means initialisation: same pool + seed gives the same lists
        # faiss warns below 39 points per list, i.e. for every pool under ~24k at nlist = 4 sqrt(N); coarse lists
        # need far fewer, and the recall we report against exact search is the real check.
        index.cp.min_points_per_centroid = 5
        index.train(pool_nd)
        index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe, "seed": int(seed)}
    else:
        if hnsw_m < 2 or ef_search < 1:
            raise ValueError(f"hnsw_m={hnsw_m} must be >= 2 and ef_search={ef_search} >= 1")
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = int(ef_search)
        params = {"hnsw_m": int(hnsw_m), "ef_search": int(ef_search)}
    index.add(pool_nd)

    want_gpu = use_gpu is True or (use_gpu == "auto" and kind != "hnsw" and _gpu_available())
    if use_gpu is True and kind == "hnsw":
        raise ValueError("faiss has no GPU HNSW; use kind='flat' or 'ivf' on GPU, or use_gpu='auto'")
    if use_gpu is True and not _gpu_available():
        raise ValueError("use_gpu=True but faiss sees no GPU (faiss-cpu installed, or no CUDA device); "
                         "install faiss-gpu (`pip install -e .[gpu]`) or pass use_gpu='auto'")
    if not want_gpu:
        return PoolIndex(index, kind, on_gpu=False, params=params)
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    if kind == "ivf":
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", params["nprobe"])
    return PoolIndex(gpu_index, kind, on_gpu=True, params=params, _gpu_resources=res)


def _wrap(index) -> PoolIndex:
    if isinstance(index, PoolIndex):
        return index
    if isinstance(index, faiss.Index):
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the faiss index uses an L2 metric; build it with build_index (inner product)")
        return PoolIndex(index, "custom", on_gpu=False)
    raise ValueError(f"index is a {type(index).__name__}; pass a PoolIndex from build_index or a faiss.Index")


def recall_at_m(approx_index, exact_index, queries, m: int) -> float:
    """Mean over queries of |approx top-m ∩ exact top-m| / |exact top-m|: what an approximate index loses."""
    approx, exact = _wrap(approx_index), _wrap(exact_index)
    queries_bd = as_embeddings(queries, "queries", dim=exact.dim)
    if m < 1:
        raise ValueError(f"m={m} must be >= 1")
    _, rows_a = approx.search(queries_bd, m)
    _, rows_e = exact.search(queries_bd, m)
    # set intersection per row, vectorised: (B, m, m) equality on valid rows
    hit = ((rows_e[:, :, None] == rows_a[:, None, :]) & (rows_e[:, :, None] >= 0)).any(-1)
    return float((hit.sum(1) / np.maximum((rows_e >= 0).sum(1), 1)).mean())


# ---------------------------------------------------------------- candidates


class Candidates(NamedTuple):
    """Per query the kept candidates, nearest first, padded to m."""

    indices: np.ndarray  # (B, m) int64 pool rows; -1 = no candidate (only after position counts[b])
    sims: np.ndarray  # (B, m) float32 cosine to the positive; NaN where indices == -1
    counts: np.ndarray  # (B,) int64 candidates found, <= m
    shortfall: np.ndarray  # (B,) int64 m - counts: the pool had too few eligible images
    n_exact_fallback: int  # queries answered by exact numpy search (approximate index or GPU k limit too short)
    warnings: tuple[str, ...]  # human-readable, one per call that had a shortfall


def _id_rows(pool_ids: Sequence[str], pool_alt_ids: Sequence[str] | None, n: int) -> dict[str, list[int]]:
    """id -> pool rows carrying it (several when content repeats under several names)."""
    lookup: dict[str, list[int]] = {}
    for ids, name in ((pool_ids, "pool_ids"), (pool_alt_ids, "pool_alt_ids")):
        if ids is None:
            continue
        if len(ids) != n:
            raise ValueError(f"{name} has {len(ids)} entries but the pool has {n} rows; pass one id per pool row")
        for row, key in enumerate(ids):
            lookup.setdefault(key, []).append(row)
    return lookup


def _excluded_rows(lookup: dict[str, list[int]], query_ids: Sequence[str], exclude_ids) -> np.ndarray:
    """(B, E) int64 pool rows to drop per query, padded with -2 (never a faiss row, never -1)."""
    b = len(query_ids)
    if exclude_ids is not None and len(exclude_ids) != b:
        raise ValueError(f"exclude_ids has {len(exclude_ids)} entries for {b} queries; pass one list per query")
    per_query = []
    for i, qid in enumerate(query_ids):
        extra = () if exclude_ids is None else exclude_ids[i]
        extra = (extra,) if isinstance(extra, str) else (extra or ())
        per_query.append({row for key in (qid, *extra) for row in lookup.get(key, ())})
    width = max(1, max(len(rows) for rows in per_query))
    out = np.full((b, width), -2, dtype=np.int64)
    for i, rows in enumerate(per_query):
        out[i, :len(rows)] = sorted(rows)
    return out


def _keep(rows_bk: np.ndarray, sims_bk: np.ndarray, excl_be: np.ndarray, m: int, rank_min: int,
          dup_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply the rules to fetched (B, k) results: (rows (B, m), sims (B, m), counts (B,), complete (B,))."""
    present = rows_bk >= 0
    # deterministic order whatever the index did with ties: similarity desc, then pool row asc
    order = np.lexsort((rows_bk, -np.where(present, sims_bk, -np.inf)), axis=-1)
    rows_bk = np.take_along_axis(rows_bk, order, 1)
    sims_bk = np.take_along_axis(sims_bk, order, 1)
    present = rows_bk >= 0
    is_self = (rows_bk[:, :, None] == excl_be[:, None, :]).any(-1)
    eligible = present & ~is_self & (sims_bk < dup_threshold)
    rank_bk = np.cumsum(eligible, axis=1) - 1  # rank among eligible candidates
    keep = eligible & (rank_bk >= rank_min) & (rank_bk < rank_min + m)
    out_rows = np.full((rows_bk.shape[0], m), -1, dtype=np.int64)
    out_sims = np.full((rows_bk.shape[0], m), np.nan, dtype=np.float32)
    qi, col = np.nonzero(keep)
    pos = rank_bk[qi, col] - rank_min
    out_rows[qi, pos] = rows_bk[qi, col]
    out_sims[qi, pos] = sims_bk[qi, col]
    complete = eligible.sum(1) >= rank_min + m
    return out_rows, out_sims, keep.sum(1).astype(np.int64), complete


def _exact(pool_nd: np.ndarray, queries_bd: np.ndarray, excl_be: np.ndarray, m: int, rank_min: int,
           dup_threshold: float):
    """The rules over the whole pool with numpy, in blocks of queries."""
    n = pool_nd.shape[0]
    step = max(1, _CHUNK_FLOATS // n)
    parts = []
    for s in range(0, queries_bd.shape[0], step):
        sims = queries_bd[s:s + step] @ pool_nd.T
        rows = np.broadcast_to(np.arange(n, dtype=np.int64), sims.shape)
        parts.append(_keep(rows, sims, excl_be[s:s + step], m, rank_min, dup_threshold))
    return tuple(np.concatenate(p) for p in zip(*parts))


def retrieve_candidates(index, pool_ids: Sequence[str], pool_emb, queries, query_ids: Sequence[str], *,
                        m: int = 64, dup_threshold: float | None = 0.98, rank_min: int = 0,
                        exclude_ids: Sequence[Sequence[str] | str] | None = None,
                        pool_alt_ids: Sequence[str] | None = None) -> Candidates:
    """Per query (B, D) unit positive embedding, the m nearest pool rows after the module's rules.

    pool_ids: one id per pool row (index order), matched against `query_ids` (B,) and `exclude_ids` (per query
    a str or a list of str). pool_alt_ids: an optional second id per pool row (e.g. its sha256) matched the
    same way, so a positive keyed by content is excluded from a pool keyed by name. dup_threshold=None
    keeps near-duplicates. FAISS is asked for more than m (the exclusions eat some) and asked again with
    a larger k for queries still short; queries the index cannot fill are answered exactly with numpy.
    """
    idx = _wrap(index)
    pool_nd = as_embeddings(pool_emb, "pool_emb", dim=idx.dim)
    queries_bd = as_embeddings(queries, "queries", dim=idx.dim)
    n, b = pool_nd.shape[0], queries_bd.shape[0]
    if n != idx.ntotal:
        raise ValueError(f"pool_emb has {n} rows but the index holds {idx.ntotal}; pass the embeddings it was built on")
    if len(query_ids) != b:
        raise ValueError(f"query_ids has {len(query_ids)} entries for {b} query rows; pass one id per query")
    if not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m={m!r} must be an integer >= 1")
    if not isinstance(rank_min, (int, np.integer)) or rank_min < 0:
        raise ValueError(f"rank_min={rank_min!r} must be an integer >= 0")
    if dup_threshold is None:
        dup_threshold = np.inf
    elif not np.isfinite(dup_threshold):
        raise ValueError(f"dup_threshold={dup_threshold}; pass a cosine such as 0.98, or None to keep duplicates")
    excl_be = _excluded_rows(_id_rows(pool_ids, pool_alt_ids, n), query_ids, exclude_ids)

    out_rows = np.full((b, m), -1, dtype=np.int64)
    out_sims = np.full((b, m), np.nan, dtype=np.float32)
    counts = np.zeros(b, dtype=np.int64)
    # Enough for the window, the excluded ids, and a margin of near-duplicates; more only on a retry.
    k = min(n, rank_min + m + excl_be.shape[1] + max(8, m // 4))
    pending = np.arange(b)
    n_fallback = 0
    while pending.size:
        if k > idx.max_k:
            starved = pending
            pending = pending[:0]
        else:
            sims, rows = idx.search(queries_bd[pending], k)
            r, s, c, complete = _keep(rows, sims, excl_be[pending], m, rank_min, dup_threshold)
            has_holes = (rows < 0).any(1)  # the approximate index cannot give more for this query
            final = complete | ((k >= n) & ~has_holes)
            starved_mask = ~final & has_holes
            done = pending[final]
            out_rows[done], out_sims[done], counts[done] = r[final], s[final], c[final]
            starved = pending[starved_mask]
            pending = pending[~final & ~starved_mask]
            k = min(k * 4, n) if k < n else n + 1
        if starved.size:
            n_fallback += starved.size
            r, s, c, _ = _exact(pool_nd, queries_bd[starved], excl_be[starved], m, rank_min, dup_threshold)
            out_rows[starved], out_sims[starved], counts[starved] = r, s, c

    shortfall = m - counts
    warnings: tuple[str, ...] = ()
    if shortfall.any():
        short = np.flatnonzero(shortfall)
        msg = (f"{short.size} of {b} queries got fewer than m={m} candidates (min {int(counts.min())}): the pool "
               f"has {n} images, minus the positive, near-duplicates (cos >= {dup_threshold}) and rank_min={rank_min}; "
               "use a larger pool or a smaller m")
        log.warning(msg)
        warnings = (msg,)
    return Candidates(out_rows, out_sims, counts, shortfall, n_fallback, warnings)
