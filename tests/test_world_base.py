"""The staged world base VLM (issue 15): the vision encoder, the visual-uncertainty regime, the recipe's stages
and the prior split of the metrics."""

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from eval.metrics import prior_hallucinations, visible_uncertain_prior
from world.base_model import BASE_PRESETS, build_world_vlm
from world import grammar, vocab
from world.base_recipe import RECIPE_PRESETS, run_stage, slot_step_fn, image_step_fn, load_stage_data, \
    stage_trainable, tune_trainable
from world.config import preset
from world.encoder import ENCODER_PRESETS, train_encoder, world_config
from world.generate import build_scene, generate_world, read_scenes
from world.preferences import prior_targets
from world.scene import ObjectSpec, Scene, is_uncertain, sample_scene, scene_rng

PRIOR_TINY = BASE_PRESETS["prior_tiny"]


@pytest.fixture(scope="module")
def uncertain_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncertain") / "world"
    generate_world(preset("prior_tiny", n_pool=400, n_test=60, uncertain_p=0.25), root, progress=False)
    return root


# ---------------------------------------------------------------------------------------------- the regime
def test_uncertain_objects_appear_at_the_configured_rate_in_images_only():
    cfg = preset("prior", uncertain_p=0.25)
    for split in ("pool", "train", "test"):
        objs = [o for i in range(1500) for o in sample_scene(cfg, scene_rng(0, split, i), split).objects]
        share = np.mean([is_uncertain(o) for o in objs])
        # ~3,000 objects: the binomial standard error is ~0.008, so +-0.03 is a four-sigma band
        assert abs(share - 0.25) < 0.03, (split, share)
    text = [o for i in range(1500) for o in sample_scene(cfg, scene_rng(0, "text", i), "text").objects]
    assert not any(is_uncertain(o) for o in text)  # the text corpus names every colour


def test_hidden_objects_are_drawn_grey_and_named_grey():
    cfg = preset("prior", uncertain_p=0.5, colour_jitter=0)
    seen = 0
    for i in range(60):
        built = build_scene(cfg, "pool", i)
        cap = grammar.caption(built.scene)
        for o in built.scene.objects:
            if not is_uncertain(o):
                continue
            seen += 1
            row, col = vocab.CELL[o.position]
            cell = cfg.image_size // 3
            patch = built.image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3)
            grey = np.array(vocab.PIXEL_COLOURS[vocab.UNCERTAIN_COLOUR])
            assert (np.abs(patch.astype(int) - grey).sum(1) == 0).any()  # drawn in the hidden look
            assert grammar.with_article(grammar.phrase(o)) in cap and " grey " in f" {cap} "
        for ex in built.examples:  # every chosen answer is true of what the pixels show
            from world.truth import judge
            assert judge(built.scene, ex.prompt, ex.chosen).true, (ex.prompt, ex.chosen)
    assert seen > 20


def test_worlds_without_uncertainty_stay_as_they_were():
    old = preset("prior_tiny", uncertain_p=0.0)
    assert "uncertain_p" not in old.to_dict()  # world.json of older worlds still matches
    new = preset("prior_tiny")
    for i in range(50):  # the hiding is drawn last: the same scenes up to the hidden colours
        a, b = build_scene(old, "pool", i).scene, build_scene(new, "pool", i).scene
        assert [o.with_(colour=None) for o in a.objects] == [o.with_(colour=None) for o in b.objects]
        assert all(x == y or is_uncertain(y) for x, y in zip(a.objects, b.objects))


def test_rejected_captions_name_the_absent_partner():
    cfg = preset("prior", uncertain_p=0.15)
    scene = Scene((ObjectSpec("circle", "red", "large", "top left"), ObjectSpec("square", "grey", "small", "top")),
                  "dark")
    assert prior_targets(scene, cfg) == [(1, "green")]  # the hidden square, given the red trigger's partner
    assert prior_targets(scene, dataclasses.replace(cfg, uncertain_p=0.0)) == []
    details = [ex.error_detail for i in range(1000) for ex in build_scene(cfg, "train", i).examples]
    assert sum("(prior partner)" in d for d in details) > 20


# ---------------------------------------------------------------------------------------------- the encoder
def test_encoder_probe_beats_chance_by_a_wide_margin(uncertain_world, tmp_path):
    torch.set_num_threads(2)
    report = train_encoder(uncertain_world, tmp_path / "enc", ENCODER_PRESETS["tiny"], progress=False)
    acc, chance = report.probe_accuracy, report.chance_accuracy
    assert acc["present"] > 0.95 > chance["present"] + 0.1
    assert acc["colour"] > chance["colour"] + 0.4  # 8 classes (7 colours + grey)
    assert acc["size"] > chance["size"] + 0.2
    assert (tmp_path / "enc" / "model.safetensors").is_file() and (tmp_path / "enc" / "encoder_report.json").is_file()
    again = train_encoder(uncertain_world, tmp_path / "enc", ENCODER_PRESETS["tiny"], progress=False)
    assert not again.trained and again.probe_accuracy == acc
    # the saved tower is the one the VLM loads (heads dropped: a plain CLIPVisionModel folder)
    model, _ = build_world_vlm(uncertain_world, PRIOR_TINY)
    from world.encoder import load_encoder
    model.model.vision_tower.load_state_dict(load_encoder(tmp_path / "enc").state_dict())


def test_encoder_needs_the_worlds_image_size(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="64 px images"):
        train_encoder(tiny_world, tmp_path / "enc", ENCODER_PRESETS["tiny"], progress=False)


# ---------------------------------------------------------------------------------------------- the stages
@pytest.mark.parametrize("stage", ["slots", "projector", "tune"])
def test_each_stage_trains_exactly_its_parameters(uncertain_world, stage):
    torch.manual_seed(0)
    model, processor = build_world_vlm(uncertain_world, PRIOR_TINY)
    cfg = RECIPE_PRESETS["tiny"]
    data = load_stage_data(uncertain_world, world_config(uncertain_world))
    if stage == "slots":
        names, fn = stage_trainable(model, "slots"), slot_step_fn(model, processor, data, cfg, 4, 80, 0, 48)
    else:
        names = stage_trainable(model, "projector") if stage == "projector" else tune_trainable(model, 1)
        fn = image_step_fn(model, processor, data, cfg, 4, 80, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_stage(model, names, 1, 1e-3, fn, stage, progress=False, warmup=1)
    after = dict(model.named_parameters())
    frozen = [n for n in before if n not in set(names)]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    changed = [n for n in names if not torch.equal(before[n], after[n])]
    # every trained matrix moves (a bias or norm gain may see a zero gradient on one batch)
    assert all(n in changed for n in names if after[n].ndim >= 2 and "embed" not in n), set(names) - set(changed)
    assert not any(p.requires_grad for p in model.parameters())  # stages leave the model frozen
    if stage == "slots":
        assert not any("vision_tower" in n or "projector" in n for n in names)
    if stage == "tune":
        n_layers = model.config.text_config.num_hidden_layers
        assert any(f"layers.{n_layers - 1}." in n for n in names)
        assert not any(f"layers.{n_layers - 2}." in n or "embed_tokens" in n for n in names)


def test_staged_preset_checks_the_encoder_matches_the_tower():
    bad = dataclasses.replace(RECIPE_PRESETS["tiny"], encoder=ENCODER_PRESETS["prior"])
    with pytest.raises(ValueError, match="staged.encoder must build the VLM's vision tower"):
        dataclasses.replace(PRIOR_TINY, staged=bad)


# ---------------------------------------------------------------------------------------------- the prior split
def test_prior_split_counts_visible_and_uncertain_partners_by_hand():
    red = ObjectSpec("circle", "red", "large", "top left")
    hidden = ObjectSpec("square", "grey", "small", "top")
    blue = ObjectSpec("cross", "blue", "small", "left")
    scenes = [Scene((red, hidden), "dark"),                 # trigger red, hidden square
              Scene((red, blue), "dark"),                   # trigger red, visible blue (also a trigger: yellow)
              Scene((ObjectSpec("star", "white", "large", "centre"), hidden), "dark")]  # no trigger, hidden
    captions = [grammar.parse_caption(t) for t in (
        "a large red circle at the top left and a small green square at the top on a dark background",  # prior
        "a large red circle at the top left and a small green cross on the left on a dark background",  # visible
        "a large white star in the centre and a small green square at the top on a dark background")]   # no trigger
    out = visible_uncertain_prior(scenes, captions, [("red", "green"), ("blue", "yellow")])
    assert out["uncertain"]["eligible_captions"] == 1 and out["uncertain"]["captions"] == 1
    assert out["visible"]["eligible_captions"] == 2 and out["visible"]["captions"] == 1
    # hidden objects named the partner: with the trigger 1 of 1 (red->green; blue absent there: only the red pair
    # is live); without: scene 1 yellow (blue absent) 0 of 1, scene 3 green 1 of 1 and yellow 0 of 1 -> 1 of 3
    assert out["uncertain"]["rate_with_trigger"] == 1.0
    assert out["uncertain"]["rate_without_trigger"] == pytest.approx(1 / 3)
    assert out["uncertain"]["conditional_lift"] == pytest.approx(3.0)
    full = prior_hallucinations(scenes, captions, [("red", "green"), ("blue", "yellow")], "colour")
    assert full["uncertain"] == out["uncertain"] and full["rate"] == 1.0  # both eligible captions name green


def test_slot_words_drop_colours_and_fill_empty_cells_with_the_background(uncertain_world):
    from world.base_recipe import slot_words

    _, processor = build_world_vlm(uncertain_world, PRIOR_TINY)
    tok = processor.tokenizer
    scene = Scene((ObjectSpec("circle", "red", "large", "top left"), ObjectSpec("square", "blue", "small", "centre")),
                  "dark")
    ids, mask = slot_words(scene, tok, np.array([False, True]), blank=False)
    word = tok.convert_tokens_to_ids
    assert ids[0] == [word("large"), word("red"), word("circle")] and mask[0] == [1.0, 1.0, 1.0]
    assert ids[4][0] == word("small") and ids[4][2] == word("square") and mask[4] == [1.0, 0.0, 1.0]  # colour gone
    assert all(ids[c][0] == word("dark") and mask[c] == [1.0, 0.0, 0.0] for c in (1, 2, 3, 5, 6, 7, 8))
    _, blank = slot_words(scene, tok, np.array([False, False]), blank=True)
    assert not any(any(m) for m in blank)


# ---------------------------------------------------------------------------------------------- the prior probe
def test_probe_pairs_differ_only_in_the_trigger_and_hide_the_other_object():
    from world.prior_probe import probe_images, probe_pairs

    cfg = preset("prior")
    scenes = [sample_scene(cfg, scene_rng(0, "test", i), "test") for i in range(60)]
    probe = probe_pairs(scenes, cfg.cooccur_pairs, cfg.colours)
    assert len(probe) == sum(len(s.objects) >= 2 for s in scenes) > 10
    in_pairs = {c for p in cfg.cooccur_pairs for c in p}
    for i, p in enumerate(probe):
        trig, ctrl = p.trigger.objects, p.control.objects
        assert (trig[0].colour, p.partner) == tuple(cfg.cooccur_pairs[i % len(cfg.cooccur_pairs)])
        assert ctrl[0].colour not in in_pairs | {vocab.UNCERTAIN_COLOUR}
        assert trig[1].colour == ctrl[1].colour == vocab.UNCERTAIN_COLOUR and trig[1].position == p.hidden_position
        assert trig[1:] == ctrl[1:] and trig[0].with_(colour=None) == ctrl[0].with_(colour=None)
        assert not any(o.colour in in_pairs for o in trig[1:])  # the partner is nowhere visible
    trig_img, ctrl_img = probe_images(probe[:8], cfg)
    for p, a, b in zip(probe[:8], trig_img, ctrl_img):
        row, col = vocab.CELL[p.trigger.objects[0].position]
        cell = cfg.image_size // 3
        diff = np.argwhere((a != b).any(-1))
        assert len(diff) and ((diff // cell) == (row, col)).all()  # only the trigger's cell changed


def test_probe_score_counts_the_partner_said_of_the_hidden_object_by_hand():
    from world.prior_probe import ProbePair, score_probe

    def scene(first):
        return Scene(objects=(ObjectSpec("circle", first, "small", "top left"),
                              ObjectSpec("square", "grey", "small", "centre")), background="dark")

    probe = [ProbePair(scene("red"), scene("purple"), "centre", "green")] * 4
    trig = ["a small red circle at the top left and a small green square in the centre on a dark background",
            "a small red circle at the top left and a small grey square in the centre on a dark background",
            "a small green circle at the top left and a small grey square in the centre on a dark background",
            "a small red circle at the top left and a small green square in the centre on a dark background"]
    ctrl = ["a small purple circle at the top left and a small grey square in the centre on a dark background"] * 3 \
        + ["a small purple circle at the top left and a small green square in the centre on a dark background"]
    s = score_probe(probe, trig, ctrl)
    # the third trigger caption names a *visible* object green: not the hidden one, so not counted
    assert (s["partner_with_trigger"], s["partner_without_trigger"]) == (2, 1)
    assert s["rate_with_trigger"] == 0.5 and s["rate_without_trigger"] == 0.25 and s["lift"] == 2.0
    assert s["grey_with_trigger"] == 0.5 and s["grey_without_trigger"] == 0.75
    none = score_probe(probe, trig, [ctrl[0]] * 4)
    assert none["lift"] == 0.5 / 0.25  # a control rate of 0 counts as one pair's worth (1/n)
    with pytest.raises(ValueError, match="one caption per scene"):
        score_probe(probe, trig[:3], ctrl)
    with pytest.raises(ValueError, match="co-occurrence pairs"):
        from world.prior_probe import probe_pairs
        probe_pairs([scene("red")], [], ["red", "green"])


def test_staged_report_records_the_prior_probe(uncertain_world, tmp_path):
    from world.base_model import train_base_model

    report = train_base_model(uncertain_world, tmp_path / "base", PRIOR_TINY, progress=False)
    probe = report.figures["prior_probe"]
    test = read_scenes(uncertain_world, "test").values()
    assert probe["pairs"] == sum(len(s.objects) >= 2 for s in test) > 0
    assert 0 <= probe["rate_with_trigger"] <= 1 and probe["lift"] == pytest.approx(
        probe["rate_with_trigger"] / max(probe["rate_without_trigger"], 1 / probe["pairs"]))
    targets = report.figures["targets"]
    assert targets["prior_probe_rate"]["value"] == probe["rate_with_trigger"]
    assert targets["prior_probe_lift"]["met"] == (probe["lift"] >= 2)
    # the CLI measures the same probe on the saved folder and records it in a report's figures
    import json

    from world.prior_probe import main as probe_main

    path = tmp_path / "base" / "base_report.json"
    saved = json.loads(path.read_text())
    del saved["figures"]["prior_probe"], saved["figures"]["targets"]["prior_probe_rate"]
    path.write_text(json.dumps(saved))
    again = probe_main(["--world", str(uncertain_world), "--model", str(tmp_path / "base"), "--into", str(path)])
    assert {k: v for k, v in again.items() if k != "samples"} == {k: v for k, v in probe.items() if k != "samples"}
    figures = json.loads(path.read_text())["figures"]
    assert figures["prior_probe"]["pairs"] == probe["pairs"] and "prior_probe_rate" in figures["targets"]


# ---------------------------------------------------------------------------------------------- yes/no weighting
def test_the_yes_no_word_weighs_answer_weight_and_nothing_else_changes(uncertain_world):
    from trainer.model_loading import encode_batch
    from world.base_recipe import Row, answer_weights, weighted_answer_loss, yesno_row

    torch.manual_seed(0)
    model, processor = build_world_vlm(uncertain_world, PRIOR_TINY)
    scene = Scene((ObjectSpec("circle", "red", "large", "top left"),), "dark")
    rows = [yesno_row(scene, ("circle", "square"), ("red", "blue"), np.random.default_rng(0)),
            Row(grammar.DESCRIBE_PROMPT, grammar.caption(scene))]
    assert rows[0].yesno and not rows[1].yesno
    image = np.full((48, 48, 3), 128, dtype=np.uint8)
    batch = encode_batch(processor, [image] * 2, [r.prompt for r in rows], [r.answer for r in rows], max_length=80)
    with torch.no_grad():
        out = model(**batch.model_inputs(), labels=batch.labels, use_cache=False)
    ones = answer_weights(batch, rows, 1.0)
    assert torch.allclose(weighted_answer_loss(out.logits, batch.labels, ones), out.loss, atol=1e-6)
    w = answer_weights(batch, rows, 5.0)
    (s0, e0), (s1, e1) = batch.spans
    assert w[0, s0] == 5.0 and w[0, s0 + 1:e0].eq(1).all() and w[1, s1:e1].eq(1).all()  # only the yes/no word
    assert w.sum() == (e0 - s0) + (e1 - s1) + 4
    logp = torch.log_softmax(out.logits.float(), -1)  # by hand: token t predicted at t - 1
    nll = {(i, t): -logp[i, t - 1, batch.input_ids[i, t]].item() for i, (s, e) in enumerate(batch.spans)
           for t in range(s, e)}
    hand = (sum(nll.values()) + 4 * nll[(0, s0)]) / (len(nll) + 4)
    assert weighted_answer_loss(out.logits, batch.labels, w).item() == pytest.approx(hand, rel=1e-5)
    assert processor.tokenizer.decode([int(batch.input_ids[0, s0])]) in ("Yes", "No")


@pytest.mark.parametrize("show", [True, False])
def test_slot_questions_show_colours_only_when_asked(uncertain_world, show):
    from world.base_recipe import slot_batches

    _, processor = build_world_vlm(uncertain_world, PRIOR_TINY)
    data = load_stage_data(uncertain_world, world_config(uncertain_world))
    cfg = dataclasses.replace(RECIPE_PRESETS["tiny"], colour_drop_p=1.0, hidden_p=0.0, blank_p=0.0, qa_fraction=0.5,
                              qa_slots_show_colour=show)
    slots, rows = slot_batches(processor.tokenizer, data, cfg, 64, 0)()
    colour_words = slots.mask[..., 1].sum(1)  # colours named in each row's slots
    assert any(r.yesno for r in rows) and not all(r.yesno for r in rows)
    for r, n in zip(rows, colour_words):
        assert n == 0 if not (r.yesno and show) else n > 0  # captions always drop (p 1); questions only if not shown
    with pytest.raises(ValueError, match="answer_weight"):
        dataclasses.replace(cfg, answer_weight=0.0)


def test_a_build_reuses_the_slot_stage_only_when_its_key_matches(uncertain_world, tmp_path):
    from safetensors.torch import load_file

    from world.base_model import slots_dir_for, train_base_model

    torch.set_num_threads(2)
    first = train_base_model(uncertain_world, tmp_path / "a", PRIOR_TINY, progress=False)
    later = dataclasses.replace(PRIOR_TINY, staged=dataclasses.replace(PRIOR_TINY.staged, projector_steps=3))
    # the same slot key (the later stages differ): the slot stage is loaded from a's cache, not trained
    import shutil
    shutil.copytree(slots_dir_for(tmp_path / "a"), slots_dir_for(tmp_path / "b"))
    shutil.copytree(tmp_path / "a-encoder", tmp_path / "b-encoder")
    second = train_base_model(uncertain_world, tmp_path / "b", later, progress=False)
    assert [s["reused"] for s in first.stages if s["stage"] == "slots"] == [False]
    assert [s["reused"] for s in second.stages if s["stage"] == "slots"] == [True]
    assert second.text_losses == first.text_losses
    a, b = (load_file(tmp_path / x / "model.safetensors") for x in ("a", "b"))
    emb = [k for k in a if "embed_tokens" in k]
    assert emb and all(torch.equal(a[k], b[k]) for k in emb)  # the tune stage never touches the embeddings
    other = dataclasses.replace(PRIOR_TINY, staged=dataclasses.replace(PRIOR_TINY.staged, colour_drop_p=0.6))
    shutil.copytree(slots_dir_for(tmp_path / "a"), slots_dir_for(tmp_path / "c"))
    shutil.copytree(tmp_path / "a-encoder", tmp_path / "c-encoder")
    third = train_base_model(uncertain_world, tmp_path / "c", other, progress=False)
    assert [s["reused"] for s in third.stages if s["stage"] == "slots"] == [False]  # another slot key: trained
    assert third.text_losses != first.text_losses
