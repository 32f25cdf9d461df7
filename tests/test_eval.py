"""The evaluation harness: metrics against hand-computed values, the world's POPE probes, the public POPE reader,
and an end-to-end run of the tiny world VLM (eval/, docs/eval.md)."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from eval.metrics import caption_stats, chair_metrics, parse_yes_no, pope_metrics, pope_reference_yes, \
    prior_hallucinations, resolve_answer
from eval.pope_reader import read_pope, setting_of
from eval.pope_world import SETTINGS, build_probes, object_stats, scene_keys
from eval.run import EvalConfig, answers_path, evaluate_model, format_table, main
from world.base_model import BASE_PRESETS, train_base_model
from world import grammar
from world.generate import read_scenes
from world.scene import ObjectSpec, Scene

O = ObjectSpec
# Scene A: a large red circle at the top left and a small blue square in the centre.
SCENE_A = Scene((O("circle", "red", "large", "top left"), O("square", "blue", "small", "centre")), "grey")
# Scene B: a small yellow diamond on the right.
SCENE_B = Scene((O("diamond", "yellow", "small", "right"),), "dark")
# Scene C: a circle without its partner square (for the co-occurrence prior).
SCENE_C = Scene((O("circle", "red", "large", "left"),), "grey")
# A names the circle right, the square in the wrong colour, and an absent green triangle; B is perfect.
CAPTION_A = ("a large red circle at the top left, a small red square in the centre and a large green triangle at "
             "the bottom on a grey background")
CAPTION_B = "a small yellow diamond on the right on a dark background"
CAPTION_C = "a large red circle on the left and a small blue square on the right on a grey background"


def parsed(*texts):
    return [grammar.parse_caption(t) for t in texts]


# ---------------------------------------------------------------------------------------------- POPE metrics
def test_pope_metrics_of_a_perfect_model():
    gold = [True, True, False, False, True, False]
    m = pope_metrics(gold, list(gold))
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 0, 3, 0)
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == 1.0
    assert m["yes_ratio"] == 0.5 and m["unparsed"] == 0


def test_pope_metrics_of_an_always_yes_model_on_balanced_probes():
    gold = [True, False] * 4
    m = pope_metrics(gold, [True] * 8)
    assert m["recall"] == 1.0 and m["precision"] == 0.5 and m["yes_ratio"] == 1.0 and m["accuracy"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * 0.5 * 1 / 1.5


def test_pope_metrics_count_unparsed_as_no_and_report_them():
    m = pope_metrics([True, False, True, False], [None, None, True, False])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 0, 2, 1)
    assert m["accuracy"] == 0.75 and m["precision"] == 1.0 and m["recall"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.25
    assert m["unparsed"] == 2 and m["unparsed_rate"] == 0.5
    never_yes = pope_metrics([True, False], [False, False])
    assert never_yes["precision"] is None and never_yes["recall"] == 0.0 and never_yes["f1"] == 0.0
    assert pope_metrics([], [])["accuracy"] is None
    with pytest.raises(ValueError, match="one prediction per label"):
        pope_metrics([True], [])


def test_answer_parsing_first_word_and_the_pope_reference_rule():
    assert parse_yes_no("Yes, there is a red circle.") is True
    assert parse_yes_no("  no.") is False and parse_yes_no("NO") is False
    assert parse_yes_no("There is no red circle.") is None and parse_yes_no("") is None
    assert parse_yes_no("Yesterday") is None
    # POPE's evaluate.py: a negation word in the first sentence means no, anything else yes.
    assert pope_reference_yes("There is no dog in the image.") is False
    assert pope_reference_yes("Yes. But not a cat") is True  # only the first sentence counts
    assert pope_reference_yes("I cannot tell") is True and pope_reference_yes("") is True
    assert pope_reference_yes("No, there is none.") is False
    assert resolve_answer("maybe", "first_word") is None and resolve_answer("maybe", "pope") is True
    with pytest.raises(ValueError, match="answer rule"):
        resolve_answer("yes", "strict")


# ---------------------------------------------------------------------------------------------- CHAIR
def test_chair_of_a_perfect_model_is_zero_with_full_recall():
    scenes = [SCENE_A, SCENE_B, SCENE_C]
    caps = parsed(*(grammar.caption(s) for s in scenes))
    for level in ("shape", "object", "exact"):
        c = chair_metrics(scenes, caps, level)
        assert c["chair_i"] == 0.0 and c["chair_s"] == 0.0 and c["recall"] == 1.0
        assert c["well_formed"] == 1.0 and c["mentions_per_caption"] == pytest.approx(4 / 3) and c["empty"] == 0.0


def test_chair_of_captions_with_known_hallucinations():
    scenes, caps = [SCENE_A, SCENE_B], parsed(CAPTION_A, CAPTION_B)
    assert all(c.well_formed for c in caps) and [len(c.objects) for c in caps] == [3, 1]
    # shape: only the triangle is absent. 1 of 4 mentions, 1 of 2 captions; circle, square, diamond all named.
    shape = chair_metrics(scenes, caps, "shape")
    assert (shape["chair_i"], shape["chair_s"], shape["recall"]) == (1 / 4, 1 / 2, 1.0)
    # object (shape + colour): the red square and the green triangle are absent; the blue square is never named.
    obj = chair_metrics(scenes, caps, "object")
    assert (obj["chair_i"], obj["chair_s"], obj["recall"], obj["hallucinated"]) == (2 / 4, 1 / 2, 2 / 3, 2)
    exact = chair_metrics(scenes, caps, "exact")
    assert (exact["chair_i"], exact["chair_s"], exact["recall"]) == (2 / 4, 1 / 2, 2 / 3)
    assert obj["mentions_per_caption"] == 2.0 and obj["well_formed"] == 1.0 and obj["n_captions"] == 2


def test_an_empty_caption_hallucinates_nothing_and_says_so_beside_chair():
    c = chair_metrics([SCENE_A], parsed("on a grey background"), "object")
    assert c["chair_i"] is None and c["chair_s"] == 0.0 and c["recall"] == 0.0
    assert c["mentions_per_caption"] == 0.0 and c["empty"] == 1.0 and c["well_formed"] == 0.0
    stats = caption_stats(parsed("a small purple purple circle at the top on a grey background"))
    assert stats["well_formed"] == 0.0 and stats["mentions"] == 1
    with pytest.raises(ValueError, match="one caption per scene"):
        chair_metrics([SCENE_A, SCENE_B], parsed(CAPTION_A), "object")


def test_prior_driven_hallucinations():
    scenes, caps = [SCENE_A, SCENE_B, SCENE_C], parsed(CAPTION_A, CAPTION_B, CAPTION_C)
    p = prior_hallucinations(scenes, caps, [("circle", "square")])
    # Only C has the trigger without the partner, and its caption names the absent square: 1 of 6 mentions;
    # shape-level hallucinations are A's triangle and C's square, so the prior explains half of them.
    assert (p["mentions"], p["eligible_captions"], p["captions"]) == (1, 1, 1)
    assert p["chair_i"] == pytest.approx(1 / 6) and p["rate"] == 1.0 and p["share"] == 0.5
    none = prior_hallucinations(scenes, caps, [])
    assert (none["mentions"], none["chair_i"], none["share"], none["rate"]) == (0, 0.0, 0.0, None)


def test_prior_driven_hallucinations_of_a_colour_prior():
    scenes, caps = [SCENE_A, SCENE_B, SCENE_C], parsed(CAPTION_A, CAPTION_B, CAPTION_C)
    p = prior_hallucinations(scenes, caps, [("red", "green")], attribute="colour")
    # A and C hold red without green (eligible); A names an absent green (prior-driven), C an absent blue (not).
    # Colour-level hallucinations: A's green and C's blue, so the prior explains half; 1 of 6 mentions.
    assert (p["mentions"], p["eligible_captions"], p["captions"]) == (1, 2, 1)
    assert p["chair_i"] == pytest.approx(1 / 6) and p["rate"] == 0.5 and p["share"] == 0.5
    # Against chance: A's one wrong colour (green) could have been either absent colour (green, yellow): 1/2
    # expected partner mention; C's (blue) one of three absent: 1/3. Observed 1, so the lift is 1 / (5/6) = 1.2.
    lifted = prior_hallucinations(scenes, caps, [("red", "green")], "colour", ("red", "green", "blue", "yellow"))
    assert lifted["chance_mentions"] == pytest.approx(5 / 6) and lifted["lift"] == pytest.approx(1.2)
    assert p["lift"] is None and p["chance_mentions"] is None
    with pytest.raises(ValueError, match="shape or a colour"):
        prior_hallucinations(scenes, caps, [("red", "green")], attribute="size")


# ---------------------------------------------------------------------------------------------- world probes
SHAPES, COLOURS = ("circle", "square", "triangle", "diamond", "cross"), ("red", "green", "blue", "yellow")


def _items(scenes):
    return [(f"test-{i:07d}", f"images/test/s{i:07d}.png", s) for i, s in enumerate(scenes)]


def test_probes_are_balanced_deterministic_and_true():
    red_pair = Scene((O("circle", "red", "large", "left"), O("square", "red", "small", "right")), "grey")
    train = [SCENE_A, SCENE_B, SCENE_C] * 3 + [red_pair] * 5
    stats = object_stats(train, "object")
    items = _items([SCENE_A, SCENE_B, SCENE_C])
    probes = build_probes(items, stats, shapes=SHAPES, colours=COLOURS, seed=0)
    assert probes == build_probes(items, stats, shapes=SHAPES, colours=COLOURS, seed=0)
    truth = {sid: s for sid, _, s in items}
    for setting in SETTINGS:
        ps = [p for p in probes if p.setting == setting]
        assert sum(p.label for p in ps) == sum(not p.label for p in ps) == 4  # k = 2 + 1 + 1
        for p in ps:  # every label is the truth, and the prompt asks exactly about the key
            assert bool(truth[p.scene_id].find(O(*p.key))) == p.label
            assert grammar.parse_prompt(p.prompt).subject == O(*p.key)
    yes = {s: [(p.scene_id, p.key) for p in probes if p.setting == s and p.label] for s in SETTINGS}
    assert yes["random"] == yes["popular"] == yes["adversarial"]  # the same yes-questions in every setting
    # popular: the absent objects most frequent in training; for B (one question) the red circle (11 scenes).
    pop_b = [p.key for p in probes if p.setting == "popular" and p.scene_id == "test-0000001" and not p.label]
    assert pop_b == [("circle", "red")]
    # adversarial: one attribute away from a present object.
    adv = [p for p in probes if p.setting == "adversarial" and not p.label]
    assert {p.kind for p in adv} <= {"colour_off", "shape_off"}
    assert all(p.key[0] == "diamond" or p.key[1] == "yellow" for p in adv if p.scene_id == "test-0000001")
    # ... ranked by co-occurrence with the present ones: C's red circle came with a red square 5 times.
    assert [(p.key, p.kind) for p in adv if p.scene_id == "test-0000002"] == [(("square", "red"), "shape_off")]


def test_probes_depend_only_on_seed_and_scene(tiny_world):
    scenes = read_scenes(tiny_world, "test")
    items = _items(list(scenes.values()))
    stats = object_stats(list(read_scenes(tiny_world, "train").values()), "object")
    full = build_probes(items, stats, shapes=SHAPES, colours=COLOURS, seed=3)
    head = build_probes(items[:5], stats, shapes=SHAPES, colours=COLOURS, seed=3)
    assert head == [p for p in full if p.scene_id in {i[0] for i in items[:5]}]  # --limit keeps the same probes
    other = build_probes(items, stats, shapes=SHAPES, colours=COLOURS, seed=4)
    assert [p.key for p in other] != [p.key for p in full]
    for setting in SETTINGS:
        labels = [p.label for p in full if p.setting == setting]
        assert sum(labels) * 2 == len(labels) > 0
    shape_stats = object_stats(list(read_scenes(tiny_world, "train").values()), "shape")
    shape_probes = build_probes(items, shape_stats, shapes=SHAPES, colours=COLOURS, seed=0)
    assert all(len(p.key) == 1 for p in shape_probes)
    assert all(p.label == (p.key in scene_keys(scenes[p.scene_id], "shape")) for p in shape_probes)


# ---------------------------------------------------------------------------------------------- POPE reader
def _png(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), colour, np.uint8)).save(path)


def test_pope_reader_keeps_good_lines_and_reports_bad_ones(tmp_path):
    images = tmp_path / "val2014"
    _png(images / "a.jpg")
    _png(images / "sub" / "b.jpg")
    _png(tmp_path / "outside.jpg")
    os.symlink(tmp_path / "outside.jpg", images / "link.jpg")
    lines = [
        {"question_id": 1, "image": "a.jpg", "image_id": 1, "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "sub/b.jpg", "text": "Is there a cat in the image?", "label": "No"},
        "{not json",
        {"question_id": 3, "image": "a.jpg", "text": "Is there a bus?", "label": "maybe"},
        {"question_id": 4, "image": "../outside.jpg", "text": "Is there a car?", "label": "no"},
        {"question_id": 5, "image": str(tmp_path / "outside.jpg"), "text": "Is there a car?", "label": "no"},
        {"question_id": 6, "image": "link.jpg", "text": "Is there a car?", "label": "no"},
        {"question_id": 7, "image": "missing.jpg", "text": "Is there a car?", "label": "no"},
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 8, "image": "a.jpg", "label": "yes"},
        {"question_id": 9, "image": "a.jpg", "question": "Is there a tie?", "answer": "yes"},
    ]
    f = tmp_path / "coco_pope_adversarial.json"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    pope = read_pope(f, images)
    assert [q.question_id for q in pope.questions] == [1, 2, 9]
    assert [q.label for q in pope.questions] == [True, False, True]
    assert pope.questions[1].path == (images / "sub" / "b.jpg").resolve()
    assert {q.setting for q in pope.questions} == {"adversarial"}
    assert len(pope.problems) == 8
    for line, text in [(3, "not JSON"), (4, "'maybe' is not yes or no"), (5, "outside the image folder"),
                       (6, "absolute path"), (7, "outside the image folder"), (8, "not a file"), (9, "repeat"),
                       (10, "no question text")]:
        assert any(p.startswith(f"coco_pope_adversarial.json:{line}: ") and text in p for p in pope.problems), line
    assert [q.question_id for q in read_pope(f, images, limit=2).questions] == [1, 2]
    # A JSON array, a `category` per question (LLaVA's combined file) and a missing folder.
    arr = tmp_path / "questions.json"
    arr.write_text(json.dumps([{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes",
                                "category": "popular"}]))
    assert read_pope(arr, images).questions[0].setting == "popular"
    assert setting_of(arr) == "questions" and setting_of(tmp_path / "aokvqa_pope_seem_random.json") == "random"
    with pytest.raises(FileNotFoundError, match="image folder"):
        read_pope(f, tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_vlm(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-base") / "tiny"
    train_base_model(tiny_world, out, BASE_PRESETS["tiny"], progress=False)
    return out


def _in_range(x):
    return x is None or (isinstance(x, (int, float)) and not math.isnan(x) and 0.0 <= x <= 1.0)


def test_evaluate_model_on_the_tiny_world(tiny_vlm, tiny_world, tmp_path):
    out = tmp_path / "eval" / "tiny.json"
    cfg = EvalConfig(limit=8, device="cpu", progress=False, max_new_tokens=48)
    result = evaluate_model(tiny_vlm, tiny_world, out=out, config=cfg)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(result["pope"]) == list(SETTINGS) and set(saved["pope"]) == set(SETTINGS)
    for setting, m in saved["pope"].items():
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed_rate"):
            assert _in_range(m[key]), (setting, key, m[key])
        assert m["tp"] + m["fn"] == m["tn"] + m["fp"] == m["n"] // 2 > 0
    levels = saved["chair"]["levels"]
    assert set(levels) == {"shape", "colour", "object", "exact"}
    for c in levels.values():
        assert c["n_captions"] == 8
        for key in ("chair_i", "chair_s", "recall", "well_formed", "empty"):
            assert _in_range(c[key]), key
        assert c["mentions_per_caption"] >= 0
    assert saved["chair"]["prior"]["pairs"] == [] and saved["chair"]["prior"]["chair_i"] == 0.0
    assert saved["source"]["scenes"] == 8 and saved["problems"] == []
    n_answers = sum(m["n"] for m in saved["pope"].values()) + 8
    assert len(answers_path(out).read_text().splitlines()) == n_answers
    table = format_table(result)
    assert "adversarial" in table and "object" in table and "prior-driven: 0" in table
    # Deterministic decoding: the same call gives the same numbers.
    again = evaluate_model(tiny_vlm, tiny_world, config=cfg)
    assert again["pope"] == result["pope"] and again["chair"] == result["chair"]


def test_cli_runs_public_pope_files(tiny_vlm, tiny_world, tmp_path, capsys):
    scenes = read_scenes(tiny_world, "test")
    lines = []
    for i, (sid, scene) in enumerate(list(scenes.items())[:3]):
        image = f"s{int(sid.split('-')[1]):07d}.png"
        shape = scene.objects[0].shape
        absent = next(s for s in SHAPES if s not in scene.shapes)
        lines += [{"question_id": 2 * i, "image": image, "text": f"Is there a {shape} in the image?", "label": "yes"},
                  {"question_id": 2 * i + 1, "image": image, "text": f"Is there a {absent} in the image?",
                   "label": "no"}]
    lines.append({"question_id": 99, "image": "../../world.json", "text": "Is there a dog?", "label": "no"})
    f = tmp_path / "world_pope_popular.json"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "pope.json"
    result = main(["--model", str(tiny_vlm), "--pope", str(f), "--images", str(tiny_world / "images" / "test"),
                   "--out", str(out), "--device", "cpu", "--no-progress", "--answer-rule", "pope"])
    m = result["pope"]["popular"]
    assert m["n"] == 6 and _in_range(m["f1"]) and m["unparsed"] == 0  # the pope rule always decides
    assert result["chair"] is None and len(result["problems"]) == 1 and "outside" in result["problems"][0]
    assert "Answer the question using a single word or phrase." in m["samples"][0]["prompt"]
    printed = capsys.readouterr().out
    assert "popular" in printed and "1 problems" in printed and str(out) in printed
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_vlm)])


def test_a_world_with_cooccurrence_reports_prior_driven_hallucinations(tiny_vlm, tmp_path):
    from world import generate_world, preset

    world = tmp_path / "cooccur"
    generate_world(preset("tiny", n_pool=60, n_train=20, n_test=6, cooccur_pairs=(("circle", "square"),),
                          cooccur_p=0.95), world, progress=False)
    cfg = EvalConfig(device="cpu", progress=False, probe_level="shape", settings=("adversarial",),
                     max_new_tokens=48)
    result = evaluate_model(tiny_vlm, world, config=cfg)
    assert list(result["pope"]) == ["adversarial"] and result["source"]["cooccur_pairs"] == [["circle", "square"]]
    prior = result["chair"]["prior"]
    assert prior["pairs"] == [["circle", "square"]]
    assert prior["mentions"] <= result["chair"]["levels"]["shape"]["hallucinated"]
    assert all(_in_range(prior[k]) for k in ("chair_i", "rate", "share"))
    assert "prior-driven (circle->square)" in format_table(result)
