"""Is an answer true of a scene, and if not, which one fact does it get wrong?

Used by the tests (every chosen answer is true, every rejected one is false in exactly its labelled way) and
by evaluation of generated answers. Works from text only: the prompt and answer are parsed with
`world.grammar`, so a model's answer is judged exactly like the world's own.
"""

from __future__ import annotations

from typing import NamedTuple

from world import grammar as g
from world import vocab
from world.scene import ObjectSpec, Scene


class Verdict(NamedTuple):
    true: bool
    """The answer states only facts of the scene (for yes/no: the right polarity)."""
    error_type: str | None
    """None when true; else one of the world's error types, `other` when the answer is wrong in a way that
    is not exactly one labelled fact (several changes, omissions, background), or `unparsed`."""
    detail: str
    """What differs, in words."""


_TRUE = Verdict(True, None, "")


def judge(scene: Scene, prompt: str, answer: str) -> Verdict:
    """Judge `answer` to the world prompt `prompt` against `scene`."""
    q = g.parse_prompt(prompt)
    if q.kind == "describe":
        return judge_caption(scene, answer)
    if q.kind == "count":
        n = g.parse_count(answer)
        if n is None:
            return Verdict(False, "unparsed", f"no number in {answer!r}")
        return _TRUE if n == len(scene.objects) else Verdict(False, "count", f"count: {len(scene.objects)}->{n}")
    if q.kind == "attribute":
        return _judge_attribute(scene, q, answer)
    if q.kind == "yesno":
        return _judge_yesno(scene, q.subject, answer)
    return Verdict(False, "unparsed", f"prompt {prompt!r} is not one of the world's templates")


def judge_caption(scene: Scene, text: str) -> Verdict:
    """A description is true when it is well-formed and names exactly the scene's objects and background."""
    parsed = g.parse_caption(text)
    if not parsed.objects or not all(o.is_complete for o in parsed.objects) \
            or len({o.position for o in parsed.objects}) != len(parsed.objects):
        return Verdict(False, "unparsed", "; ".join(parsed.issues) or "two objects in one cell")
    if parsed.background != scene.background:
        return Verdict(False, "other", f"background: {scene.background}->{parsed.background}")
    verdict = diff_objects(scene.objects, parsed.objects)
    if verdict.true and not parsed.well_formed:
        return Verdict(False, "unparsed", "; ".join(parsed.issues))
    return verdict


def diff_objects(truth: tuple[ObjectSpec, ...] | list[ObjectSpec], said: list[ObjectSpec]) -> Verdict:
    """Classify how complete object lists differ (cells are unique on both sides)."""
    S = {o.position: o for o in truth}
    A = {o.position: o for o in said}
    only_s = [p for p in S if p not in A]
    only_a = [p for p in A if p not in S]
    changed = [p for p in S if p in A and S[p] != A[p]]
    if not only_s and not only_a and not changed:
        return _TRUE
    if not only_s and not only_a and len(changed) == 1:
        s, a = S[changed[0]], A[changed[0]]
        fields = [f for f in ("shape", "colour", "size") if getattr(s, f) != getattr(a, f)]
        if len(fields) == 1:
            f = fields[0]
            etype = "object" if f == "shape" else "attribute"
            return Verdict(False, etype, f"{f}: {getattr(s, f)}->{getattr(a, f)} at the {s.position}")
    if not only_s and not only_a and len(changed) == 2:
        (s1, a1), (s2, a2) = [(S[p], A[p]) for p in changed]
        if s1.colour != s2.colour and (a1.colour, a2.colour) == (s2.colour, s1.colour) \
                and a1.with_(colour=s1.colour) == s1 and a2.with_(colour=s2.colour) == s2:
            return Verdict(False, "binding", f"binding: colours {s1.colour}<->{s2.colour}")
    if not only_s and not changed and len(only_a) == 1:
        extra = A[only_a[0]]
        if extra.kind in {o.kind for o in truth}:
            return Verdict(False, "count", f"count: an extra {extra.colour} {extra.shape} at the {extra.position}")
        return Verdict(False, "object", f"object: absent {extra.shape} at the {extra.position}")
    if not changed and len(only_s) == 1 and len(only_a) == 1 and S[only_s[0]].kind == A[only_a[0]].kind:
        return Verdict(False, "position", f"position: {only_s[0]}->{only_a[0]}")
    return Verdict(False, "other", f"missing {only_s}, invented {only_a}, changed {changed}")


def _judge_attribute(scene: Scene, q: g.Question, answer: str) -> Verdict:
    hits = scene.find(q.subject)
    if len(hits) != 1:
        return Verdict(False, "unparsed", f"the question's subject fits {len(hits)} objects, not one")
    obj = scene.objects[hits[0]]
    value = g.parse_attribute_answer(answer).value
    truth = getattr(obj, q.attribute)
    allowed = {"colour": vocab.COLOUR_WORDS, "size": vocab.SIZES, "position": vocab.CELL}[q.attribute]
    if value not in allowed:
        return Verdict(False, "unparsed", f"no {q.attribute} in {answer!r}")
    if value == truth:
        return _TRUE
    if q.attribute == "position":
        return Verdict(False, "position", f"position: {truth}->{value}")
    others = {o.colour for i, o in enumerate(scene.objects) if i != hits[0]}
    if q.attribute == "colour" and value in others:
        return Verdict(False, "binding", f"binding: {value} belongs to another object")
    return Verdict(False, "attribute", f"{q.attribute}: {truth}->{value}")


def _judge_yesno(scene: Scene, spec: ObjectSpec, answer: str) -> Verdict:
    yes = g.parse_yesno(answer).yes
    present = bool(scene.find(spec))
    if yes is None:
        return Verdict(False, "unparsed", f"neither yes nor no in {answer!r}")
    if yes == present:
        return _TRUE
    if not yes:
        return Verdict(False, "object", f"object: present {g.phrase(spec)} denied")
    # A false "yes": find the one attribute that, dropped from the question, would make it true.
    if spec.shape not in scene.shapes:
        return Verdict(False, "object", f"object: absent {spec.shape} claimed present")
    if spec.position is not None and scene.find(spec.with_(position=None)):
        return Verdict(False, "position", f"position: no {spec.colour} {spec.shape} at the {spec.position}")
    if spec.size is not None and scene.find(spec.with_(size=None)):
        return Verdict(False, "attribute", f"size: no {g.phrase(spec)}")
    if spec.colour is not None and scene.find(spec.with_(colour=None)):
        if spec.colour in scene.colours:
            return Verdict(False, "binding", f"binding: {spec.colour} belongs to another object")
        return Verdict(False, "attribute", f"colour: no {g.phrase(spec)}")
    return Verdict(False, "other", f"no {g.phrase(spec)}; several attributes differ")
