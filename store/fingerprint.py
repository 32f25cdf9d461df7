"""Content fingerprints: the keys that decide whether a stage's output is still current."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import polars as pl

from store.safe_files import open_regular


def sha256_file(path: Path, chunk: int = 1 << 20, *, what: str = "file") -> str:
    """sha256 of a regular file's bytes. A FIFO or a device (`/dev/zero`, or a symlink to it) raises
    `NotRegularFileError` instead of blocking or hashing forever; reading stops at the size the file had when
    opened."""
    h = hashlib.sha256()
    with open_regular(path, what=what) as fh:
        left = os.fstat(fh.fileno()).st_size
        while left > 0 and (block := fh.read(min(chunk, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def fingerprint(*parts: object) -> str:
    """A short, stable hash of JSON-serialisable parts (configs, other fingerprints, file lists)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def text_id(text: str) -> str:
    """Identifier of a piece of text (prompts are deduplicated by it)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def frame_fingerprint(df: pl.DataFrame, columns: Iterable[str]) -> str:
    """Fingerprint of the values of `columns` of `df`, in row order: what a stage that reads only those columns
    depends on (the embedding of positives does not depend on `chosen`)."""
    h = hashlib.sha256()
    for name in columns:
        h.update(json.dumps([name, str(df.schema[name])]).encode())
        for value in df[name].to_list():
            h.update(json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8", "backslashreplace"))
            h.update(b"\x1e")
    return h.hexdigest()[:16]
