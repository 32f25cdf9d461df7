"""Mining on the tiny world, materialised on a real instance: shard schema, every asset check, the manifest,
internal consistency of each shard, and resume after an interrupted run."""

import json

import dagster as dg
import numpy as np
import polars as pl
from PIL import Image

from assets.definitions import all_assets
from assets.partitions import recipe_shard_key
from assets.recipes import DEFAULT_RECIPE
from store.fingerprint import sha256_file
from pipeline.mine import NEGATIVE_LIST, POOL_LIST
from pipeline.shard_checks import SHARD_CHECK_NAMES
from pipeline.sharding import shard_keys


def _shards(root) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(root / "shards" / f"shard={k}.parquet") for k in shard_keys()])


def test_shards_have_the_documented_schema(mined):
    root = mined[0]
    df = _shards(root)
    for col in ("example_id", "prompt", "chosen", "rejected", "image_id", "image_path", "n_negatives", "shortfall"):
        assert col in df.columns
    assert df.schema["negatives"] == NEGATIVE_LIST and df.schema["pool"] == POOL_LIST
    assert "error_type" in df.columns  # the world's labels are carried through for analysis
    manifest = pl.read_parquet(root / "world" / "tiny-seed0" / "preferences.parquet")
    assert df.height == manifest.height and df["example_id"].n_unique() == df.height
    assert (df["n_negatives"] + df["shortfall"] == 3).all() and (df["n_negatives"] == 3).all()


def test_every_shard_check_passes(mined):
    results = [r for label, r in mined[3] if label.startswith("preference_shards")]
    assert len(results) == len(shard_keys())
    for r in results:
        evaluations = {e.check_name: e for e in r.get_asset_check_evaluations()}
        assert set(evaluations) == set(SHARD_CHECK_NAMES)
        assert all(e.passed for e in evaluations.values()), {n: e.metadata for n, e in evaluations.items()}


def test_each_shard_is_internally_consistent(mined):
    """Negatives are pool entries (same fields at pool_pos); the first negative has the pool's highest score;
    q is softmax(score) over the pool; the positive's content is never a candidate."""
    df = _shards(mined[0])
    for row in df.iter_rows(named=True):
        pool, negs = row["pool"], row["negatives"]
        scores = np.array([c["score"] for c in pool])
        assert negs[0]["pool_pos"] == int(np.argmax(scores))
        for n in negs:
            entry = pool[n["pool_pos"]]
            assert n["image_id"] == entry["image_id"] and n["score"] == entry["score"]
        q = np.exp(scores - scores.max())
        np.testing.assert_allclose([c["q"] for c in pool], q / q.sum(), rtol=1e-4, atol=1e-6)
        assert row["image_path"] not in {c["path"] for c in pool}
        sims = [c["clip_sim"] for c in pool]
        assert sims == sorted(sims, reverse=True) and max(sims) < 0.98


def test_sae_asset_reports_learning_and_latents(mined):
    result = [r for label, r in mined[3] if label == "sae [partition fused]"][0]
    meta = result.asset_materializations_for_node("sae")[0].metadata
    assert meta["val/fvu"].value < 0.5  # a mean-only model scores 1.0
    assert "latents_by_attribute" in meta and (mined[0] / "models" / "sae" / "latents.parquet").exists()
    assert (mined[0] / "models" / "sae" / "sae.safetensors").exists()


def test_manifest_and_contact_sheets(mined):
    root = mined[0]
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["examples"] == _shards(root).height
    for entry in manifest["shards"]:
        assert entry["sha256"] == sha256_file(root / "shards" / entry["file"])
    assert manifest["clip"]["fingerprint"] and manifest["sae"]["sha256"]
    with Image.open(root / "shards" / "contact_sheet-shard=000.png") as im:
        assert im.width >= 4 * 128 and im.height >= 128


def test_resume_after_interruption_gives_the_same_shards(mined):
    """An interrupted run leaves some shards done and others missing; rerunning redoes only the missing ones and
    ends with the same shards."""
    root, instance, resources, _ = mined
    before = _shards(root)
    kept = root / "shards" / "shard=000.parquet"
    kept_mtime = kept.stat().st_mtime_ns
    for k in shard_keys()[1:]:
        (root / "shards" / f"shard={k}.parquet").unlink()
        (root / "mining" / "candidates" / f"shard={k}.parquet").unlink()
    for k in shard_keys():
        for selection, key in ((["candidates"], k), (["preference_shards"], recipe_shard_key(DEFAULT_RECIPE, k))):
            assert dg.materialize(all_assets, selection=selection, partition_key=key, instance=instance,
                                  resources=resources).success
    after = _shards(root)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert after.equals(before)
