"""Where artifacts live. Every stage writes under one data root so that a user can move or delete it whole."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "MISP_DATA_ROOT"

_last: Path | None = None


def data_root(override: str | os.PathLike | None = None) -> Path:
    """The data root: `override`, else `$MISP_DATA_ROOT`, else `./data`. Created if missing."""
    root = Path(override or os.environ.get(DATA_ROOT_ENV) or "data").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    global _last
    _last = root
    return root


def last_data_root() -> Path | None:
    """The root the last `data_root()` call of this process returned: where readers that only have an image
    path (the trainer, eval) look up what ingest recorded about it (`store.safe_image.open_ingested`)."""
    return _last


def shard_file(folder: Path, shard: str, prefix: str = "shard=") -> Path:
    """`<folder>/shard=NNN.parquet` — the file of one shard partition."""
    return folder / f"{prefix}{shard}.parquet"
