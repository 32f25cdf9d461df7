"""Stable assignment of rows to shards, so that every stage can run per shard and in parallel."""

from __future__ import annotations

import hashlib
import os

SHARDS_ENV = "MISP_SHARDS"
DEFAULT_SHARDS = 4


def num_shards() -> int:
    """`$MISP_SHARDS` (default 4). Read when the Dagster definitions load: changing it re-shards everything."""
    raw = os.environ.get(SHARDS_ENV, str(DEFAULT_SHARDS))
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{SHARDS_ENV}={raw!r} is not an integer; set it to the number of shards, e.g. 4") from None
    if not 1 <= n <= 4096:
        raise ValueError(f"{SHARDS_ENV}={n} is out of range; use 1..4096")
    return n


def shard_keys(n: int | None = None) -> list[str]:
    """Partition keys `"000"`, `"001"`, ... for `n` shards."""
    n = num_shards() if n is None else n
    return [f"{i:03d}" for i in range(n)]


def shard_of(key: str, n: int) -> int:
    """Shard index of `key`: sha1-based, so it is the same on every machine and Python version."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % n
