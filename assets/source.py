"""Source assets: the raw inputs (scene world or the user's files) and their validated, sharded tables."""


import dataclasses

import dagster as dg
import polars as pl

from assets.metadata import counts_table, markdown_table, table_schema
from assets.partitions import shard_index, shard_partitions
from assets.resources import DataRoot, DataSource
from pipeline.column_mapping import ColumnMapping
from store.fingerprint import fingerprint, frame_fingerprint, sha256_file
from pipeline.ingest import IngestLimits, IngestResult, NoUsableRowsError, ingest_examples, ingest_pool
from pipeline.manifest_shard import shard_fingerprint
from store.parquet_io import is_current, read_metadata, read_pair_if_current, write_pair, write_parquet_atomic
from store.safe_image import ledger_changes, ledger_file, ledger_frame
from store.paths import shard_file
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
                "manifest_sha256": sha256_file(manifest, what="manifest")}
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


def _ingest_or_reuse(context, fp: str, out, qout, ledger_path, limits: IngestLimits, run) -> IngestResult:
    """Run the ingest unless its outputs were written from the same inputs (resume). "Same inputs" covers the
    manifest or listing (in `fp`) and every image file the shard checked: the ledger's stamps (size, mtime,
    ctime, inode), re-hashing a file only where its stamp changed (`store.safe_image.ledger_changes`)."""
    pair = read_pair_if_current(out, qout, fp)
    # A shard whose every row was quarantined is rerun (so that it stops with the reason again); an empty one is not.
    if pair is not None and (pair[0].height or not pair[1].height) and is_current(ledger_path, fp):
        changes = ledger_changes(pl.read_parquet(ledger_path), max_bytes=limits.max_file_bytes)
        if not changes:
            context.log.info(f"shard {context.partition_key}: inputs unchanged (its manifest rows or pool listing, "
                             f"and its image files), reusing {out}")
            return IngestResult(*pair, int(read_metadata(out)["rows_in"]), images=pl.read_parquet(ledger_path))
        context.log.info(f"shard {context.partition_key}: image files changed since the last ingest "
                         f"({'; '.join(changes)}); re-ingesting")
    try:
        result = run()
    except NoUsableRowsError as exc:
        _write(exc.result, fp, out, qout, ledger_path)
        raise NoUsableRowsError(f"{exc} [this shard's quarantine: {qout}]", exc.result) from None
    _write(result, fp, out, qout, ledger_path)
    return result


def _write(result: IngestResult, fp: str, out, qout, ledger_path) -> None:
    """Ledger first, then quarantine, then rows: a rows file that exists has both beside it. `content` is the
    fingerprint of the rows themselves (`retrieval_content` of the columns retrieval reads): stages downstream
    key on them, so an identical re-ingest changes nothing and a new `chosen` text re-mines only its shard."""
    meta = {"fingerprint": fp, "rows_in": result.rows_in,
            "content": frame_fingerprint(result.rows, result.rows.columns)}
    if "example_id" in result.rows.columns:  # what retrieval (candidates, hence the SAE) reads: not `chosen`
        meta["retrieval_content"] = frame_fingerprint(result.rows, ("example_id", "image_sha256", "prompt"))
    write_parquet_atomic(result.images if result.images is not None else ledger_frame([]), ledger_path, meta)
    write_pair(result.rows, result.quarantine, out, qout, meta)


def _pool_listing_fingerprint(pool_dir) -> str:
    """Identity of a folder's listing: the file names (row_index is a position in it). Their content is covered
    by the ledger (`_ingest_or_reuse`), so touching a file without changing it does not re-ingest."""
    entries = sorted(str(p.relative_to(pool_dir)) for p in pool_dir.rglob("*") if p.is_file())
    return fingerprint(entries)


def _ledger_file(root, source: str, key: str):
    return ledger_file(root, source, key)


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
    result = _ingest_or_reuse(context, fp, out, qout, _ledger_file(root, "pool", context.partition_key), limits,
                              lambda: ingest_pool(pool_dir, shard=shard, num_shards=n, limits=limits, progress=True,
                                                  require_usable=True))
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
    # This shard's own rows (plus the layout all shards share), not the whole file: a changed row re-ingests
    # only its shard. The image files are covered by the shard's ledger (`_ingest_or_reuse`).
    fp = fingerprint("examples", shard_fingerprint(manifest, mapping=mapping, shard=shard, num_shards=n, limits=limits,
                                                   image_store=root / "ingest" / "images", parts=(str(image_root),)))
    result = _ingest_or_reuse(context, fp, out, qout, _ledger_file(root, "examples", context.partition_key), limits,
                              lambda: ingest_examples(manifest, image_root=image_root, mapping=mapping, shard=shard,
                                                      num_shards=n, limits=limits, progress=True,
                                                      image_store=root / "ingest" / "images", require_usable=True))
    context.log.info(f"shard {context.partition_key}: {result.rows_in} in, {result.rows.height} out, "
                     f"{result.quarantine.height} quarantined {result.counts()}")
    return dg.MaterializeResult(metadata=_ingest_metadata(result, out))
