"""The world's one grammar: captions, prompts and answers as text, and their parsers.

Canonical caption (objects in reading order of their cells, then the context):
    a large red circle at the top left, a small blue square in the centre and an orange cross on the right
    on a dark background
Object phrase: `a|an SIZE COLOUR SHAPE PREP the POSITION`, PREP = `on` for left/right, `in` for centre, `at` else.
Objects are joined by ", " and a final " and "; the background clause `on a BG background` closes the caption.

The parsers are lenient because they also read what a model generated (CHAIR-style scoring): they recover
every object mention they can, and report `well_formed=False` with the reasons instead of raising.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from world import vocab
from world.scene import ObjectSpec, Scene

DESCRIBE_PROMPT = "Describe the image."
COUNT_PROMPT = "How many objects are there?"
ATTRIBUTE_QUESTION = {
    "colour": "What colour is the {}?", "size": "What size is the {}?", "position": "Where is the {}?",
}

_ARTICLES = {"a", "an", "the", "one"}
_SEPARATORS = {",", "and", ".", ";"}
_PREPOSITIONS = {"at", "on", "in"}
_PLURALS = {s + ("es" if s.endswith(("s", "x", "ss")) else "s"): s for s in vocab.SHAPES}


# ---------------------------------------------------------------------------------------------- writing text
def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def position_phrase(position: str) -> str:
    """`at the top left`, `on the left`, `in the centre`."""
    return f"{vocab.PREPOSITION[position]} the {position}"


def phrase(spec: ObjectSpec) -> str:
    """The words of an object or a partial spec, without article: `large red circle at the top left`."""
    words = [w for w in (spec.size, spec.colour, spec.shape) if w is not None]
    if spec.position is not None:
        words.append(position_phrase(spec.position))
    return " ".join(words)


def caption(scene: Scene) -> str:
    """The canonical caption: every object with all four attributes, in reading order, then the context."""
    parts = [with_article(phrase(o)) for o in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on {with_article(scene.background)} background"


def count_answer(n: int) -> str:
    word = vocab.NUMBER_WORDS[n] if 0 <= n < len(vocab.NUMBER_WORDS) else str(n)
    return "There is one object." if n == 1 else f"There are {word} objects."


def attribute_prompt(attribute: str, subject: ObjectSpec) -> str:
    return ATTRIBUTE_QUESTION[attribute].format(phrase(subject))


def attribute_answer(attribute: str, subject: ObjectSpec, value: str) -> str:
    said = position_phrase(value) if attribute == "position" else value
    return f"The {phrase(subject)} is {said}."


def yesno_prompt(spec: ObjectSpec) -> str:
    return f"Is there {with_article(phrase(spec))}?"


def yesno_answer(yes: bool, spec: ObjectSpec) -> str:
    return f"Yes, there is {with_article(phrase(spec))}." if yes else f"No, there is no {phrase(spec)}."


# ---------------------------------------------------------------------------------------------- reading text
def tokens(text: str) -> list[str]:
    """Lower-case words and punctuation, with spelling variants mapped to the vocabulary."""
    return [vocab.SYNONYMS.get(t, t) for t in re.findall(r"[a-z]+|[0-9]+|[,.;?!]", text.lower())]


def _match_position(toks: list[str], i: int) -> tuple[str, int] | None:
    """`PREP [the] POSITION` at toks[i]; the two-word cells are tried first so `top left` is not read as `top`."""
    if i >= len(toks) or toks[i] not in _PREPOSITIONS:
        return None
    j = i + 1 + (i + 1 < len(toks) and toks[i + 1] == "the")
    if j + 1 < len(toks) and f"{toks[j]} {toks[j + 1]}" in vocab.CELL:
        return f"{toks[j]} {toks[j + 1]}", j + 2
    if j < len(toks) and toks[j] in vocab.CELL:
        return toks[j], j + 1
    return None


def _match_object(toks: list[str], i: int) -> tuple[ObjectSpec, int, list[str]] | None:
    """`[article] [SIZE] [COLOUR] SHAPE [PREP the POSITION]` at toks[i], modifiers in either order.
    Returns the (possibly partial) spec, the index after it, and what was irregular; None if no shape."""
    j, issues = i, []
    if j < len(toks) and toks[j] in _ARTICLES:
        j += 1
    size = colour = None
    while j < len(toks) and (toks[j] in vocab.SIZES or toks[j] in vocab.COLOUR_WORDS):
        slot = "size" if toks[j] in vocab.SIZES else "colour"
        if (size if slot == "size" else colour) is not None:
            issues.append(f"second {slot} {toks[j]!r} in one mention")
        elif slot == "size":
            size = toks[j]
        else:
            colour = toks[j]
        j += 1
    if j >= len(toks):
        return None
    if toks[j] in vocab.SHAPES:
        shape = toks[j]
    elif toks[j] in _PLURALS:
        shape = _PLURALS[toks[j]]
        issues.append(f"plural {toks[j]!r}")
    else:
        return None
    j += 1
    position = None
    hit = _match_position(toks, j)
    if hit is not None:
        position, j = hit
    return ObjectSpec(shape, colour, size, position), j, issues


def _match_background(toks: list[str], i: int) -> tuple[str, int] | None:
    """`[on|in|against] [a|an|the] BG background` at toks[i]."""
    j = i + (i < len(toks) and toks[i] in {"on", "in", "against"})
    j += j < len(toks) and toks[j] in _ARTICLES
    if j + 1 < len(toks) and toks[j] in vocab.BACKGROUNDS and toks[j + 1] == "background":
        return toks[j], j + 2
    return None


class ParsedCaption(NamedTuple):
    objects: list[ObjectSpec]
    """Every object mention recovered, in text order; fields the text left out are None."""
    background: str | None
    """The context named by `on a BG background`, or None."""
    well_formed: bool
    """True when the text follows the caption grammar exactly (modulo spelling variants and separators)."""
    issues: list[str]
    """Why it is not well-formed (empty when it is)."""


def parse_caption(text: str) -> ParsedCaption:
    """Read a caption back into object mentions and a background. Never raises on odd text."""
    toks = tokens(text)
    objects: list[ObjectSpec] = []
    background: str | None = None
    issues: list[str] = []
    after_object = False  # an object just ended, so the next object needs a separator first
    i = 0
    while i < len(toks):
        if toks[i] in _SEPARATORS:
            after_object = False
            i += 1
            continue
        bg = _match_background(toks, i)
        if bg is not None:
            if background is not None:
                issues.append(f"second background {bg[0]!r}")
            else:
                background = bg[0]
            i = bg[1]
            continue
        obj = _match_object(toks, i)
        if obj is not None:
            spec, i, obj_issues = obj
            issues.extend(obj_issues)
            if after_object:
                issues.append(f"no separator before the {spec.shape}")
            if background is not None:
                issues.append(f"the {spec.shape} comes after the background clause")
            if not spec.is_complete:
                missing = [f for f in ("size", "colour", "position") if getattr(spec, f) is None]
                issues.append(f"the {spec.shape} lacks {', '.join(missing)}")
            objects.append(spec)
            after_object = True
            continue
        issues.append(f"unexpected word {toks[i]!r}")
        i += 1
    if not objects:
        issues.append("no object mentioned")
    if background is None:
        issues.append("no background clause")
    return ParsedCaption(objects, background, not issues, issues)


def parse_subject(text: str) -> ObjectSpec | None:
    """A partial spec from a bare phrase (`red square at the top`); None unless the whole text is one phrase."""
    toks = [t for t in tokens(text) if t not in {".", "?", "!"}]
    hit = _match_object(toks, 0)
    return hit[0] if hit is not None and hit[1] == len(toks) and not hit[2] else None


class Question(NamedTuple):
    kind: str
    """`describe`, `count`, `attribute`, `yesno`, or `unknown` for text outside the world's templates."""
    attribute: str | None = None
    """For `attribute` questions: `colour`, `size` or `position`."""
    subject: ObjectSpec | None = None
    """The object asked about (attribute) or whose presence is asked (yesno), as a partial spec."""


_QUESTION_RES = (
    (re.compile(r"^what colou?r is the (.+?)\??$"), "colour"),
    (re.compile(r"^what size is the (.+?)\??$"), "size"),
    (re.compile(r"^where is the (.+?)\??$"), "position"),
)


def parse_prompt(text: str) -> Question:
    t = " ".join(text.lower().split())
    if "describe" in t:
        return Question("describe")
    if t.startswith("how many"):
        return Question("count")
    for pattern, attribute in _QUESTION_RES:
        m = pattern.match(t)
        if m:
            subject = parse_subject(m.group(1))
            return Question("attribute", attribute, subject) if subject else Question("unknown")
    m = re.match(r"^is there (?:a |an )?(.+?)\??$", t)
    if m:
        subject = parse_subject(m.group(1))
        return Question("yesno", None, subject) if subject else Question("unknown")
    return Question("unknown")


def parse_count(text: str) -> int | None:
    """The first number in an answer (`There are three objects.` -> 3)."""
    for t in tokens(text):
        if t in vocab.NUMBER_WORDS:
            return vocab.NUMBER_WORDS.index(t)
        if t.isdigit():
            return int(t)
    return None


class AttributeAnswer(NamedTuple):
    subject: ObjectSpec | None
    """Who the answer talks about (`The red square is ...`)."""
    value: str | None
    """The colour, size or cell it gives; None if none could be read."""


def parse_attribute_answer(text: str) -> AttributeAnswer:
    toks = [t for t in tokens(text) if t not in {".", "!"}]
    hit = _match_object(toks, 0)
    subject, j = (hit[0], hit[1]) if hit else (None, 0)
    # The value is whatever follows the first "is": a colour, a size or a position phrase.
    rest = toks[toks.index("is", j) + 1:] if "is" in toks[j:] else toks[j:]
    pos = _match_position(rest, 0)
    if pos is not None:
        return AttributeAnswer(subject, pos[0])
    words = [t for t in rest if t in vocab.COLOUR_WORDS or t in vocab.SIZES]
    return AttributeAnswer(subject, words[0] if words else None)


class YesNoAnswer(NamedTuple):
    yes: bool | None
    """True for yes, False for no, None when the answer says neither."""
    subject: ObjectSpec | None
    """The phrase the answer repeats, if any."""


def parse_yesno(text: str) -> YesNoAnswer:
    toks = tokens(text)
    yes = next((t == "yes" for t in toks if t in {"yes", "no"}), None)
    rest = toks[toks.index("is") + 1:] if "is" in toks else []
    rest = rest[1:] if rest[:1] == ["no"] else rest
    hit = _match_object(rest, 0)
    return YesNoAnswer(yes, hit[0] if hit else None)
