"""One "current" mechanism: Dagster's code and data versions (plus the files on disk) decide what must run, on a
real instance. After the tiny world's full run nothing is stale or missing; a rerun of a current partition keeps
its data version and leaves the rest fresh; bumping one asset's code version makes exactly that asset and its
downstream due; a deleted shard file makes exactly its partition and what reads it due."""

import shutil

import dagster as dg

from assets import layout
from assets.definitions import all_assets
from assets.partitions import partition_keys, recipe_shard_key
from assets.recipes import DEFAULT_RECIPE
from assets.staleness import stale_or_missing
from pipeline.sharding import shard_keys

NAMES = [k.to_user_string() for a in all_assets for k in a.keys]
DEFAULT = {name: partition_keys(name) for name in NAMES}
"""The default recipe's partitions: what the `mined` fixture (materialise) materialised."""
MINING_DOWNSTREAM_OF_CANDIDATES = {"candidates", "sae", "mining_recipe", "preference_shards", "shards_manifest"}


def _bump(name: str) -> list:
    return [a.map_asset_specs(lambda spec: spec.replace_attributes(code_version=f"{spec.code_version}-bumped")
                              if spec.key.to_user_string() == name else spec) for a in all_assets]


def _due(instance, assets, root) -> set[tuple[str, str | None]]:
    return {(t.asset, t.partition) for t in stale_or_missing(instance, assets, NAMES, DEFAULT, root=root)}


def test_after_a_full_run_nothing_is_stale_or_missing(mined):
    root, instance, _, _ = mined
    assert stale_or_missing(instance, all_assets, NAMES, DEFAULT, root=root) == []
    # every other recipe is missing: its partitions exist in the catalog but were never materialised
    other = stale_or_missing(instance, all_assets, ["preference_shards"], {"preference_shards": [
        recipe_shard_key("greedy_image", k) for k in shard_keys()]}, root=root)
    assert [t.reason for t in other] == ["missing"] * len(shard_keys())


def test_rerunning_a_current_partition_keeps_everything_fresh(mined):
    root, instance, resources, _ = mined
    target = layout.table_file(root, "candidates", shard_keys()[0])
    before = target.stat().st_mtime_ns
    assert dg.materialize(all_assets, selection=["candidates"], partition_key=shard_keys()[0], instance=instance,
                          resources=resources).success
    assert target.stat().st_mtime_ns == before  # the IO manager did not rewrite a current table
    assert stale_or_missing(instance, all_assets, NAMES, DEFAULT, root=root) == []


def test_a_new_code_version_makes_exactly_that_asset_and_its_downstream_due(mined):
    root, instance, _, _ = mined
    due = _due(instance, _bump("candidates"), root)
    assert {name for name, _ in due} == MINING_DOWNSTREAM_OF_CANDIDATES
    assert due == {(n, p) for n in MINING_DOWNSTREAM_OF_CANDIDATES for p in DEFAULT[n]}
    reasons = {t.asset: t.reason for t in stale_or_missing(instance, _bump("candidates"), NAMES, DEFAULT, root=root)}
    assert reasons["candidates"] == "stale: has a new code version"
    assert reasons["sae"].startswith("upstream candidates")
    # a leaf: only itself
    assert _due(instance, _bump("shards_manifest"), root) == {("shards_manifest", DEFAULT_RECIPE)}
    # the embeddings of prompts: candidates, and every mining asset after them, not the pool side
    due = {name for name, _ in _due(instance, _bump("prompt_embeddings"), root)}
    assert due == {"prompt_embeddings"} | MINING_DOWNSTREAM_OF_CANDIDATES


def test_a_deleted_shard_file_makes_its_partition_and_readers_due(mined, tmp_path):
    root, instance, _, _ = mined
    shard = shard_keys()[-1]
    path = layout.table_file(root, "preference_shards", recipe_shard_key(DEFAULT_RECIPE, shard))
    kept = shutil.copy2(path, tmp_path / path.name)
    path.unlink()
    try:
        todo = stale_or_missing(instance, all_assets, NAMES, DEFAULT, root=root)
    finally:
        shutil.copy2(kept, path)
    assert [(t.asset, t.partition, t.reason.split(" [")[0]) for t in todo] == [
        ("preference_shards", recipe_shard_key(DEFAULT_RECIPE, shard), "not on disk"),
        ("shards_manifest", DEFAULT_RECIPE, f"upstream preference_shards[{recipe_shard_key(DEFAULT_RECIPE, shard)}] must run")]


def test_a_changed_source_makes_exactly_the_ingest_that_reads_it_due(mined):
    """The sources are observed (one data version per shard from their content): a new pool file makes the pool
    side due, never the examples side; putting the folder back makes nothing due."""
    root, instance, resources, _ = mined
    ingest = ["pool_images", "preference_examples"]
    # A first observation, then the ingest re-run (nothing is rewritten), so that what it read is on record.
    assert stale_or_missing(instance, all_assets, NAMES, DEFAULT, root=root, resources=resources) == []
    for key in shard_keys():
        assert dg.materialize(all_assets, selection=ingest, partition_key=key, instance=instance,
                              resources=resources).success
    assert stale_or_missing(instance, all_assets, NAMES, DEFAULT, root=root, resources=resources) == []
    pool_dir = root / "world" / "tiny-seed0" / "images" / "pool"
    extra = pool_dir / "zz-extra.png"
    shutil.copy2(next(pool_dir.glob("*.png")), extra)
    try:
        todo = stale_or_missing(instance, all_assets, NAMES, DEFAULT, root=root, resources=resources)
    finally:
        extra.unlink()
    due = {t.asset for t in todo}
    assert due == {"pool_images", "pool_embeddings", "pool_index"} | MINING_DOWNSTREAM_OF_CANDIDATES
    assert {(t.partition, t.reason) for t in todo if t.asset == "pool_images"} == {
        (k, "stale: has a new dependency data version") for k in shard_keys()}
    assert stale_or_missing(instance, all_assets, NAMES, DEFAULT, root=root, resources=resources) == []
