"""Per-shard CLIP embeddings of pool images, positive images and prompts, with their asset checks.

A row whose embedding is NaN or inf (a broken checkpoint) goes to `embeddings/quarantine/<table>-shard=NNN.parquet`
with reason `non_finite_embedding`, as ingest does with bad input rows."""


from typing import Callable

import dagster as dg
import polars as pl

from assets import layout
from assets.clip import clip_model
from assets.io_managers import Table, current_table, parquet_io
from assets.metadata import counts_table, markdown_table, table_schema
from assets.partitions import shard_partitions
from assets.resources import ClipModel, DataRoot
from assets.source import pool_images, preference_examples
from pipeline.checks import check_finite, check_not_collapsed, check_unique_keys, check_unit_norm
from pipeline.clip_encoder import ClipEncoder, checkpoint_fingerprint
from pipeline.embed import (pool_embedding_table, positive_embedding_table, prompt_embedding_table,
                           quarantine_non_finite)
from store.fingerprint import fingerprint, frame_fingerprint, text_id
from store.safe_image import ImageOpener, ledger_file

CHECKS = ("finite", "unit_norm", "one_row_per_input")
IMAGE_CHECKS = CHECKS + ("not_collapsed",)
"""Image tables also fail when every image embeds alike (a random CLIP); a shard's few prompts may well be alike."""


CODE_VERSION = "2"
"""Of the embedding assets: bump when a change to embedding changes the rows written (2: IO managers)."""


def _embedding_asset(name: str, table: str, upstream: dg.AssetsDefinition, build: Callable[..., pl.DataFrame],
                     expected_keys: Callable[[pl.DataFrame], list[str]], reads: tuple[str, ...], doc: str,
                     checks: tuple[str, ...] = CHECKS) -> dg.AssetsDefinition:
    """One per-shard embedding asset: takes its upstream shard, embeds, returns the table (the IO manager writes
    it), checks. `reads`: the upstream columns the embedding depends on; only a change in them (or in the CLIP)
    re-embeds the shard, so editing a `chosen` text re-ingests but does not re-embed. `table`: the name of the
    rows in the quarantine (`pool`, `positives`, `prompts`)."""
    upstream_name = upstream.key.to_user_string()

    @dg.asset(name=name, group_name="embeddings", partitions_def=shard_partitions, deps=[clip_model],
              ins={"inputs": dg.AssetIn(upstream.key)}, kinds={"parquet", "pytorch"}, description=doc,
              io_manager_def=parquet_io, code_version=CODE_VERSION,
              check_specs=[dg.AssetCheckSpec(c, asset=name) for c in checks])
    def _asset(context: dg.AssetExecutionContext, inputs: Table, data_root: DataRoot, clip: ClipModel):
        root = data_root.root()
        out, qout = layout.table_file(root, name, context.partition_key), layout.quarantine_file(
            root, name, context.partition_key)
        spec = clip.spec(root)
        clip_fp = checkpoint_fingerprint(spec)
        fp = fingerprint(name, frame_fingerprint(inputs.rows, reads), clip_fp, CODE_VERSION)
        if (stored := current_table(out, qout, fp)) is not None:
            context.log.info(f"{out} is current (same inputs and CLIP); not re-embedding")
            rows, quarantine = stored.rows, stored.quarantine
        else:
            encoder = ClipEncoder(spec)
            ledger = ledger_file(root, "pool" if upstream_name == "pool_images" else "examples", context.partition_key)
            opener = ImageOpener.from_ledger(pl.read_parquet(ledger) if ledger.exists() else None)
            rows, quarantine = quarantine_non_finite(
                build(encoder, inputs.rows, batch_size=clip.batch_size, progress=True, opener=opener), table)
        provenance = {"fingerprint": fp, "clip": clip_fp, "dim": int(rows.schema["embedding"].size)}
        if quarantine.height:
            context.log.warning(f"shard {context.partition_key}: {quarantine.height} {table} embeddings are NaN or "
                                f"inf and were quarantined to {qout}; the CLIP checkpoint looks broken")
        outcomes = {"finite": check_finite(rows), "unit_norm": check_unit_norm(rows),
                    "one_row_per_input": check_unique_keys(rows, expected_keys(inputs.rows), quarantine["id"].to_list())}
        if "not_collapsed" in checks:
            outcomes["not_collapsed"] = check_not_collapsed(rows)
        yield dg.Output(
            Table(rows, quarantine, provenance), data_version=dg.DataVersion(fp),
            metadata={"dagster/row_count": rows.height, "rows_in": rows.height + quarantine.height,
                      "rows_quarantined": quarantine.height,
                      "quarantine_by_reason": counts_table(dict(quarantine["reason"].value_counts().iter_rows())),
                      "path": dg.MetadataValue.path(str(out)), "quarantine_path": dg.MetadataValue.path(str(qout)),
                      "embedding_dim": provenance["dim"], "clip_fingerprint": clip_fp,
                      "preview": markdown_table(rows), "quarantine_preview": markdown_table(quarantine.drop("raw")),
                      "dagster/column_schema": table_schema(rows)})
        for c, o in outcomes.items():
            yield dg.AssetCheckResult(check_name=c, passed=o.passed, description=o.description, metadata=o.details,
                                      severity=dg.AssetCheckSeverity.ERROR)

    return _asset


pool_embeddings = _embedding_asset(
    "pool_embeddings", "pool", pool_images, pool_embedding_table,
    lambda df: df["image_id"].to_list(), ("image_id", "path", "sha256"),
    "CLIP image embeddings of the shard's pool images (one row per image, L2-normalised).", IMAGE_CHECKS)
positive_embeddings = _embedding_asset(
    "positive_embeddings", "positives", preference_examples, positive_embedding_table,
    lambda df: df["image_sha256"].unique().to_list(), ("image_sha256", "image_id", "image_path"),
    "CLIP image embeddings of the shard's positive images (one row per unique image content).", IMAGE_CHECKS)
prompt_embeddings = _embedding_asset(
    "prompt_embeddings", "prompts", preference_examples, prompt_embedding_table,
    lambda df: [text_id(p) for p in df["prompt"].unique().to_list()], ("prompt",),
    "CLIP text embeddings of the shard's prompts (one row per unique prompt).")
