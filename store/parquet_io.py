"""Atomic Parquet writes with provenance metadata, so that a file that exists is complete and self-describing."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import polars as pl
import pyarrow.parquet as pq

from store import SCHEMA_VERSION

META_PREFIX = "misp."


def write_parquet_atomic(df: pl.DataFrame, path: Path, metadata: Mapping[str, object] | None = None) -> Path:
    """Write `df` to `path` (zstd) through a temp file in the same folder and `os.replace`.

    `metadata` values are JSON-encoded into the file's key-value metadata under `misp.<key>`; the schema
    version is always recorded. A crash mid-write leaves the previous file (or none), never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = df.to_arrow()
    kv = {f"{META_PREFIX}schema_version": json.dumps(SCHEMA_VERSION)}
    for key, value in (metadata or {}).items():
        kv[f"{META_PREFIX}{key}"] = json.dumps(value)
    existing = table.schema.metadata or {}
    table = table.replace_schema_metadata({**existing, **{k.encode(): v.encode() for k, v in kv.items()}})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: Path) -> dict[str, object]:
    """The `misp.*` key-value metadata of a Parquet file, JSON-decoded, without the prefix."""
    raw = pq.read_schema(path).metadata or {}
    out: dict[str, object] = {}
    for k, v in raw.items():
        key = k.decode()
        if key.startswith(META_PREFIX):
            out[key[len(META_PREFIX):]] = json.loads(v.decode())
    return out


def is_current(path: Path, fingerprint: str) -> bool:
    """True when `path` exists and was written from inputs with this fingerprint (the work can be skipped)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        return read_metadata(path).get("fingerprint") == fingerprint
    except Exception:  # unreadable file: treat as stale and rewrite it
        return False


def write_bytes_atomic(data: bytes, path: Path) -> Path:
    """Write bytes atomically (JSON reports, PNGs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(obj: object, path: Path) -> Path:
    return write_bytes_atomic((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), path)


def read_pair_if_current(rows_path: Path, quarantine_path: Path, fingerprint: str):
    """(rows, quarantine) when both files were written from inputs with this fingerprint, else None."""
    if is_current(rows_path, fingerprint) and is_current(quarantine_path, fingerprint):
        return pl.read_parquet(rows_path), pl.read_parquet(quarantine_path)
    return None


def write_pair(rows: pl.DataFrame, quarantine: pl.DataFrame, rows_path: Path, quarantine_path: Path,
               metadata: Mapping[str, object]) -> None:
    """A table and its quarantine, quarantine first: a rows file that exists always has its quarantine beside it."""
    write_parquet_atomic(quarantine, quarantine_path, metadata)
    write_parquet_atomic(rows, rows_path, metadata)
