"""Read the public POPE question files: one JSON object per line, images in one folder.

    from eval.pope_reader import read_pope
    pope = read_pope("POPE/output/coco/coco_pope_random.json", "coco/val2014")
    pope.questions[0]     # PopeQuestion(question_id=0, image='COCO_val2014_000000548882.jpg', ...)
    pope.problems         # ['line 7: label 'maybe' is not yes or no', ...]: bad lines are reported, not fatal

The format of AoiDragon/POPE (`output/coco/coco_pope_{random,popular,adversarial}.json`; JSON Lines despite the
extension): `{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the
image?", "label": "yes"}` (some files also carry `image_id`). Also read: `question` for `text`, `answer` for
`label` (the answer files of that repository), `category` (LLaVA's `llava_pope_test.jsonl` groups the three
settings in one file with it), and a whole-file JSON array. The setting of a question is its `category`, else
`random`/`popular`/`adversarial` found in the file name, else the file name's stem.

Every image path must stay inside the image folder once resolved (no absolute paths, no `..` and no symlink
leading out) and must be a file; otherwise the question is dropped and the reason is in `problems`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from eval.pope_world import SETTINGS

LABELS = {"yes": True, "no": False}


class PopeQuestion(NamedTuple):
    question_id: Any
    """As in the file (an int in POPE's files); the line number when the file has none."""
    image: str
    """The image path as written in the file."""
    path: Path
    """The resolved image file, inside the image folder."""
    text: str
    label: bool
    """True for `yes`."""
    setting: str
    line: int
    """1-based line of the file (the array index + 1 for a JSON array)."""


class PopeFile(NamedTuple):
    path: Path
    questions: list[PopeQuestion]
    problems: list[str]
    """One line per dropped question or unreadable line: `<file>:<line>: <reason>`."""


def setting_of(path: Path) -> str:
    """`coco_pope_adversarial.json` -> `adversarial`; a name without a POPE setting -> its stem."""
    found = [s for s in SETTINGS if re.search(rf"(^|[^a-z]){s}([^a-z]|$)", path.stem.lower())]
    return found[0] if len(found) == 1 else path.stem


def _records(path: Path) -> tuple[list[tuple[int, Any]], list[str]]:
    """(line, parsed object) of every readable record, and the problems of the unreadable ones."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            return [(i + 1, r) for i, r in enumerate(json.loads(text))], []
        except json.JSONDecodeError as err:
            return [], [f"{path.name}: not a JSON array ({err}); write one JSON object per line"]
    records, problems = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((i, json.loads(line)))
        except json.JSONDecodeError as err:
            problems.append(f"{path.name}:{i}: not JSON ({err.msg})")
    return records, problems


def resolve_image(image: Any, root: Path) -> tuple[Path | None, str]:
    """(the file, '') when `image` names a file inside `root` (already resolved), else (None, the reason)."""
    if not isinstance(image, str) or not image.strip():
        return None, f"image {image!r} is not a file name"
    if "\x00" in image:
        return None, "image path holds a NUL byte"
    rel = Path(image)
    if rel.is_absolute() or rel.drive:
        return None, f"image {image!r} is an absolute path; give it relative to the image folder"
    try:
        full = (root / rel).resolve()
    except (OSError, RuntimeError) as err:  # symlink loops
        return None, f"image {image!r} cannot be resolved ({err})"
    if not full.is_relative_to(root):
        return None, f"image {image!r} leads outside the image folder {root}"
    if not full.is_file():
        return None, f"image {image!r} is not a file in {root}"
    return full, ""


def read_pope(path: str | os.PathLike, image_dir: str | os.PathLike, *, limit: int | None = None,
              setting: str | None = None) -> PopeFile:
    """The questions of one POPE file whose images resolve inside `image_dir` (the first `limit` good ones),
    and what was wrong with the others. Raises only when the file or the folder does not exist."""
    path, given = Path(path).expanduser(), Path(image_dir).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"POPE question file {path} does not exist; give a file such as "
                                "coco_pope_random.json (one JSON object per line)")
    if not given.is_dir():
        raise FileNotFoundError(f"image folder {given} does not exist; give the folder the questions' `image` "
                                "names are relative to (val2014/ for POPE's COCO files)")
    root = given.resolve()
    default_setting = setting or setting_of(path)
    records, problems = _records(path)
    questions: list[PopeQuestion] = []
    seen: set[Any] = set()
    for line, rec in records:
        if limit is not None and len(questions) >= limit:
            break
        where = f"{path.name}:{line}"
        if not isinstance(rec, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        text = rec.get("text", rec.get("question"))
        label = rec.get("label", rec.get("answer"))
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: no question text (`text`)")
            continue
        label = LABELS.get(label.strip().lower()) if isinstance(label, str) else None
        if label is None:
            problems.append(f"{where}: label {rec.get('label', rec.get('answer'))!r} is not yes or no")
            continue
        qid = rec.get("question_id", line)
        key = (qid, rec.get("category"))
        if not isinstance(qid, (int, str)) or key in seen:
            problems.append(f"{where}: question_id {qid!r} is {'a repeat' if key in seen else 'not an int or str'}")
            continue
        full, why = resolve_image(rec.get("image"), root)
        if full is None:
            problems.append(f"{where}: {why}")
            continue
        seen.add(key)
        category = rec.get("category")
        questions.append(PopeQuestion(qid, rec["image"], full, text.strip(), label,
                                      category if isinstance(category, str) and category else default_setting,
                                      line))
    return PopeFile(path, questions, problems)
