"""Per-shard CLIP embeddings of pool images, positive images and prompts, with their asset checks.

A row whose embedding is NaN or inf (a broken checkpoint) goes to `embeddings/quarantine/<table>-shard=NNN.parquet`
with reason `non_finite_embedding`, as ingest does with bad input rows."""


from typing import Callable

import dagster as dg
import polars as pl

from assets.clip import clip_model
from assets.metadata import counts_table, markdown_table, table_schema
from assets.partitions import shard_partitions
from assets.resources import ClipModel, DataRoot
from assets.source import pool_images, preference_examples
from pipeline.checks import check_finite, check_not_collapsed, check_unique_keys, check_unit_norm
from pipeline.clip_encoder import ClipEncoder, checkpoint_fingerprint
from pipeline.embed import (pool_embedding_table, positive_embedding_table, prompt_embedding_table,
                           quarantine_non_finite)
from store.fingerprint import fingerprint, frame_fingerprint, text_id
from store.parquet_io import read_pair_if_current, write_pair
from store.safe_image import ImageOpener, ledger_file
from store.paths import shard_file

CHECKS = ("finite", "unit_norm", "one_row_per_input")
IMAGE_CHECKS = CHECKS + ("not_collapsed",)
"""Image tables also fail when every image embeds alike (a random CLIP); a shard's few prompts may well be alike."""


def _embedding_asset(name: str, folder: str, upstream: dg.AssetsDefinition, upstream_folder: str,
                     build: Callable[..., pl.DataFrame], expected_keys: Callable[[pl.DataFrame], list[str]],
                     reads: tuple[str, ...], doc: str, checks: tuple[str, ...] = CHECKS) -> dg.AssetsDefinition:
    """One per-shard embedding asset: reads its upstream shard, embeds, writes, checks. `reads`: the upstream
    columns the embedding depends on; only a change in them (or in the CLIP) re-embeds the shard, so editing a
    `chosen` text re-ingests but does not re-embed."""

    @dg.asset(name=name, group_name="embeddings", partitions_def=shard_partitions, deps=[upstream, clip_model],
              kinds={"parquet", "pytorch"}, description=doc,
              check_specs=[dg.AssetCheckSpec(c, asset=name) for c in checks])
    def _asset(context: dg.AssetExecutionContext, data_root: DataRoot, clip: ClipModel) -> dg.MaterializeResult:
        root = data_root.root()
        src = shard_file(root / "ingest" / upstream_folder, context.partition_key)
        if not src.exists():
            raise FileNotFoundError(f"{src} is missing: materialise {upstream.key.to_user_string()} for shard "
                                    f"{context.partition_key} first")
        out = shard_file(root / "embeddings" / folder, context.partition_key)
        qout = shard_file(root / "embeddings" / "quarantine", context.partition_key, prefix=f"{folder}-shard=")
        spec = clip.spec(root)
        clip_fp = checkpoint_fingerprint(spec)
        inputs = pl.read_parquet(src)
        fp = fingerprint(name, frame_fingerprint(inputs, reads), clip_fp)
        if (pair := read_pair_if_current(out, qout, fp)) is not None:
            context.log.info(f"{out} is current (same inputs and CLIP); not re-embedding")
            table, quarantine = pair
        else:
            encoder = ClipEncoder(spec)
            ledger = ledger_file(root, f"{'pool' if folder == 'pool' else 'examples'}",
                                 context.partition_key)
            opener = ImageOpener.from_ledger(pl.read_parquet(ledger) if ledger.exists() else None)
            table, quarantine = quarantine_non_finite(
                build(encoder, inputs, batch_size=clip.batch_size, progress=True, opener=opener), folder)
            write_pair(table, quarantine, out, qout, {"fingerprint": fp, "clip": clip_fp, "dim": encoder.dim})
        if quarantine.height:
            context.log.warning(f"shard {context.partition_key}: {quarantine.height} {folder} embeddings are NaN or "
                                f"inf and were quarantined to {qout}; the CLIP checkpoint looks broken")
        outcomes = {"finite": check_finite(table), "unit_norm": check_unit_norm(table),
                    "one_row_per_input": check_unique_keys(table, expected_keys(inputs), quarantine["id"].to_list())}
        if "not_collapsed" in checks:
            outcomes["not_collapsed"] = check_not_collapsed(table)
        return dg.MaterializeResult(
            metadata={"dagster/row_count": table.height, "rows_in": table.height + quarantine.height,
                      "rows_quarantined": quarantine.height,
                      "quarantine_by_reason": counts_table(dict(quarantine["reason"].value_counts().iter_rows())),
                      "path": dg.MetadataValue.path(str(out)), "quarantine_path": dg.MetadataValue.path(str(qout)),
                      "embedding_dim": int(table.schema["embedding"].size), "clip_fingerprint": clip_fp,
                      "preview": markdown_table(table), "quarantine_preview": markdown_table(quarantine.drop("raw")),
                      "dagster/column_schema": table_schema(table)},
            check_results=[dg.AssetCheckResult(check_name=c, passed=o.passed, description=o.description,
                                               metadata=o.details, severity=dg.AssetCheckSeverity.ERROR)
                           for c, o in outcomes.items()],
        )

    return _asset


pool_embeddings = _embedding_asset(
    "pool_embeddings", "pool", pool_images, "pool", pool_embedding_table,
    lambda df: df["image_id"].to_list(), ("image_id", "path", "sha256"),
    "CLIP image embeddings of the shard's pool images (one row per image, L2-normalised).", IMAGE_CHECKS)
positive_embeddings = _embedding_asset(
    "positive_embeddings", "positives", preference_examples, "examples", positive_embedding_table,
    lambda df: df["image_sha256"].unique().to_list(), ("image_sha256", "image_id", "image_path"),
    "CLIP image embeddings of the shard's positive images (one row per unique image content).", IMAGE_CHECKS)
prompt_embeddings = _embedding_asset(
    "prompt_embeddings", "prompts", preference_examples, "examples", prompt_embedding_table,
    lambda df: [text_id(p) for p in df["prompt"].unique().to_list()], ("prompt",),
    "CLIP text embeddings of the shard's prompts (one row per unique prompt).")
