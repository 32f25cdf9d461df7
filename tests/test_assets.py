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
    assert keys == {"source_data", "pool_source", "examples_source", "clip_model", *EMBED_ASSETS, "pool_index", "candidates", "sae",
                    "mining_recipe", "preference_shards", "shards_manifest"}
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
        assert len(evaluations) == 11  # 3 checks x 3 embedding assets + not_collapsed on the 2 image tables
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


def test_files_source_quarantines_bad_rows_and_reports_counts(tmp_path):
    """A user's manifest with bad rows: the asset finishes, the good rows go on, every bad row is in the
    quarantine table with its reason, and the counts are in the materialisation metadata."""
    import json

    from PIL import Image

    from assets.resources import ClipModel, DataRoot
    from pipeline.sharding import shard_keys

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not a png at all")
    rows = [{"id": f"ok{i}", "prompt": "Describe.", "chosen": "a red square", "rejected": "a blue square",
             "image": f"images/{i}.png"} for i in range(4)]
    rows += [{"id": "missing", "prompt": "Describe.", "chosen": "x", "rejected": "y", "image": "images/nope.png"},
             {"id": "broken", "prompt": "Describe.", "chosen": "x", "rejected": "y", "image": "images/broken.png"},
             {"id": "empty", "prompt": "  ", "chosen": "x", "rejected": "y", "image": "images/0.png"},
             {"id": "escape", "prompt": "Describe.", "chosen": "x", "rejected": "y", "image": "../outside.png"},
             {"id": "ok0", "prompt": "Again.", "chosen": "x", "rejected": "y", "image": "images/1.png"}]
    manifest = tmp_path / "prefs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    resources = {"data_root": DataRoot(path=str(tmp_path / "data")), "clip": ClipModel(),
                 "source": DataSource(kind="files", pool_dir=str(images), manifest=str(manifest),
                                      image_root=str(tmp_path))}
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(all_assets, selection=["source_data"], instance=instance, resources=resources).success
    total_out, reasons, quarantined_meta = 0, {}, 0
    for key in shard_keys():
        result = dg.materialize(all_assets, selection=["preference_examples"], partition_key=key,
                                instance=instance, resources=resources)
        meta = result.asset_materializations_for_node("preference_examples")[0].metadata
        quarantined_meta += meta["rows_quarantined"].value
        total_out += meta["dagster/row_count"].value
        q = pl.read_parquet(tmp_path / "data" / "ingest" / "quarantine" / f"examples-shard={key}.parquet")
        reasons.update(dict(zip(q["id"].to_list(), q["reason"].to_list())))
    assert total_out == 4 and quarantined_meta == 5 == len(rows) - total_out
    assert reasons == {"missing": "missing_file", "broken": "undecodable_image", "empty": "empty_prompt",
                       "escape": "path_outside_root", "ok0": "duplicate_id"}
    # With no CLIP configured and a user's data, the CLIP asset says what to configure.
    with pytest.raises(Exception, match="MISP_CLIP_MODEL"):
        dg.materialize(all_assets, selection=["clip_model"], instance=instance, resources=resources)
