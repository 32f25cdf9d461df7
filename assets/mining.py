"""Mining assets: the pool index, per-shard candidates, the SAE, per-shard preference shards, the manifest."""

import base64
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Optional

import dagster as dg
import faiss
import numpy as np
import polars as pl

from assets import layout
from assets.io_managers import ALL_SHARDS, Table, current_table, folder_fingerprint, folder_io, json_io, parquet_io
from assets.metadata import markdown_table, table_schema
from assets.partitions import (recipe_of_shards, recipe_partitions, recipe_shard_key, recipe_shard_partitions,
                               shard_index, shard_partitions, space_to_recipes)
from assets.recipes import recipe
from assets.resources import ClipModel, DataRoot, DataSource
from assets.stage_config import config_from, to
from pipeline.checks import check_enough_candidates
from pipeline.contact_sheet import contact_sheet
from store.fingerprint import fingerprint, sha256_file
from pipeline.mine import MiningConfig, PoolTable, candidate_table, drop_unembedded, mine_shard
from store.parquet_io import read_metadata, write_bytes_atomic, write_parquet_atomic
from pipeline.retrieval import PoolIndex, build_index, recall_at_m
from pipeline.shard_checks import SHARD_CHECK_NAMES, shard_checks
from pipeline.sharding import shard_keys


CODE_VERSION = "2"
"""Of the mining assets (index, candidates, shards, manifest): bump when a change to mining changes what they write
(2: IO managers, recipes as partitions)."""


def _fingerprints(tables: dict[str, Table]) -> list:
    return [t.fingerprint for t in tables.values()]


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


class PoolIndexFolder(NamedTuple):
    """`index/`: the pool in FAISS id order (pool.parquet), the index (pool.faiss) and its description (pool.json)."""

    fingerprint: str
    pool: pl.DataFrame | None = None
    index: PoolIndex | None = None
    info: dict | None = None

    def save(self, folder) -> None:
        write_parquet_atomic(self.pool, folder / "pool.parquet", {"fingerprint": self.fingerprint})
        cpu_index = faiss.index_gpu_to_cpu(self.index.index) if self.index.on_gpu else self.index.index
        write_bytes_atomic(faiss.serialize_index(cpu_index).tobytes(), folder / "pool.faiss")
        write_bytes_atomic(json.dumps(self.info).encode(), folder / "pool.json")


@dg.asset(group_name="mining", kinds={"faiss", "parquet"}, io_manager_def=folder_io, code_version=CODE_VERSION,
          ins={"pool": dg.AssetIn("pool_embeddings", metadata=ALL_SHARDS)})
def pool_index(context: dg.AssetExecutionContext, config: IndexConfig, pool: dict[str, Table],
               data_root: DataRoot) -> dg.Output:
    """All pool embeddings in one table (row i = FAISS id i) and the FAISS index over them."""
    folder = layout.folder(data_root.root(), "pool_index")
    fp = fingerprint("pool_index", _fingerprints(pool), config.model_dump(), CODE_VERSION)
    if folder_fingerprint(folder) == fp:
        context.log.info(f"{folder} is current (same pool embeddings and config); not rebuilding")
        info = json.loads((folder / "pool.json").read_text())
        return dg.Output(PoolIndexFolder(fp), data_version=dg.DataVersion(fp), metadata=_index_metadata(info, folder))
    table = pl.concat([t.rows for t in pool.values()])
    if table.height == 0:
        raise ValueError("the pool is empty: every pool image was quarantined at ingest or embedding; see "
                         "<data root>/ingest/quarantine and embeddings/quarantine for the reasons")
    emb = table["embedding"].to_numpy().astype(np.float32)
    index = build_index(emb, config.kind, nlist=config.nlist, nprobe=config.nprobe, hnsw_m=config.hnsw_m)
    info = {"kind": config.kind, "params": index.params, "fingerprint": fp, "rows": table.height,
            "on_gpu": index.on_gpu}
    if config.kind != "flat":
        exact = build_index(emb, "flat", use_gpu=False)
        sample = emb[np.random.default_rng(0).choice(len(emb), size=min(500, len(emb)), replace=False)]
        info["recall_at_64_vs_exact"] = recall_at_m(index, exact, sample, min(64, len(emb)))
    return dg.Output(PoolIndexFolder(fp, table, index, info), data_version=dg.DataVersion(fp),
                     metadata=_index_metadata(info, folder))


def _index_metadata(info: dict, index_path) -> dict:
    meta = {"dagster/row_count": info["rows"], "kind": info["kind"], "on_gpu": info["on_gpu"],
            "params": dg.MetadataValue.json(info["params"]), "path": dg.MetadataValue.path(str(index_path))}
    if "recall_at_64_vs_exact" in info:
        meta["recall_at_64_vs_exact"] = info["recall_at_64_vs_exact"]
    return meta


def load_pool_table(index_dir) -> tuple[PoolTable, str]:
    """The pool in index order and the pool index's fingerprint (no FAISS index: scoring needs only the table)."""
    info = json.loads((index_dir / "pool.json").read_text())
    return PoolTable.from_frame(pl.read_parquet(index_dir / "pool.parquet")), info["fingerprint"]


def load_pool_index(index_dir) -> PoolIndex:
    info = json.loads((index_dir / "pool.json").read_text())
    index = faiss.deserialize_index(np.frombuffer((index_dir / "pool.faiss").read_bytes(), dtype=np.uint8))
    return PoolIndex(index=index, kind=info["kind"], on_gpu=False, params=info["params"])


CandidatesConfig = config_from(
    MiningConfig, ("m", "dup_threshold", "rank_min", "k"), "CandidatesConfig",
    "Retrieval of each example's candidate pool (SPEC §2.2; fields of pipeline.mine.MiningConfig). `k` is the K of "
    "the mining run: the `enough_candidates` check fails when most examples have fewer candidates than this; it is "
    "not part of the candidates' fingerprint (it changes no row).")
CandidatesConfig.to_mining_config = lambda self: to(MiningConfig, self)


@dg.asset(group_name="mining", partitions_def=shard_partitions, kinds={"faiss", "parquet"},
          io_manager_def=parquet_io, code_version=CODE_VERSION,
          ins={"index_dir": dg.AssetIn("pool_index"), "examples": dg.AssetIn("preference_examples"),
               "positives": dg.AssetIn("positive_embeddings"), "prompts": dg.AssetIn("prompt_embeddings")},
          check_specs=[dg.AssetCheckSpec("enough_candidates", asset="candidates")])
def candidates(context: dg.AssetExecutionContext, config: CandidatesConfig, index_dir: Path, examples: Table,
               positives: Table, prompts: Table, data_root: DataRoot):
    """Per example of the shard, the M nearest pool images to its positive (positive and near-duplicates out)."""
    key = context.partition_key
    pool, pool_fp = load_pool_table(index_dir)
    cfg = config.to_mining_config()
    out = layout.table_file(data_root.root(), "candidates", key)
    fp = fingerprint("candidates", pool_fp, positives.fingerprint, config.model_dump(exclude={"k"}),
                     examples.provenance.get("retrieval_content"), CODE_VERSION)  # ids, images, prompts (not chosen)
    warnings: tuple = ()
    kept, unembedded = drop_unembedded(examples.rows, positives.rows, prompts.rows)
    if unembedded.height:
        context.log.warning(f"{unembedded.height} examples have no embedding for their image or prompt (quarantined "
                            f"by the embedding stage) and are not mined: {unembedded['example_id'].head(5).to_list()}")
    if (stored := current_table(out, None, fp)) is not None:
        table = stored.rows
    else:
        table, warnings = candidate_table(kept, positives.rows, pool, load_pool_index(index_dir), cfg)
    for w in warnings:
        context.log.warning(w)
    counts = table["cand_rows"].list.len()
    sims = table["cand_sims"].explode(empty_as_null=True).drop_nulls()
    enough = check_enough_candidates(table, config.k, config.dup_threshold)
    yield dg.Output(Table(table, None, {"fingerprint": fp, "m": config.m}), data_version=dg.DataVersion(fp), metadata={
        "dagster/row_count": table.height, "mean_candidates": float(counts.mean() or 0),
        "examples_without_embedding": unembedded.height,
        "examples_with_shortfall": int((table["shortfall"] > 0).sum()),
        "clip_sim_quantiles": dg.MetadataValue.json(
            {f"q{q}": float(sims.quantile(q / 100) or 0) for q in (5, 25, 50, 75, 95)} if len(sims) else {}),
        "path": dg.MetadataValue.path(str(out)),
    })
    yield dg.AssetCheckResult(check_name="enough_candidates", passed=enough.passed, description=enough.description,
                              metadata=enough.details, severity=dg.AssetCheckSeverity.ERROR)


MiningRunConfig = config_from(
    MiningConfig, ("k", "lambda_div", "tau", "w_rec", "w_dev", "code_top_n", "seed"), "MiningRunConfig",
    "Scoring and selection of negatives (SPEC §2.5-2.7; fields of pipeline.mine.MiningConfig). The rule comes "
    "from the partition's recipe (assets/recipes.py), `m` from the candidates.")


def _png_markdown(png: bytes) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![contact sheet](data:image/png;base64,{base64.b64encode(png).decode()})")


@dg.asset(group_name="mining", partitions_def=recipe_partitions, kinds={"json"}, io_manager_def=json_io,
          code_version=CODE_VERSION, ins={"sae_dir": dg.AssetIn("sae", partition_mapping=space_to_recipes())})
def mining_recipe(context: dg.AssetExecutionContext, sae_dir: Path) -> dg.Output:
    """One recipe (assets/recipes.py): its selection rule and the SAE of its space, by checksum. The shards of a
    recipe depend on it, so a new SAE of one space marks exactly that space's recipes stale. Written as
    `recipe.json` in the recipe's shard folder."""
    name = context.partition_key
    info = {"name": name, **recipe(name)._asdict(), "sae_dir": str(sae_dir),
            "sae_sha256": sha256_file(sae_dir / "sae.safetensors")}
    return dg.Output(info, data_version=dg.DataVersion(fingerprint(info, CODE_VERSION)),
                     metadata={"rule": info["rule"], "space": info["space"], "sae": dg.MetadataValue.path(str(sae_dir))})


@dg.asset(group_name="mining", partitions_def=recipe_shard_partitions, kinds={"parquet"},
          io_manager_def=parquet_io, code_version=CODE_VERSION,
          ins={"cands": dg.AssetIn("candidates"), "examples": dg.AssetIn("preference_examples"),
               "positives": dg.AssetIn("positive_embeddings"), "prompts": dg.AssetIn("prompt_embeddings"),
               "index_dir": dg.AssetIn("pool_index"), "recipe_info": dg.AssetIn("mining_recipe")},
          check_specs=[dg.AssetCheckSpec(name, asset="preference_shards") for name in SHARD_CHECK_NAMES])
def preference_shards(context: dg.AssetExecutionContext, config: MiningRunConfig, cands: Table, examples: Table,
                      positives: Table, prompts: Table, index_dir: Path, recipe_info: dict, data_root: DataRoot,
                      source: DataSource):
    """Multi-negative preference shards, one partition per (recipe, shard): per example the K selected negatives
    (the recipe's rule, greedy order) and the whole candidate pool with scores, proposals and compact SAE codes
    from the SAE of the recipe's space (docs/shards.md)."""
    from sae import SparseAutoencoder

    root = data_root.root()
    key = context.partition_key
    recipe_name = key.keys_by_dimension["recipe"]
    sae_dir = Path(recipe_info["sae_dir"])
    shard, _ = shard_index(context)
    cfg = to(MiningConfig, config, m=int(cands.provenance["m"]), rule=recipe_info["rule"])
    fp = fingerprint("shard", cands.fingerprint,
                     examples.provenance.get("content"),  # the shard carries the examples' text
                     prompts.fingerprint, sha256_file(sae_dir / "sae.safetensors"), dataclasses.asdict(cfg),
                     CODE_VERSION)
    out = layout.table_file(root, "preference_shards", key)
    stats = None
    if (stored := current_table(out, None, fp)) is not None:
        context.log.info(f"{out} is current; not re-mining")
        table, provenance = stored.rows, stored.provenance
    else:
        pool, _ = load_pool_table(index_dir)
        table, stats = mine_shard(examples.rows, cands.rows, positives.rows, prompts.rows, pool,
                                  SparseAutoencoder.load(sae_dir), cfg, shard_seed=shard, progress=True)
        provenance = {"fingerprint": fp, "config": dataclasses.asdict(cfg), "diversity": stats.diversity,
                      "recipe": recipe_name}
    meta = _shard_metadata(table, stats, cfg, out)
    sheet = contact_sheet(table)
    write_bytes_atomic(sheet, layout.contact_sheet_file(root, key))
    meta["contact_sheet"] = _png_markdown(sheet)
    if stats is not None and source.kind == "world":
        from world.changes import error_type_report, scenes_by_path

        paths = {r: [[pool.paths[i] for i in rows] for rows in per_ex] for r, per_ex in stats.selected_rows.items()}
        report = error_type_report(table["image_path"].to_list(), paths, scenes_by_path(source.world_dir(root)))
        meta["world/negatives_by_rule"] = markdown_table(report, n=10, drop=())
    yield dg.Output(Table(table, None, provenance), data_version=dg.DataVersion(fp), metadata=meta)
    for name, o in shard_checks(table, cfg.k).items():
        yield dg.AssetCheckResult(check_name=name, passed=o.passed, description=o.description, metadata=o.details)


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


@dg.asset(group_name="mining", partitions_def=recipe_partitions, kinds={"json"}, io_manager_def=json_io,
          code_version=CODE_VERSION,
          deps=[dg.AssetDep(preference_shards, partition_mapping=recipe_of_shards()), "clip_model"],
          ins={"index_dir": dg.AssetIn("pool_index"), "recipe_info": dg.AssetIn("mining_recipe")})
def shards_manifest(context: dg.AssetExecutionContext, index_dir: Path, recipe_info: dict, data_root: DataRoot,
                    source: DataSource, clip: ClipModel) -> dg.Output:
    """`manifest.json` of one recipe's shard folder: counts, configuration, fingerprints of the CLIP, the SAE and the
    input data, and a sha256 per shard file so that a corrupted or truncated shard is detected before training
    reads it."""
    from pipeline.clip_encoder import checkpoint_fingerprint

    root = data_root.root()
    recipe_name = context.partition_key
    sae_dir = Path(recipe_info["sae_dir"])
    files = [layout.table_file(root, "preference_shards", recipe_shard_key(recipe_name, k)) for k in shard_keys()]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"preference_shards of recipe {recipe_name!r} is missing for {missing}: materialise "
                                "every shard partition first (`make mine` does)")
    shards = []
    for f in files:
        meta = read_metadata(f)
        n = pl.scan_parquet(f).select(pl.len()).collect().item()
        shards.append({"file": f.name, "rows": n, "sha256": sha256_file(f), "config": meta.get("config"),
                       "fingerprint": meta.get("fingerprint")})
    quarantines = [layout.quarantine_file(root, "preference_examples", k) for k in shard_keys()]
    quarantined = sum(pl.scan_parquet(q).select(pl.len()).collect().item() for q in quarantines if q.exists())
    manifest = {
        "schema_version": 1, "recipe": {k: recipe_info[k] for k in ("name", "rule", "space")}, "shards": shards,
        "examples": sum(s["rows"] for s in shards), "examples_quarantined": quarantined,
        "clip": {"model": clip.model or "world CLIP", "fingerprint": checkpoint_fingerprint(clip.spec(root))},
        "sae": {"sha256": sha256_file(sae_dir / "sae.safetensors"), "folder": str(sae_dir),
                "num_latents": json.loads((sae_dir / "cfg.json").read_text())["num_latents"]},
        "pool": json.loads((index_dir / "pool.json").read_text()),
        "source": {"kind": source.kind, **({"world_preset": source.world_preset, "world_seed": source.world_seed}
                                           if source.kind == "world" else {"manifest": source.manifest,
                                                                          "pool_dir": source.pool_dir})},
    }
    path = layout.manifest_file(root, recipe_name)
    return dg.Output(manifest, data_version=dg.DataVersion(fingerprint(manifest)),
                     metadata={"examples": manifest["examples"], "shards": len(shards),
                               "examples_quarantined": quarantined, "path": dg.MetadataValue.path(str(path))})
