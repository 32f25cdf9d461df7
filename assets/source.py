"""Source assets: the raw inputs (scene world or the user's files) and their validated, sharded tables."""


import dataclasses
from pathlib import Path

import dagster as dg
import polars as pl

from assets import layout
from assets.io_managers import Table, current_table, parquet_io, write_table
from assets.metadata import counts_table, markdown_table, table_schema
from assets.partitions import shard_index, shard_partitions
from assets.resources import DataRoot, DataSource
from pipeline.column_mapping import ColumnMapping
from store.fingerprint import fingerprint, frame_fingerprint, sha256_file
from pipeline.manifest_shard import shard_fingerprint
from pipeline.ingest import IngestLimits, IngestResult, NoUsableRowsError, ingest_examples, ingest_pool
from store.parquet_io import is_current, write_parquet_atomic
from store.safe_image import ledger_changes, ledger_file, ledger_frame
from world import PRESETS, generate_world


@dg.asset(group_name="source", kinds={"parquet", "png"}, code_version="1")
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


CODE_VERSION = "2"
"""Of the ingest assets: bump when a change to ingest changes the rows it writes (2: tables through the IO manager)."""


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


def _ingest_or_reuse(context, fp: str, asset: str, root, ledger_path, limits: IngestLimits, run) -> IngestResult:
    """Run the ingest unless its outputs were written from the same inputs (resume). "Same inputs" covers the
    manifest or listing (in `fp`) and every image file the shard checked: the ledger's stamps (size, mtime,
    ctime, inode), re-hashing a file only where its stamp changed (`store.safe_image.ledger_changes`)."""
    out, qout = layout.table_file(root, asset, context.partition_key), layout.quarantine_file(root, asset,
                                                                                           context.partition_key)
    stored = current_table(out, qout, fp)
    # A shard whose every row was quarantined is rerun (so that it stops with the reason again); an empty one is not.
    if stored is not None and (stored.rows.height or not stored.quarantine.height) and is_current(ledger_path, fp):
        changes = ledger_changes(pl.read_parquet(ledger_path), max_bytes=limits.max_file_bytes)
        if not changes:
            context.log.info(f"shard {context.partition_key}: inputs unchanged (its manifest rows or pool listing, "
                             f"and its image files), reusing {out}")
            return IngestResult(stored.rows, stored.quarantine, int(stored.provenance["rows_in"]),
                                images=pl.read_parquet(ledger_path))
        context.log.info(f"shard {context.partition_key}: image files changed since the last ingest "
                         f"({'; '.join(changes)}); re-ingesting")
    try:
        result = run()
    except NoUsableRowsError as exc:
        # The run fails, so no output reaches the IO manager: write the quarantine (and the ledger) here, where
        # the error message points.
        write_parquet_atomic(_ledger(exc.result), ledger_path, _provenance(exc.result, fp))
        write_table(_table(exc.result, fp), out, qout)
        raise NoUsableRowsError(f"{exc} [this shard's quarantine: {qout}]", exc.result) from None
    write_parquet_atomic(_ledger(result), ledger_path, _provenance(result, fp))  # before the rows (IO manager)
    return result


def _ledger(result: IngestResult) -> pl.DataFrame:
    return result.images if result.images is not None else ledger_frame([])


def _provenance(result: IngestResult, fp: str) -> dict:
    """`content` is the fingerprint of the rows themselves, the data version Dagster compares: stages downstream
    key on it, so an identical re-ingest changes nothing and a new `chosen` text re-mines only its shard."""
    meta = {"fingerprint": fp, "rows_in": result.rows_in,
            "content": frame_fingerprint(result.rows, result.rows.columns),
            "quarantine_content": frame_fingerprint(result.quarantine, result.quarantine.columns)}
    if "example_id" in result.rows.columns:  # what retrieval (candidates, hence the SAE) reads: not `chosen`
        meta["retrieval_content"] = frame_fingerprint(result.rows, ("example_id", "image_sha256", "prompt"))
    return meta


def _table(result: IngestResult, fp: str) -> Table:
    return Table(result.rows, result.quarantine, _provenance(result, fp))


def _output(context, result: IngestResult, fp: str, asset: str, root) -> dg.Output:
    context.log.info(f"shard {context.partition_key}: {result.rows_in} in, {result.rows.height} out, "
                     f"{result.quarantine.height} quarantined {result.counts()}")
    table = _table(result, fp)
    return dg.Output(table, data_version=table.data_version,
                     metadata=_ingest_metadata(result, layout.table_file(root, asset, context.partition_key)))


def _pool_listing_fingerprint(pool_dir) -> str:
    """Identity of a folder's listing: the file names (row_index is a position in it). Their content is covered
    by the ledger (`_ingest_or_reuse`), so touching a file without changing it does not re-ingest."""
    entries = sorted(str(p.relative_to(pool_dir)) for p in pool_dir.rglob("*") if p.is_file())
    return fingerprint(entries)


def pool_fingerprint(source: DataSource, root, shard: int, n: int, limits: IngestLimits) -> str:
    """What one pool shard's ingest reads, by content: the pool folder's listing (the files themselves are covered
    by the shard's ledger) and the limits. Both the `pool_images` asset (its reuse key) and the `pool_source`
    observation (the shard's data version in the catalog) use it."""
    pool_dir, _, _ = source.inputs(root)
    return fingerprint("pool", _pool_listing_fingerprint(pool_dir), limits, n, shard, CODE_VERSION)


def examples_fingerprint(source: DataSource, root, shard: int, n: int, limits: IngestLimits) -> str:
    """What one examples shard's ingest reads: its manifest rows, the image root, the column mapping and the limits
    (the image files are covered by the shard's ledger). Used by `preference_examples` and `examples_source`."""
    _, manifest, image_root = source.inputs(root)
    mapping = ColumnMapping.resolve(source.column_mapping)
    # This shard's own rows (plus the layout all shards share), not the whole file: a changed row re-ingests
    # only its shard.
    return fingerprint("examples", shard_fingerprint(manifest, mapping=mapping, shard=shard, num_shards=n,
                                                     limits=limits, image_store=Path(root) / "ingest" / "images",
                                                     parts=(str(image_root),)), CODE_VERSION)


def _as_asset(source_asset: dg.SourceAsset) -> dg.AssetsDefinition:
    """An observable source as the external `AssetsDefinition` Dagster turns it into anyway, so that the definitions
    are one kind of object (`keys`, `map_asset_specs`, ...)."""
    from dagster._core.definitions.external_asset import create_external_asset_from_source_asset

    return create_external_asset_from_source_asset(source_asset)


def _observe(fingerprint_of, data_root: DataRoot, source: DataSource) -> dg.DataVersionsByPartition:
    """One data version per shard; `absent` while the source is not there yet (the world not generated)."""
    root, keys = data_root.root(), shard_partitions.get_partition_keys()
    versions = {}
    for i, key in enumerate(keys):
        try:
            versions[key] = fingerprint_of(source, root, i, len(keys), IngestLimits())
        except (FileNotFoundError, NotADirectoryError):
            versions[key] = "absent"
    return dg.DataVersionsByPartition({k: dg.DataVersion(v) for k, v in versions.items()})


@_as_asset
@dg.observable_source_asset(group_name="source", partitions_def=shard_partitions)
def pool_source(data_root: DataRoot, source: DataSource) -> dg.DataVersionsByPartition:
    """The pool folder as each pool shard's ingest sees it (observed: `assets.staleness.stale_or_missing` observes
    it before deciding, the UI's "Observe sources" does too). A new data version marks that shard's ingest stale."""
    return _observe(pool_fingerprint, data_root, source)


@_as_asset
@dg.observable_source_asset(group_name="source", partitions_def=shard_partitions)
def examples_source(data_root: DataRoot, source: DataSource) -> dg.DataVersionsByPartition:
    """The preference manifest as each examples shard's ingest sees it (observed, like `pool_source`)."""
    return _observe(examples_fingerprint, data_root, source)


@dg.asset(group_name="ingest", partitions_def=shard_partitions, deps=[source_data, pool_source], kinds={"parquet"},
          io_manager_def=parquet_io, code_version=CODE_VERSION)
def pool_images(context: dg.AssetExecutionContext, data_root: DataRoot, source: DataSource) -> dg.Output:
    """Validated pool images of one shard; bad files go to quarantine with a reason."""
    root = data_root.root()
    shard, n = shard_index(context)
    pool_dir, _, _ = source.inputs(root)
    limits = IngestLimits()
    fp = pool_fingerprint(source, root, shard, n, limits)
    result = _ingest_or_reuse(context, fp, "pool_images", root, ledger_file(root, "pool", context.partition_key),
                              limits, lambda: ingest_pool(pool_dir, shard=shard, num_shards=n, limits=limits,
                                                          progress=True, require_usable=True))
    return _output(context, result, fp, "pool_images", root)


@dg.asset(group_name="ingest", partitions_def=shard_partitions, deps=[source_data, examples_source],
          kinds={"parquet"}, io_manager_def=parquet_io, code_version=CODE_VERSION)
def preference_examples(context: dg.AssetExecutionContext, data_root: DataRoot, source: DataSource) -> dg.Output:
    """Validated preference examples of one shard; bad rows go to quarantine with a reason."""
    root = data_root.root()
    shard, n = shard_index(context)
    _, manifest, image_root = source.inputs(root)
    mapping = ColumnMapping.resolve(source.column_mapping)
    limits = IngestLimits()
    fp = examples_fingerprint(source, root, shard, n, limits)
    result = _ingest_or_reuse(context, fp, "preference_examples", root,
                              ledger_file(root, "examples", context.partition_key), limits,
                              lambda: ingest_examples(manifest, image_root=image_root, mapping=mapping, shard=shard,
                                                      num_shards=n, limits=limits, progress=True,
                                                      image_store=root / layout.IMAGE_STORE, require_usable=True))
    return _output(context, result, fp, "preference_examples", root)
