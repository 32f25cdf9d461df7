"""Benchmark mining (SPEC §2): examples mined per second per stage, exact vs IVF vs HNSW, and the retrieval step
against sentence-transformers' `mine_hard_negatives` on the same embeddings.

    .venv/bin/python bench/mine.py            # pools of 10k and 100k, 1,000 examples, 3 repetitions: 5-8 min on 2 cores
    .venv/bin/python bench/mine.py --quick    # tiny sizes, 1 repetition: checks the script runs (seconds)

Data (fixed seeds, nothing downloaded, HF_HUB_OFFLINE=1): synthetic CLIP-like L2-normalised image embeddings,
D = 512, from 1,000 clusters, each with its own 16-d local subspace, around a shared mean direction: a random pair
has cosine ~0.45, the nearest neighbour ~0.8-0.85 (CLIP ViT-B on COCO looks like this). The positives are pool
images (as when COCO is both the positive source and the pool), so the positive must be excluded by id, and 5 % of
them also have a re-encoded copy (cosine ~0.99) in the pool under another id, which the duplicate threshold removes.
Prompts t: unit Dt = 512 vectors.

Stages, each timed --reps times after a warm-up (index builds: no warm-up, they are expensive), medians reported:
  build      `build_index(pool, kind)` for flat / ivf / hnsw (use_gpu="auto": CPU with faiss-cpu).
  retrieve   `retrieve_candidates(..., m=64, dup_threshold=0.98)`: id exclusion, duplicates, re-queries included.
  score      u = h_v(m_p) - h_v(m_i) gathered for the exact candidates, then `SparseAutoencoder.score_candidates`
             (fused space, k = 128 latents) in chunks of --sae-batch examples. The SAE is RANDOMLY INITIALISED
             (speed does not depend on trained weights; biases jittered so that codes are not constant).
  select     `select_batch(recon, codes, counts, rule="greedy", K=3)`: scores, greedy selection, proposals q.
End to end = retrieve + score + select (steady state: one index serves every example), and with the index build
for these --queries examples. Recall@64 of IVF and HNSW against exact search: `recall_at_m` (raw top-64), and the
overlap of their `retrieve_candidates` output with the exact one (what mining actually keeps); IVF is also timed at
2x and 4x its default nprobe, to show what more recall costs.

sentence-transformers (optional, `pip install sentence-transformers datasets`; "not installed" otherwise):
`mine_hard_negatives` takes a model, not embeddings, so it gets `PrecomputedEmbeddings`, a duck-typed stand-in
that returns OUR embeddings by row lookup (no network, no transformer). Its settings mirror ours: positive excluded
by index, max_score = 0.98 for duplicates, range_min = 0, range_max = 64 + 16 so that FAISS is asked for the same
k = 81 as `retrieve_candidates`, num_negatives = 64, sampling "top", output "labeled-list". Timed: the whole call
(input checks, its own IndexFlatIP build + search, torch masking, building the output `datasets.Dataset`) minus the
time spent inside the stand-in model (embedding lookup). Its FAISS share is reported separately, as is the
use_faiss=False path (torch matmul + topk). Agreement = mean fraction of our exact candidates it also returns.

Prints tables; writes reports/bench/mine.json (machine, threads, versions, repetitions, every timing).
"""

from __future__ import annotations

import os

# Before any Hugging Face import: never reach the network, and keep sentence-transformers' progress bars quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store.parquet_io import write_json_atomic  # noqa: E402
from pipeline.retrieval import KINDS, build_index, recall_at_m, retrieve_candidates  # noqa: E402
from pipeline.selection import select_batch  # noqa: E402
from sae import SaeConfig, SparseAutoencoder  # noqa: E402
from sae.autoencoder import library_versions  # noqa: E402

M = 64  # SPEC default candidates per example
K = 3  # SPEC default negatives per example
DUP_THRESHOLD = 0.98


# ---------------------------------------------------------------- data


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clip_like_pool(n: int, d: int, n_clusters: int, rng: np.random.Generator, local_dim: int = 16) -> np.ndarray:
    """(n, d) unit embeddings: shared mean + cluster centre + a per-cluster low-dimensional local variation + noise.

    Weights (0.45, 0.25, 0.25, 0.05 of the squared norm) give random pairs a cosine near 0.45 and close neighbours
    0.8+, like CLIP image embeddings; isotropic Gaussians would make every neighbour equally far and flatter IVF/HNSW.
    """
    mean = unit_rows(rng.standard_normal((1, d)))[0]
    centres = unit_rows(rng.standard_normal((n_clusters, d)))
    local_basis = (rng.standard_normal((n_clusters, local_dim, d)) / np.sqrt(d)).astype(np.float32)
    label = rng.integers(0, n_clusters, n)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 20_000):  # blocks keep the (block, local_dim, d) gather small
        lab = label[s:s + 20_000]
        z = rng.standard_normal((lab.size, local_dim)).astype(np.float32) / np.sqrt(local_dim)
        local = np.einsum("nl,nld->nd", z, local_basis[lab])
        noise = rng.standard_normal((lab.size, d)).astype(np.float32) / np.sqrt(d)
        out[s:s + lab.size] = (np.sqrt(0.45) * mean + np.sqrt(0.25) * centres[lab] + np.sqrt(0.25) * local
                               + np.sqrt(0.05) * noise)
    return unit_rows(out)


def make_examples(n_pool: int, n_queries: int, d: int, dt: int, dup_frac: float, seed: int) -> dict:
    """Pool, pool ids, positives (pool rows, so the id rule must drop them), prompts, and near-duplicate copies."""
    rng = np.random.default_rng(seed)
    pool = clip_like_pool(n_pool, d, n_clusters=1000, rng=rng)
    rows = rng.permutation(n_pool)
    query_rows, others = rows[:n_queries], rows[n_queries:]
    n_dup = int(round(dup_frac * n_queries))
    # a re-encoded copy of a positive stored under another name: cosine ~0.99, removed only by dup_threshold
    dup_targets = others[:n_dup]
    pool[dup_targets] = unit_rows(pool[query_rows[:n_dup]] + 0.1 * rng.standard_normal((n_dup, d)) / np.sqrt(d))
    pool_ids = [f"img{i:07d}" for i in range(n_pool)]
    prompts = unit_rows(rng.standard_normal((n_queries, dt)))
    return {"pool": pool, "pool_ids": pool_ids, "queries": pool[query_rows].copy(),
            "query_ids": [pool_ids[r] for r in query_rows], "prompts": prompts, "n_dup": n_dup}


# ---------------------------------------------------------------- timing


def timed(fn, reps: int, warmup: bool = True):
    """(median seconds, all seconds, last result). The warm-up run spins up thread pools and allocators."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def stage_row(stage: str, index: str, seconds: float, times: list[float], n_examples: int | None, **extra) -> dict:
    rate = n_examples / seconds if n_examples else None
    return {"stage": stage, "index": index, "median_s": seconds, "times_s": times, "examples_per_s": rate, **extra}


# ---------------------------------------------------------------- stages


def candidate_overlap(rows_a: np.ndarray, rows_b: np.ndarray) -> float:
    """Mean over queries of |a ∩ b| / |b| for padded (B, m) pool rows (-1 = none)."""
    hit = ((rows_b[:, :, None] == rows_a[:, None, :]) & (rows_b[:, :, None] >= 0)).any(-1)
    return float((hit.sum(1) / np.maximum((rows_b >= 0).sum(1), 1)).mean())


def bench_retrieval(data: dict, reps: int) -> tuple[list[dict], dict]:
    """Build and retrieve with every index kind; recall of ivf/hnsw against flat. Returns rows and exact candidates."""
    n_q = len(data["query_ids"])
    rows, built, cands = [], {}, {}
    for kind in KINDS:
        med, times, built[kind] = timed(lambda: build_index(data["pool"], kind), reps, warmup=False)
        rows.append(stage_row("build", kind, med, times, None, params=built[kind].metadata()))

    def retrieve(kind):
        return retrieve_candidates(built[kind], data["pool_ids"], data["pool"], data["queries"], data["query_ids"],
                                   m=M, dup_threshold=DUP_THRESHOLD)

    for kind in KINDS:
        med, times, cands[kind] = timed(lambda: retrieve(kind), reps)
        extra = {"n_exact_fallback": cands[kind].n_exact_fallback, "mean_count": float(cands[kind].counts.mean())}
        if kind != "flat":
            extra["recall_at_m"] = recall_at_m(built[kind], built["flat"], data["queries"], M)
            extra["candidate_overlap"] = candidate_overlap(cands[kind].indices, cands["flat"].indices)
        rows.append(stage_row("retrieve", kind, med, times, n_q, **extra))
    check_exclusions(data, cands["flat"])
    rows += ivf_nprobe_sweep(built["ivf"], built["flat"], retrieve, data, reps)
    return rows, cands["flat"]


def ivf_nprobe_sweep(ivf, flat, retrieve, data: dict, reps: int) -> list[dict]:
    """Recall and retrieve time of the IVF index at 2x and 4x the default nprobe: what more recall costs.
    CPU only (a GPU IVF takes nprobe through GpuParameterSpace); the index is restored afterwards."""
    if ivf.on_gpu:
        return []
    default, nlist, rows = ivf.index.nprobe, ivf.params["nlist"], []
    try:
        for factor in (2, 4):
            nprobe = min(nlist, default * factor)
            ivf.index.nprobe = nprobe
            med, times, _ = timed(lambda: retrieve("ivf"), reps)
            rows.append(stage_row("retrieve", f"ivf nprobe={nprobe}", med, times, len(data["query_ids"]),
                                  recall_at_m=recall_at_m(ivf, flat, data["queries"], M), nprobe=nprobe, nlist=nlist))
    finally:
        ivf.index.nprobe = default
    return rows


def check_exclusions(data: dict, cands) -> None:
    """The bench is only meaningful if the rules fired: no positive and no planted duplicate among the candidates."""
    pos_rows = np.array([int(q[3:]) for q in data["query_ids"]])
    if (cands.indices == pos_rows[:, None]).any():
        raise AssertionError("a positive is among its own candidates; retrieve_candidates ignored the id rule")
    if (cands.sims >= DUP_THRESHOLD).any():
        raise AssertionError("a candidate has cosine >= dup_threshold; retrieve_candidates ignored the duplicate rule")


def make_sae(dv: int, dt: int, k: int, seed: int) -> SparseAutoencoder:
    """A random-init paper SAE (sigmoid, fused space): speed does not depend on the weights."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(kind="sigmoid", space="fused", dv=dv, dt=dt, num_latents=k), generator=g)
    with torch.no_grad():  # as bench/sae_score.py: spread the latents so codes differ between candidates
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 1e-3, generator=g)
    sae.scorer()  # prompt-independent terms, computed once per trained SAE: not part of per-example cost
    return sae


def score_all(sae: SparseAutoencoder, data: dict, cands, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """recon (E, C), codes (E, C, k) for every example's candidates, `batch` prompts per score_candidates call
    (one call reads the 2 x 134 MB of weights once for all its prompts; bench/sae_score.py)."""
    pool = torch.from_numpy(data["pool"])
    queries = torch.from_numpy(data["queries"])
    prompts = torch.from_numpy(data["prompts"])
    idx = torch.from_numpy(cands.indices)
    recon, codes = [], []
    for s in range(0, idx.shape[0], batch):
        rows = idx[s:s + batch]
        u = queries[s:s + batch, None, :] - pool[rows.clamp_min(0)]
        u = u * (rows >= 0)[..., None]  # padding contributes a zero difference; select_batch ignores it anyway
        out = sae.score_candidates(u, prompts[s:s + batch])
        recon.append(out.recon_error.numpy())
        codes.append(out.codes.numpy())
    return np.concatenate(recon), np.concatenate(codes)


def bench_scoring_selection(sae: SparseAutoencoder, data: dict, cands, reps: int, batch: int) -> list[dict]:
    n_q = len(data["query_ids"])
    med_s, times_s, (recon, codes) = timed(lambda: score_all(sae, data, cands, batch), reps)
    med_k, times_k, sel = timed(lambda: select_batch(recon, codes, cands.counts, clip_sims=cands.sims,
                                                    rule="greedy", K=K), reps)
    assert (sel.n_selected == K).all() and np.allclose(sel.q.sum(1), 1.0)
    return [stage_row("score", "-", med_s, times_s, n_q, sae_batch=batch, candidates=int(cands.counts.sum())),
            stage_row("select", "-", med_k, times_k, n_q, mean_diversity=float(np.nanmean(sel.diversity)))]


def end_to_end(rows: list[dict], n_q: int) -> list[dict]:
    """Sums of stage medians, per index kind: steady state (index already built) and including the build."""
    get = {(r["stage"], r["index"]): r["median_s"] for r in rows}
    out = []
    for kind in KINDS:
        steady = get[("retrieve", kind)] + get[("score", "-")] + get[("select", "-")]
        out.append(stage_row("end to end", kind, steady, [], n_q))
        out.append(stage_row("end to end + build", kind, steady + get[("build", kind)], [], n_q))
    return out


# ---------------------------------------------------------------- sentence-transformers


class PrecomputedEmbeddings:
    """Duck-typed SentenceTransformer for `mine_hard_negatives(use_faiss=...)`: the members it touches when no
    cache folder, cross-encoder or multi-process pool is given. Returns given unit embeddings by text key, and
    records the seconds spent in here so that they can be subtracted (the lookup is not retrieval)."""

    device = torch.device("cpu")

    def __init__(self, corpus_ids, corpus_emb, query_ids, query_emb):
        self._corpus = ({t: i for i, t in enumerate(corpus_ids)}, corpus_emb)
        self._queries = ({t: i for i, t in enumerate(query_ids)}, query_emb)
        self.seconds = 0.0

    def _lookup(self, table, texts):
        start = time.perf_counter()
        rows, emb = table
        out = emb[np.fromiter((rows[t] for t in texts), dtype=np.int64, count=len(texts))]
        self.seconds += time.perf_counter() - start
        return out

    def encode_document(self, texts, **_):
        return self._lookup(self._corpus, texts)

    def encode_query(self, texts, **_):
        return self._lookup(self._queries, texts)

    def get_embedding_dimension(self) -> int:
        return int(self._corpus[1].shape[1])

    def similarity(self, a, b):  # the default cosine of a SentenceTransformer; inputs are already unit
        return torch.as_tensor(a) @ torch.as_tensor(b).T

    def similarity_pairwise(self, a, b):
        return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)


@contextlib.contextmanager
def faiss_stopwatch():
    """Time what mine_hard_negatives spends in FAISS: it builds `faiss.IndexFlatIP(dim)` itself, so swap in a proxy
    that times add/search. The proxy also fails its `index_cpu_to_all_gpus` attempt, which is caught there: with
    faiss-gpu this would keep ST on CPU; with faiss-cpu (here) that call fails anyway."""
    original, clock = faiss.IndexFlatIP, {"seconds": 0.0}

    class TimedFlatIP:
        def __init__(self, d):
            self.inner = original(d)

        def add(self, x):
            start = time.perf_counter()
            self.inner.add(x)
            clock["seconds"] += time.perf_counter() - start

        def search(self, x, k):
            start = time.perf_counter()
            out = self.inner.search(x, k)
            clock["seconds"] += time.perf_counter() - start
            return out

    faiss.IndexFlatIP = TimedFlatIP
    try:
        yield clock
    finally:
        faiss.IndexFlatIP = original


def sentence_transformers_or_none():
    """(mine_hard_negatives, Dataset, versions) or None with the reason when the optional packages are absent."""
    try:
        import datasets
        import sentence_transformers
        from sentence_transformers.util import mine_hard_negatives
    except ImportError as exc:
        return None, f"not installed ({exc.name})"
    return (mine_hard_negatives, datasets.Dataset,
            {"sentence-transformers": sentence_transformers.__version__, "datasets": datasets.__version__}), None


def st_rows_from_output(out, pool_ids: list[str], n_q: int, col: str) -> np.ndarray:
    """(B, M) pool rows of the negatives in a labeled-list output (first entry of each list is the positive)."""
    row_of = {t: i for i, t in enumerate(pool_ids)}
    rows = np.full((n_q, M), -1, dtype=np.int64)
    for q, docs in enumerate(out[col]):
        negs = [row_of[t] for t in docs[1:]]
        rows[q, :len(negs)] = negs
    return rows


def bench_sentence_transformers(data: dict, exact_cands, reps: int) -> dict:
    """Ours (flat build + retrieve_candidates) side by side with mine_hard_negatives on the same embeddings."""
    st, reason = sentence_transformers_or_none()
    n_q = len(data["query_ids"])

    def ours():
        index = build_index(data["pool"], "flat")
        return retrieve_candidates(index, data["pool_ids"], data["pool"], data["queries"], data["query_ids"],
                                   m=M, dup_threshold=DUP_THRESHOLD)

    med, times, _ = timed(ours, reps)
    rows = [stage_row("retrieval", "misp-dpo: build_index(flat) + retrieve_candidates", med, times, n_q,
                      agreement=1.0)]
    if st is None:
        rows.append({"stage": "retrieval", "index": "sentence-transformers mine_hard_negatives", "status": reason})
        return {"rows": rows, "versions": None}
    mine, Dataset, versions = st
    query_keys = [f"q:{q}" for q in data["query_ids"]]  # anchors are their own texts, mapped to the positive's row
    dataset = Dataset.from_dict({"anchor": query_keys, "positive": data["query_ids"]})
    model = PrecomputedEmbeddings(data["pool_ids"], data["pool"], query_keys, data["queries"])
    extra_k = max(8, M // 4)  # the margin retrieve_candidates adds; with 1 positive ST fetches range_max + 1

    for use_faiss in (True, False):
        def call():
            model.seconds = 0.0
            with faiss_stopwatch() as clock:
                start = time.perf_counter()
                out = mine(dataset, model, corpus=data["pool_ids"], range_min=0, range_max=M + extra_k,
                           max_score=DUP_THRESHOLD, num_negatives=M, sampling_strategy="top",
                           output_format="labeled-list", use_faiss=use_faiss, verbose=False)
                total = time.perf_counter() - start
            return total - model.seconds, clock["seconds"], model.seconds, out

        call()  # warm-up (first call imports pandas paths, compiles nothing, but allocates)
        runs = [call() for _ in range(reps)]
        net = [r[0] for r in runs]
        st_rows = st_rows_from_output(runs[-1][3], data["pool_ids"], n_q, "positive")
        rows.append(stage_row(
            "retrieval", f"sentence-transformers mine_hard_negatives(use_faiss={use_faiss})",
            statistics.median(net), net, n_q,
            faiss_s=statistics.median(r[1] for r in runs) if use_faiss else None,
            lookup_s_subtracted=statistics.median(r[2] for r in runs),
            agreement=candidate_overlap(st_rows, exact_cands.indices)))
    return {"rows": rows, "versions": versions,
            "settings": {"range_min": 0, "range_max": M + extra_k, "max_score": DUP_THRESHOLD, "num_negatives": M,
                         "sampling_strategy": "top", "output_format": "labeled-list"}}


# ---------------------------------------------------------------- report


def machine_info(reps: int) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "repetitions": reps,
        **{f"lib_{k}": v for k, v in library_versions().items()},
    }


def fmt_rate(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def print_pool_table(n_pool: int, n_q: int, rows: list[dict], reps: int) -> None:
    print(f"\npool {n_pool:,}, {n_q:,} examples, M={M}, K={K}, median of {reps}, "
          f"{torch.get_num_threads()} torch / {faiss.omp_get_max_threads()} faiss threads")
    print(f"{'stage':20s} {'index':16s} {'median s':>9s} {'examples/s':>11s} {'recall@64':>9s} {'cand. overlap':>13s}")
    for r in rows:
        rec = f"{r['recall_at_m']:.3f}" if "recall_at_m" in r else ""
        ov = f"{r['candidate_overlap']:.3f}" if "candidate_overlap" in r else ""
        print(f"{r['stage']:20s} {r['index']:16s} {r['median_s']:9.3f} {fmt_rate(r['examples_per_s']):>11s} "
              f"{rec:>9s} {ov:>13s}")


def print_st_table(n_pool: int, res: dict) -> None:
    k_fetched = M + max(8, M // 4) + 1
    print(f"\nretrieval side by side, pool {n_pool:,}, same embeddings, exact search, k fetched = {k_fetched}")
    print(f"{'method':66s} {'median s':>9s} {'examples/s':>11s} {'faiss s':>8s} {'agreement':>9s}")
    for r in res["rows"]:
        if "status" in r:
            print(f"{r['index']:66s} {r['status']}")
            continue
        fs = f"{r['faiss_s']:.3f}" if r.get("faiss_s") is not None else ""
        print(f"{r['index']:66s} {r['median_s']:9.3f} {fmt_rate(r['examples_per_s']):>11s} {fs:>8s} "
              f"{r['agreement']:9.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pools", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--queries", type=int, default=1000, help="examples (positives) mined per pool")
    p.add_argument("--dim", type=int, default=512, help="image embedding dimension Dv (CLIP ViT-B: 512)")
    p.add_argument("--dt", type=int, default=512, help="prompt embedding dimension Dt")
    p.add_argument("--k", type=int, default=128, help="SAE latents")
    p.add_argument("--sae-batch", type=int, default=128, help="examples per score_candidates call")
    p.add_argument("--dup-frac", type=float, default=0.05, help="fraction of positives with a near-copy in the pool")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-st", action="store_true", help="skip the sentence-transformers comparison")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition: a smoke test of this script")
    p.add_argument("--out", default=None, help="JSON path (default reports/bench/mine.json; --quick: a temp file)")
    args = p.parse_args()
    if args.quick:
        args.pools, args.queries, args.dim, args.dt, args.k, args.reps = [2000, 5000], 200, 64, 64, 32, 1
    if args.out is None:  # a smoke test must not overwrite the real report
        args.out = str(Path(tempfile.gettempdir()) / "mine.quick.json") if args.quick else "reports/bench/mine.json"

    info = machine_info(args.reps)
    sae = make_sae(args.dim, args.dt, args.k, args.seed)
    results = []
    for n_pool in args.pools:
        data = make_examples(n_pool, args.queries, args.dim, args.dt, args.dup_frac, args.seed)
        rows, exact = bench_retrieval(data, args.reps)
        rows += bench_scoring_selection(sae, data, exact, args.reps, args.sae_batch)
        rows += end_to_end(rows, args.queries)
        print_pool_table(n_pool, args.queries, rows, args.reps)
        st = None if args.no_st else bench_sentence_transformers(data, exact, args.reps)
        if st:
            print_st_table(n_pool, st)
        results.append({"pool": n_pool, "rows": rows, "sentence_transformers": st, "near_duplicates": data["n_dup"]})

    info["load_average_1_5_15_end"] = list(os.getloadavg())
    out = {"machine": info, "config": {**vars(args), "m": M, "K": K, "dup_threshold": DUP_THRESHOLD,
                                      "sae": sae.cfg.to_dict(), "sae_random_init": True},
           "results": results, "argv": sys.argv[1:]}
    write_json_atomic(out, Path(args.out))
    print(f"\nwrote {args.out} (load average at start {info['load_average_1_5_15'][0]:.2f}, "
          f"end {info['load_average_1_5_15_end'][0]:.2f} on {info['cpu_count']} cores)")


if __name__ == "__main__":
    main()
