"""Mining assets: the pool index, per-shard candidates, the SAE, per-shard preference shards, the manifest."""

import base64
import dataclasses
import json
from typing import Optional

import dagster as dg
import faiss
import numpy as np
import polars as pl

from assets.embeddings import pool_embeddings, positive_embeddings, prompt_embeddings
from assets.metadata import markdown_table, table_schema
from assets.partitions import shard_index, shard_partitions
from assets.resources import ClipModel, DataRoot, DataSource
from assets.source import preference_examples
from pipeline.checks import check_enough_candidates
from pipeline.contact_sheet import contact_sheet
from store.fingerprint import fingerprint, sha256_file
from pipeline.mine import MiningConfig, PoolTable, candidate_table, drop_unembedded, mine_shard
from store.parquet_io import is_current, read_metadata, write_bytes_atomic, write_parquet_atomic
from store.paths import shard_file
from pipeline.retrieval import PoolIndex, build_index, recall_at_m
from pipeline.shard_checks import SHARD_CHECK_NAMES, shard_checks
from pipeline.sharding import shard_keys


def _all_shards(folder, what: str) -> list:
    files = [shard_file(folder, k) for k in shard_keys()]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{what} is missing for {missing}: materialise every shard partition first "
                                "(`make mine` does)")
    return files


class IndexConfig(dg.Config):
    """FAISS index over the pool (SPEC §2.2)."""

    kind: str = "flat"
    """`flat` (exact inner product), `ivf` or `hnsw` (approximate; recall against exact is reported)."""
    nlist: Optional[int] = None
    """IVF lists (default 4 sqrt N)."""
    nprobe: Optional[int] = None
    """IVF lists probed per query."""
    hnsw_m: int = 32
    """HNSW graph degree."""


@dg.asset(group_name="mining", deps=[pool_embeddings], kinds={"faiss", "parquet"})
def pool_index(context: dg.AssetExecutionContext, config: IndexConfig, data_root: DataRoot) -> dg.MaterializeResult:
    """All pool embeddings in one table (row i = FAISS id i) and the FAISS index over them."""
    root = data_root.root()
    files = _all_shards(root / "embeddings" / "pool", "pool_embeddings")
    fp = fingerprint("pool_index", [read_metadata(f)["fingerprint"] for f in files], config.model_dump())
    table_path, index_path, info_path = (root / "index" / n for n in ("pool.parquet", "pool.faiss", "pool.json"))
    if is_current(table_path, fp) and index_path.exists() and info_path.exists() and \
            json.loads(info_path.read_text()).get("fingerprint") == fp:
        context.log.info(f"{index_path} is current (same pool embeddings and config); not rebuilding")
        info = json.loads(info_path.read_text())
        return dg.MaterializeResult(metadata=_index_metadata(info, index_path))
    pool = pl.concat([pl.read_parquet(f) for f in files])
    if pool.height == 0:
        raise ValueError("the pool is empty: every pool image was quarantined at ingest or embedding; see "
                         "<data root>/ingest/quarantine and embeddings/quarantine for the reasons")
    emb = pool["embedding"].to_numpy().astype(np.float32)
    index = build_index(emb, config.kind, nlist=config.nlist, nprobe=config.nprobe, hnsw_m=config.hnsw_m)
    info = {"kind": config.kind, "params": index.params, "fingerprint": fp, "rows": pool.height,
            "on_gpu": index.on_gpu}
    if config.kind != "flat":
        exact = build_index(emb, "flat", use_gpu=False)
        sample = emb[np.random.default_rng(0).choice(len(emb), size=min(500, len(emb)), replace=False)]
        info["recall_at_64_vs_exact"] = recall_at_m(index, exact, sample, min(64, len(emb)))
    write_parquet_atomic(pool, table_path, {"fingerprint": fp})
    cpu_index = faiss.index_gpu_to_cpu(index.index) if index.on_gpu else index.index
    write_bytes_atomic(faiss.serialize_index(cpu_index).tobytes(), index_path)
    write_bytes_atomic(json.dumps(info).encode(), info_path)  # last: it vouches for the two files above
    return dg.MaterializeResult(metadata=_index_metadata(info, index_path))


def _index_metadata(info: dict, index_path) -> dict:
    meta = {"dagster/row_count": info["rows"], "kind": info["kind"], "on_gpu": info["on_gpu"],
            "params": dg.MetadataValue.json(info["params"]), "path": dg.MetadataValue.path(str(index_path))}
    if "recall_at_64_vs_exact" in info:
        meta["recall_at_64_vs_exact"] = info["recall_at_64_vs_exact"]
    return meta


def load_pool_table(root) -> tuple[PoolTable, str]:
    """The pool in index order and the pool index's fingerprint (no FAISS index: scoring needs only the table)."""
    info = json.loads((root / "index" / "pool.json").read_text())
    return PoolTable.from_frame(pl.read_parquet(root / "index" / "pool.parquet")), info["fingerprint"]


def load_pool_index(root) -> PoolIndex:
    info = json.loads((root / "index" / "pool.json").read_text())
    index = faiss.deserialize_index(np.frombuffer((root / "index" / "pool.faiss").read_bytes(), dtype=np.uint8))
    return PoolIndex(index=index, kind=info["kind"], on_gpu=False, params=info["params"])


class CandidatesConfig(dg.Config):
    """Retrieval of each example's candidate pool (SPEC §2.2)."""

    m: int = 64
    """Candidates per example."""
    dup_threshold: float = 0.98
    """Cosine at or above which a pool image is a near-duplicate of the positive and excluded."""
    rank_min: int = 0
    """Skip this many nearest eligible candidates."""
    k: int = 3
    """K of the mining run (MiningRunConfig.k): the `enough_candidates` check fails when most examples have fewer
    candidates than this. Not part of the candidates' fingerprint (it changes no row)."""


@dg.asset(group_name="mining", partitions_def=shard_partitions, kinds={"faiss", "parquet"},
          deps=[pool_index, preference_examples, positive_embeddings, prompt_embeddings],
          check_specs=[dg.AssetCheckSpec("enough_candidates", asset="candidates")])
def candidates(context: dg.AssetExecutionContext, config: CandidatesConfig, data_root: DataRoot) -> dg.MaterializeResult:
    """Per example of the shard, the M nearest pool images to its positive (positive and near-duplicates out)."""
    root = data_root.root()
    key = context.partition_key
    examples_path = shard_file(root / "ingest" / "examples", key)
    positives_path = shard_file(root / "embeddings" / "positives", key)
    pool, pool_fp = load_pool_table(root)
    cfg = MiningConfig(m=config.m, dup_threshold=config.dup_threshold, rank_min=config.rank_min)
    out = shard_file(root / "mining" / "candidates", key)
    fp = fingerprint("candidates", pool_fp, read_metadata(positives_path)["fingerprint"],
                     config.model_dump(exclude={"k"}),
                     read_metadata(examples_path).get("retrieval_content"))  # ids, images, prompts (not chosen)
    warnings: tuple = ()
    examples, unembedded = drop_unembedded(pl.read_parquet(examples_path), pl.read_parquet(positives_path),
                                           pl.read_parquet(shard_file(root / "embeddings" / "prompts", key)))
    if unembedded.height:
        context.log.warning(f"{unembedded.height} examples have no embedding for their image or prompt (quarantined "
                            f"by the embedding stage) and are not mined: {unembedded['example_id'].head(5).to_list()}")
    if is_current(out, fp):
        table = pl.read_parquet(out)
    else:
        table, warnings = candidate_table(examples, pl.read_parquet(positives_path), pool, load_pool_index(root),
                                          cfg)
        write_parquet_atomic(table, out, {"fingerprint": fp, "m": config.m})
    for w in warnings:
        context.log.warning(w)
    counts = table["cand_rows"].list.len()
    sims = table["cand_sims"].explode(empty_as_null=True).drop_nulls()
    enough = check_enough_candidates(table, config.k, config.dup_threshold)
    return dg.MaterializeResult(check_results=[dg.AssetCheckResult(
        check_name="enough_candidates", passed=enough.passed, description=enough.description,
        metadata=enough.details, severity=dg.AssetCheckSeverity.ERROR)], metadata={
        "dagster/row_count": table.height, "mean_candidates": float(counts.mean() or 0),
        "examples_without_embedding": unembedded.height,
        "examples_with_shortfall": int((table["shortfall"] > 0).sum()),
        "clip_sim_quantiles": dg.MetadataValue.json(
            {f"q{q}": float(sims.quantile(q / 100) or 0) for q in (5, 25, 50, 75, 95)} if len(sims) else {}),
        "path": dg.MetadataValue.path(str(out)),
    })


class MiningRunConfig(dg.Config):
    """Scoring and selection of negatives (SPEC §2.5-2.7)."""

    k: int = 3
    """Negatives per example."""
    rule: str = "greedy"
    """`greedy` (SAE score + diversity), `similarity` (top-K CLIP), `random_pool` (uniform from the whole gallery,
    the papers' random baseline) or `random_neighbours` (uniform among the m candidates)."""
    lambda_div: float = 0.5
    """Diversity weight of the greedy rule."""
    tau: float = 1.0
    """Proposal temperature."""
    w_rec: float = 1.0
    """Weight of reconstruction difficulty in the score."""
    w_dev: float = 1.0
    """Weight of semantic deviation in the score."""
    code_top_n: int = 16
    """Latents kept per candidate in the shard (compact SAE code)."""
    seed: int = 0
    """Seed of the random rules."""


def _png_markdown(png: bytes) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![contact sheet](data:image/png;base64,{base64.b64encode(png).decode()})")


@dg.asset(group_name="mining", partitions_def=shard_partitions, kinds={"parquet"},
          deps=[candidates, "sae", prompt_embeddings],
          check_specs=[dg.AssetCheckSpec(name, asset="preference_shards") for name in SHARD_CHECK_NAMES])
def preference_shards(context: dg.AssetExecutionContext, config: MiningRunConfig, data_root: DataRoot,
                      source: DataSource) -> dg.MaterializeResult:
    """Multi-negative preference shards: per example the K selected negatives (greedy order) and the whole
    candidate pool with scores, proposals and compact SAE codes (docs/shards.md)."""
    from sae import SparseAutoencoder

    root = data_root.root()
    key = context.partition_key
    shard, _ = shard_index(context)
    files = {name: shard_file(root / folder, key) for name, folder in
             (("examples", "ingest/examples"), ("positives", "embeddings/positives"),
              ("prompts", "embeddings/prompts"), ("candidates", "mining/candidates"))}
    sae_dir = root / "models" / "sae"
    cfg = MiningConfig(m=int(read_metadata(files["candidates"])["m"]),
                       **{k: v for k, v in config.model_dump().items()})
    fp = fingerprint("shard", read_metadata(files["candidates"])["fingerprint"],
                     read_metadata(files["examples"]).get("content"),  # the shard carries the examples' text
                     read_metadata(files["prompts"])["fingerprint"], sha256_file(sae_dir / "sae.safetensors"),
                     dataclasses.asdict(cfg))
    out = shard_file(root / "shards", key)
    if is_current(out, fp):
        context.log.info(f"{out} is current; not re-mining")
        table, stats = pl.read_parquet(out), None
    else:
        pool, _ = load_pool_table(root)
        table, stats = mine_shard(pl.read_parquet(files["examples"]), pl.read_parquet(files["candidates"]),
                                  pl.read_parquet(files["positives"]),
                                  pl.read_parquet(files["prompts"]), pool, SparseAutoencoder.load(sae_dir), cfg,
                                  shard_seed=shard, progress=True)
        write_parquet_atomic(table, out, {"fingerprint": fp, "config": dataclasses.asdict(cfg),
                                          "diversity": stats.diversity})
    meta = _shard_metadata(table, stats, cfg, out)
    sheet = contact_sheet(table)
    write_bytes_atomic(sheet, root / "shards" / f"contact_sheet-shard={key}.png")
    meta["contact_sheet"] = _png_markdown(sheet)
    if stats is not None and source.kind == "world":
        from world.changes import error_type_report, scenes_by_path

        paths = {r: [[pool.paths[i] for i in rows] for rows in per_ex] for r, per_ex in stats.selected_rows.items()}
        report = error_type_report(table["image_path"].to_list(), paths, scenes_by_path(source.world_dir(root)))
        meta["world/negatives_by_rule"] = markdown_table(report, n=10, drop=())
    outcomes = shard_checks(table, cfg.k)
    return dg.MaterializeResult(metadata=meta, check_results=[
        dg.AssetCheckResult(check_name=name, passed=o.passed, description=o.description, metadata=o.details)
        for name, o in outcomes.items()])


def _shard_metadata(table: pl.DataFrame, stats, cfg: MiningConfig, out) -> dict:
    negs = (table.select(pl.col("negatives").list.explode(empty_as_null=True).struct.unnest()).drop_nulls("score")
            if table.height else pl.DataFrame())
    meta = {"dagster/row_count": table.height, "path": dg.MetadataValue.path(str(out)), "rule": cfg.rule,
            "k": cfg.k, "examples_with_shortfall": int((table["shortfall"] > 0).sum()) if table.height else 0,
            "preview": markdown_table(table.select("example_id", "prompt", "chosen", "rejected", "n_negatives")),
            "dagster/column_schema": table_schema(table)}
    if negs.height:
        meta["negative_score_quantiles"] = dg.MetadataValue.json(
            {f: {f"q{q}": float(negs[f].quantile(q / 100)) for q in (5, 50, 95)}
             for f in ("clip_sim", "recon_error", "deviation", "score", "q")})
    if stats is not None:
        meta["diversity/mean_pairwise_latent_distance"] = markdown_table(
            pl.DataFrame({"rule": list(stats.diversity), "diversity": list(stats.diversity.values())}), drop=())
    return meta


@dg.asset(group_name="mining", deps=[preference_shards, "clip_model", "sae"], kinds={"json"})
def shards_manifest(context: dg.AssetExecutionContext, data_root: DataRoot, source: DataSource,
                    clip: ClipModel) -> dg.MaterializeResult:
    """`shards/manifest.json`: counts, configuration, fingerprints of the CLIP, the SAE and the input data, and
    a sha256 per shard file so that a corrupted or truncated shard is detected before training reads it."""
    from pipeline.clip_encoder import checkpoint_fingerprint

    root = data_root.root()
    files = _all_shards(root / "shards", "preference_shards")
    shards = []
    for f in files:
        meta = read_metadata(f)
        n = pl.scan_parquet(f).select(pl.len()).collect().item()
        shards.append({"file": f.name, "rows": n, "sha256": sha256_file(f), "config": meta.get("config"),
                       "fingerprint": meta.get("fingerprint")})
    quarantined = sum(pl.scan_parquet(q).select(pl.len()).collect().item()
                      for q in (root / "ingest" / "quarantine").glob("examples-shard=*.parquet"))
    manifest = {
        "schema_version": 1, "shards": shards, "examples": sum(s["rows"] for s in shards),
        "examples_quarantined": quarantined,
        "clip": {"model": clip.model or "world CLIP", "fingerprint": checkpoint_fingerprint(clip.spec(root))},
        "sae": {"sha256": sha256_file(root / "models" / "sae" / "sae.safetensors"),
                "num_latents": json.loads((root / "models" / "sae" / "cfg.json").read_text())["num_latents"]},
        "pool": json.loads((root / "index" / "pool.json").read_text()),
        "source": {"kind": source.kind, **({"world_preset": source.world_preset, "world_seed": source.world_seed}
                                           if source.kind == "world" else {"manifest": source.manifest,
                                                                          "pool_dir": source.pool_dir})},
    }
    path = root / "shards" / "manifest.json"
    write_bytes_atomic((json.dumps(manifest, indent=2) + "\n").encode(), path)
    return dg.MaterializeResult(metadata={"examples": manifest["examples"], "shards": len(shards),
                                          "examples_quarantined": quarantined, "path": dg.MetadataValue.path(str(path))})
