"""POPE-style yes/no probes built from the scene world's test split, in POPE's three negative settings.

    from eval.pope_world import build_probes, object_stats
    stats = object_stats(train_scenes, level="object")
    probes = build_probes(test_scenes, stats, shapes=cfg.shapes, colours=cfg.colours, seed=0)

Per scene (as POPE does per image): k = min(distinct objects present, `per_scene`, objects absent) yes-probes,
the same in every setting, and k no-probes drawn by the setting:
  random       k absent objects uniformly at random;
  popular      the k absent objects most frequent in the training scenes (POPE: most frequent in the dataset);
  adversarial  absent objects one attribute away from a present one (same shape in another colour, or same
               colour as another shape), ranked by how often they co-occur with the present objects in the
               training scenes (POPE's adversarial rule); at shape level, just that co-occurrence ranking.
Ties are broken by a seeded per-scene permutation, so probes depend only on (seed, scene) and a `limit` on
scenes never changes the probes of the scenes kept. Questions use the world's own template (`Is there a red
circle?`), the wording the world VLM was trained on.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import NamedTuple, Sequence

import numpy as np

from world import grammar
from world.scene import ObjectSpec, Scene

SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")
PROBE_LEVELS: tuple[str, ...] = ("object", "shape")
"""`object`: `Is there a red circle?` (shape + colour, the world's 35 default kinds); `shape`: `Is there a
circle?` (5 default kinds, so few absent ones per scene)."""

Key = tuple[str, ...]


class Probe(NamedTuple):
    question_id: str
    """`<setting>-<scene_id>-<j>`."""
    setting: str
    scene_id: str
    image: str
    """The image path as given (relative to the world root)."""
    prompt: str
    label: bool
    """True when the object is in the scene."""
    key: Key
    """(shape, colour) or (shape,): what is asked about."""
    kind: str
    """`present`, or how the negative was chosen: `random`, `popular`, `colour_off` (same shape, another
    colour), `shape_off` (same colour, another shape), `cooccur` (adversarial, by co-occurrence alone)."""


class ObjectStats(NamedTuple):
    """Counts over training scenes: in how many scenes each object appears, and each pair together."""

    level: str
    frequency: Counter
    cooccurrence: Counter
    """(a, b) -> scenes holding both, a != b, both orders."""
    n_scenes: int


def scene_keys(scene: Scene, level: str) -> list[Key]:
    """The distinct objects of a scene at `level`, sorted."""
    if level not in PROBE_LEVELS:
        raise ValueError(f"probe level {level!r} is not one of {PROBE_LEVELS}")
    keys = {(o.shape, o.colour) if level == "object" else (o.shape,) for o in scene.objects}
    return sorted(keys)


def all_keys(shapes: Sequence[str], colours: Sequence[str], level: str) -> list[Key]:
    """Every object the world can show at `level`, in config order."""
    return [(s, c) for s in shapes for c in colours] if level == "object" else [(s,) for s in shapes]


def object_stats(scenes: Sequence[Scene], level: str = "object") -> ObjectStats:
    freq: Counter = Counter()
    cooc: Counter = Counter()
    for scene in scenes:
        keys = scene_keys(scene, level)
        freq.update(keys)
        cooc.update((a, b) for a in keys for b in keys if a != b)
    return ObjectStats(level, freq, cooc, len(scenes))


def prompt_for(key: Key) -> str:
    return grammar.yesno_prompt(ObjectSpec(key[0], key[1] if len(key) > 1 else None))


def _rng(seed: int, scene_id: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(scene_id.encode()), purpose])


def _ranked(candidates: list[Key], score: dict[Key, float], rng: np.random.Generator) -> list[Key]:
    """Candidates by score, highest first; ties in a seeded random order."""
    tiebreak = rng.permutation(len(candidates))
    order = sorted(range(len(candidates)), key=lambda i: (-score.get(candidates[i], 0), tiebreak[i]))
    return [candidates[i] for i in order]


def one_off(key: Key, present: list[Key]) -> str | None:
    """`colour_off` when `key` is a present object's shape in another colour, `shape_off` when it is a present
    object's colour on another shape (checked in that order), None otherwise (or at shape level)."""
    if len(key) < 2:
        return None
    if any(p[0] == key[0] for p in present):
        return "colour_off"
    if any(p[1] == key[1] for p in present):
        return "shape_off"
    return None


def negatives(setting: str, present: list[Key], absent: list[Key], k: int, stats: ObjectStats,
              rng: np.random.Generator) -> list[tuple[Key, str]]:
    """k absent objects for one scene under `setting`, with how each was chosen."""
    if setting == "random":
        picks = rng.choice(len(absent), size=k, replace=False)
        return [(absent[i], "random") for i in sorted(picks)]
    if setting == "popular":
        return [(key, "popular") for key in _ranked(absent, dict(stats.frequency), rng)[:k]]
    if setting == "adversarial":
        score = {c: sum(stats.cooccurrence[(p, c)] for p in present) for c in absent}
        near = [c for c in absent if one_off(c, present)]
        chosen = _ranked(near, score, rng)[:k]
        rest = _ranked([c for c in absent if c not in chosen], score, rng)[:k - len(chosen)]
        return [(c, one_off(c, present)) for c in chosen] + [(c, "cooccur") for c in rest]
    raise ValueError(f"POPE setting {setting!r} is not one of {SETTINGS}")


def build_probes(scenes: Sequence[tuple[str, str, Scene]], stats: ObjectStats, *, shapes: Sequence[str],
                 colours: Sequence[str], seed: int = 0, per_scene: int = 3,
                 settings: Sequence[str] = SETTINGS) -> list[Probe]:
    """Balanced probes for `scenes` given as (scene_id, image path, Scene), setting by setting.

    `stats` (from the training scenes) fixes the level and feeds `popular` and `adversarial`; `shapes` and
    `colours` are the world config's (what can be absent). Deterministic in (seed, scene_id)."""
    if per_scene < 1:
        raise ValueError(f"per_scene={per_scene}: ask at least one yes and one no question per scene")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown POPE settings {unknown}; choose from {SETTINGS}")
    level = stats.level
    universe = all_keys(shapes, colours, level)
    plan = []
    for scene_id, image, scene in scenes:
        present = scene_keys(scene, level)
        absent = [key for key in universe if key not in set(present)]
        k = min(len(present), per_scene, len(absent))
        if k == 0:
            continue
        pos_rng = _rng(seed, scene_id, 0)
        positives = [present[i] for i in sorted(pos_rng.choice(len(present), size=k, replace=False))]
        plan.append((scene_id, image, present, absent, positives, k))
    probes: list[Probe] = []
    for s_code, setting in enumerate(SETTINGS):
        if setting not in settings:
            continue
        for scene_id, image, present, absent, positives, k in plan:
            negs = negatives(setting, present, absent, k, stats, _rng(seed, scene_id, 1 + s_code))
            asked = [(key, True, "present") for key in positives] + [(key, False, how) for key, how in negs]
            probes += [Probe(f"{setting}-{scene_id}-{j}", setting, scene_id, image, prompt_for(key), label, key, how)
                       for j, (key, label, how) in enumerate(asked)]
    return probes
