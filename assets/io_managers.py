"""IO managers: assets return their outputs and take their inputs as `ins`; these write and read them at the
paths of `assets.layout`, so no asset re-derives another's path.

- `ParquetIOManager` (tables): an asset returns a `Table` (rows, optional quarantine, provenance); the IO manager
  writes the quarantine, then the rows, atomically (`store.parquet_io`), with the provenance in the Parquet
  key-value metadata (`misp.fingerprint`, ...). A downstream asset receives a `Table` (rows + provenance) for one
  partition, or `{partition key: Table}` for several.
- `ModelFolderIOManager` (models, index): an asset returns an object with `fingerprint` and `save(folder)`; the IO
  manager saves it into a fresh sibling folder, stamps `fingerprint.txt` there and swaps it in, so a folder under
  its final name is always whole. A downstream asset receives the folder's `Path`.
- `JsonIOManager` (manifests): an asset returns a dict; it is written atomically as indented JSON.

Writing is skipped when what is on disk already carries the output's fingerprint: an asset that found its output
current (same inputs and config) returns it as is and nothing is rewritten (mtimes and checksums stay).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import dagster as dg
import polars as pl

from assets import layout
from store.parquet_io import is_current, read_metadata, write_json_atomic, write_parquet_atomic

FINGERPRINT_FILE = "fingerprint.txt"
"""Stamp of a model folder, written last inside the staged folder (`.txt`: not part of a CLIP's checkpoint hash)."""


class Table(NamedTuple):
    """A per-shard table with what it was made from."""

    rows: pl.DataFrame
    quarantine: pl.DataFrame | None = None
    """Rows refused with a reason (ingest, embeddings); written before `rows` so that rows never lack it."""
    provenance: dict[str, Any] = {}
    """Parquet key-value metadata; `fingerprint` (inputs + config + code version) decides reuse, `content` (when
    set) is the fingerprint of the rows themselves."""

    @property
    def fingerprint(self) -> str | None:
        return self.provenance.get("fingerprint")

    @property
    def data_version(self) -> dg.DataVersion:
        """What Dagster compares for staleness: the rows' content when known, else the inputs' fingerprint."""
        return dg.DataVersion(str(self.provenance.get("content") or self.provenance["fingerprint"]))


def read_table(path: Path, quarantine: Path | None = None) -> Table:
    return Table(pl.read_parquet(path), pl.read_parquet(quarantine) if quarantine and quarantine.exists() else None,
                 read_metadata(path))


def current_table(rows_path: Path, quarantine_path: Path | None, fingerprint: str) -> Table | None:
    """The stored table (with its quarantine) when it was written from inputs with this fingerprint, else None."""
    if is_current(rows_path, fingerprint) and (quarantine_path is None or is_current(quarantine_path, fingerprint)):
        return read_table(rows_path, quarantine_path)
    return None


def _same_provenance(path: Path | None, provenance: dict[str, Any]) -> bool:
    if path is None:
        return True
    try:
        stored = read_metadata(path)
    except Exception:  # missing or unreadable: write it
        return False
    # The schema version is written with every file (store.parquet_io), whether or not the provenance carries it
    # (a table read back does). Compared as JSON text: a NaN (an undefined diversity) equals itself there.
    stored.pop("schema_version", None)
    wanted = {k: v for k, v in provenance.items() if k != "schema_version"}
    return json.dumps(stored, sort_keys=True) == json.dumps(json.loads(json.dumps(wanted)), sort_keys=True)


def write_table(table: Table, rows_path: Path, quarantine_path: Path | None) -> bool:
    """Quarantine first, then rows; nothing is written when both already carry the table's provenance (its
    fingerprint and, where set, its content fingerprints: an ingest whose manifest is unchanged but whose image
    files changed has the same `fingerprint` and new rows). Returns whether anything was written."""
    if table.fingerprint is None:
        raise ValueError("a Table's provenance needs a `fingerprint` (inputs + config), the key of reuse")
    if table.quarantine is not None and quarantine_path is None:
        raise ValueError(f"a quarantine was returned for {rows_path} but its layout has no quarantine folder")
    if _same_provenance(rows_path, table.provenance) and \
            _same_provenance(quarantine_path if table.quarantine is not None else None, table.provenance):
        return False
    if table.quarantine is not None:
        write_parquet_atomic(table.quarantine, quarantine_path, table.provenance)
    write_parquet_atomic(table.rows, rows_path, table.provenance)
    return True


def _keys(context) -> list[str] | None:
    return list(context.asset_partition_keys) if context.has_asset_partitions else None


ALL_SHARDS = {"all_shards": True}
"""`AssetIn(metadata=ALL_SHARDS)`: the input is every shard as `{partition key: Table}`, even if there is one."""


class ParquetIOManager(dg.IOManager):
    """Per-shard tables as `<data root>/<folder>/shard=NNN.parquet` (assets.layout.TABLES)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _paths(self, asset: str, key: str) -> tuple[Path, Path | None]:
        return layout.table_file(self.root, asset, key), layout.quarantine_file(self.root, asset, key)

    def handle_output(self, context: dg.OutputContext, obj: Table) -> None:
        if not isinstance(obj, Table):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}; table assets "
                            "return assets.io_managers.Table")
        write_table(obj, *self._paths(context.asset_key.path[-1], context.asset_partition_key))

    def load_input(self, context: dg.InputContext) -> Table | dict[str, Table]:
        asset = context.asset_key.path[-1]
        keys = _keys(context)
        if not keys:
            raise ValueError(f"{asset} is partitioned per shard; load it for a partition")

        def load(key: str) -> Table:
            rows, _ = self._paths(asset, key)
            if not rows.exists():
                raise FileNotFoundError(f"{rows} is missing: materialise {asset} for partition {key} first "
                                        "(`make mine` does)")
            return Table(pl.read_parquet(rows), None, read_metadata(rows))

        if (context.definition_metadata or {}).get("all_shards"):
            return {k: load(k) for k in keys}
        if len(keys) != 1:
            raise ValueError(f"{asset}: {len(keys)} partitions for one input; declare it with "
                             "AssetIn(metadata=ALL_SHARDS) to receive them all")
        return load(keys[0])


class Saveable(Protocol):
    fingerprint: str

    def save(self, folder: Path) -> None: ...


def folder_fingerprint(folder: Path) -> str | None:
    try:
        return (Path(folder) / FINGERPRINT_FILE).read_text().strip() or None
    except OSError:
        return None


def save_folder(obj: Saveable, target: Path) -> bool:
    """Save into a fresh sibling folder, stamp it, swap it in (the old one is removed after). Skipped when the
    folder already carries this fingerprint. Returns whether anything was written."""
    target = Path(target)
    if folder_fingerprint(target) == obj.fingerprint:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        obj.save(staged)
        (staged / FINGERPRINT_FILE).write_text(obj.fingerprint + "\n")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(staged, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    # What a killed earlier write left beside it (one writer per folder: these assets are not per shard).
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.is_dir() and leftover.suffix in (".tmp", ".old", ".staging"):
            shutil.rmtree(leftover, ignore_errors=True)
    return True


class ModelFolderIOManager(dg.IOManager):
    """Model and index folders (assets.layout.FOLDERS): safetensors + JSON, FAISS + Parquet."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def handle_output(self, context: dg.OutputContext, obj: Saveable) -> None:
        key = context.asset_partition_key if context.has_asset_partitions else None
        # An output may name another folder of the layout (a configured CLIP: `clip_model_configured`).
        save_folder(obj, layout.folder(self.root, getattr(obj, "layout_name", None) or context.asset_key.path[-1], key))

    def load_input(self, context: dg.InputContext) -> Path:
        keys = _keys(context)
        if keys is not None and len(keys) != 1:
            raise ValueError(f"{context.asset_key.to_user_string()}: one partition per input, got {keys}")
        path = layout.folder(self.root, context.asset_key.path[-1], keys[0] if keys else None)
        if folder_fingerprint(path) is None:
            raise FileNotFoundError(f"{path} is missing or incomplete: materialise "
                                    f"{context.asset_key.to_user_string()} first (`make mine` does)")
        return path


class JsonIOManager(dg.IOManager):
    """Manifests (`shards_manifest`: `<recipe dir>/manifest.json`)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def handle_output(self, context: dg.OutputContext, obj: dict) -> None:
        key = context.asset_partition_key if context.has_asset_partitions else None
        write_json_atomic(obj, layout.output_path(self.root, context.asset_key.path[-1], key))

    def load_input(self, context: dg.InputContext) -> dict:
        keys = _keys(context)
        path = layout.output_path(self.root, context.asset_key.path[-1], keys[0] if keys else None)
        return json.loads(Path(path).read_text())


# Bound to each asset (`io_manager_def=`) and rooted at the `data_root` resource, so that every caller that passes
# the three resources (tests, the CLI, the experiment) gets them without configuring anything.
@dg.io_manager(required_resource_keys={"data_root"})
def parquet_io(init_context) -> ParquetIOManager:
    return ParquetIOManager(init_context.resources.data_root.root())


@dg.io_manager(required_resource_keys={"data_root"})
def folder_io(init_context) -> ModelFolderIOManager:
    return ModelFolderIOManager(init_context.resources.data_root.root())


@dg.io_manager(required_resource_keys={"data_root"})
def json_io(init_context) -> JsonIOManager:
    return JsonIOManager(init_context.resources.data_root.root())


class StagedFolder(NamedTuple):
    """A folder already written elsewhere (a trainer that writes its own files), moved in by the IO manager; or,
    with `staged=None`, the folder already in place and current."""

    fingerprint: str
    staged: Path | None = None

    def save(self, folder: Path) -> None:
        if self.staged is None:
            raise ValueError(f"nothing staged for fingerprint {self.fingerprint}: the asset found its folder current "
                             "but it is not")
        for item in Path(self.staged).iterdir():
            shutil.move(str(item), str(Path(folder) / item.name))
        shutil.rmtree(self.staged, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    """A fresh empty folder beside `target` for a trainer to write into before the IO manager swaps it in."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
