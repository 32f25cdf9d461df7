"""Hallucination metrics as pure functions: POPE-style yes/no scores and CHAIR-style caption scores.

    from eval.metrics import parse_yes_no, pope_metrics, chair_metrics, caption_stats, prior_hallucinations
    pope_metrics([True, False], [True, None])        # gold yes/no, predicted yes/no/unparsed
    chair_metrics(scenes, [parse_caption(c) for c in captions], level="object")

Nothing here loads a model or a file: answers come in as text or booleans, captions as `ParsedCaption`s of
`world.grammar`, truth as `world.scene.Scene`s. Formulas: docs/eval.md.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from world.grammar import ParsedCaption
from world.scene import ObjectSpec, Scene, is_uncertain

# ---------------------------------------------------------------------------------------------- yes/no answers
ANSWER_RULES = ("first_word", "pope")
"""`first_word`: the answer's first word is yes or no, anything else is unparsed (None).
`pope`: the rule of POPE's evaluate.py (and LLaVA's eval_pope.py): no when the first sentence holds the word
`No`, `no` or `not`, else yes; it never returns None."""

_FIRST_WORD = re.compile(r"^[\W_]*([A-Za-z]+)")


def parse_yes_no(text: str) -> bool | None:
    """True/False when the first word of `text` is yes/no (any case, leading punctuation skipped), else None."""
    m = _FIRST_WORD.match(text or "")
    word = m.group(1).lower() if m else ""
    return True if word == "yes" else False if word == "no" else None


def pope_reference_yes(text: str) -> bool:
    """The answer mapping of the POPE reference script: keep the first sentence, drop commas, split on spaces;
    `No`, `no` or `not` among the words means no, anything else (an empty or off-topic answer too) means yes."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def resolve_answer(text: str, rule: str = "first_word") -> bool | None:
    """The predicted yes (True) / no (False) / unparsed (None) of an answer under `rule` (see ANSWER_RULES)."""
    if rule == "first_word":
        return parse_yes_no(text)
    if rule == "pope":
        return pope_reference_yes(text)
    raise ValueError(f"answer rule {rule!r} is not one of {ANSWER_RULES}")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def pope_metrics(gold: Sequence[bool], pred: Sequence[bool | None]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no predictions against gold labels (yes = positive).

    An unparsed prediction (None) counts as "no" in the confusion matrix and is counted in `unparsed`.
    Undefined ratios are None (precision with no yes predictions; everything when `gold` is empty).
    F1 = 2TP / (2TP + FP + FN): the harmonic mean of precision and recall, and 0 when TP = 0."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions; give one prediction per label")
    tp = sum(1 for g, p in zip(gold, pred) if g and p is True)
    fp = sum(1 for g, p in zip(gold, pred) if not g and p is True)
    fn = sum(1 for g, p in zip(gold, pred) if g and p is not True)
    tn = sum(1 for g, p in zip(gold, pred) if not g and p is not True)
    unparsed = sum(1 for p in pred if p is None)
    n = len(gold)
    return {
        "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": _ratio(tp + tn, n), "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn), "yes_ratio": _ratio(tp + fp, n),
        "unparsed": unparsed, "unparsed_rate": _ratio(unparsed, n),
    }


# ---------------------------------------------------------------------------------------------- captions
LEVELS: dict[str, tuple[str, ...]] = {
    "shape": ("shape",),
    "colour": ("colour",),
    "object": ("shape", "colour"),
    "exact": ("shape", "colour", "size", "position"),
}
"""What a mention must get right to count as a true object. `shape` is CHAIR's object category; `object`
(shape + colour) is the world's object kind and the unit of its POPE probes; `exact` is every attribute."""


def _check_level(level: str) -> tuple[str, ...]:
    if level not in LEVELS:
        raise ValueError(f"CHAIR level {level!r} is not one of {sorted(LEVELS)}")
    return LEVELS[level]


def pattern_at(spec: ObjectSpec, level: str) -> ObjectSpec:
    """The mention reduced to the fields of `level` (others None). Fields the text left out stay None, so a
    partial mention is judged on what it says; the well-formed fraction shows how often that happens."""
    fields = _check_level(level)
    return ObjectSpec(**{f: getattr(spec, f) if f in fields else None for f in ("shape", "colour", "size",
                                                                             "position")})


def is_hallucinated(mention: ObjectSpec, scene: Scene, level: str = "object") -> bool:
    """True when no object of `scene` agrees with the mention on the fields of `level`."""
    return not scene.find(pattern_at(mention, level))


def truth_keys(scene: Scene, level: str) -> set[tuple[str | None, ...]]:
    """The distinct objects of a scene at `level` (e.g. the set of (shape, colour) pairs)."""
    fields = _check_level(level)
    return {tuple(getattr(o, f) for f in fields) for o in scene.objects}


def _covers(mention: ObjectSpec, key: tuple[str | None, ...], fields: tuple[str, ...]) -> bool:
    return all(getattr(mention, f) is None or getattr(mention, f) == v for f, v in zip(fields, key))


def _check_pairs(scenes: Sequence[Scene], captions: Sequence[ParsedCaption]) -> None:
    if len(scenes) != len(captions):
        raise ValueError(f"{len(scenes)} scenes but {len(captions)} captions; give one caption per scene")


def caption_stats(captions: Sequence[ParsedCaption]) -> dict[str, Any]:
    """What must sit next to every CHAIR figure: how many captions, how many mentions each, how many follow the
    grammar and how many name no object at all (an empty caption hallucinates nothing)."""
    n = len(captions)
    mentions = sum(len(c.objects) for c in captions)
    return {"n_captions": n, "mentions": mentions, "mentions_per_caption": _ratio(mentions, n),
            "well_formed": _ratio(sum(c.well_formed for c in captions), n),
            "empty": _ratio(sum(not c.objects for c in captions), n)}


def chair_metrics(scenes: Sequence[Scene], captions: Sequence[ParsedCaption], level: str = "object") -> dict[str, Any]:
    """CHAIR at `level` over captions of `scenes` (one each), with the caption statistics beside it.

    CHAIR_i = hallucinated mentions / mentions; CHAIR_s = captions with a hallucinated mention / captions;
    recall = true objects (distinct at `level`) named by some mention / true objects; all summed over captions."""
    _check_pairs(scenes, captions)
    fields = _check_level(level)
    hallucinated = bad_captions = covered = total = 0
    for scene, cap in zip(scenes, captions):
        bad = sum(is_hallucinated(m, scene, level) for m in cap.objects)
        hallucinated += bad
        bad_captions += bad > 0
        keys = truth_keys(scene, level)
        total += len(keys)
        covered += sum(any(_covers(m, k, fields) for m in cap.objects) for k in keys)
    stats = caption_stats(captions)
    return {"level": level, "chair_i": _ratio(hallucinated, stats["mentions"]),
            "chair_s": _ratio(bad_captions, len(captions)), "recall": _ratio(covered, total),
            "hallucinated": hallucinated, **stats}


def prior_hallucinations(scenes: Sequence[Scene], captions: Sequence[ParsedCaption],
                         pairs: Sequence[Sequence[str]], attribute: str = "shape",
                         universe: Sequence[str] | None = None) -> dict[str, Any]:
    """Hallucinations a co-occurrence prior explains: a mention whose `attribute` (shape or colour) is a partner
    the scene lacks while the scene holds its trigger (world config `cooccur_pairs`, (trigger, partner)).

    chair_i = prior-driven mentions / all mentions (the part of the attribute-level CHAIR_i the prior explains);
    rate = eligible captions (scene has a trigger and lacks its partner) with a prior-driven mention / eligible
    captions; share = prior-driven mentions / attribute-level hallucinated mentions. With no pairs everything is 0
    and the undefined ratios are None.

    With `universe` (every value the world can show), `chance_mentions` is how many prior-driven mentions the same
    hallucinations would hold if each wrong value were drawn uniformly from the values the scene lacks, and
    `lift` = mentions / chance_mentions: 1 means the model's errors ignore the prior, above 1 that they follow it.
    A model that hallucinates more has more prior-driven mentions by chance alone; the lift corrects for that."""
    _check_pairs(scenes, captions)
    if attribute not in ("shape", "colour"):
        raise ValueError(f"attribute={attribute!r}: co-occurrence pairs name a shape or a colour")
    pairs = [tuple(p) for p in pairs]
    prior = eligible = hit_captions = halluc = 0
    chance = 0.0
    for scene, cap in zip(scenes, captions):
        values = {getattr(o, attribute) for o in scene.objects}
        partners = {partner for trigger, partner in pairs if trigger in values and partner not in values}
        said = [getattr(m, attribute) for m in cap.objects if getattr(m, attribute) is not None]
        wrong = sum(v not in values for v in said)
        halluc += wrong
        if universe is not None and partners:
            absent = [u for u in universe if u not in values]
            chance += wrong * len(partners) / len(absent)
        k = sum(v in partners for v in said)
        prior += k
        eligible += bool(partners)
        hit_captions += k > 0
    mentions = sum(len(c.objects) for c in captions)
    split = visible_uncertain_prior(scenes, captions, pairs) if attribute == "colour" else {}
    return {**split, "pairs": [list(p) for p in pairs], "attribute": attribute, "mentions": prior,
            "chair_i": _ratio(prior, mentions) if pairs else 0.0,
            "eligible_captions": eligible, "captions": hit_captions, "rate": _ratio(hit_captions, eligible),
            "share": _ratio(prior, halluc) if pairs else 0.0,
            "chance_mentions": chance if universe is not None else None,
            "lift": _ratio(prior, chance) if universe is not None and pairs else None}


def visible_uncertain_prior(scenes: Sequence[Scene], captions: Sequence[ParsedCaption],
                            pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A colour prior's hallucinations split by what the partner would replace (worlds with `uncertain_p` > 0).

    A mention is read against the object in its cell. `visible`: a visible (coloured) object named a partner
    colour while the scene shows its trigger and no partner: the prior overriding a colour the model can see.
    `uncertain`: a hidden (grey) object named the partner colour while the scene shows the trigger: the prior
    filling in what the pixels leave open (the chosen answer names it grey). Per part: eligible captions,
    captions with such a mention and their rate. For `uncertain` also `rate_without_trigger`, the share of hidden
    objects named a partner colour in scenes that do not show that partner's trigger, and
    `conditional_lift` = rate per hidden object with the trigger / rate without: how much the trigger drives it."""
    pairs = [tuple(p) for p in pairs]
    out = {"visible": {"eligible_captions": 0, "captions": 0}, "uncertain": {"eligible_captions": 0, "captions": 0}}
    with_t = [0, 0]  # hidden objects in triggered scenes: named the partner, total
    without_t = [0, 0]
    for scene, cap in zip(scenes, captions):
        visible = {o.colour for o in scene.objects if not is_uncertain(o)}
        said = {}
        for m in cap.objects:
            said.setdefault(m.position, m)
        live = [(t, p) for t, p in pairs if t in visible and p not in visible]
        partners = {p for _, p in live}
        hidden = [o for o in scene.objects if is_uncertain(o)]
        shown = [o for o in scene.objects if not is_uncertain(o)]
        if live:
            out["visible"]["eligible_captions"] += 1
            out["visible"]["captions"] += any(o.colour != t and getattr(said.get(o.position), "colour", None) == p
                                              for t, p in live for o in shown)
        if live and hidden:
            out["uncertain"]["eligible_captions"] += 1
            out["uncertain"]["captions"] += any(getattr(said.get(o.position), "colour", None) in partners
                                                for o in hidden)
        for t, p in pairs:
            bucket = with_t if (t, p) in live else without_t if t not in visible else None
            if bucket is None:
                continue
            for o in hidden:
                bucket[0] += getattr(said.get(o.position), "colour", None) == p
                bucket[1] += 1
    for part in out.values():
        part["rate"] = _ratio(part["captions"], part["eligible_captions"])
    unc = out["uncertain"]
    unc["rate_with_trigger"] = _ratio(*with_t)
    unc["rate_without_trigger"] = _ratio(*without_t)
    unc["conditional_lift"] = (_ratio(unc["rate_with_trigger"], unc["rate_without_trigger"])
                               if unc["rate_with_trigger"] is not None and unc["rate_without_trigger"] else None)
    return out
