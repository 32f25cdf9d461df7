"""The world's grammar: captions parse back exactly, odd text is flagged not fatal, answers are judged right."""

from __future__ import annotations

import numpy as np
import pytest

from world import grammar as g
from world import preset, vocab
from world.preferences import make_examples
from world.scene import ObjectSpec, Scene, sample_scene
from world.truth import diff_objects, judge

SCENE = Scene(
    (ObjectSpec("square", "blue", "small", "centre"), ObjectSpec("circle", "red", "large", "top left"),
     ObjectSpec("cross", "orange", "small", "right")),
    "dark",
)


def test_caption_reads_naturally_in_reading_order():
    assert g.caption(SCENE) == ("a large red circle at the top left, a small blue square in the centre and "
                                "a small orange cross on the right on a dark background")
    one = Scene((ObjectSpec("diamond", "orange", "large", "bottom"),), "striped")
    assert g.caption(one) == "a large orange diamond at the bottom on a striped background"


@pytest.mark.parametrize("cfg", [
    preset("tiny"),
    preset("tiny", shapes=vocab.SHAPES, colours=tuple(vocab.COLOURS), backgrounds=vocab.BACKGROUNDS, max_objects=9),
])
def test_caption_round_trips_for_many_random_scenes(cfg):
    for i in range(400):
        scene = sample_scene(cfg, np.random.default_rng([7, 0, i]))
        parsed = g.parse_caption(g.caption(scene))
        assert parsed.well_formed, (g.caption(scene), parsed.issues)
        assert parsed.objects == list(scene.objects) and parsed.background == scene.background


def test_parser_tolerates_variants_and_recovers_mentions():
    text = "A big red circle at the upper left and a small blue square in the center, on a gray background."
    parsed = g.parse_caption(text)
    assert parsed.well_formed and parsed.background == "grey"
    assert parsed.objects == [ObjectSpec("circle", "red", "large", "top left"),
                              ObjectSpec("square", "blue", "small", "centre")]
    partial = g.parse_caption("a red circle on the left")
    assert not partial.well_formed and partial.objects == [ObjectSpec("circle", "red", None, "left")]
    assert any("lacks size" in i for i in partial.issues) and any("background" in i for i in partial.issues)


@pytest.mark.parametrize("text", [
    "", "hello world", "a small purple purple purple", "purple purple purple purple",
    "a large red circle at the top left a small blue square in the centre on a dark background",
    "a large red circle at the top left on a dark background and a small blue square in the centre",
    "two red circles on a dark background", "on a dark background", "a large red red circle at the top",
])
def test_parser_flags_malformed_text(text):
    assert not g.parse_caption(text).well_formed


def test_parser_never_raises_on_word_soup():
    words = (list(vocab.SHAPES) + list(vocab.COLOURS) + list(vocab.BACKGROUNDS) + list(vocab.SIZES)
             + ["a", "an", "the", "at", "on", "in", "top", "left", "and", ",", "background", "is", "xyz", "."])
    rng = np.random.default_rng(0)
    for _ in range(500):
        text = " ".join(rng.choice(words, size=int(rng.integers(0, 25))))
        parsed = g.parse_caption(text)
        assert isinstance(parsed.well_formed, bool)
        for fn in (g.parse_prompt, g.parse_count, g.parse_attribute_answer, g.parse_yesno):
            fn(text)


def test_prompts_and_answers_parse_back():
    subj = ObjectSpec("square", "blue")
    q = g.parse_prompt(g.attribute_prompt("size", subj))
    assert (q.kind, q.attribute, q.subject) == ("attribute", "size", subj)
    assert g.parse_attribute_answer(g.attribute_answer("position", subj, "top right")).value == "top right"
    spec = ObjectSpec("triangle", "orange", position="bottom left")
    assert g.yesno_prompt(spec) == "Is there an orange triangle at the bottom left?"
    assert g.parse_prompt(g.yesno_prompt(spec)).subject == spec
    assert g.parse_yesno(g.yesno_answer(False, spec)) == (False, spec)
    assert g.parse_count(g.count_answer(3)) == 3 and g.count_answer(1) == "There is one object."
    assert g.parse_prompt("Write a poem.").kind == "unknown"


def test_judge_labels_each_kind_of_mistake():
    base = g.caption(SCENE)
    cases = {
        base.replace("red circle", "red star"): "object",
        base.replace("large red", "large green"): "attribute",
        base.replace("large red", "small red"): "attribute",
        base.replace("on the right", "at the bottom"): "position",
        base.replace("red circle", "blue circle").replace("small blue", "small red"): "binding",
        base.replace(" on a dark", ", a large red circle at the bottom on a dark"): "count",
        base.replace(" on a dark", ", a large red star at the bottom on a dark"): "object",
        base.replace("a large red circle at the top left, ", ""): "other",  # omission is not a hallucination type
        base.replace("dark", "striped"): "other",
        "a red circle": "unparsed",
    }
    assert judge(SCENE, g.DESCRIBE_PROMPT, base).true
    for text, etype in cases.items():
        v = judge(SCENE, g.DESCRIBE_PROMPT, text)
        assert not v.true and v.error_type == etype, (text, v)
    assert judge(SCENE, "What colour is the square?", "The square is red.").error_type == "binding"
    assert judge(SCENE, "What colour is the square?", "The square is white.").error_type == "attribute"
    assert judge(SCENE, "Is there a blue circle?", "Yes, there is a blue circle.").error_type == "binding"
    assert judge(SCENE, "Is there a blue circle?", "No.").true
    assert judge(SCENE, "Is there a red circle?", "Maybe.").error_type == "unparsed"
    assert judge(SCENE, "How many objects are there?", "There are 3 objects.").true


def test_diff_objects_needs_exactly_one_fact():
    two_changes = [o.with_(colour="white", size="small") if o.shape == "circle" else o for o in SCENE.objects]
    assert diff_objects(SCENE.objects, two_changes).error_type == "other"


def test_examples_respect_restricted_error_types():
    cfg = preset("tiny", error_types=("binding",), prompt_kinds=("describe", "attribute"))
    seen = set()
    for i in range(200):
        rng = np.random.default_rng([0, 1, i])
        scene = sample_scene(cfg, rng)
        for ex in make_examples(scene, cfg, rng):
            seen.add(ex.error_type)
            assert not judge(scene, ex.prompt, ex.rejected).true
    assert seen == {"binding"}
