"""The Dagster layer on a real (temporary) instance: definitions load, the tiny world materialises end to end
through the embeddings, asset checks pass, reruns skip finished work, and the CLI works from the repo root."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from assets.definitions import all_assets, defs
from assets.resources import DataSource, resources_from_env

REPO = Path(__file__).resolve().parents[1]
EMBED_ASSETS = ["pool_images", "preference_examples", "pool_embeddings", "positive_embeddings",
                "prompt_embeddings"]


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for a in all_assets for k in a.keys}
    assert keys == {"source_data", "clip_model", *EMBED_ASSETS, "pool_index", "candidates", "sae",
                    "preference_shards", "shards_manifest"}
    checks = {k.name for a in all_assets for k in a.check_keys}
    assert {"finite", "unit_norm", "one_row_per_input", "q_sums_to_one"} <= checks


def test_resources_from_env_reads_the_documented_variables():
    res = resources_from_env({"MISP_DATA_ROOT": "/x", "MISP_SOURCE": "files", "MISP_POOL_DIR": "/p",
                              "MISP_MANIFEST": "/m.jsonl", "MISP_CLIP_MODEL": "ViT-B-32"})
    assert res["data_root"].path == "/x" and res["source"].kind == "files" and res["clip"].model == "ViT-B-32"
    with pytest.raises(ValueError, match="MISP_POOL_DIR"):
        DataSource(kind="files").validate()
    with pytest.raises(ValueError, match="not one of"):
        DataSource(kind="s3").validate()


def _result(results, label_prefix):
    return [r for label, r in results if label.startswith(label_prefix)]


def test_tiny_world_materialises_through_embeddings(mined):
    root, _, _, results = mined
    clip_meta = _result(results, "source_data")[0].asset_materializations_for_node("clip_model")[0].metadata
    assert 0.0 <= clip_meta["retrieval/image_to_text_top1"].value <= 1.0
    assert clip_meta["random_init/image_to_text_top1"].value <= 0.2
    assert (root / "models" / "clip" / "open_clip_model.safetensors").exists()
    world = root / "world" / "tiny-seed0"
    examples = pl.concat([pl.read_parquet(f) for f in sorted((root / "ingest" / "examples").glob("*.parquet"))])
    manifest = pl.read_parquet(world / "preferences.parquet")
    # The world is clean: every example survives ingest, each in exactly one shard.
    assert examples.height == manifest.height and examples["example_id"].n_unique() == manifest.height
    pool = pl.concat([pl.read_parquet(f) for f in sorted((root / "embeddings" / "pool").glob("*.parquet"))])
    assert pool.height == pl.read_parquet(world / "scenes.parquet").filter(pl.col("split") == "pool").height
    emb = pool["embedding"].to_numpy()
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    prompts = [pl.read_parquet(f) for f in sorted((root / "embeddings" / "prompts").glob("*.parquet"))]
    for table in prompts:  # deduplicated within a shard: "Describe the image." appears once per shard
        assert table["prompt"].n_unique() == table.height
    assert sum(t.height for t in prompts) < examples.height
    for result in _result(results, "pool_images"):
        evaluations = result.get_asset_check_evaluations()
        assert len(evaluations) == 9  # 3 checks x 3 embedding assets
        assert all(e.passed for e in evaluations), [(e.check_name, e.metadata) for e in evaluations if not e.passed]


def test_rerun_skips_finished_shards(mined):
    root, instance, resources, _ = mined
    files = sorted((root / "embeddings").rglob("shard=000.parquet")) + sorted((root / "ingest").rglob("*000.parquet"))
    before = {f: f.stat().st_mtime_ns for f in files}
    again = dg.materialize(all_assets, selection=EMBED_ASSETS, partition_key="000", instance=instance,
                           resources=resources)
    assert again.success
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_asset_check_functions_fail_on_corrupted_embeddings(mined):
    from pipeline.checks import check_finite, check_unique_keys, check_unit_norm

    table = pl.read_parquet(mined[0] / "embeddings" / "pool" / "shard=000.parquet")
    emb = table["embedding"].to_numpy().copy()
    emb[0, 0] = np.nan
    emb[1] *= 2
    broken = table.with_columns(pl.Series("embedding", emb, dtype=table.schema["embedding"]))
    assert not check_finite(broken).passed
    assert not check_unit_norm(broken.slice(1)).passed
    assert not check_unique_keys(pl.concat([table, table.head(1)])).passed
    assert not check_unique_keys(table, table["key"].to_list() + ["missing"]).passed


def _cli_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISP_")}
    env.update({"DAGSTER_HOME": str(tmp_path / "home"), "MISP_DATA_ROOT": str(tmp_path / "data"),
                "MISP_WORLD_PRESET": "tiny", "MISP_SHARDS": "2", "HF_HUB_OFFLINE": "1", **extra})
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    return env


def test_cli_validates_and_materialises_from_repo_root(tmp_path):
    dagster = str(Path(sys.executable).parent / "dagster")
    env = _cli_env(tmp_path)
    out = subprocess.run([dagster, "definitions", "validate"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    materialize = [dagster, "asset", "materialize", "-m", "assets.definitions"]
    out = subprocess.run([*materialize, "--select", "source_data"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "data" / "world" / "tiny-seed0" / "preferences.parquet").exists()
    out = subprocess.run([*materialize, "--select", "pool_images,preference_examples", "--partition", "001"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "data" / "ingest" / "examples" / "shard=001.parquet").exists()
    assert not (tmp_path / "data" / "ingest" / "examples" / "shard=000.parquet").exists()
