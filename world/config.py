"""`WorldConfig`: every knob of the scene world, validated once, saved as `world.json` beside the data."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from world import vocab

# Bump whenever a change to sampling, rendering or text makes the same config produce different files:
# `generate_world` treats a folder written by another version as stale.
WORLD_VERSION = 1

PROMPT_KINDS: tuple[str, ...] = ("describe", "count", "attribute", "yesno")
ERROR_TYPES: tuple[str, ...] = ("object", "attribute", "count", "position", "binding")
SPLITS: tuple[str, ...] = ("pool", "train", "test")
COOCCUR_ATTRIBUTES: tuple[str, ...] = ("shape", "colour")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    """Root seed; every scene derives from `default_rng([seed, split_code, index])`."""
    n_pool: int = 8000
    """Scenes in the candidate-negative pool (`images/pool/`); they get no prompts."""
    n_train: int = 2000
    """Scenes that are positives of the training preference examples (`images/train/`)."""
    n_test: int = 1000
    """Held-out scenes for benchmarks and `preferences_test.parquet` (`images/test/`)."""
    image_size: int = 64
    """Side of the square RGB image in pixels; the 3x3 grid and object sizes scale with it."""
    min_objects: int = 1
    """Fewest objects in a scene."""
    max_objects: int = 4
    """Most objects in a scene (at most 9: one per grid cell)."""
    shapes: tuple[str, ...] = vocab.DEFAULT_SHAPES
    """Shapes objects are drawn from (a subset of `world.vocab.SHAPES`)."""
    colours: tuple[str, ...] = vocab.DEFAULT_COLOURS
    """Colours objects are drawn from (keys of `world.vocab.COLOURS`)."""
    backgrounds: tuple[str, ...] = vocab.DEFAULT_BACKGROUNDS
    """Background contexts (a subset of `world.vocab.BACKGROUNDS`)."""
    small_scale: float = 0.375
    """Diameter of a small object as a fraction of the cell side (8 px at 64 px: shape is hard to see)."""
    large_scale: float = 0.75
    """Diameter of a large object as a fraction of the cell side (16 px at 64 px: shape is easy to see)."""
    size_jitter: float = 0.1
    """Relative random change of each object's diameter (0.1: +-10%)."""
    position_jitter: float = 1.0
    """Fraction of the free room in its cell by which an object's centre may move (0: cell centre)."""
    colour_jitter: int = 12
    """Largest per-channel shift of an object's colour, and of the background's brightness (0-255 units)."""
    pixel_noise: float = 0.0
    """Std of per-pixel Gaussian noise (0-255 units); 0 keeps PNGs small and fast to write."""
    prompts_per_scene: int = 2
    """Preference examples per train/test scene, each of a different prompt kind."""
    prompt_kinds: tuple[str, ...] = PROMPT_KINDS
    """Prompt kinds to draw from (`describe`, `count`, `attribute`, `yesno`)."""
    always_describe: bool = True
    """Make the first prompt of every scene `describe` (when it is among `prompt_kinds`)."""
    error_types: tuple[str, ...] = ERROR_TYPES
    """Hallucination types a rejected answer may carry; drawn uniformly among those a prompt allows."""
    cooccur_pairs: tuple[tuple[str, str], ...] = ()
    """Language-prior regime, off by default: (trigger, partner) values of `cooccur_attribute`; a scene with
    the trigger and no partner gets the partner added (or swapped in for another object) with probability
    `cooccur_p`."""
    cooccur_p: float = 0.0
    """Probability that a trigger shape is accompanied by its partner (on top of chance co-occurrence)."""
    cooccur_splits: tuple[str, ...] = ("pool", "train")
    """Splits the co-occurrence prior applies to; the test split stays unbiased by default."""
    png_compress_level: int = 6
    """zlib level of the PNGs (0-9); part of the config because it changes the bytes written."""
    cooccur_attribute: str = "shape"
    """What `cooccur_pairs` name: `shape`s (a circle comes with a square) or `colour`s (a red object comes with
    a green one)."""
    n_text: int = 0
    """Captions of extra scenes written as text only (`texts.parquet`, no images): the corpus a language model
    is pretrained on before it sees images (the language-prior regime; `world.base_model` `text_steps`)."""
    text_cooccur_p: float = 0.0
    """Co-occurrence probability of `cooccur_pairs` in the text corpus (usually stronger than `cooccur_p`, as
    text priors are stronger than what the image fine-tuning data shows)."""
    uncertain_p: float = 0.0
    """Visual uncertainty, off by default: the share of objects of every image split drawn in a dull neutral
    grey (`world.vocab.UNCERTAIN_COLOUR`) instead of their colour. Their colour cannot be read from the pixels, so
    the scene's truth, captions and chosen answers name what is visible ("a small grey square"), never the
    hidden colour; the text corpus (`n_text`) is not drawn and keeps every colour. Drawn after the co-occurrence
    prior, so a hidden object may be a trigger's partner: the prior is weaker in what images show."""

    def __post_init__(self) -> None:
        # Lists from JSON/CLI become tuples so that configs compare and hash the same way.
        for name in ("shapes", "colours", "backgrounds", "prompt_kinds", "error_types", "cooccur_splits"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "cooccur_pairs", tuple(tuple(p) for p in self.cooccur_pairs))
        self._validate()

    def _validate(self) -> None:
        for name in ("n_pool", "n_train", "n_test", "n_text"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is negative; use 0 or more scenes")
        if self.image_size < 24:
            raise ValueError(f"image_size={self.image_size} is too small to draw a 3x3 grid; use 24 or more")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(f"need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) <= 9")
        _check_subset("shapes", self.shapes, vocab.SHAPES, minimum=2)
        _check_subset("colours", self.colours, tuple(vocab.COLOURS), minimum=2)
        _check_subset("backgrounds", self.backgrounds, vocab.BACKGROUNDS, minimum=1)
        _check_subset("prompt_kinds", self.prompt_kinds, PROMPT_KINDS, minimum=1)
        _check_subset("error_types", self.error_types, ERROR_TYPES, minimum=1)
        _check_subset("cooccur_splits", self.cooccur_splits, SPLITS, minimum=0)
        if not 0 < self.small_scale < self.large_scale <= 1:
            raise ValueError(f"need 0 < small_scale ({self.small_scale}) < large_scale ({self.large_scale}) <= 1")
        if not 0 <= self.size_jitter < 0.5:
            raise ValueError(f"size_jitter={self.size_jitter} must be in [0, 0.5)")
        if not 0 <= self.position_jitter <= 1:
            raise ValueError(f"position_jitter={self.position_jitter} must be in [0, 1]")
        if not 0 <= self.colour_jitter <= 64 or self.pixel_noise < 0:
            raise ValueError("colour_jitter must be in [0, 64] and pixel_noise >= 0")
        if not 1 <= self.prompts_per_scene <= len(self.prompt_kinds):
            raise ValueError(
                f"prompts_per_scene={self.prompts_per_scene} must be in 1..{len(self.prompt_kinds)} "
                f"(each prompt of a scene has a different kind; prompt_kinds={self.prompt_kinds})"
            )
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level={self.png_compress_level} must be in 0..9")
        self._validate_cooccurrence()

    def _validate_cooccurrence(self) -> None:
        for name in ("cooccur_p", "text_cooccur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")
        if self.text_cooccur_p > 0 and not self.cooccur_pairs:
            raise ValueError("text_cooccur_p > 0 needs cooccur_pairs, e.g. (('circle', 'square'),)")
        if self.cooccur_p > 0 and not self.cooccur_pairs:
            raise ValueError("cooccur_p > 0 needs cooccur_pairs, e.g. (('circle', 'square'),)")
        if self.cooccur_attribute not in COOCCUR_ATTRIBUTES:
            raise ValueError(f"cooccur_attribute={self.cooccur_attribute!r} is not one of {COOCCUR_ATTRIBUTES}")
        values = self.shapes if self.cooccur_attribute == "shape" else self.colours
        for pair in self.cooccur_pairs:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(values):
                raise ValueError(f"cooccur_pairs entry {pair!r} must be (trigger, partner): two different "
                                 f"{self.cooccur_attribute}s of {values}")
        if not 0 <= self.uncertain_p < 1:
            raise ValueError(f"uncertain_p={self.uncertain_p} must be a share in [0, 1)")
        if self.cooccur_pairs and self.max_objects < 2:
            raise ValueError("cooccur_pairs needs max_objects >= 2 so that a partner can join its trigger")

    @property
    def n_scenes(self) -> int:
        return self.n_pool + self.n_train + self.n_test

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists); `WorldConfig.from_dict` inverts it. Fields added after version 1
        are left out at their default, so that worlds generated before they existed stay current."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        return {k: v for k, v in d.items() if k not in _LATE_FIELDS or v != _LATE_FIELDS[k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown WorldConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Stable text identity of what this config generates (config + generator version)."""
        return json.dumps({"config": self.to_dict(), "world_version": WORLD_VERSION}, sort_keys=True)


_LATE_FIELDS: dict[str, Any] = {"n_text": 0, "text_cooccur_p": 0.0, "cooccur_attribute": "shape", "uncertain_p": 0.0}


def _check_subset(name: str, values: tuple[str, ...], library: tuple[str, ...], minimum: int) -> None:
    unknown = [v for v in values if v not in library]
    if unknown:
        raise ValueError(f"{name} has unknown entries {unknown}; choose from {list(library)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={values} has duplicates")
    if len(values) < minimum:
        raise ValueError(f"{name} needs at least {minimum} entries, got {values}")


PRESETS: dict[str, WorldConfig] = {
    # Tests: generates in well under a second.
    "tiny": WorldConfig(n_pool=200, n_train=48, n_test=40),
    # The demo `make` runs end to end on 2 cores.
    "default": WorldConfig(n_pool=8000, n_train=2000, n_test=1000),
    # Experiments.
    "large": WorldConfig(n_pool=50000, n_train=10000, n_test=2000),
    # The language-prior regime of `make experiment` (docs/experiment.md): a prior on what the world VLM sees
    # well (colour; shape stays near chance in minutes of training, docs/base_model.md), strong in a text
    # corpus (a red object comes with a green one, a blue with a yellow, 95% of the time), weaker in the image
    # data (40%), absent from the test split; 48 px so that a 16-px patch is exactly one grid cell. 15% of the
    # objects in images are drawn a dull grey (visual uncertainty): where the pixels leave the colour open, the
    # text prior can fill it in (docs/base_model.md). 600 test scenes: ~70 captions eligible for that prior.
    "prior": WorldConfig(
        n_pool=3000, n_train=1000, n_test=600, n_text=20000, max_objects=3, image_size=48,
        prompt_kinds=("describe", "yesno"), cooccur_attribute="colour",
        cooccur_pairs=(("red", "green"), ("blue", "yellow")), cooccur_p=0.4, text_cooccur_p=0.95,
        uncertain_p=0.15),
}
# `python -m experiment --quick` (CI): the prior regime at the tiny preset's scale.
PRESETS["prior_tiny"] = dataclasses.replace(PRESETS["prior"], n_pool=200, n_train=48, n_test=24, n_text=400)


def preset(name: str, **overrides: Any) -> WorldConfig:
    """The named preset with some fields replaced, e.g. `preset("tiny", seed=3)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown world preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
