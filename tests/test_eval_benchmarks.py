"""Public benchmarks offline: AMBER and CHAIR on COCO read from small fixture files in their public formats, scored
against hand-computed values, and run end to end through `python -m eval` with the tiny world VLM (docs/eval.md)."""

import json
import math
import shutil

import pytest
from PIL import Image

from eval.amber import AmberItem, discriminative_metrics, generative_metrics, read_amber, score_response
from eval.coco_chair import caption_objects, chair_scores, load_coco, read_synonyms, sample_images
from eval.lexicon import singular, vocabulary_words
from eval.run import answers_path, main
from world.base_model import BASE_PRESETS, train_base_model


# ---------------------------------------------------------------------------------------------- lexicon
def test_singular_goes_towards_the_vocabulary_only():
    known = {"bus", "glass", "dog", "man", "leave", "tree", "people", "sunglasses", "berry"}
    assert [singular(w, known) for w in ("buses", "glasses", "dogs", "men", "leaves", "trees", "berries")] == \
        ["bus", "glass", "dog", "man", "leave", "tree", "berry"]
    assert singular("people", known) == "people" and singular("sunglasses", known) == "sunglasses"
    assert singular("cats", known) == "cats"  # no known singular: unchanged
    assert vocabulary_words("Two Dogs, a man; three buses.", known) == ["dog", "man", "bus"]


# ---------------------------------------------------------------------------------------------- AMBER fixture
RELATION = {"sky": [], "person": ["people", "man", "woman"], "dog": [], "beach": ["sand", "shore"],
            "sea": ["water", "lake"], "lake": ["water", "sea", "river"], "cloud": [], "sun": [], "ship": ["boat"],
            "bird": [], "tree": ["forest"], "forest": ["tree"], "light": []}
GENERATIVE = [  # (id, truth, hallu, a response)
    (1, ["sky", "person", "beach"], ["dog", "ship", "sun"],
     "A man and two dogs on the beach under a sunny sky, with a boat and the light of the sun."),
    (2, ["sea", "lake"], ["bird", "tree"], "Calm water with a bird, and people."),
    (3, ["tree"], ["bird"], "Trees."),
]
DISCRIMINATIVE = [  # (id, type, truth, query, predicted yes)
    (4, "discriminative-hallucination", "yes", "Is there a person in this image?", True),
    (5, "discriminative-hallucination", "no", "Is there a dog in this image?", False),
    (6, "discriminative-attribute-state", "yes", "Is the sky sunny in this image?", False),
    (7, "discriminative-attribute-number", "no", "Are there two ships in this image?", True),
    (8, "discriminative-attribute-action", "no", "Does the man run in this image?", None),
    (9, "discriminative-relation", "yes", "Is the man on the beach in this image?", True),
]


def _jpeg(path, src=None, colour=(90, 140, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.open(src).convert("RGB") if src else Image.new("RGB", (32, 32), colour)
    im.save(path, format="JPEG")


def write_amber(root, image_sources=None):
    """An AMBER repository folder as the public one lays it out, and its image folder."""
    data, query, images = root / "data", root / "data" / "query", root / "image"
    query.mkdir(parents=True)
    ann = [{"id": i, "type": "generative", "truth": t, "hallu": h} for i, t, h, _ in GENERATIVE]
    ann += [{"id": i, "type": k, "truth": t} for i, k, t, _, _ in DISCRIMINATIVE]
    (data / "annotations.json").write_text(json.dumps(ann, indent=4))
    (data / "relation.json").write_text(json.dumps(RELATION, indent=4))
    (data / "safe_words.txt").write_text("light\nsign")
    gen = [{"id": i, "image": f"AMBER_{i}.jpg", "query": "Describe this image."} for i, _, _, _ in GENERATIVE]
    disc = [{"id": i, "image": f"AMBER_{1 + i % 3}.jpg", "query": q} for i, _, _, q, _ in DISCRIMINATIVE]
    disc.append({"id": 10, "image": "../secret.jpg", "query": "Is there a cat in this image?"})  # no annotation
    (query / "query_generative.json").write_text(json.dumps(gen, indent=4))
    (query / "query_discriminative.json").write_text(json.dumps(disc, indent=4))
    for n in (1, 2, 3):
        _jpeg(images / f"AMBER_{n}.jpg", image_sources[n - 1] if image_sources else None, (40 * n, 90, 200))
    return root, images


def test_amber_reader_keeps_good_queries_and_reports_bad_ones(tmp_path):
    root, images = write_amber(tmp_path / "AMBER")
    data = read_amber(root, images)
    assert [it.id for it in data.generative] == [1, 2, 3]
    assert [it.id for it in data.discriminative] == list(range(4, 10))
    assert data.generative[0].truth == ["sky", "person", "beach"] and data.generative[0].hallu == ("dog", "ship", "sun")
    assert data.discriminative[2] == AmberItem(6, "AMBER_1.jpg", (images / "AMBER_1.jpg").resolve(),
                                               "Is the sky sunny in this image?", "discriminative-attribute-state",
                                               "yes")
    assert len(data.problems) == 1 and "id 10 has no entry" in data.problems[0]
    assert "light" in data.lexicon.safe_words and "boat" in data.lexicon.words
    only = read_amber(root, images, tasks=("discriminative",), limit=2)
    assert only.generative == [] and len(only.discriminative) == 2 and only.lexicon is None
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        read_amber(tmp_path, images)
    with pytest.raises(FileNotFoundError, match="image folder"):
        read_amber(root, tmp_path / "nowhere")


def test_amber_generative_metrics_against_hand_computed_values(tmp_path):
    root, images = write_amber(tmp_path / "AMBER")
    data = read_amber(root, images)
    s1 = score_response(GENERATIVE[0][3], data.generative[0], data.lexicon)
    # man (person, by association), dog, beach, sky, boat (ship's word), light (safe), sun.
    assert s1.words == ["man", "dog", "beach", "sky", "boat", "light", "sun"]
    assert s1.hallucinated == ["dog", "boat", "sun"] and s1.covered == [0, 1, 2] and s1.cognitive == [0, 1, 2]
    s2 = score_response(GENERATIVE[1][3], data.generative[1], data.lexicon)
    # water covers sea (the first object whose words hold it, as the reference matches), not lake as well.
    assert s2.words == ["water", "bird", "people"] and s2.covered == [0] and s2.hallucinated == ["bird", "people"]
    assert s2.cognitive == [0]
    m = generative_metrics([(it, r) for it, (_, _, _, r) in zip(data.generative, GENERATIVE)], data.lexicon)
    assert m["n"] == 3 and m["mentions"] == 11 and m["hallucinated"] == 5
    assert m["chair"] == pytest.approx(5 / 11)   # 3 + 2 + 0 hallucinated of 7 + 3 + 1 words
    assert m["cover"] == pytest.approx(5 / 6)    # 3 of 3, 1 of 2, 1 of 1 annotated objects
    assert m["hal"] == pytest.approx(2 / 3)      # responses 1 and 2 hallucinate
    assert m["cog"] == pytest.approx(4 / 6)      # 3 of 3, 1 of 2, 0 of 1 likely hallucinations
    assert generative_metrics([], data.lexicon)["chair"] is None


def test_amber_discriminative_metrics_take_no_as_the_positive_class(tmp_path):
    root, images = write_amber(tmp_path / "AMBER")
    data = read_amber(root, images, tasks=("discriminative",))
    m = discriminative_metrics([(it, p) for it, (*_, p) in zip(data.discriminative, DISCRIMINATIVE)])
    o = m["overall"]
    # correct: 4, 5, 9; said yes: 4, 7, 9; said no: 5, 6; truth no: 5, 7, 8; right no: 5; 8 unparsed (wrong).
    assert o["n"] == 6 and o["accuracy"] == 0.5 and o["precision"] == 0.5 and o["recall"] == pytest.approx(1 / 3)
    assert o["f1"] == pytest.approx(0.4) and o["yes_ratio"] == 0.5 and o["unparsed"] == 1
    assert m["existence"]["accuracy"] == m["existence"]["f1"] == 1.0
    assert m["attribute"]["n"] == 3 and m["attribute"]["accuracy"] == 0.0 and m["attribute"]["f1"] == 0.0
    assert m["state"]["precision"] == 0.0 and m["state"]["recall"] is None and m["state"]["f1"] is None
    assert m["relation"]["accuracy"] == 1.0 and m["relation"]["precision"] is None
    assert list(m) == ["overall", "existence", "attribute", "state", "number", "action", "relation"]


# ---------------------------------------------------------------------------------------------- COCO fixture
SYNONYMS = """person, man, woman, people, child, boy, baby
dog, puppy
motorcycle, motor bike, motorbike
dining table, table
chair, seat
toilet
bird
wine glass
"""


def write_coco(root, image_sources=None):
    """COCO 2014-format instance and caption annotations (3 images, the third missing on disk), a synonym list
    in CHAIR's format, and the image folder."""
    ann, images = root / "annotations", root / "val2014"
    ann.mkdir(parents=True)
    files = {i: f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)}
    cats = [{"id": 1, "name": "person"}, {"id": 4, "name": "motorcycle"}, {"id": 16, "name": "bird"},
            {"id": 18, "name": "dog"}, {"id": 70, "name": "toilet"}]
    inst = {"images": [{"id": i, "file_name": f, "width": 32, "height": 32} for i, f in files.items()],
            "categories": cats,
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1}, {"id": 11, "image_id": 1, "category_id": 4},
                            {"id": 12, "image_id": 2, "category_id": 70}, {"id": 13, "image_id": 3, "category_id": 16}]}
    caps = {"images": inst["images"],
            "annotations": [{"id": 20, "image_id": 1, "caption": "A man riding a motor bike."},
                            {"id": 21, "image_id": 1, "caption": "A dog runs beside the road."},
                            {"id": 22, "image_id": 2, "caption": "A white toilet with its seat up."}]}
    (ann / "instances_val2014.json").write_text(json.dumps(inst))
    (ann / "captions_val2014.json").write_text(json.dumps(caps))
    (root / "synonyms.txt").write_text(SYNONYMS)
    for n in (1, 2):
        _jpeg(images / files[n], image_sources[n - 1] if image_sources else None)
    return ann, images, root / "synonyms.txt"


def test_chair_caption_objects_follow_the_chair_rules(tmp_path):
    syn = read_synonyms(write_coco(tmp_path)[2])
    assert caption_objects("Two men ride motorbikes next to a baby bird and a table.", syn) == \
        [("man", "person"), ("motorbike", "motorcycle"), ("bird", "bird"), ("table", "dining table")]
    assert caption_objects("The seat of the toilet.", syn) == [("toilet", "toilet")]  # not a chair
    assert caption_objects("A seat and wine glasses.", syn) == [("seat", "chair"), ("wine glass", "wine glass")]
    with pytest.raises(FileNotFoundError, match="synonyms.txt"):
        read_synonyms(tmp_path / "missing.txt")


def test_chair_on_coco_against_hand_computed_values(tmp_path):
    ann, images, syn_path = write_coco(tmp_path)
    syn = read_synonyms(syn_path)
    coco = load_coco(tmp_path, "val2014", syn)  # the annotations/ subfolder is found
    # Instances + reference captions: image 1 holds a person and a motorcycle, and its captions add a dog.
    assert coco.objects[1] == {"person", "motorcycle", "dog"} and coco.objects[2] == {"toilet"}
    picked, problems = sample_images(coco, images, limit=None, seed=0)
    assert [p.image_id for p in picked] == [1, 2] and len(problems) == 1 and "image 3" in problems[0]
    m = chair_scores([(1, "Two men ride motorbikes next to a baby bird and a table."),
                      (2, "A toilet seat in a small room.")], coco.objects, syn)
    # Caption 1 names person, motorcycle (true), bird, dining table (not there); caption 2 names the toilet.
    assert m["mentions"] == 5 and m["hallucinated"] == 2
    assert m["chair_i"] == pytest.approx(2 / 5) and m["chair_s"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(3 / 4)  # person, motorcycle of 3; toilet of 1
    assert m["samples"][0]["hallucinated"] == ["bird", "table"]
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        load_coco(tmp_path, "train2014", syn)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_vlm(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-base") / "tiny"
    train_base_model(tiny_world, out, BASE_PRESETS["tiny"], progress=False)
    return out


def _in_range(x):
    return x is None or (isinstance(x, (int, float)) and not math.isnan(x) and 0.0 <= x <= 1.0)


def _world_images(tiny_world, n):
    return sorted((tiny_world / "images" / "test").glob("*.png"))[:n]


def test_cli_scores_amber_end_to_end(tiny_vlm, tiny_world, tmp_path, capsys):
    root, images = write_amber(tmp_path / "AMBER", _world_images(tiny_world, 3))
    out = tmp_path / "amber.json"
    result = main(["--model", str(tiny_vlm), "--amber", str(root), "--images", str(images), "--out", str(out),
                   "--device", "cpu", "--no-progress", "--max-new-tokens", "24"])
    amber = result["amber"]
    assert amber["discriminative"]["overall"]["n"] == 6 and amber["generative"]["n"] == 3
    for m in amber["discriminative"].values():
        assert all(_in_range(m[k]) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
    assert all(_in_range(amber["generative"][k]) for k in ("chair", "cover", "hal", "cog"))
    assert result["source"]["kind"] == "amber" and len(result["problems"]) == 1
    assert json.loads(out.read_text())["amber"] == json.loads(json.dumps(amber))
    rows = [json.loads(line) for line in answers_path(out).read_text().splitlines()]
    assert len(rows) == 6 + 3
    # The saved answers re-score to the same numbers.
    data = read_amber(root, images)
    again = generative_metrics([(it, r["answer"]) for it, r in zip(data.generative, rows[6:])], data.lexicon)
    assert again == amber["generative"]
    printed = capsys.readouterr().out
    assert "AMBER (no = positive)" in printed and "CHAIR" in printed and "Cover" in printed


def test_cli_scores_chair_on_coco_end_to_end(tiny_vlm, tiny_world, tmp_path, capsys):
    ann, images, syn = write_coco(tmp_path / "coco", _world_images(tiny_world, 2))
    out = tmp_path / "coco.json"
    result = main(["--model", str(tiny_vlm), "--coco-chair", str(ann), "--coco-synonyms", str(syn),
                   "--images", str(images), "--out", str(out), "--device", "cpu", "--no-progress", "--limit", "5",
                   "--max-new-tokens", "24"])
    c = result["coco_chair"]
    assert c["n_captions"] == 2 and all(_in_range(c[k]) for k in ("chair_i", "chair_s", "recall", "empty"))
    assert result["pope"] == {} and result["chair"] is None and "image 3" in result["problems"][0]
    assert result["source"]["split"] == "val2014" and len(answers_path(out).read_text().splitlines()) == 2
    # Benchmark-only knobs are recorded in `source`, and kept out of `config` (whose world fields key experiments).
    assert result["source"]["prompt"] == "Please describe this image in detail."
    assert not {"caption_prompt", "coco_split", "amber_tasks"} & set(result["config"])
    assert "COCO CHAIR (2 captions)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the synonym list is the user's to give
        main(["--model", str(tiny_vlm), "--coco-chair", str(ann), "--images", str(images)])
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_vlm), "--amber", str(tmp_path), "--pope", str(syn), "--images", str(images)])
