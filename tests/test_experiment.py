"""The language-prior regime (text corpus, language pretraining) and `python -m experiment --quick` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from experiment.conditions import MAIN, ablations, train_overrides
from experiment.report import load_records
from experiment.run import QUICK, ExperimentConfig, flatten_eval, flatten_probe, plan, run_experiment, seeds_of
from world.base_model import BASE_PRESETS, train_base_model
from world import PRESETS, generate_world, preset
from world.generate import read_scenes


@pytest.fixture(scope="module")
def prior_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior") / "world"
    generate_world(preset("prior_tiny"), root, progress=False)
    return root


def _partner_rate(scenes_shapes, pairs) -> float:
    """P(partner present | trigger present), over every pair."""
    hits = total = 0
    for shapes in scenes_shapes:
        for trigger, partner in pairs:
            if trigger in shapes:
                total += 1
                hits += partner in shapes
    return hits / total


def test_text_corpus_carries_the_stronger_prior(prior_world):
    cfg = preset("prior_tiny")
    texts = pl.read_parquet(prior_world / "texts.parquet")
    assert texts.height == cfg.n_text and texts["scene_id"].n_unique() == cfg.n_text
    pairs = cfg.cooccur_pairs
    assert cfg.cooccur_attribute == "colour"
    text_rate = _partner_rate([set(s) for s in texts["colours"].to_list()], pairs)
    scenes = read_scenes(prior_world)
    test_rate = _partner_rate([{o.colour for o in s.objects} for sid, s in scenes.items() if sid.startswith("test")],
                              pairs)
    image_rate = _partner_rate([{o.colour for o in s.objects} for sid, s in scenes.items()
                                if not sid.startswith("test")], pairs)
    # text p = 0.95, image data p = 0.4, test split: chance only (a later pair's swap can undo an earlier one,
    # hence a little under 0.95 in the text)
    assert text_rate > 0.85 and text_rate > image_rate + 0.2 and image_rate > test_rate + 0.1
    assert json.loads((prior_world / "world.json").read_text())["counts"]["text"] == cfg.n_text


def test_worlds_from_before_the_text_corpus_stay_current():
    # A world.json written before n_text existed has no such key; the same config must still compare equal.
    assert "n_text" not in PRESETS["default"].to_dict() and "text_cooccur_p" not in PRESETS["default"].to_dict()
    assert PRESETS["prior"].to_dict()["n_text"] == 20000


def test_text_corpus_settings_are_validated():
    with pytest.raises(ValueError, match="text_cooccur_p > 0 needs cooccur_pairs"):
        preset("tiny", text_cooccur_p=0.5)
    with pytest.raises(ValueError, match="n_text=-1"):
        preset("tiny", n_text=-1)


def test_language_pretraining_learns_the_corpus_before_images(prior_world, tmp_path):
    report = train_base_model(prior_world, tmp_path / "base", BASE_PRESETS["prior_tiny"], progress=False)
    assert len(report.text_losses) == BASE_PRESETS["prior_tiny"].staged.slot_steps
    assert report.text_losses[-1] < report.text_losses[0]
    assert report.train_rows["texts"] == preset("prior_tiny").n_text


def test_language_pretraining_needs_a_text_corpus(tmp_path):
    world = tmp_path / "w"
    generate_world(preset("tiny"), world, progress=False)
    with pytest.raises(FileNotFoundError, match="n_text > 0"):
        train_base_model(world, tmp_path / "base", BASE_PRESETS["prior_tiny"], progress=False)


def test_every_condition_carries_the_same_sft_term():
    for cond in MAIN[1:]:
        over = train_overrides(cond, sft_weight=0.7)
        assert over["loss"].get("sft_weight", 1.0 if cond.preset == "sft" else None) == (
            1.0 if cond.preset == "sft" else 0.7), cond
    with pytest.raises(ValueError, match="untrained base"):
        train_overrides(MAIN[0], 1.0)


def test_paper_form_and_ablations_run_without_the_sft_term():
    from experiment.conditions import PAPER_FORM, PAPER_GROUP
    from trainer.losses import LossConfig

    assert [c.name for c in PAPER_FORM] == ["base", "dpo", "random_multi", "misp"]
    assert all(c.group == PAPER_GROUP for c in PAPER_FORM)
    for cond in PAPER_FORM[1:] + ablations(16):
        assert train_overrides(cond, sft_weight=0.7)["loss"]["sft_weight"] == 0.0, cond
    by = {(c.group, c.name): c for c in PAPER_FORM + ablations(16)}
    misp = by[(PAPER_GROUP, "misp")]
    # arms equal to misp itself share its run (one training, three labels) ...
    for key in (("K", "K=3"), ("beta", "beta=0.5"), ("rule", "greedy (SAE + diversity)"), ("sae_space", "fused")):
        assert by[key].run_key() == misp.run_key(), key
    # ... because misp's preset is K = 3 and beta = 0.5
    resolved = LossConfig.from_preset("misp", **misp.loss)
    assert (resolved.num_negatives, resolved.beta, resolved.sft_weight) == (3, 0.5, 0.0)
    assert len({c.run_key() for c in ablations(16)} - {c.run_key() for c in PAPER_FORM}) == 12


def test_the_low_sft_group_changes_only_the_sft_weight():
    from experiment.conditions import LOW_SFT, LOW_SFT_GROUP

    main = {c.name: c for c in MAIN}
    assert [c.name for c in LOW_SFT] == ["base", "sft", "dpo", "random_multi", "misp"]
    for cond in LOW_SFT:
        assert cond.group == LOW_SFT_GROUP and cond.shards == main[cond.name].shards
        if cond.name in ("base", "sft"):  # the main runs under another label
            assert cond.run_key() == main[cond.name].run_key()
        else:
            assert train_overrides(cond, sft_weight=1.0)["loss"] == {"sft_weight": 0.1}
            assert train_overrides(main[cond.name], sft_weight=1.0)["loss"] == {"sft_weight": 1.0}


def test_every_group_control_is_an_arm_of_its_group():
    """A renamed arm would silently drop its group's difference table: each control names a member of its group."""
    from experiment.conditions import LOW_SFT, PAPER_FORM, group_controls

    members = {(c.group, c.name) for c in MAIN + LOW_SFT + PAPER_FORM + ablations(12)}
    controls = group_controls(12)
    assert controls["is"] == "full pool (12)" and controls["K"] == "K=3"
    assert {g for g, _ in members} - {"main"} == set(controls)
    for group, control in controls.items():
        assert (group, control) in members, (group, control)


def test_flatten_eval_reads_the_eval_result():
    result = {"chair": {"levels": {"object": {"chair_i": 0.5, "chair_s": 0.6, "recall": 0.7, "mentions_per_caption": 2.0,
                                              "well_formed": 1.0, "empty": 0.0},
                                   "shape": {"chair_i": 0.2, "chair_s": 0.3, "recall": 0.9}},
                        "prior": {"pairs": [["circle", "square"]], "chair_i": 0.1, "rate": 0.25, "share": 0.5,
                                  "visible": {"eligible_captions": 8, "rate": 0.125},
                                  "uncertain": {"eligible_captions": 0, "rate": None}}},
              "pope": {"adversarial": {"accuracy": 0.55, "f1": None, "yes_ratio": 0.3}}}
    flat = flatten_eval(result)
    assert flat["chair_i_object"] == 0.5 and flat["recall_shape"] == 0.9 and flat["prior_rate"] == 0.25
    assert flat["pope_adversarial_f1"] is None and flat["well_formed"] == 1.0
    assert flat["prior_rate_visible"] == 0.125 and "prior_rate_uncertain" not in flat  # no eligible caption


def test_flatten_probe_reads_the_prior_probe():
    assert flatten_probe(None) == {} and flatten_probe({"pairs": 0}) == {}
    probe = {"pairs": 4, "rate_with_trigger": 0.5, "rate_without_trigger": 0.0, "lift": 2.0, "grey_with_trigger": 0.25}
    assert flatten_probe(probe) == {"prior_probe_rate": 0.5, "prior_probe_control": 0.0, "prior_probe_lift": 2.0,
                                    "probe_grey_said": 0.25}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    out = root / "report" / "quick.md"
    conds = plan(True, True, QUICK)
    instance = dg.DagsterInstance.ephemeral()
    records = run_experiment(QUICK, conds, out, title="quick", root=root / "work", progress=False, instance=instance)
    return root, out, conds, records, instance


def test_quick_experiment_reports_every_condition_and_seed(quick):
    root, out, conds, records, _ = quick
    expected = {(c.group, c.name, s) for c in conds for s in (QUICK.seeds[:1] if c.preset is None else QUICK.seeds)}
    assert {(r["group"], r["condition"], r["seed"]) for r in records} == expected
    assert load_records(out.with_suffix(".results.jsonl")) == records
    md = out.read_text()
    for cond in conds:
        assert f"| {cond.name} |" in md
    # the prior world has co-occurrence pairs: every record carries the prior probe, measured on the test split
    for r in records:
        assert 0.0 <= r["eval"]["prior_probe_rate"] <= 1.0 and r["eval"]["prior_probe_lift"] is not None, r
    assert "prior probe rate" in md
    for png in ("main_metrics.png", "cost.png", "ablation_K.png"):
        assert (out.parent / "quick" / png).stat().st_size > 1000


def test_quick_experiment_costs_follow_the_presets(quick):
    _, _, _, records, _ = quick
    by = {(r["group"], r["condition"], r["seed"]): r for r in records}
    examples = QUICK.steps * QUICK.batch_size
    assert by[("main", "base", 0)]["train"] is None
    # rows per example: sft 1 (chosen); dpo 2 (+ rejected); misp 2 + K = 3 negatives; full pool 2 + every candidate
    assert by[("main", "sft", 0)]["train"]["forward_rows"] == examples
    assert by[("main", "dpo", 0)]["train"]["forward_rows"] == 2 * examples
    assert by[("main", "misp", 0)]["train"]["forward_rows"] == 5 * examples
    full = next(r for k, r in by.items() if k[0] == "is" and k[1].startswith("full pool") and k[2] == 0)
    assert full["train"]["forward_rows"] > by[("main", "misp", 0)]["train"]["forward_rows"]
    # conditions that train the same thing in two groups share one run; the paper form trains without the SFT term
    assert by[("K", "K=3", 0)]["eval"] == by[("no_sft", "misp", 0)]["eval"]
    assert by[("no_sft", "misp", 0)]["train"]["final"]["loss"] != by[("main", "misp", 0)]["train"]["final"]["loss"]
    assert "loss/sft" not in by[("no_sft", "misp", 0)]["train"]["final"]
    assert "loss/sft" in by[("main", "misp", 0)]["train"]["final"]
    for r in records:
        if r["train"]:
            assert r["train"]["steps"] == QUICK.steps and r["train"]["reference_rows"] >= r["train"]["forward_rows"] \
                / QUICK.steps / QUICK.batch_size


def test_quick_experiment_mines_one_shard_set_per_rule_and_space(quick):
    """Each recipe is a partition of the shard assets with its own folder and its own catalog entries; the two SAE
    spaces coexist; nothing is copied aside."""
    from assets.layout import recipe_dir, sae_dir
    from pipeline.sharding import shard_keys

    root, _, _, _, instance = quick
    work = root / "work"
    rules, sae_folders = {}, {}
    for name in ("greedy", "similarity", "random", "greedy_image"):
        manifest = json.loads((recipe_dir(work, name) / "manifest.json").read_text())
        rules[name] = {s["config"]["rule"] for s in manifest["shards"]}
        assert {s["config"]["k"] for s in manifest["shards"]} == {QUICK.candidates}
        assert manifest["recipe"]["name"] == name
        sae_folders[name] = manifest["sae"]["folder"]
    assert rules == {"greedy": {"greedy"}, "similarity": {"similarity"}, "random": {"random_pool"},
                     "greedy_image": {"greedy"}}
    assert sae_folders["greedy_image"] == str(sae_dir(work, "image")) != sae_folders["greedy"] == str(sae_dir(work))
    assert not (work / "shard_sets").exists()
    shards = instance.get_materialized_partitions(dg.AssetKey("preference_shards"))
    assert shards == {f"{r}|{k}" for r in ("greedy", "similarity", "random", "greedy_image") for k in shard_keys()}
    assert instance.get_materialized_partitions(dg.AssetKey("sae")) == {"fused", "image"}


def test_quick_experiment_rerun_reuses_every_result(quick, monkeypatch):
    root, out, conds, records, _ = quick
    results = sorted((root / "work" / "runs").glob("*/result.json"))
    before = {p: os.stat(p).st_mtime_ns for p in results}
    # another spelling of the same root and a progress bar: neither is part of what a result depends on
    monkeypatch.chdir(root)
    again = run_experiment(QUICK, conds, out, title="quick", root=Path("work"), progress=True,
                           instance=dg.DagsterInstance.ephemeral())
    assert again == records
    assert {p: os.stat(p).st_mtime_ns for p in results} == before


def test_report_only_trains_nothing_and_names_what_is_missing(quick, tmp_path):
    from experiment.conditions import Condition

    root, out, conds, records, _ = quick
    runs = root / "work" / "runs"
    before = {p: os.stat(p).st_mtime_ns for p in runs.glob("*/result.json")}
    extra = Condition("beta=0.3", "misp", {"beta": 0.3}, group="extra")
    partial = run_experiment(QUICK, [*conds, extra], tmp_path / "partial.md", title="partial", root=root / "work",
                             progress=False, report_only=True)
    assert partial == records  # every finished run reported, the unfinished one left out
    assert {p: os.stat(p).st_mtime_ns for p in runs.glob("*/result.json")} == before
    md = (tmp_path / "partial.md").read_text()
    assert "Not run yet (2;" in md and "extra: beta=0.3, seed 0; extra: beta=0.3, seed 1" in md
    with pytest.raises(ValueError, match="no experiment under"):
        run_experiment(QUICK, conds, tmp_path / "r.md", title="t", root=tmp_path / "empty", report_only=True)


def test_a_stale_evaluation_is_redone_without_retraining(quick, monkeypatch):
    """Runs after the rerun test: it leaves results evaluated under another EVAL_VERSION."""
    root, out, conds, records, _ = quick
    import experiment.run as run

    final = root / "work" / "runs"
    weights = {p: os.stat(p).st_mtime_ns for p in final.glob("*/final/*.safetensors")}
    assert weights
    monkeypatch.setattr(run, "EVAL_VERSION", run.EVAL_VERSION + 1)
    again = run_experiment(QUICK, conds, out, title="quick", root=root / "work", progress=False,
                           instance=dg.DagsterInstance.ephemeral())
    assert {p: os.stat(p).st_mtime_ns for p in final.glob("*/final/*.safetensors")} == weights  # not retrained
    assert [r["eval"] for r in again] == [r["eval"] for r in records]  # same models, same greedy answers
    stored = json.loads(next(final.glob("*/result.json")).read_text())
    assert stored["eval_fingerprint"] != "" and "train_fingerprint" in stored


def test_seeds_option_takes_a_count_or_a_list():
    import argparse

    from experiment.run import _seeds

    assert _seeds("3") == (0, 1, 2) and _seeds("1,3") == (1, 3) and _seeds("4,") == (4,)
    for bad in ("x", "0", "1,a"):
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            _seeds(bad)


def test_main_conditions_run_five_seeds_and_ablations_three():
    cfg = ExperimentConfig()
    assert cfg.seeds == (0, 1, 2, 3, 4)
    by = {(c.group, c.name): seeds_of(cfg, c) for c in plan(True, True, cfg)}
    assert by[("main", "base")] == (0,) and by[("main", "misp")] == (0, 1, 2, 3, 4)
    assert by[("K", "K=5")] == (0, 1, 2) and by[("rule", "random")] == (0, 1, 2)
    assert by[("no_sft", "misp")] == (0, 1, 2) and by[("no_sft", "base")] == (0,)
    assert by[("low_sft", "misp")] == (0, 1, 2, 3, 4) and by[("low_sft", "base")] == (0,)
    with pytest.raises(ValueError, match="ablation_seeds"):
        ExperimentConfig(ablation_seeds=0)
