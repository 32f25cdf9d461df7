"""A mining run that cannot silently degrade: a built-in CLIP without weights is refused unless `random` is said,
and asset checks (severity ERROR) fail on collapsed embeddings, candidate pools short of K, a diverged SAE and dead
latents, each naming the likely cause and the knob. Check functions against hand-computed values; the embedding
check on a real instance with a deliberately broken CLIP checkpoint; the healthy tiny-world run passes every new
check."""

import shutil

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from assets.definitions import all_assets
from assets.resources import ClipModel, DataRoot, DataSource, resources_from_env
from pipeline.checks import (check_enough_candidates, check_not_collapsed, check_sae_fvu, check_sae_live_latents,
                             mean_pairwise_cosine)
from pipeline.clip_encoder import ClipSpec, checkpoint_fingerprint
from pipeline.sharding import shard_keys


def _table(rows):
    m = np.asarray(rows, dtype=np.float32)
    return pl.DataFrame({"key": [f"k{i}" for i in range(len(m))], "embedding": m},
                        schema={"key": pl.String, "embedding": pl.Array(pl.Float32, m.shape[1])})


# ---------------------------------------------------------------------------------------------- the refusal
def test_a_builtin_clip_without_weights_is_refused_unless_random_is_said():
    with pytest.raises(ValueError, match="MISP_CLIP_PRETRAINED=random"):
        ClipSpec(model="ViT-B-32")
    with pytest.raises(ValueError, match="without weights"):
        ClipModel(model="ViT-B-32", pretrained="").spec(DataRoot(path="/tmp").root())
    spec = ClipSpec(model="ViT-B-32", pretrained="random", device="cpu")
    assert checkpoint_fingerprint(spec) != checkpoint_fingerprint(ClipSpec(model="ViT-B-32", pretrained="random",
                                                                           seed=1))


def test_a_run_with_an_unweighted_clip_is_refused_on_a_real_instance(tmp_path):
    resources = resources_from_env({"MISP_DATA_ROOT": str(tmp_path), "MISP_CLIP_MODEL": "ViT-B-32",
                                    "MISP_SOURCE": "files", "MISP_POOL_DIR": str(tmp_path),
                                    "MISP_MANIFEST": str(tmp_path / "m.jsonl")})
    result = dg.materialize(all_assets, selection=["clip_model"], resources=resources,
                            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    errors = [e.step_failure_data.error.to_string() for e in result.all_events if e.is_step_failure]
    assert errors and "MISP_CLIP_PRETRAINED=random" in errors[0] and "'ViT-B-32'" in errors[0]


# ---------------------------------------------------------------------------------------------- check functions
def test_mean_pairwise_cosine_is_exact():
    # Pairs (1,2) = 0, (1,3) = 1, (2,3) = 0: the mean is 1/3; the row norms do not matter.
    assert mean_pairwise_cosine(np.array([[1.0, 0], [0, 2.0], [3.0, 0]])) == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(40, 8))
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    sims = unit @ unit.T
    assert mean_pairwise_cosine(m) == pytest.approx(sims[~np.eye(40, dtype=bool)].mean())
    assert mean_pairwise_cosine(m[:1]) is None


def test_collapse_check_fails_on_alike_embeddings_and_names_the_knob():
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    collapsed = base + 0.05 * rng.normal(size=(50, 16))
    out = check_not_collapsed(_table(collapsed))
    assert not out.passed and out.details["mean_pairwise_cosine"] > 0.99
    assert "MISP_CLIP_PRETRAINED" in out.description and "collapsed" in out.description
    assert check_not_collapsed(_table(np.eye(16))).passed  # orthogonal: cosine 0
    few = check_not_collapsed(_table(collapsed[:3]))  # three alike images say nothing about the CLIP
    assert few.passed and "too few" in few.description and few.details["rows"] == 3


def test_candidate_check_fails_when_most_examples_are_short_of_k():
    table = pl.DataFrame({"example_id": ["a", "b", "c"], "cand_rows": [[1, 2, 3], [4], []]},
                         schema={"example_id": pl.String, "cand_rows": pl.List(pl.Int64)})
    out = check_enough_candidates(table, 3, 0.98)
    assert not out.passed and out.details["short_of_k"] == 2 and out.details["fraction_short"] == pytest.approx(2 / 3)
    assert "dup_threshold=0.98" in out.description and "MISP_CLIP_PRETRAINED" in out.description
    assert check_enough_candidates(table, 1, 0.98).passed  # only c is short of 1: a third
    assert check_enough_candidates(table.head(0), 3, 0.98).passed


def test_sae_checks_fail_on_a_diverged_or_dead_sae():
    assert check_sae_fvu({"fvu": 0.4, "n": 10}).passed
    for bad in (1.9e307, float("inf"), float("nan"), 1.01):
        out = check_sae_fvu({"fvu": bad, "n": 10})
        assert not out.passed and "SaeTrainingConfig.lr" in out.description
    # Sigmoid: latents 0 and 1 vary, 2 and 3 are stuck (one near rho, one saturated): half dead, not most.
    codes = np.array([[0.05, 0.02, 0.05, 1.0], [0.07, 0.09, 0.05, 1.0], [0.04, 0.03, 0.05, 1.0]])
    out = check_sae_live_latents(codes, "sigmoid")
    assert out.passed and out.details["dead_latents"] == 2 and out.details["dead_fraction"] == 0.5
    out = check_sae_live_latents(codes[:, 1:], "sigmoid")  # 2 of 3 stuck
    assert not out.passed and "66.7%" in out.description and "num_latents" in out.description
    # TopK: dead = never non-zero, whatever the others do.
    topk = np.array([[0.0, 0.3, 0.0], [0.0, 0.0, 0.0], [0.0, 1.2, 0.0]])
    assert not check_sae_live_latents(topk, "topk").passed
    assert check_sae_live_latents(topk[:, 1:], "topk").passed


# ---------------------------------------------------------------------------------------------- on real runs
def test_every_new_check_passes_on_the_healthy_tiny_world_run(mined):
    evaluations = [e for _, r in mined[3] for e in r.get_asset_check_evaluations()]
    by_name: dict[str, list] = {}
    for e in evaluations:
        by_name.setdefault(e.check_name, []).append(e)
    for name in ("not_collapsed", "enough_candidates", "sae_val_fvu", "sae_live_latents"):
        assert by_name.get(name), f"no {name} evaluation"
        assert all(e.passed for e in by_name[name]), [(name, e.metadata) for e in by_name[name]]
    assert len(by_name["not_collapsed"]) == 2 * len(shard_keys())  # pool and positive embeddings, every shard


def test_collapse_check_fails_on_a_collapsed_clip_materialised_on_a_real_instance(mined, tmp_path):
    """A deliberately broken checkpoint: the tiny world's CLIP with its vision tower's last LayerNorm scale zeroed
    (and a fixed bias), so every image embeds to the same vector. The run completes; the ERROR check says why its
    output is useless, while `finite` and `unit_norm` pass."""
    root, clip_dir = tmp_path / "data", tmp_path / "broken-clip"
    for sub in ("world", "ingest"):
        shutil.copytree(mined[0] / sub, root / sub)
    shutil.copytree(mined[0] / "models" / "clip", clip_dir)
    weights = load_file(str(clip_dir / "open_clip_model.safetensors"))
    weights["visual.ln_post.weight"] = torch.zeros_like(weights["visual.ln_post.weight"])
    weights["visual.ln_post.bias"] = torch.randn(weights["visual.ln_post.bias"].shape,
                                                 generator=torch.Generator().manual_seed(0))
    save_file(weights, str(clip_dir / "open_clip_model.safetensors"))
    resources = {"data_root": DataRoot(path=str(root)), "source": DataSource(kind="world", world_preset="tiny"),
                 "clip": ClipModel(model=f"local-dir:{clip_dir}", device="cpu")}
    result = dg.materialize(all_assets, selection=["pool_embeddings"], partition_key=shard_keys()[0],
                            resources=resources, instance=dg.DagsterInstance.ephemeral())
    assert result.success  # nothing crashes: that is why the check exists
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    bad = checks["not_collapsed"]
    assert not bad.passed and bad.severity == dg.AssetCheckSeverity.ERROR
    assert bad.metadata["mean_pairwise_cosine"].value > 0.999 and bad.metadata["rows"].value > 10
    assert "MISP_CLIP_PRETRAINED" in bad.description and "collapsed" in bad.description
    assert checks["finite"].passed and checks["unit_norm"].passed  # the table looks fine otherwise
