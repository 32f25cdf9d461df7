"""The `sae` asset: a sparse autoencoder trained on (positive, retrieved candidate) differences (SPEC §2.3-2.4)."""

import json
from pathlib import Path
from typing import NamedTuple

import dagster as dg
import numpy as np
import polars as pl

from assets import layout
from assets.io_managers import ALL_SHARDS, Table, folder_fingerprint, folder_io
from assets.metadata import markdown_table
from assets.mining import load_pool_table
from assets.partitions import space_partitions
from assets.resources import DataRoot, DataSource
from assets.stage_config import config_from, to
from pipeline.checks import check_sae_fvu, check_sae_live_latents
from store.fingerprint import fingerprint
from pipeline.mine import training_pairs
from store.parquet_io import write_json_atomic, write_parquet_atomic
from pipeline.sharding import shard_keys
from world.changes import ATTRIBUTES, change_labels, scenes_by_path
from sae import SaeConfig, SparseAutoencoder, TrainConfig, encode_all, train_sae
from sae.interpret import latent_table, usage_histogram


SAE_FIELDS = ("kind", "num_latents", "rho", "gamma", "k_active", "seed")
"""Fields of sae.SaeConfig the run config sets (`space` comes from the partition, `dv`/`dt` from the data)."""
TRAIN_FIELDS = ("max_epochs", "lr")
"""Fields of sae.TrainConfig the run config sets."""


def _sae_training_config() -> type[dg.Config]:
    sae_part = config_from(SaeConfig, SAE_FIELDS, "_SaeFields", "")
    train_part = config_from(TrainConfig, TRAIN_FIELDS, "_TrainFields", "")
    fields = {**{n: (f.annotation, f) for n, f in sae_part.model_fields.items()},
              **{n: (f.annotation, f) for n, f in train_part.model_fields.items()}}
    import pydantic

    model = pydantic.create_model(
        "SaeTrainingConfig", __base__=dg.Config, __module__=__name__,
        pairs_per_example=(int, pydantic.Field(default=8, description="Training pairs drawn per example among its "
                                                                      "retrieved candidates.")), **fields)
    model.__doc__ = ("SAE architecture and training (fields of sae.SaeConfig and sae.TrainConfig; defaults: the "
                     "paper's sigmoid SAE, k = 128, prompt-conditioned). The space is the partition.")
    return model


SaeTrainingConfig = _sae_training_config()


def _pairs(index_dir, cands: dict[str, Table], examples: dict[str, Table], positives: dict[str, Table],
           prompts: dict[str, Table], per_example: int, seed: int
           ) -> tuple[np.ndarray, np.ndarray, pl.DataFrame, list[str]]:
    pool, _ = load_pool_table(index_dir)
    rng = np.random.default_rng(seed)
    us, ts, ids, fps = [], [], [], []
    for key in shard_keys():
        u, t, pair_ids = training_pairs(cands[key].rows, examples[key].rows, positives[key].rows, prompts[key].rows,
                                        pool, per_example=per_example, rng=rng)
        if len(u):
            us.append(u), ts.append(t), ids.append(pair_ids)
        fps += [cands[key].fingerprint, prompts[key].fingerprint]
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


CODE_VERSION = "2"
"""Of `sae`: bump when a change to SAE training changes the weights (2: folder IO manager, space partitions)."""


class SaeFolder(NamedTuple):
    """`models/sae[-<space>]/`: weights + cfg.json (SparseAutoencoder.save), training.json, latents.parquet."""

    fingerprint: str
    model: SparseAutoencoder | None = None
    history: dict | None = None
    pairs: int = 0
    latents: pl.DataFrame | None = None

    def save(self, folder) -> None:
        self.model.save(folder)
        write_json_atomic({"fingerprint": self.fingerprint, "history": self.history, "pairs": self.pairs},
                          folder / "training.json")
        if self.latents is not None:
            write_parquet_atomic(self.latents, folder / "latents.parquet", {"fingerprint": self.fingerprint})


def _all(name: str) -> dg.AssetIn:
    return dg.AssetIn(name, metadata=ALL_SHARDS, partition_mapping=dg.AllPartitionMapping())


@dg.asset(group_name="mining", partitions_def=space_partitions, kinds={"pytorch", "safetensors"},
          io_manager_def=folder_io, code_version=CODE_VERSION,
          ins={"index_dir": dg.AssetIn("pool_index"), "cands": _all("candidates"),
               "examples": _all("preference_examples"), "positives": _all("positive_embeddings"),
               "prompts": _all("prompt_embeddings")},
          check_specs=[dg.AssetCheckSpec(name, asset="sae") for name in SAE_CHECKS])
def sae(context: dg.AssetExecutionContext, config: SaeTrainingConfig, index_dir: Path, cands: dict,
        examples: dict, positives: dict, prompts: dict, data_root: DataRoot, source: DataSource):
    """Sparse autoencoder over embedding differences, one partition per space (`fused`: prompt-conditioned, the
    paper's; `image`: the ablation), with its training curve, held-out metrics, latent usage and (on the scene
    world) the ground-truth change each latent tracks."""
    root = data_root.root()
    space = context.partition_key
    folder = layout.folder(root, "sae", space)
    u, t, ids, input_fps = _pairs(index_dir, cands, examples, positives, prompts, config.pairs_per_example,
                                  config.seed)
    cfg = to(SaeConfig, config, space=space, dv=int(u.shape[1]), dt=int(t.shape[1]))
    train_cfg = to(TrainConfig, config)
    _check_enough_pairs(len(u), ids["positive_sha256"].n_unique(), train_cfg.val_fraction, config.pairs_per_example)
    fp = fingerprint("sae", input_fps, config.model_dump(), space, CODE_VERSION)
    if folder_fingerprint(folder) == fp:
        context.log.info(f"SAE at {folder} is current; not retraining")
        model = SparseAutoencoder.load(folder)
        history = json.loads((folder / "training.json").read_text())["history"]
        fresh = False
    else:
        model, history = train_sae(u, t, cfg, train_cfg, progress=True)
        fresh = True
    codes = encode_all(model, u, t).numpy()
    meta = {
        "pairs": len(u), "dv": int(u.shape[1]), "dt": int(t.shape[1]), "kind": config.kind, "space": space,
        "best_epoch": history["best_epoch"],
        **{f"val/{k}": float(v) for k, v in history["final_val"].items() if k != "n"},
        "training_curve": dg.MetadataValue.json([{k: r[k] for k in ("epoch", "train_loss", "val_fvu")}
                                                 for r in history["epochs"]]),
        "latent_usage": _md_table(usage_histogram(codes, config.kind)),
        "folder": dg.MetadataValue.path(str(folder)),
    }
    table = None
    if source.kind == "world":
        scenes = scenes_by_path(source.world_dir(root))
        pos = [scenes.get(p) for p in ids["positive_path"].to_list()]
        neg = [scenes.get(p) for p in ids["pool_path"].to_list()]
        keep = [i for i, (a, b) in enumerate(zip(pos, neg)) if a is not None and b is not None]
        changed = change_labels([pos[i] for i in keep], [neg[i] for i in keep])
        table = latent_table(codes[keep], changed, ATTRIBUTES, ids=[ids["pool_path"][i] for i in keep],
                             kind=config.kind, n_top=3)
        best = table.filter(pl.col("best_attribute").is_not_null())
        meta["latents_by_attribute"] = _md_table(best.group_by("best_attribute").agg(
            pl.len().alias("latents"), pl.col("auroc").max().alias("max_auroc")).sort("best_attribute"))
        meta["top_latents"] = _md_table(best.sort("auroc", descending=True).head(15))
        meta["latent_report"] = dg.MetadataValue.path(str(folder / "latents.parquet"))
    outcomes = {"sae_val_fvu": check_sae_fvu(history["final_val"]),
                "sae_live_latents": check_sae_live_latents(codes, config.kind)}
    output = SaeFolder(fp, model, history, len(u), table) if fresh else SaeFolder(fp)
    yield dg.Output(output, data_version=dg.DataVersion(fp), metadata=meta)
    for name, o in outcomes.items():
        yield dg.AssetCheckResult(check_name=name, passed=o.passed, description=o.description, metadata=o.details,
                                  severity=dg.AssetCheckSeverity.ERROR)
