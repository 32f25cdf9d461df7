"""Content fingerprints: the keys that decide whether a stage's output is still current."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(*parts: object) -> str:
    """A short, stable hash of JSON-serialisable parts (configs, other fingerprints, file lists)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_files(paths: Iterable[Path]) -> str:
    """Fingerprint of several files' contents, in the order given."""
    return fingerprint([sha256_file(Path(p)) for p in paths])


def text_id(text: str) -> str:
    """Identifier of a piece of text (prompts are deduplicated by it)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
