"""Scenes: what is in an image (ground truth), how to sample one from a seed, and how to draw it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np

from world import vocab
from world.config import WorldConfig
from world.render import draw  # the only module that knows pixels

SPLIT_CODE: dict[str, int] = {"pool": 0, "train": 1, "test": 2, "text": 3, "encoder": 4}
"""Seed stream of each split; `text` is the caption-only corpus (`WorldConfig.n_text`), `encoder` the extra
scenes the world vision encoder trains on (`world.encoder`; rendered in memory, never written)."""
IMAGE_SPLITS: tuple[str, ...] = ("pool", "train", "test", "encoder")
"""Splits whose scenes are drawn as images: visual uncertainty (`WorldConfig.uncertain_p`) applies to them."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object. In a `Scene` every field is set; a parsed text mention or a question's subject may
    leave fields None, and then it is a pattern: `matches(obj)` ignores the unset fields."""

    shape: str | None
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    @property
    def is_complete(self) -> bool:
        return None not in (self.shape, self.colour, self.size, self.position)

    @property
    def kind(self) -> tuple[str | None, str | None, str | None]:
        """What the object is, without where: (shape, colour, size)."""
        return (self.shape, self.colour, self.size)

    def matches(self, obj: ObjectSpec) -> bool:
        return all(
            mine is None or mine == theirs
            for mine, theirs in ((self.shape, obj.shape), (self.colour, obj.colour),
                                 (self.size, obj.size), (self.position, obj.position))
        )

    def with_(self, **changes: str | None) -> ObjectSpec:
        return replace(self, **changes)

    def to_row(self) -> dict[str, str | None]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


def _reading_order(obj: ObjectSpec) -> int:
    return vocab.POSITIONS.index(obj.position) if obj.position in vocab.POSITIONS else len(vocab.POSITIONS)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: objects (kept in reading order of their cells) and the background."""

    objects: tuple[ObjectSpec, ...]
    background: str

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=_reading_order))
        if not objs:
            raise ValueError("a scene needs at least one object")
        for o in objs:
            if not o.is_complete:
                raise ValueError(f"scene object {o} has unset fields; every scene object needs all four")
            if o.shape not in vocab.SHAPES or o.colour not in vocab.COLOUR_WORDS or o.size not in vocab.SIZES \
                    or o.position not in vocab.CELL:
                raise ValueError(f"scene object {o} uses a word outside world.vocab")
        if len({o.position for o in objs}) != len(objs):
            raise ValueError(f"two objects share a cell in {objs}; a cell holds at most one object")
        if self.background not in vocab.BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {vocab.BACKGROUNDS}")
        object.__setattr__(self, "objects", objs)

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    @property
    def colours(self) -> set[str]:
        return {o.colour for o in self.objects}

    def free_cells(self) -> list[str]:
        taken = {o.position for o in self.objects}
        return [p for p in vocab.POSITIONS if p not in taken]

    def find(self, pattern: ObjectSpec) -> list[int]:
        """Indices of the objects the (partial) spec matches."""
        return [i for i, o in enumerate(self.objects) if pattern.matches(o)]

    def replace_objects(self, objects: Iterable[ObjectSpec]) -> Scene:
        return Scene(objects=tuple(objects), background=self.background)

    def objects_rows(self) -> list[dict[str, str | None]]:
        return [o.to_row() for o in self.objects]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator a scene derives from: independent of generation order, so any scene can be rebuilt alone."""
    return np.random.default_rng([seed, SPLIT_CODE[split], index])


def sample_scene(cfg: WorldConfig, rng: np.random.Generator, split: str = "pool") -> Scene:
    """Draw objects (count, cells, shape, colour, size) and a background uniformly, then apply the optional
    co-occurrence prior of `cfg.cooccur_pairs` (drawn last, so that turning it off leaves scenes unchanged)."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.permutation(9)[:n]
    shape_i = rng.integers(len(cfg.shapes), size=n)
    colour_i = rng.integers(len(cfg.colours), size=n)
    size_i = rng.integers(2, size=n)
    objs = [
        ObjectSpec(cfg.shapes[s], cfg.colours[c], vocab.SIZES[z], vocab.POSITIONS[p])
        for s, c, z, p in zip(shape_i, colour_i, size_i, cells)
    ]
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    p = cfg.text_cooccur_p if split == "text" else (cfg.cooccur_p if split in cfg.cooccur_splits else 0.0)
    if cfg.cooccur_pairs and p > 0:
        objs = _apply_cooccurrence(cfg, rng, objs, p)
    if cfg.uncertain_p > 0 and split in IMAGE_SPLITS:
        objs = hide_colours(objs, rng.random(len(objs)) < cfg.uncertain_p)
    return Scene(objects=tuple(objs), background=background)


def hide_colours(objs: list[ObjectSpec], hidden: np.ndarray) -> list[ObjectSpec]:
    """The objects as the pixels show them: each one flagged in `hidden` becomes `vocab.UNCERTAIN_COLOUR`, so its
    true colour is gone from the truth, the captions and every answer as it is from the image."""
    return [o.with_(colour=vocab.UNCERTAIN_COLOUR) if h else o for o, h in zip(objs, hidden)]


def is_uncertain(obj: ObjectSpec) -> bool:
    """True for an object drawn hidden (`WorldConfig.uncertain_p`): its colour cannot be read from the image."""
    return obj.colour == vocab.UNCERTAIN_COLOUR


def _apply_cooccurrence(cfg: WorldConfig, rng: np.random.Generator, objs: list[ObjectSpec],
                        p: float) -> list[ObjectSpec]:
    """Make each trigger (a shape or a colour, `cfg.cooccur_attribute`) usually come with its partner: the
    world's stand-in for a language prior."""
    attr = cfg.cooccur_attribute
    for trigger, partner in cfg.cooccur_pairs:
        values = {getattr(o, attr) for o in objs}
        if trigger not in values or partner in values or rng.random() >= p:
            continue
        free = [q for q in vocab.POSITIONS if q not in {o.position for o in objs}]
        others = [i for i, o in enumerate(objs) if getattr(o, attr) != trigger]
        if len(objs) < cfg.max_objects and free:
            # Add rather than replace when there is room, so the prior does not thin out other values.
            if attr == "shape":
                shape, colour = partner, cfg.colours[int(rng.integers(len(cfg.colours)))]
            else:
                shape, colour = cfg.shapes[int(rng.integers(len(cfg.shapes)))], partner
            objs = objs + [ObjectSpec(shape, colour, vocab.SIZES[int(rng.integers(2))],
                                      free[int(rng.integers(len(free)))])]
        elif others:
            i = others[int(rng.integers(len(others)))]
            objs = objs[:i] + [objs[i].with_(**{attr: partner})] + objs[i + 1:]
    return objs


def render(scene: Scene, cfg: WorldConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a uint8 array (image_size, image_size, 3). With `rng`, positions, sizes and colours
    jitter (seeded); without, the canonical drawing (cell centres, nominal sizes, exact palette)."""
    return draw(scene, cfg, rng)
