"""Preference examples of a scene: a prompt, the true answer (chosen) and a hallucinated answer (rejected)
that changes exactly one fact, labelled with its error type.

Error types: `object` (a shape swapped for one absent from the scene, an absent object claimed or a present
one denied), `attribute` (colour or size changed), `count` (wrong number, or an extra copy of an object),
`position` (an object moved to an empty cell), `binding` (colours swapped between two objects, or one
object's colour given to another). Each prompt draws its type uniformly among the types it allows, so the
types stay balanced where the scene permits them. `world.truth.judge` reads the texts back and checks all this.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, TypeVar

import numpy as np

from world import grammar as g
from world import vocab
from world.config import WorldConfig
from world.scene import ObjectSpec, Scene

T = TypeVar("T")


class Example(NamedTuple):
    prompt: str
    chosen: str
    rejected: str
    prompt_kind: str
    error_type: str
    error_detail: str


def _pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    return seq[int(rng.integers(len(seq)))]


def _choose_error(options: dict[str, list], cfg: WorldConfig, rng: np.random.Generator) -> str | None:
    """Uniform over the error types that are enabled and have at least one way to happen in this scene."""
    usable = [t for t in cfg.error_types if options.get(t)]
    return _pick(rng, usable) if usable else None


def _identify(scene: Scene, i: int, exclude: str) -> ObjectSpec | None:
    """The shortest description of object i that no other object fits, without the attribute asked about."""
    o = scene.objects[i]
    for fields in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"),
                   ("shape", "position"), ("colour", "shape", "position")):
        if exclude in fields:
            continue
        spec = ObjectSpec(**{f: getattr(o, f) for f in fields})
        if scene.find(spec) == [i]:
            return spec
    return None


def prior_targets(scene: Scene, cfg: WorldConfig) -> list[tuple[int, str]]:
    """(object index, partner colour) pairs a colour prior would hallucinate: the scene shows a trigger colour,
    lacks its partner, and the object is not that trigger; hidden (grey) objects first, as they are where the
    prior has nothing visible to contradict it. Only in worlds with visual uncertainty (`uncertain_p` > 0) and a
    colour prior, so that older worlds draw exactly the answers they always did."""
    if cfg.uncertain_p <= 0 or cfg.cooccur_attribute != "colour" or not cfg.cooccur_pairs:
        return []
    colours = scene.colours
    out = [(i, partner) for trigger, partner in cfg.cooccur_pairs if trigger in colours and partner not in colours
           for i, o in enumerate(scene.objects) if o.colour != trigger]
    hidden = [(i, c) for i, c in out if scene.objects[i].colour == vocab.UNCERTAIN_COLOUR]
    return hidden or out


# ------------------------------------------------------------------------------------------------ describe
def _describe(scene: Scene, cfg: WorldConfig, rng: np.random.Generator) -> Example | None:
    objs, free = list(scene.objects), scene.free_cells()
    absent = [s for s in cfg.shapes if s not in scene.shapes]
    pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs)) if objs[i].colour != objs[j].colour]
    everyone = list(range(len(objs)))
    etype = _choose_error({"object": absent and everyone, "attribute": everyone, "count": free and everyone,
                           "position": free and everyone, "binding": pairs}, cfg, rng)
    if etype is None:
        return None
    i = _pick(rng, everyone)
    o = objs[i]
    if etype == "object":
        new = _pick(rng, absent)
        objs[i] = o.with_(shape=new)
        detail = f"object: {o.shape}->{new} on object {i + 1} ({o.position})"
    elif etype == "attribute":
        if rng.random() < 0.5:
            prior = prior_targets(scene, cfg)
            if prior:  # the hallucination the text prior drives: the absent partner's colour
                i, new = _pick(rng, prior)
                o = objs[i]
                objs[i], detail = o.with_(colour=new), f"colour: {o.colour}->{new} on object {i + 1} (prior partner)"
            else:
                new = _pick(rng, [c for c in cfg.colours if c != o.colour])
                objs[i], detail = o.with_(colour=new), f"colour: {o.colour}->{new} on object {i + 1}"
        else:
            new = "small" if o.size == "large" else "large"
            objs[i], detail = o.with_(size=new), f"size: {o.size}->{new} on object {i + 1}"
    elif etype == "count":
        cell = _pick(rng, free)
        k = sum(x.kind == o.kind for x in objs)
        objs.append(o.with_(position=cell))
        detail = f"count: {g.phrase(o.with_(position=None))} {k}->{k + 1} (extra at {cell})"
    elif etype == "position":
        cell = _pick(rng, free)
        objs[i], detail = o.with_(position=cell), f"position: object {i + 1} ({o.shape}) {o.position}->{cell}"
    else:  # binding
        i, j = _pick(rng, pairs)
        a, b = objs[i], objs[j]
        objs[i], objs[j] = a.with_(colour=b.colour), b.with_(colour=a.colour)
        detail = f"binding: colours {a.colour}<->{b.colour} between objects {i + 1} and {j + 1}"
    return Example(g.DESCRIBE_PROMPT, g.caption(scene), g.caption(scene.replace_objects(objs)),
                   "describe", etype, detail)


# ------------------------------------------------------------------------------------------------ count
def _count(scene: Scene, cfg: WorldConfig, rng: np.random.Generator) -> Example | None:
    if "count" not in cfg.error_types:
        return None
    n = len(scene.objects)
    wrong = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    return Example(g.COUNT_PROMPT, g.count_answer(n), g.count_answer(wrong), "count", "count",
                   f"count: {n}->{wrong}")


# ------------------------------------------------------------------------------------------------ attribute
def _attribute(scene: Scene, cfg: WorldConfig, rng: np.random.Generator) -> Example | None:
    objs, free = scene.objects, scene.free_cells()
    idx = range(len(objs))
    by_colour = {i: _identify(scene, i, "colour") for i in idx}
    by_size = {i: _identify(scene, i, "size") for i in idx}
    by_place = {i: _identify(scene, i, "position") for i in idx}
    # An attribute error must not borrow a colour present in the scene: that would be a binding error.
    unseen = [c for c in cfg.colours if c not in scene.colours]
    options = {
        "attribute": [(i, "colour") for i in idx if by_colour[i] and unseen] + [(i, "size") for i in idx if by_size[i]],
        "binding": [(i, j) for i in idx for j in idx if by_colour[i] and objs[j].colour != objs[i].colour],
        "position": [i for i in idx if by_place[i] and free],
    }
    etype = _choose_error(options, cfg, rng)
    if etype is None:
        return None
    if etype == "attribute":
        i, attr = _pick(rng, options["attribute"])
        o = objs[i]
        if attr == "colour":
            subject, true, wrong = by_colour[i], o.colour, _pick(rng, unseen)
        else:
            subject, true, wrong = by_size[i], o.size, ("small" if o.size == "large" else "large")
        detail = f"{attr}: {true}->{wrong} of the {g.phrase(subject)}"
    elif etype == "binding":
        i, j = _pick(rng, options["binding"])
        attr, subject, true, wrong = "colour", by_colour[i], objs[i].colour, objs[j].colour
        detail = f"binding: colour {wrong} of object {j + 1} ({objs[j].shape}) given to the {g.phrase(subject)}"
    else:
        i = _pick(rng, options["position"])
        attr, subject, true, wrong = "position", by_place[i], objs[i].position, _pick(rng, free)
        detail = f"position: {true}->{wrong} of the {g.phrase(subject)}"
    return Example(g.attribute_prompt(attr, subject), g.attribute_answer(attr, subject, true),
                   g.attribute_answer(attr, subject, wrong), "attribute", etype, detail)


# ------------------------------------------------------------------------------------------------ yes/no
# Phrase formats of the questions: colour+shape, size+colour+shape, colour+shape+position. Positive questions
# draw them with the frequencies the negative ones end up with, so the wording never gives the answer away.
_FORMATS = (("colour", "shape"), ("size", "colour", "shape"), ("colour", "shape", "position"))
_FORMAT_P = (0.625, 0.125, 0.25)


def _yesno(scene: Scene, cfg: WorldConfig, rng: np.random.Generator) -> Example | None:
    objs, free = scene.objects, scene.free_cells()
    absent = [s for s in cfg.shapes if s not in scene.shapes]
    unseen = [c for c in cfg.colours if c not in scene.colours]
    negatives = {
        "object": [ObjectSpec(s, c) for s in absent for c in cfg.colours],
        "attribute": [ObjectSpec(o.shape, c) for o in objs for c in unseen]
        + [ObjectSpec(o.shape, o.colour, s) for o in objs for s in vocab.SIZES
           if not scene.find(ObjectSpec(o.shape, o.colour, s))],
        "binding": [ObjectSpec(o.shape, c) for o in objs for c in sorted(scene.colours)
                    if not scene.find(ObjectSpec(o.shape, c))],
        "position": [ObjectSpec(o.shape, o.colour, position=p) for o in objs for p in free],
    }
    positive = rng.random() < 0.5 and "object" in cfg.error_types
    etype = None if positive else _choose_error(negatives, cfg, rng)
    if etype is None:
        if "object" not in cfg.error_types:
            return None
        o = _pick(rng, objs)
        fields = _FORMATS[int(rng.choice(len(_FORMATS), p=_FORMAT_P))]
        spec = ObjectSpec(**{f: getattr(o, f) for f in fields})
        return Example(g.yesno_prompt(spec), g.yesno_answer(True, spec), g.yesno_answer(False, spec),
                       "yesno", "object", f"object: present {g.phrase(spec)} denied")
    if etype == "attribute":
        # Colour and size variants equally often, whichever has more candidates.
        by_colour = [s for s in negatives["attribute"] if s.size is None]
        by_size = [s for s in negatives["attribute"] if s.size is not None]
        spec = _pick(rng, _pick(rng, [c for c in (by_colour, by_size) if c]))
    else:
        spec = _pick(rng, negatives[etype])
    details = {
        "object": f"object: absent {spec.shape} claimed present",
        "attribute": f"{'size' if spec.size else 'colour'}: no {g.phrase(spec)} in the scene",
        "binding": f"binding: {spec.colour} belongs to another object, not the {spec.shape}",
        "position": f"position: no {spec.colour} {spec.shape} at the {spec.position}",
    }
    return Example(g.yesno_prompt(spec), g.yesno_answer(False, spec), g.yesno_answer(True, spec),
                   "yesno", etype, details[etype])


BUILDERS: dict[str, Callable[[Scene, WorldConfig, np.random.Generator], Example | None]] = {
    "describe": _describe, "count": _count, "attribute": _attribute, "yesno": _yesno,
}


def choose_kinds(cfg: WorldConfig, rng: np.random.Generator) -> list[str]:
    """`prompts_per_scene` different kinds; `describe` first when `always_describe`."""
    kinds = list(cfg.prompt_kinds)
    first: list[str] = []
    if cfg.always_describe and "describe" in kinds:
        kinds.remove("describe")
        first = ["describe"]
    order = [kinds[k] for k in rng.permutation(len(kinds))]
    return (first + order)[: cfg.prompts_per_scene]


def make_examples(scene: Scene, cfg: WorldConfig, rng: np.random.Generator) -> list[Example]:
    """The preference examples of one scene. A kind that no enabled error type fits is skipped, so a scene
    can yield fewer than `prompts_per_scene` examples when `cfg.error_types` is restricted."""
    out = []
    for kind in choose_kinds(cfg, rng):
        ex = BUILDERS[kind](scene, cfg, rng)
        if ex is not None:
            out.append(ex)
    return out
