"""The `sae` asset: a sparse autoencoder trained on (positive, retrieved candidate) differences (SPEC §2.3-2.4)."""

import json
from typing import Optional

import dagster as dg
import numpy as np
import polars as pl

from assets.metadata import markdown_table
from assets.mining import _all_shards, candidates, load_pool_table
from assets.resources import DataRoot, DataSource
from pipeline.checks import check_sae_fvu, check_sae_live_latents
from store.fingerprint import fingerprint
from pipeline.mine import training_pairs
from store.parquet_io import read_metadata, write_json_atomic, write_parquet_atomic
from store.paths import shard_file
from pipeline.sharding import shard_keys
from world.changes import ATTRIBUTES, change_labels, scenes_by_path
from sae import SaeConfig, SparseAutoencoder, TrainConfig, encode_all, train_sae
from sae.interpret import latent_table, usage_histogram


class SaeTrainingConfig(dg.Config):
    """SAE architecture and training (defaults: the paper's sigmoid SAE, k = 128, prompt-conditioned)."""

    kind: str = "sigmoid"
    """`sigmoid` (paper: KL sparsity) or `topk`."""
    space: str = "fused"
    """`fused` (d = vec(u t^T), prompt-conditioned) or `image` (d = u, ablation)."""
    num_latents: int = 128
    """Latents k."""
    rho: float = 0.05
    """sigmoid: target activation rate."""
    gamma: float = 1.0
    """sigmoid: weight of the KL sparsity term."""
    k_active: int = 8
    """topk: active latents per input."""
    pairs_per_example: int = 8
    """Training pairs drawn per example among its retrieved candidates."""
    max_epochs: int = 30
    """Upper bound on epochs (early stopping on held-out FVU)."""
    lr: Optional[float] = None
    """Adam learning rate (default: the library's)."""
    seed: int = 0
    """Seed of pair sampling, init and training."""


def _pairs(root, per_example: int, seed: int) -> tuple[np.ndarray, np.ndarray, pl.DataFrame, list[str]]:
    pool, _ = load_pool_table(root)
    rng = np.random.default_rng(seed)
    us, ts, ids, fps = [], [], [], []
    cand_files = _all_shards(root / "mining" / "candidates", "candidates")
    for key, cand_file in zip(shard_keys(), cand_files):
        files = {name: shard_file(root / folder, key) for name, folder in
                 (("examples", "ingest/examples"), ("positives", "embeddings/positives"),
                  ("prompts", "embeddings/prompts"))}
        u, t, pair_ids = training_pairs(pl.read_parquet(cand_file), pl.read_parquet(files["examples"]),
                                        pl.read_parquet(files["positives"]), pl.read_parquet(files["prompts"]), pool,
                                        per_example=per_example, rng=rng)
        if len(u):
            us.append(u), ts.append(t), ids.append(pair_ids)
        fps += [read_metadata(cand_file)["fingerprint"], read_metadata(files["prompts"])["fingerprint"]]
    if not us:
        raise ValueError("no (positive, candidate) pairs to train the SAE on: every example has an empty "
                         "candidate pool; check the pool_index and candidates assets")
    return np.concatenate(us), np.concatenate(ts), pl.concat(ids), fps


def _check_enough_pairs(n_pairs: int, n_positives: int, val_fraction: float, per_example: int) -> None:
    """The held-out FVU divides by the variance of the held-out pairs: it needs at least 2 of them, so at least
    ceil(2 / val_fraction) pairs in all. Fewer (one good example) would end in an infinite FVU and advice about
    the learning rate; say instead what is missing."""
    need = int(np.ceil(2 / val_fraction))
    if n_pairs < need:
        raise ValueError(
            f"the SAE needs at least {need} (positive, candidate) pairs ({val_fraction:.0%} held out, at least 2); "
            f"the ingested examples give {n_pairs} pairs from {n_positives} positive image(s) with "
            f"SaeTrainingConfig.pairs_per_example={per_example}. Add examples (see the ingest quarantine for rows "
            "that were dropped) or raise pairs_per_example (at most the candidates per example, CandidatesConfig.m)")


def _md_table(df: pl.DataFrame, n: int = 20) -> dg.MetadataValue:
    return markdown_table(df, n=n, drop=())


SAE_CHECKS = ("sae_val_fvu", "sae_live_latents")


@dg.asset(group_name="mining", deps=[candidates], kinds={"pytorch", "safetensors"},
          check_specs=[dg.AssetCheckSpec(name, asset="sae") for name in SAE_CHECKS])
def sae(context: dg.AssetExecutionContext, config: SaeTrainingConfig, data_root: DataRoot,
        source: DataSource) -> dg.MaterializeResult:
    """Sparse autoencoder over prompt-conditioned embedding differences, with its training curve, held-out
    metrics, latent usage and (on the scene world) the ground-truth change each latent tracks."""
    root = data_root.root()
    folder = root / "models" / "sae"
    u, t, ids, input_fps = _pairs(root, config.pairs_per_example, config.seed)
    cfg = SaeConfig(kind=config.kind, space=config.space, num_latents=config.num_latents, dv=u.shape[1],
                    dt=t.shape[1], rho=config.rho, gamma=config.gamma, k_active=config.k_active, seed=config.seed)
    train_cfg = TrainConfig(max_epochs=config.max_epochs, **({"lr": config.lr} if config.lr else {}))
    _check_enough_pairs(len(u), ids["positive_sha256"].n_unique(), train_cfg.val_fraction, config.pairs_per_example)
    fp = fingerprint("sae", input_fps, config.model_dump())
    info_path = folder / "training.json"
    if (folder / "cfg.json").exists() and info_path.exists() and \
            json.loads(info_path.read_text()).get("fingerprint") == fp:
        context.log.info(f"SAE at {folder} is current; not retraining")
        model = SparseAutoencoder.load(folder)
        history = json.loads(info_path.read_text())["history"]
    else:
        model, history = train_sae(u, t, cfg, train_cfg, progress=True)
        model.save(folder)
        write_json_atomic({"fingerprint": fp, "history": history, "pairs": len(u)}, info_path)
    codes = encode_all(model, u, t).numpy()
    meta = {
        "pairs": len(u), "dv": int(u.shape[1]), "dt": int(t.shape[1]), "kind": config.kind, "space": config.space,
        "best_epoch": history["best_epoch"],
        **{f"val/{k}": float(v) for k, v in history["final_val"].items() if k != "n"},
        "training_curve": dg.MetadataValue.json([{k: r[k] for k in ("epoch", "train_loss", "val_fvu")}
                                                 for r in history["epochs"]]),
        "latent_usage": _md_table(usage_histogram(codes, config.kind)),
        "folder": dg.MetadataValue.path(str(folder)),
    }
    if source.kind == "world":
        scenes = scenes_by_path(source.world_dir(root))
        pos = [scenes.get(p) for p in ids["positive_path"].to_list()]
        neg = [scenes.get(p) for p in ids["pool_path"].to_list()]
        keep = [i for i, (a, b) in enumerate(zip(pos, neg)) if a is not None and b is not None]
        changed = change_labels([pos[i] for i in keep], [neg[i] for i in keep])
        table = latent_table(codes[keep], changed, ATTRIBUTES, ids=[ids["pool_path"][i] for i in keep],
                             kind=config.kind, n_top=3)
        report = folder / "latents.parquet"
        write_parquet_atomic(table, report, {"fingerprint": fp})
        best = table.filter(pl.col("best_attribute").is_not_null())
        meta["latents_by_attribute"] = _md_table(best.group_by("best_attribute").agg(
            pl.len().alias("latents"), pl.col("auroc").max().alias("max_auroc")).sort("best_attribute"))
        meta["top_latents"] = _md_table(best.sort("auroc", descending=True).head(15))
        meta["latent_report"] = dg.MetadataValue.path(str(report))
    outcomes = {"sae_val_fvu": check_sae_fvu(history["final_val"]),
                "sae_live_latents": check_sae_live_latents(codes, config.kind)}
    return dg.MaterializeResult(metadata=meta, check_results=[
        dg.AssetCheckResult(check_name=name, passed=o.passed, description=o.description, metadata=o.details,
                            severity=dg.AssetCheckSeverity.ERROR) for name, o in outcomes.items()])
