"""Words of a caption, singularised against a known vocabulary: the light NLP that AMBER's and CHAIR's scorers need.

    words("Two dogs chase the buses.")                     # ['two', 'dogs', 'chase', 'the', 'buses']
    singular("buses", {"bus", "dog"})                       # 'bus'
    vocabulary_words("Two dogs chase the buses.", {"bus", "dog"})   # ['dog', 'bus']

The reference scorers tokenize with nltk and lemmatise with WordNet (AMBER) or `pattern.en.singularize` (CHAIR),
which need data downloads at run time. Here a word is singularised only *towards a vocabulary*: the word itself
when the vocabulary has it (`glass`, `bus`, `people`, `sunglasses`), else the first of a few rule-based singular
forms (irregulars such as `men` -> `man`; `-ies` -> `-y`; `-ves` -> `-f` / `-fe`; `-es`; `-s`) that the vocabulary
has, else the word unchanged. Since both scorers only ever count vocabulary words, a singular form that is not in
the vocabulary would be dropped anyway; what this cannot do is WordNet's part-of-speech filtering (AMBER keeps
nouns only: `watch` the verb counts here), see docs/eval.md.
"""

from __future__ import annotations

import re
from typing import Collection, Iterable

WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
             "teeth": "tooth", "mice": "mouse", "geese": "goose", "oxen": "ox", "dice": "die", "knives": "knife",
             "wives": "wife", "leaves": "leaf", "shelves": "shelf", "halves": "half", "loaves": "loaf",
             "calves": "calf", "wolves": "wolf", "scarves": "scarf", "lives": "life", "cacti": "cactus"}
"""Plurals no suffix rule recovers (the vocabulary still decides: `people` stays `people` where it is a word)."""


def words(text: str) -> list[str]:
    """Lower-case words (letters, inner hyphens kept: `air-conditioning`); punctuation and digits split them."""
    return WORD.findall(text.lower())


def singular_forms(word: str) -> list[str]:
    """Candidate singulars of `word`, most specific first (the word itself not included)."""
    out = []
    if word in IRREGULAR:
        out.append(IRREGULAR[word])
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 4:
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


def singular(word: str, known: Collection[str]) -> str:
    """`word` if `known` has it, else its first singular form that `known` has, else `word` unchanged."""
    if word in known:
        return word
    return next((s for s in singular_forms(word) if s in known), word)


def vocabulary_words(text: str, known: Collection[str]) -> list[str]:
    """The words of `text` (singularised towards `known`) that are in `known`, in order, repeats kept."""
    return [w for w in (singular(t, known) for t in words(text)) if w in known]


def singularised(text: str, known: Collection[str]) -> list[str]:
    """Every word of `text`, each singularised towards `known` (words outside it unchanged)."""
    return [singular(t, known) for t in words(text)]


def vocabulary(entries: Iterable[str]) -> set[str]:
    """Every single word of the (possibly multi-word) `entries`: what `singular` may map a token to."""
    return {w for e in entries for w in e.split()}
