"""Ground truth of the scene world for SAE latents and mined negatives: which facts a candidate changes relative
to its positive.

Only meaningful when the data source is the scene world; a user's data has no such labels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl


ATTRIBUTES = ("colour", "shape", "size", "count", "position", "context")
"""Ground-truth changes between two scenes of the world (docs/data.md, scenes.parquet)."""


def scene_changes(a: Mapping, b: Mapping) -> dict[str, bool]:
    """Which attributes differ between two scenes (rows of scenes.parquet: `objects`, `background`).
    Attributes of the objects compare as multisets, so a reordering is not a change."""

    def multiset(scene: Mapping, key: str) -> Counter:
        return Counter(str(obj[key]) for obj in scene["objects"])

    return {
        "colour": multiset(a, "colour") != multiset(b, "colour"),
        "shape": multiset(a, "shape") != multiset(b, "shape"),
        "size": multiset(a, "size") != multiset(b, "size"),
        "count": len(a["objects"]) != len(b["objects"]),
        "position": multiset(a, "position") != multiset(b, "position"),
        "context": a["background"] != b["background"],
    }


def change_labels(positives: Sequence[Mapping], negatives: Sequence[Mapping]) -> np.ndarray:
    """(N, len(ATTRIBUTES)) bool: attribute changes between each positive scene and its paired candidate scene."""
    if len(positives) != len(negatives):
        raise ValueError(f"{len(positives)} positive scenes but {len(negatives)} candidate scenes; pair them 1:1")
    rows = [scene_changes(p, n) for p, n in zip(positives, negatives)]
    return np.array([[row[a] for a in ATTRIBUTES] for row in rows], dtype=bool).reshape(len(rows), len(ATTRIBUTES))


def scenes_by_path(world_dir: Path) -> dict[str, dict]:
    """Absolute image path -> scene row (objects, background) for every image of the world."""
    scenes = pl.read_parquet(Path(world_dir) / "scenes.parquet")
    root = Path(world_dir).resolve()
    return {str(root / r["image"]): r for r in scenes.select("image", "objects", "background").iter_rows(named=True)}


def change_signature(positive: dict, negative: dict) -> frozenset[str]:
    """The set of attributes in which the negative's scene differs from the positive's."""
    return frozenset(a for a, changed in scene_changes(positive, negative).items() if changed)


def error_type_report(positive_paths: list[str], selected_paths: dict[str, list[list[str]]],
                      scenes: dict[str, dict]) -> pl.DataFrame:
    """Per selection rule: mean number of distinct change signatures among an example's negatives (more = the
    negatives deviate in more different ways) and mean number of attributes each negative changes (fewer =
    harder, closer negatives)."""
    rows = []
    for rule, per_example in selected_paths.items():
        distinct, n_changed = [], []
        for pos_path, negs in zip(positive_paths, per_example):
            pos = scenes.get(str(Path(pos_path).resolve()))
            sigs = [change_signature(pos, scenes[str(Path(n).resolve())]) for n in negs
                    if pos is not None and str(Path(n).resolve()) in scenes]
            if sigs:
                distinct.append(len(set(sigs)))
                n_changed.extend(len(s) for s in sigs)
        rows.append({"rule": rule, "examples": len(distinct),
                     "distinct_change_types": float(np.mean(distinct)) if distinct else float("nan"),
                     "attributes_changed_per_negative": float(np.mean(n_changed)) if n_changed else float("nan")})
    return pl.DataFrame(rows)
