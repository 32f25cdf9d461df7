"""CHAIR on COCO (Rohrbach et al., 2018): which objects a caption names that the image does not hold.

    from eval.coco_chair import read_synonyms, load_coco, sample_images, caption_objects, chair_scores
    syn = read_synonyms("Hallucination/data/synonyms.txt")    # CHAIR's synonym list, a local file you give
    coco = load_coco("coco/annotations", "val2014", syn)      # instances_val2014.json + captions_val2014.json
    images, problems = sample_images(coco, "coco/val2014", limit=500, seed=0)
    caption_objects("Two men ride motor bikes.", syn)         # [('man', 'person'), ('motor bike', 'motorcycle')]
    chair_scores([(image_id, caption), ...], coco.objects)    # CHAIR_i, CHAIR_s, recall, ...

**Ground truth** of an image: the COCO categories of its instance annotations and the objects its five reference
captions name, each mapped to its category through the synonym list (as the CHAIR paper does). **A caption's
mentions**: its words, singularised towards the synonym list's words (`eval.lexicon`), with CHAIR's two-word
objects joined (`hot dog`, `teddy bear`, `baby bird` -> `bird`, `passenger jet` -> `jet`, ...) and `seat` dropped
from captions that name a toilet; each word of the list maps to its line's first word, the COCO category.

**The synonym list** is the one of the CHAIR paper's repository (LisaAnne/Hallucination, `data/synonyms.txt`):
one line per COCO category, `person, girl, boy, man, woman, ...`, the category first. That repository states no
licence, so it is not shipped here: the user gives the file.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from eval.lexicon import singularised, vocabulary
from eval.pope_reader import resolve_image

DEFAULT_PROMPT = "Please describe this image in detail."
"""The captioning prompt of the CHAIR evaluations of OPERA / LURE-style work on LLaVA-1.5 (500 val2014 images)."""

_COCO_DOUBLE_WORDS = ("motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
                      "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
                      "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
                      "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
                      "stove top oven", "home plate")
_QUALIFIED_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal",
                      "cub")


def double_words() -> dict[str, str]:
    """CHAIR's two-word objects -> the word they count as. `baby dog` is a dog, not a person (`baby` is a synonym of
    person); `passenger train` a train; `bow tie` a tie; `toilet seat` a toilet, not a chair."""
    out = {w: w for w in _COCO_DOUBLE_WORDS}
    for animal in _QUALIFIED_ANIMALS:
        out[f"baby {animal}"] = out[f"adult {animal}"] = animal
    for vehicle in ("jet", "train"):
        out[f"passenger {vehicle}"] = vehicle
    out.update({"bow tie": "tie", "toilet seat": "toilet"})
    return out


DOUBLE_WORDS = double_words()


class Synonyms(NamedTuple):
    category_of: dict[str, str]
    """Every word or phrase of the list -> its line's first entry (the COCO category)."""
    known: frozenset[str]
    """Single words a caption token may be singularised to."""


def read_synonyms(path: str | os.PathLike) -> Synonyms:
    """CHAIR's synonym list: one line per category, `category, synonym, synonym, ...`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"synonym list {path} does not exist; give CHAIR's synonyms.txt (data/synonyms.txt "
                                "of the LisaAnne/Hallucination repository: one line per COCO category, "
                                "`person, girl, boy, man, ...`)")
    category_of: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        entries = [e.strip().lower() for e in line.split(",") if e.strip()]
        for e in entries:
            category_of.setdefault(e, entries[0])
    if not category_of:
        raise ValueError(f"synonym list {path} is empty; give CHAIR's synonyms.txt")
    return Synonyms(category_of, frozenset(vocabulary(list(category_of) + list(DOUBLE_WORDS))))


def caption_objects(caption: str, synonyms: Synonyms) -> list[tuple[str, str]]:
    """(word as found, COCO category) of every object mention in `caption`, in order, repeats kept."""
    tokens = singularised(caption, synonyms.known)
    joined, i = [], 0
    while i < len(tokens):
        pair = " ".join(tokens[i:i + 2])
        if pair in DOUBLE_WORDS:
            joined.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            joined.append(tokens[i])
            i += 1
    if "toilet" in joined and "seat" in joined:  # "the seat of the toilet" is not a chair
        joined = [w for w in joined if w != "seat"]
    return [(w, synonyms.category_of[w]) for w in joined if w in synonyms.category_of]


class CocoAnnotations(NamedTuple):
    files: dict[int, str]
    """Image id -> file name (`COCO_val2014_000000000042.jpg`)."""
    objects: dict[int, frozenset[str]]
    """Image id -> the categories it holds (instances + reference captions), CHAIR's ground truth."""
    paths: list[str]
    """The annotation files read."""


def _find(folder: Path, name: str) -> Path:
    for path in (folder / name, folder / "annotations" / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{folder} has no {name} (looked in . and annotations/); give the folder of the COCO "
                            f"2014 annotations (annotations_trainval2014.zip, unpacked)")


def load_coco(annotations_dir: str | os.PathLike, split: str, synonyms: Synonyms) -> CocoAnnotations:
    """The images of `split` (`val2014`) and their ground-truth categories from `instances_<split>.json` and
    `captions_<split>.json`. An instance category the synonym list lacks counts under its own name."""
    folder = Path(annotations_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"COCO annotation folder {folder} does not exist")
    inst_path, cap_path = _find(folder, f"instances_{split}.json"), _find(folder, f"captions_{split}.json")
    instances = json.loads(inst_path.read_text(encoding="utf-8"))
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in instances["images"]}
        names = {int(c["id"]): str(c["name"]).lower() for c in instances["categories"]}
        objects: dict[int, set[str]] = defaultdict(set)
        for a in instances["annotations"]:
            name = names[int(a["category_id"])]
            objects[int(a["image_id"])].add(synonyms.category_of.get(name, name))
        for a in json.loads(cap_path.read_text(encoding="utf-8"))["annotations"]:
            objects[int(a["image_id"])].update(c for _, c in caption_objects(str(a["caption"]), synonyms))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{inst_path} / {cap_path}: not the COCO annotation format ({err!r}); give COCO 2014's "
                         "instances_*.json and captions_*.json") from err
    return CocoAnnotations(files, {i: frozenset(objects.get(i, ())) for i in files}, [str(inst_path), str(cap_path)])


class CocoImage(NamedTuple):
    image_id: int
    image: str
    path: Path


def sample_images(coco: CocoAnnotations, image_dir: str | os.PathLike, *, limit: int | None, seed: int
                  ) -> tuple[list[CocoImage], list[str]]:
    """`limit` images of the split drawn with `seed` (all, in id order, when `limit` is None) whose file is in
    `image_dir`; the ones that are not are reported and replaced by the next of the draw."""
    given = Path(image_dir).expanduser()
    if not given.is_dir():
        raise FileNotFoundError(f"COCO image folder {given} does not exist; give the folder of the split's images "
                                "(val2014/)")
    root = given.resolve()
    ids = sorted(coco.files)
    if limit is not None:
        random.Random(seed).shuffle(ids)
    out, problems = [], []
    for image_id in ids:
        if limit is not None and len(out) >= limit:
            break
        full, why = resolve_image(coco.files[image_id], root)
        if full is None:
            problems.append(f"image {image_id}: {why}")
            continue
        out.append(CocoImage(image_id, coco.files[image_id], full))
    return out, problems


def chair_scores(captions: Sequence[tuple[int, str]], objects: dict[int, frozenset[str]], synonyms: Synonyms,
                 samples: int = 5) -> dict[str, Any]:
    """CHAIR over (image id, caption) pairs:

    - CHAIR_i = mentions of a category the image lacks / all mentions (repeats counted, as in the paper);
    - CHAIR_s = captions with such a mention / captions;
    - recall = ground-truth categories some mention names / ground-truth categories (summed over images).
    """
    mentions = hallucinated = bad_caps = empty = named_true = true = 0
    rows = []
    for image_id, caption in captions:
        found = caption_objects(caption, synonyms)
        truth = objects[image_id]
        wrong = [(w, c) for w, c in found if c not in truth]
        mentions += len(found)
        hallucinated += len(wrong)
        bad_caps += bool(wrong)
        empty += not found
        named_true += len({c for _, c in found} & truth)
        true += len(truth)
        if len(rows) < samples:
            rows.append({"image_id": image_id, "caption": caption, "hallucinated": [w for w, _ in wrong],
                         "truth": sorted(truth)})
    n = len(captions)
    return {"n_captions": n, "chair_i": hallucinated / mentions if mentions else None,
            "chair_s": bad_caps / n if n else None, "recall": named_true / true if true else None,
            "mentions": mentions, "hallucinated": hallucinated,
            "mentions_per_caption": mentions / n if n else None, "empty": empty / n if n else None,
            "samples": rows}
