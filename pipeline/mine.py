"""Per-shard mining: candidates by FAISS, SAE scores, selection, proposals -> preference shard rows.

Plain functions over Polars tables and numpy arrays (no Dagster). The order of work for one shard:
`candidate_table` (retrieval) -> [the SAE is trained on pairs from all shards' candidates] -> `mine_shard`.
Shard schema: docs/shards.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from pipeline.embed import embedding_matrix
from store.fingerprint import text_id
from pipeline.retrieval import PoolIndex, retrieve_candidates
from pipeline.selection import NEIGHBOUR_RULES, RULES, select_batch, select_from_gallery


@dataclass(frozen=True)
class MiningConfig:
    """Knobs of retrieval and selection (SPEC §2; defaults are the paper's or our recorded decisions)."""

    m: int = 64
    """Candidates retrieved per example (the pool an example's negatives and proposals are drawn from)."""
    k: int = 3
    """Negatives selected per example (the paper's K)."""
    dup_threshold: float = 0.98
    """Candidates with cosine >= this to the positive are near-duplicates and excluded."""
    rank_min: int = 0
    """Skip this many nearest eligible candidates (a leading rank window)."""
    rule: str = "greedy"
    """`greedy` (SAE score + diversity, MISP), `similarity` (top-K CLIP), `random_pool` (uniform from the whole
    gallery: the papers' random-negative baseline), `random_neighbours` (uniform among the m candidates)."""
    lambda_div: float = 0.5
    """Weight of the diversity term of the greedy rule."""
    tau: float = 1.0
    """Temperature of the proposal q = softmax(s / tau) over each example's candidates."""
    w_rec: float = 1.0
    """Weight of the normalised reconstruction error in the score."""
    w_dev: float = 1.0
    """Weight of the normalised semantic deviation in the score."""
    code_top_n: int = 16
    """Latents kept per candidate in the shard's compact SAE code (largest activations)."""
    batch_examples: int = 128
    """Examples scored by the SAE at once (memory: batch * m * Dv floats)."""
    seed: int = 0
    """Seed of the random rule (mixed with the shard key so shards differ)."""

    def __post_init__(self) -> None:
        if self.rule == "random":
            raise ValueError("rule='random' was split in two: `random_pool` draws from the whole gallery (the "
                             "papers' random baseline), `random_neighbours` among the m retrieved candidates")
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r} is not one of {RULES}")
        if not 1 <= self.k <= self.m:
            raise ValueError(f"need 1 <= k ({self.k}) <= m ({self.m}): negatives are chosen among the candidates")
        if not 0 < self.dup_threshold <= 1:
            raise ValueError(f"dup_threshold={self.dup_threshold} must be in (0, 1]")
        if self.tau <= 0 or self.code_top_n < 1 or self.batch_examples < 1:
            raise ValueError("tau must be > 0, code_top_n and batch_examples >= 1")


class PoolTable(NamedTuple):
    """All pool images in index order (row i of `emb` is FAISS id i)."""

    ids: list[str]
    paths: list[str]
    sha256: list[str]
    emb: np.ndarray  # (N, D) float32, unit rows

    @classmethod
    def from_frame(cls, df: pl.DataFrame) -> "PoolTable":
        return cls(df["image_id"].to_list(), df["path"].to_list(), df["sha256"].to_list(), embedding_matrix(df))


def _lookup(table: pl.DataFrame, keys: list[str], what: str) -> np.ndarray:
    """Rows of an embedding table in the order of `keys`; a missing key is a pipeline bug worth naming."""
    pos = {k: i for i, k in enumerate(table["key"].to_list())}
    missing = [k for k in keys if k not in pos]
    if missing:
        raise KeyError(f"{len(missing)} {what} have no embedding (e.g. {missing[0]!r}); re-materialise the "
                       f"embeddings of this shard")
    return embedding_matrix(table)[[pos[k] for k in keys]]


def drop_unembedded(examples: pl.DataFrame, positives: pl.DataFrame, prompts: pl.DataFrame
                    ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(examples that can be mined, examples whose positive image or prompt has no embedding). The latter were
    quarantined by the embedding stage (non-finite output); they are reported, not mined."""
    has_pos = pl.col("image_sha256").is_in(positives["key"].implode())
    has_prompt = pl.col("prompt").map_elements(text_id, return_dtype=pl.String).is_in(prompts["key"].implode())
    flagged = examples.with_columns((has_pos & has_prompt).alias("_ok"))
    return flagged.filter("_ok").drop("_ok"), flagged.filter(~pl.col("_ok")).drop("_ok")


def candidate_table(examples: pl.DataFrame, positives: pl.DataFrame, pool: PoolTable, index: PoolIndex,
                    cfg: MiningConfig) -> tuple[pl.DataFrame, tuple[str, ...]]:
    """Per example the M nearest pool images to its positive, excluding the positive itself (by content hash)
    and its near-duplicates. Returns the table and retrieval warnings (pool too small, ...)."""
    if examples.height == 0:
        return pl.DataFrame(schema=CANDIDATE_SCHEMA), ()
    shas = examples["image_sha256"].to_list()
    queries = _lookup(positives, shas, "positive images")
    cands = retrieve_candidates(index, pool.ids, pool.emb, queries, shas, m=cfg.m,
                                dup_threshold=cfg.dup_threshold, rank_min=cfg.rank_min, pool_alt_ids=pool.sha256)
    rows = [r[:c].tolist() for r, c in zip(cands.indices, cands.counts)]
    sims = [s[:c].astype(np.float32).tolist() for s, c in zip(cands.sims, cands.counts)]
    table = pl.DataFrame({"example_id": examples["example_id"], "cand_rows": rows, "cand_sims": sims,
                          "shortfall": cands.shortfall.astype(np.int64)}, schema=CANDIDATE_SCHEMA)
    return table, cands.warnings


CANDIDATE_SCHEMA = {"example_id": pl.String, "cand_rows": pl.List(pl.Int64), "cand_sims": pl.List(pl.Float32),
                    "shortfall": pl.Int64}


def training_pairs(candidates: pl.DataFrame, examples: pl.DataFrame, positives: pl.DataFrame,
                   prompts: pl.DataFrame, pool: PoolTable, per_example: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, pl.DataFrame]:
    """SAE training pairs from one shard: up to `per_example` random retrieved candidates per example.
    Returns u = h_v(positive) - h_v(candidate) (N, Dv), t = h_t(prompt) (N, Dt) and the ids of each pair."""
    joined = examples.select("example_id", "image_sha256", "image_path", "prompt").join(candidates, on="example_id")
    pos_ids, pos_paths, pool_rows, prompt_keys = [], [], [], []
    for sha, path, prompt, rows in joined.select("image_sha256", "image_path", "prompt", "cand_rows").iter_rows():
        if not rows:
            continue
        pick = rng.choice(len(rows), size=min(per_example, len(rows)), replace=False)
        pool_rows.extend(rows[i] for i in pick)
        pos_ids.extend([sha] * len(pick))
        pos_paths.extend([path] * len(pick))
        prompt_keys.extend([text_id(prompt)] * len(pick))
    if not pool_rows:
        return np.zeros((0, pool.emb.shape[1]), np.float32), np.zeros((0, 0), np.float32), pl.DataFrame()
    u = _lookup(positives, pos_ids, "positive images") - pool.emb[pool_rows]
    t = _lookup(prompts, prompt_keys, "prompts")
    ids = pl.DataFrame({"positive_sha256": pos_ids, "positive_path": pos_paths, "pool_row": pool_rows,
                        "pool_path": [pool.paths[r] for r in pool_rows], "prompt_id": prompt_keys})
    return u.astype(np.float32), t.astype(np.float32), ids


class GalleryDraws(NamedTuple):
    """`random_pool` negatives of a batch of examples: K uniform draws from the whole gallery."""

    rows: np.ndarray  # (E, K) gallery rows, -1 where the gallery ran out
    clip_sim: np.ndarray  # (E, K) cosine to the positive
    recon: np.ndarray  # (E, K) SAE reconstruction error of the pair (positive, draw)
    deviation: np.ndarray  # (E, K) L1 norm of its SAE code
    diversity: np.ndarray  # (E,) mean pairwise latent distance of the draws

    def entries(self, e: int, cand_rows: list[int], cand: list[dict], pool: "PoolTable") -> list[dict]:
        """Negative structs of example e. Draws that are also retrieved candidates carry the candidate's fields
        (score, q, pool_pos); the others have no score or proposal (those are defined over the candidates)."""
        at = {r: i for i, r in enumerate(cand_rows)}
        out = []
        for j, r in enumerate(self.rows[e].tolist()):
            if r < 0:
                continue
            entry = {"image_id": pool.ids[r], "path": pool.paths[r], "clip_sim": float(self.clip_sim[e, j]),
                     "recon_error": float(self.recon[e, j]), "deviation": float(self.deviation[e, j]),
                     "score": None, "q": None, "pool_pos": None}
            if r in at:
                entry |= {k: v for k, v in cand[at[r]].items() if k in ("score", "q")} | {"pool_pos": at[r]}
            out.append(entry)
        return out


def _gallery_draws(batch: pl.DataFrame, pos: np.ndarray, t: np.ndarray, pool: "PoolTable", sae,
                   cfg: MiningConfig, rng: np.random.Generator) -> GalleryDraws:
    """K uniform draws per example from the whole gallery, never the positive (same content hash) nor a
    near-duplicate of it (cosine >= dup_threshold), scored by the SAE like candidates are."""
    from pipeline.selection import mean_pairwise_latent_distance

    shas = batch["image_sha256"].to_list()
    gallery_sha = np.asarray(pool.sha256)

    def excluder(e: int):
        return lambda rows: (gallery_sha[rows] == shas[e]) | (pool.emb[rows] @ pos[e] >= cfg.dup_threshold)

    rows = select_from_gallery(len(pool.ids), cfg.k, rng, [excluder(e) for e in range(batch.height)])
    safe = np.maximum(rows, 0)
    emb = pool.emb[safe]  # (E, K, D)
    sims = np.einsum("ekd,ed->ek", emb, pos)
    with torch.inference_mode():
        out = sae.score_candidates(torch.from_numpy(pos[:, None, :] - emb), torch.from_numpy(t))
    codes = out.codes.double().cpu().numpy()
    valid = rows >= 0
    return GalleryDraws(rows, np.where(valid, sims, np.nan), np.where(valid, out.recon_error.double().cpu().numpy(),
                                                                      np.nan),
                        np.where(valid, np.abs(codes).sum(-1), np.nan),
                        mean_pairwise_latent_distance(codes, valid=valid))


class ShardStats(NamedTuple):
    diversity: dict[str, float]  # mean pairwise latent distance of the selected negatives, per rule
    shortfall_examples: int  # examples with fewer than K negatives
    selected_rows: dict[str, list[list[int]]]  # per rule, per example: pool rows of its selected negatives


def _pad(lists: list[list], width: int, fill) -> np.ndarray:
    out = np.full((len(lists), width), fill)
    for i, row in enumerate(lists):
        out[i, :len(row)] = row
    return out


def _compact_codes(codes_ck: np.ndarray, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """The n largest latents of each candidate: indices (ascending activation order reversed) and values."""
    n = min(n, codes_ck.shape[1])
    top = np.argsort(-codes_ck, axis=1, kind="stable")[:, :n]
    return top.tolist(), np.take_along_axis(codes_ck, top, axis=1).astype(np.float32).tolist()


def mine_shard(examples: pl.DataFrame, candidates: pl.DataFrame, positives: pl.DataFrame,
               prompts: pl.DataFrame, pool: PoolTable, sae, cfg: MiningConfig, *, shard_seed: int = 0,
               progress: bool = True) -> tuple[pl.DataFrame, ShardStats]:
    """Score every example's candidates with the SAE, select K negatives by `cfg.rule`, attach proposals.

    Also selects by the other two rules on the same candidates (cheap) to report how diverse each rule's
    negatives are: the figure that says whether the SAE selection does what it claims."""
    # Examples without a candidates row had no embedding (reported by the candidates asset): not mined.
    joined = examples.join(candidates, on="example_id", how="inner", maintain_order="left")
    rng = np.random.default_rng([cfg.seed, shard_seed])
    negatives, pools, diversity = [], [], {r: [] for r in RULES}
    selected_rows: dict[str, list[list[int]]] = {r: [] for r in RULES}
    bar = tqdm(total=joined.height, desc="mine", unit="ex", disable=not progress)
    for start in range(0, joined.height, cfg.batch_examples):
        batch = joined.slice(start, cfg.batch_examples)
        rows = [r if r is not None else [] for r in batch["cand_rows"].to_list()]
        sims = [s if s is not None else [] for s in batch["cand_sims"].to_list()]
        counts = np.array([len(r) for r in rows], dtype=np.int64)
        width = max(1, int(counts.max()) if len(counts) else 1)
        rows_ec = _pad(rows, width, -1)
        sims_ec = _pad(sims, width, np.nan)
        pos = _lookup(positives, batch["image_sha256"].to_list(), "positive images")
        t = _lookup(prompts, [text_id(p) for p in batch["prompt"].to_list()], "prompts")
        cand_emb = pool.emb[np.where(rows_ec >= 0, rows_ec, 0)]  # padding rows are ignored downstream
        u = pos[:, None, :] - cand_emb
        with torch.inference_mode():
            out = sae.score_candidates(torch.from_numpy(u), torch.from_numpy(t))
        recon = out.recon_error.double().cpu().numpy()
        codes = out.codes.double().cpu().numpy()
        results = {rule: select_batch(recon, codes, counts, clip_sims=sims_ec, rule=rule, K=cfg.k,
                                      lambda_div=cfg.lambda_div, tau=cfg.tau, w_rec=cfg.w_rec, w_dev=cfg.w_dev,
                                      rng=rng) for rule in NEIGHBOUR_RULES}
        for rule, res in results.items():
            diversity[rule].extend(res.diversity[np.isfinite(res.diversity)].tolist())
            selected_rows[rule].extend(rows_ec[e, res.selected[e, :res.n_selected[e]]].tolist()
                                       for e in range(batch.height))
        gallery = _gallery_draws(batch, pos, t, pool, sae, cfg, rng)
        diversity["random_pool"].extend(gallery.diversity[np.isfinite(gallery.diversity)].tolist())
        selected_rows["random_pool"].extend([r for r in row if r >= 0] for row in gallery.rows.tolist())
        sel = results[cfg.rule] if cfg.rule != "random_pool" else results["greedy"]  # scores and q: any rule
        for e in range(batch.height):
            c = int(counts[e])
            idx, val = _compact_codes(codes[e, :c], cfg.code_top_n)
            cand = [{"image_id": pool.ids[r], "path": pool.paths[r], "clip_sim": float(sims_ec[e, i]),
                     "recon_error": float(sel.recon[e, i]), "deviation": float(sel.deviation[e, i]),
                     "score": float(sel.score[e, i]), "q": float(sel.q[e, i]),
                     "code_idx": idx[i], "code_val": val[i]} for i, r in enumerate(rows_ec[e, :c].tolist())]
            pools.append(cand)
            if cfg.rule == "random_pool":
                negatives.append(gallery.entries(e, rows_ec[e, :c].tolist(), cand, pool))
                continue
            negatives.append([{k: v for k, v in cand[j].items() if not k.startswith("code_")} | {"pool_pos": j}
                              for j in sel.selected[e, :sel.n_selected[e]].tolist()])
        bar.update(batch.height)
    bar.close()
    keep = [c for c in ("example_id", "prompt", "chosen", "rejected", "image_id", "image_path", "image_sha256")
            if c in joined.columns]
    extras = [c for c in examples.columns if c not in keep and c not in
              {"width", "height", "shard", "row_index"}]
    n_neg = [len(n) for n in negatives]
    table = joined.select(keep + extras).with_columns(
        pl.Series("negatives", negatives, dtype=NEGATIVE_LIST),
        pl.Series("pool", pools, dtype=POOL_LIST),
        pl.Series("n_negatives", n_neg, dtype=pl.Int64),
        pl.Series("shortfall", [cfg.k - n for n in n_neg], dtype=pl.Int64),
    )
    stats = ShardStats({r: float(np.mean(v)) if v else float("nan") for r, v in diversity.items()},
                       int(sum(n < cfg.k for n in n_neg)), selected_rows)
    return table, stats


_CANDIDATE_FIELDS = {"image_id": pl.String, "path": pl.String, "clip_sim": pl.Float32,
                     "recon_error": pl.Float32, "deviation": pl.Float32, "score": pl.Float32, "q": pl.Float32}
NEGATIVE_LIST = pl.List(pl.Struct({**_CANDIDATE_FIELDS, "pool_pos": pl.Int64}))
POOL_LIST = pl.List(pl.Struct({**_CANDIDATE_FIELDS, "code_idx": pl.List(pl.UInt16),
                               "code_val": pl.List(pl.Float32)}))
