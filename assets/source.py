"""Source assets: the raw inputs (scene world or the user's files) and their validated, sharded tables."""


import dataclasses

import dagster as dg
import polars as pl

from assets.metadata import counts_table, markdown_table, table_schema
from assets.partitions import shard_index, shard_partitions
from assets.resources import DataRoot, DataSource
from pipeline.column_mapping import ColumnMapping
from pipeline.fingerprint import fingerprint, sha256_file
from pipeline.ingest import IngestLimits, IngestResult, ingest_examples, ingest_pool
from pipeline.parquet_io import read_metadata, read_pair_if_current, write_pair
from pipeline.paths import shard_file
from world import PRESETS, generate_world


@dg.asset(group_name="source", kinds={"parquet", "png"})
def source_data(context: dg.AssetExecutionContext, data_root: DataRoot, source: DataSource) -> dg.MaterializeResult:
    """The raw inputs. With the scene world as source: generate it (PNG images + preference manifest).
    With files: confirm the user's pool folder and manifest exist and fingerprint them."""
    root = data_root.root()
    pool_dir, manifest, image_root = source.inputs(root)
    if source.kind == "world":
        if source.world_preset not in PRESETS:
            raise ValueError(f"unknown world preset {source.world_preset!r}; use one of {sorted(PRESETS)}")
        cfg = dataclasses.replace(PRESETS[source.world_preset], seed=source.world_seed)
        summary = generate_world(cfg, source.world_dir(root), progress=True)
        context.log.info(f"scene world at {source.world_dir(root)}")
        meta = {"world_dir": dg.MetadataValue.path(str(summary.root)), "pool_images": summary.n_pool,
                "train_scenes": summary.n_train, "test_scenes": summary.n_test,
                "preference_examples": summary.n_preferences, "test_examples": summary.n_preferences_test,
                "regenerated": summary.generated,
                "preview": markdown_table(pl.read_parquet(summary.preferences), n=8)}
    else:
        for path, what in ((pool_dir, "pool folder"), (manifest, "manifest"), (image_root, "image root")):
            if not path.exists():
                raise FileNotFoundError(f"{what} {path} does not exist; check MISP_POOL_DIR / MISP_MANIFEST / "
                                        "MISP_IMAGE_ROOT")
        meta = {"pool_dir": dg.MetadataValue.path(str(pool_dir)), "manifest": dg.MetadataValue.path(str(manifest)),
                "manifest_sha256": sha256_file(manifest)}
    return dg.MaterializeResult(metadata={"source": source.kind, **meta})


def _ingest_metadata(result, out_path) -> dict:
    counts = result.counts()
    return {
        "dagster/row_count": result.rows.height,
        "rows_in": result.rows_in,
        "rows_quarantined": result.quarantine.height,
        "quarantine_by_reason": counts_table(counts),
        "path": dg.MetadataValue.path(str(out_path)),
        "preview": markdown_table(result.rows),
        "quarantine_preview": markdown_table(result.quarantine.drop("raw")),
        "dagster/column_schema": table_schema(result.rows),
    }


def _ingest_or_reuse(context, fp: str, out, qout, run) -> IngestResult:
    """Run the ingest unless both outputs were already written from the same inputs (resume)."""
    if (pair := read_pair_if_current(out, qout, fp)) is not None:
        context.log.info(f"shard {context.partition_key}: inputs unchanged, reusing {out}")
        return IngestResult(*pair, int(read_metadata(out)["rows_in"]))
    result = run()
    write_pair(result.rows, result.quarantine, out, qout, {"fingerprint": fp, "rows_in": result.rows_in})
    return result


def _pool_listing_fingerprint(pool_dir) -> str:
    """Cheap identity of a folder: names, sizes and modification times (content is hashed at ingest)."""
    entries = sorted((str(p.relative_to(pool_dir)), st.st_size, st.st_mtime_ns)
                     for p in pool_dir.rglob("*") if p.is_file() and (st := p.stat()))
    return fingerprint(entries)


@dg.asset(group_name="ingest", partitions_def=shard_partitions, deps=[source_data], kinds={"parquet"})
def pool_images(context: dg.AssetExecutionContext, data_root: DataRoot, source: DataSource) -> dg.MaterializeResult:
    """Validated pool images of one shard; bad files go to quarantine with a reason."""
    root = data_root.root()
    shard, n = shard_index(context)
    pool_dir, _, _ = source.inputs(root)
    out = shard_file(root / "ingest" / "pool", context.partition_key)
    qout = shard_file(root / "ingest" / "quarantine", context.partition_key, prefix="pool-shard=")
    limits = IngestLimits()
    fp = fingerprint("pool", _pool_listing_fingerprint(pool_dir), limits, n, shard)
    result = _ingest_or_reuse(context, fp, out, qout, lambda: ingest_pool(
        pool_dir, shard=shard, num_shards=n, limits=limits, progress=True))
    context.log.info(f"shard {context.partition_key}: {result.rows_in} in, {result.rows.height} out, "
                     f"{result.quarantine.height} quarantined {result.counts()}")
    return dg.MaterializeResult(metadata=_ingest_metadata(result, out))


@dg.asset(group_name="ingest", partitions_def=shard_partitions, deps=[source_data], kinds={"parquet"})
def preference_examples(context: dg.AssetExecutionContext, data_root: DataRoot,
                        source: DataSource) -> dg.MaterializeResult:
    """Validated preference examples of one shard; bad rows go to quarantine with a reason."""
    root = data_root.root()
    shard, n = shard_index(context)
    _, manifest, image_root = source.inputs(root)
    mapping = ColumnMapping.resolve(source.column_mapping)
    out = shard_file(root / "ingest" / "examples", context.partition_key)
    qout = shard_file(root / "ingest" / "quarantine", context.partition_key, prefix="examples-shard=")
    limits = IngestLimits()
    fp = fingerprint("examples", sha256_file(manifest), str(image_root), mapping, limits, n, shard)
    result = _ingest_or_reuse(context, fp, out, qout, lambda: ingest_examples(
        manifest, image_root=image_root, mapping=mapping, shard=shard, num_shards=n, limits=limits,
        progress=True))
    context.log.info(f"shard {context.partition_key}: {result.rows_in} in, {result.rows.height} out, "
                     f"{result.quarantine.height} quarantined {result.counts()}")
    return dg.MaterializeResult(metadata=_ingest_metadata(result, out))
