"""AMBER (Wang et al., 2023), an LLM-free hallucination benchmark: its files on local disk, its two scorers.

    from eval.amber import read_amber, discriminative_metrics, generative_metrics
    data = read_amber("AMBER", "AMBER/image")       # the repository's data/ (or the files flat) + the image folder
    data.discriminative[0]   # AmberItem(id=1005, image='AMBER_1.jpg', query='Is the sky sunny in this image?', ...)
    discriminative_metrics([(item, True), ...])     # accuracy / precision / recall / F1, "no" the positive class
    generative_metrics([(item, "A man on a beach ..."), ...], data.lexicon)   # CHAIR, Cover, Hal, Cog

The files, as the repository junyangwang0410/AMBER lays them out (found in `DIR`, `DIR/data` or `DIR/data/query`):

- `data/query/query_generative.json`: `[{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}, ...]`
  (ids 1-1004); `query_discriminative.json` (ids 1005 on, `"query": "Is the sky sunny in this image?"`), or its
  three parts `query_discriminative-{existence,attribute,relation}.json` when the whole one is absent;
- `data/annotations.json`: one entry per id, list index = id - 1. Generative: `{"id": 1, "type": "generative",
  "truth": ["sky", "forest", ...], "hallu": ["cloud", "sun", ...]}`; discriminative: `{"id": 1005, "type":
  "discriminative-attribute-state", "truth": "yes"}` (types `discriminative-hallucination` = existence,
  `discriminative-attribute-{state,number,action}` = attribute, anything else = relation, as the reference does);
- `data/relation.json`: object -> associated words (`"person": ["people", "man", ...]`); its keys and values are
  the words the generative scorer looks at;
- `data/safe_words.txt`: one word per line that never counts (`orange`, `light`, `sign`, ...).

Scoring follows the reference `inference.py`; where it differs (no spaCy similarity, no nltk POS tagging,
lower-casing, unparsed answers reported) docs/eval.md says so.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from eval.lexicon import vocabulary_words
from eval.pope_reader import resolve_image

QUERY_GENERATIVE = "query_generative.json"
QUERY_DISCRIMINATIVE = "query_discriminative.json"
QUERY_DIMENSIONS = ("query_discriminative-existence.json", "query_discriminative-attribute.json",
                    "query_discriminative-relation.json")
TASKS = ("discriminative", "generative")
ATTRIBUTE_TYPES = {"discriminative-attribute-state": "state", "discriminative-attribute-number": "number",
                   "discriminative-attribute-action": "action"}
EXISTENCE_TYPE = "discriminative-hallucination"
DIMENSIONS = ("existence", "attribute", "state", "number", "action", "relation")


class AmberItem(NamedTuple):
    id: int
    image: str
    """As written in the query file (relative to the image folder)."""
    path: Path
    query: str
    type: str
    """`generative` or `discriminative-...` (annotations.json)."""
    truth: Any
    """Generative: the objects in the image (list); discriminative: `yes` or `no`."""
    hallu: tuple[str, ...] = ()
    """Generative: objects a model is likely to hallucinate for this image."""


class AmberLexicon(NamedTuple):
    association: dict[str, list[str]]
    """relation.json: object -> associated words (a mention of one covers the object)."""
    safe_words: frozenset[str]
    """Words that are never counted as hallucinated nor as covering."""
    words: frozenset[str]
    """Every key and value of relation.json: the only words the generative scorer counts."""


class AmberData(NamedTuple):
    generative: list[AmberItem]
    discriminative: list[AmberItem]
    lexicon: AmberLexicon | None
    problems: list[str]
    files: list[str]


def dimension_of(kind: str) -> str:
    """`existence`, `attribute` or `relation` of a discriminative annotation type (the reference's buckets)."""
    if kind == EXISTENCE_TYPE:
        return "existence"
    return "attribute" if kind in ATTRIBUTE_TYPES else "relation"


def find_file(root: Path, name: str) -> Path | None:
    """`name` in `root`, `root/data`, `root/data/query` or `root/query` (the repository layout or the files flat)."""
    for folder in (root, root / "data", root / "data" / "query", root / "query"):
        if (folder / name).is_file():
            return folder / name
    return None


def _need(root: Path, name: str) -> Path:
    path = find_file(root, name)
    if path is None:
        raise FileNotFoundError(f"AMBER folder {root} has no {name} (looked in ., data/, data/query/); give the "
                                "AMBER repository folder (or a folder holding its data files)")
    return path


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); give the file as the AMBER repository has it") from err


def read_lexicon(root: Path) -> AmberLexicon:
    relation_path = _need(root, "relation.json")
    relation = _json(relation_path)
    if not isinstance(relation, dict) or not all(isinstance(v, list) for v in relation.values()):
        raise ValueError(f"{relation_path}: expected an object of word -> list of associated words")
    safe = _need(root, "safe_words.txt").read_text(encoding="utf-8").splitlines()
    words = {k.lower() for k in relation} | {w.lower() for v in relation.values() for w in v}
    return AmberLexicon({k.lower(): [w.lower() for w in v] for k, v in relation.items()},
                        frozenset(w.strip().lower() for w in safe if w.strip()), frozenset(words))


def read_amber(amber_dir: str | os.PathLike, image_dir: str | os.PathLike, *, tasks: Sequence[str] = TASKS,
               limit: int | None = None) -> AmberData:
    """The queries of the chosen tasks whose image resolves inside `image_dir` and whose annotation is usable (the
    first `limit` good ones of each task), and what was wrong with the others. Raises only for a missing folder or
    file, or a file that is not the expected JSON."""
    root, given = Path(amber_dir).expanduser(), Path(image_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"AMBER folder {root} does not exist; give the AMBER repository folder")
    if not given.is_dir():
        raise FileNotFoundError(f"AMBER image folder {given} does not exist; give the folder of AMBER_1.jpg, ...")
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"AMBER tasks {list(tasks)}: choose one or more of {TASKS}")
    images = given.resolve()
    ann_path = _need(root, "annotations.json")
    annotations = _json(ann_path)
    if not isinstance(annotations, list):
        raise ValueError(f"{ann_path}: expected a JSON list (entry i holds id i + 1)")
    by_id = {a["id"]: a for a in annotations if isinstance(a, dict) and isinstance(a.get("id"), int)}
    files, problems = [str(ann_path)], []
    query_files: dict[str, list[Path]] = {}
    if "generative" in tasks:
        query_files["generative"] = [_need(root, QUERY_GENERATIVE)]
    if "discriminative" in tasks:
        whole = find_file(root, QUERY_DISCRIMINATIVE)
        parts = [p for p in (find_file(root, n) for n in QUERY_DIMENSIONS) if p is not None]
        if whole is None and not parts:
            raise FileNotFoundError(f"AMBER folder {root} has no {QUERY_DISCRIMINATIVE} nor its parts "
                                    f"{list(QUERY_DIMENSIONS)}")
        query_files["discriminative"] = [whole] if whole is not None else parts
    out: dict[str, list[AmberItem]] = {t: [] for t in TASKS}
    for task, paths in query_files.items():
        seen: set[int] = set()
        for path in paths:
            files.append(str(path))
            queries = _json(path)
            if not isinstance(queries, list):
                raise ValueError(f"{path}: expected a JSON list of {{id, image, query}}")
            for i, q in enumerate(queries):
                if limit is not None and len(out[task]) >= limit:
                    break
                item, why = _item(q, by_id, images, task)
                if item is None or item.id in seen:
                    problems.append(f"{path.name}[{i}]: {why or f'id {item.id} repeated'}")
                    continue
                seen.add(item.id)
                out[task].append(item)
    lexicon = read_lexicon(root) if "generative" in tasks else None
    if lexicon is not None:
        files += [str(find_file(root, "relation.json")), str(find_file(root, "safe_words.txt"))]
    return AmberData(out["generative"], out["discriminative"], lexicon, problems, files)


def _item(q: Any, by_id: dict[int, dict], images: Path, task: str) -> tuple[AmberItem | None, str]:
    if not isinstance(q, dict):
        return None, "not a JSON object"
    qid, query = q.get("id"), q.get("query")
    if not isinstance(qid, int) or not isinstance(query, str) or not query.strip():
        return None, f"needs an integer id and a query, got id={qid!r} query={query!r}"
    ann = by_id.get(qid)
    if ann is None:
        return None, f"id {qid} has no entry in annotations.json"
    kind = ann.get("type", "")
    if (task == "generative") != (kind == "generative"):
        return None, f"id {qid} is annotated {kind!r}, not a {task} item"
    if task == "generative":
        truth, hallu = ann.get("truth"), ann.get("hallu", [])
        if not isinstance(truth, list) or not isinstance(hallu, list):
            return None, f"id {qid}: generative annotation needs lists `truth` and `hallu`"
        truth, hallu = [str(w).lower() for w in truth], tuple(str(w).lower() for w in hallu)
    else:
        truth, hallu = str(ann.get("truth", "")).strip().lower(), ()
        if truth not in ("yes", "no"):
            return None, f"id {qid}: truth {ann.get('truth')!r} is not yes or no"
    full, why = resolve_image(q.get("image"), images)
    if full is None:
        return None, f"id {qid}: {why}"
    return AmberItem(qid, q["image"], full, query.strip(), kind, truth, hallu), ""


# ---------------------------------------------------------------------------------------------- discriminative
def _yes_no_scores(rows: Sequence[tuple[bool, bool | None]]) -> dict[str, Any]:
    """AMBER's discriminative scores over (truth is yes, predicted yes / no / None) rows. As in the reference,
    "no" is the positive class (a hallucination benchmark rewards saying no to what is not there): precision =
    correct no / answered no, recall = correct no / truth no. An unparsed answer is wrong whatever the truth."""
    n = len(rows)
    correct = sum(p is not None and p == t for t, p in rows)
    said_no = sum(p is False for _, p in rows)
    truth_no = sum(not t for t, _ in rows)
    right_no = sum(p is False and not t for t, p in rows)
    precision = right_no / said_no if said_no else None
    recall = right_no / truth_no if truth_no else None
    f1 = (2 * precision * recall / (precision + recall) if precision is not None and recall is not None
          and precision + recall > 0 else (0.0 if precision is not None and recall is not None else None))
    return {"n": n, "accuracy": correct / n if n else None, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p is True for _, p in rows) / n if n else None,
            "unparsed": sum(p is None for _, p in rows),
            "unparsed_rate": sum(p is None for _, p in rows) / n if n else None}


def discriminative_metrics(answers: Sequence[tuple[AmberItem, bool | None]]) -> dict[str, Any]:
    """`overall` and per dimension (`existence`, `attribute` and its `state` / `number` / `action`, `relation`,
    those present): the scores of `_yes_no_scores` over (item, predicted yes) pairs."""
    groups: dict[str, list[tuple[bool, bool | None]]] = defaultdict(list)
    for item, pred in answers:
        row = (item.truth == "yes", pred)
        groups["overall"].append(row)
        dim = dimension_of(item.type)
        groups[dim].append(row)
        if dim == "attribute":
            groups[ATTRIBUTE_TYPES[item.type]].append(row)
    return {k: _yes_no_scores(groups[k]) for k in ("overall",) + DIMENSIONS if k in groups}


# ---------------------------------------------------------------------------------------------- generative
class ResponseScore(NamedTuple):
    words: list[str]
    """The lexicon's words in the response, in order (repeats kept): CHAIR's denominator."""
    hallucinated: list[str]
    """Words that are neither safe words nor an annotated object (or its associated word)."""
    covered: list[int]
    """Indices of `truth` objects the response mentions (directly or by an associated word)."""
    cognitive: list[int]
    """Indices of `hallu` objects the response mentions (AMBER's Cog)."""


def _first_match(word: str, objects: Sequence[str], association: dict[str, list[str]]) -> int | None:
    """Index of the object `word` stands for: the reference looks through every object's associated words first
    (in object order), then through the objects themselves, and takes the first hit."""
    for i, obj in enumerate(objects):
        if word in association.get(obj, ()):
            return i
    return next((i for i, obj in enumerate(objects) if word == obj), None)


def score_response(response: str, item: AmberItem, lexicon: AmberLexicon) -> ResponseScore:
    words = vocabulary_words(response, lexicon.words)
    hallucinated, covered, cognitive = [], set(), set()
    for w in words:
        if w in lexicon.safe_words:
            continue
        hit = _first_match(w, item.truth, lexicon.association)
        if hit is not None:
            covered.add(hit)
            continue
        hit = _first_match(w, item.hallu, lexicon.association)
        if hit is not None:
            cognitive.add(hit)
        hallucinated.append(w)
    return ResponseScore(words, hallucinated, sorted(covered), sorted(cognitive))


def generative_metrics(answers: Sequence[tuple[AmberItem, str]], lexicon: AmberLexicon,
                       samples: int = 5) -> dict[str, Any]:
    """AMBER's generative scores over (item, response) pairs:

    - CHAIR = hallucinated words / lexicon words mentioned (over all responses);
    - Cover = annotated objects mentioned / annotated objects;
    - Hal = responses with at least one hallucinated word / responses;
    - Cog = likely-hallucinated objects (`hallu`) mentioned / `hallu` objects.
    """
    scores = [(item, r, score_response(r, item, lexicon)) for item, r in answers]
    mentions = sum(len(s.words) for _, _, s in scores)
    hallucinated = sum(len(s.hallucinated) for _, _, s in scores)
    truths = sum(len(i.truth) for i, _, _ in scores)
    hallus = sum(len(i.hallu) for i, _, _ in scores)
    n = len(scores)

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"n": n, "chair": ratio(hallucinated, mentions),
            "cover": ratio(sum(len(s.covered) for _, _, s in scores), truths),
            "hal": ratio(sum(bool(s.hallucinated) for _, _, s in scores), n),
            "cog": ratio(sum(len(s.cognitive) for _, _, s in scores), hallus),
            "mentions": mentions, "hallucinated": hallucinated,
            "mentions_per_response": ratio(mentions, n),
            "empty": ratio(sum(not s.words for _, _, s in scores), n),
            "samples": [{"id": i.id, "response": r, "hallucinated": s.hallucinated,
                         "covered": [i.truth[k] for k in s.covered]} for i, r, s in scores[:samples]]}
