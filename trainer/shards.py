"""Reading mined preference shards for training: checksums first, then a table of examples (docs/shards.md)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from store.fingerprint import sha256_file


class CorruptShardError(ValueError):
    """A shard file whose bytes do not match the checksum recorded in manifest.json."""


def read_manifest(shards_dir: Path) -> dict:
    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `make mine` (or point `shards` at a folder written by it)")
    return json.loads(path.read_text())


def load_shards(shards_dir: Path, *, verify: bool = True, limit: int | None = None) -> pl.DataFrame:
    """All examples of the shards listed in manifest.json, in manifest order. With `verify`, every file's sha256
    must match the manifest: a truncated or corrupted shard is named instead of being half-read."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    frames = []
    for entry in manifest["shards"]:
        path = shards_dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in manifest.json is missing; rerun `make mine`")
        if verify and sha256_file(path) != entry["sha256"]:
            raise CorruptShardError(f"shard {path} does not match its checksum in manifest.json (truncated or "
                                    "modified); delete it and rerun `make mine` to rebuild it")
        frames.append(pl.read_parquet(path))
    if not frames:
        raise ValueError(f"manifest {shards_dir / 'manifest.json'} lists no shards")
    table = pl.concat(frames, how="vertical_relaxed")
    return table.head(limit) if limit else table
