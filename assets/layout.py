"""Where every asset's output lives under the data root: the one place that maps (asset, partition) to a path.
The IO managers write and read there; the trainer, eval and the summary read the same paths (docs/mining.md,
"Where the artifacts live"). The default recipe keeps the historical paths (`shards/`, `models/sae/`)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from assets.recipes import DEFAULT_RECIPE, DEFAULT_SPACE


class TableLayout(NamedTuple):
    folder: str
    """Folder of the `shard=NNN.parquet` files, relative to the data root."""
    quarantine: tuple[str, str] | None = None
    """(folder, file prefix) of the quarantine tables beside it, or None."""


TABLES: dict[str, TableLayout] = {
    "pool_images": TableLayout("ingest/pool", ("ingest/quarantine", "pool-shard=")),
    "preference_examples": TableLayout("ingest/examples", ("ingest/quarantine", "examples-shard=")),
    "pool_embeddings": TableLayout("embeddings/pool", ("embeddings/quarantine", "pool-shard=")),
    "positive_embeddings": TableLayout("embeddings/positives", ("embeddings/quarantine", "positives-shard=")),
    "prompt_embeddings": TableLayout("embeddings/prompts", ("embeddings/quarantine", "prompts-shard=")),
    "candidates": TableLayout("mining/candidates"),
    "preference_shards": TableLayout("shards"),  # per recipe: see recipe_dir
}
"""Per-shard Parquet tables (one file per partition)."""

IMAGE_STORE = "ingest/images"
"""Images that arrive inside a manifest (bytes columns), written once by content hash."""

FOLDERS: dict[str, str] = {"clip_model": "models/clip", "pool_index": "index", "sae": "models/sae",
                           "clip_model_configured": "models/clip-configured"}
"""Model and index folders (safetensors + JSON, FAISS + Parquet); `sae` per space: see sae_dir. With a CLIP
configured (MISP_CLIP_MODEL) `clip_model` stamps `models/clip-configured/` instead, so that a world CLIP trained
earlier in `models/clip` is kept."""


def split_key(key: str | None) -> tuple[str | None, str | None]:
    """(recipe, shard) of a partition key of the shard assets: `greedy|000` (a recipe x shard multi-partition;
    Dagster orders dimensions by name) or a plain shard key `000`."""
    if key is None:
        return None, None
    if "|" in key:
        recipe_name, shard = str(key).split("|", 1)
        return recipe_name, shard
    return None, str(key)


def recipe_dir(root: Path, recipe_name: str = DEFAULT_RECIPE) -> Path:
    """Folder of one recipe's shards and manifest: `<root>/shards` for the default recipe (what `make train`
    reads), `<root>/shards/recipes/<name>` for the others."""
    return Path(root) / "shards" if recipe_name == DEFAULT_RECIPE else Path(root) / "shards" / "recipes" / recipe_name


def sae_dir(root: Path, space: str = DEFAULT_SPACE) -> Path:
    """The SAE of one space: `<root>/models/sae` (fused, the default), `<root>/models/sae-<space>` otherwise."""
    return Path(root) / FOLDERS["sae"] if space == DEFAULT_SPACE else Path(root) / f"{FOLDERS['sae']}-{space}"


def table_file(root: Path, asset: str, key: str) -> Path:
    if asset not in TABLES:
        raise KeyError(f"{asset!r} is not a table asset; tables: {sorted(TABLES)}")
    recipe_name, shard = split_key(key)
    folder = recipe_dir(root, recipe_name or DEFAULT_RECIPE) if asset == "preference_shards" \
        else Path(root) / TABLES[asset].folder
    return folder / f"shard={shard}.parquet"


def quarantine_file(root: Path, asset: str, key: str) -> Path | None:
    q = TABLES[asset].quarantine
    return None if q is None else Path(root) / q[0] / f"{q[1]}{split_key(key)[1]}.parquet"


def folder(root: Path, asset: str, key: str | None = None) -> Path:
    if asset == "sae":
        return sae_dir(root, key or DEFAULT_SPACE)
    return Path(root) / FOLDERS[asset]


def manifest_file(root: Path, recipe_name: str = DEFAULT_RECIPE) -> Path:
    return recipe_dir(root, recipe_name) / "manifest.json"


def contact_sheet_file(root: Path, key: str) -> Path:
    recipe_name, shard = split_key(key)
    return recipe_dir(root, recipe_name or DEFAULT_RECIPE) / f"contact_sheet-shard={shard}.png"


def output_path(root: Path, asset: str, key: str | None) -> Path | None:
    """The file or folder that holds `asset`'s output for partition `key` (None: the asset has no stored output,
    e.g. `source_data`, whose files are the source's own)."""
    if asset in TABLES:
        return table_file(root, asset, key)
    if asset in FOLDERS:
        return folder(root, asset, key)
    if asset == "shards_manifest":
        return manifest_file(root, key or DEFAULT_RECIPE)
    if asset == "mining_recipe":
        return recipe_dir(root, key or DEFAULT_RECIPE) / "recipe.json"
    return None


def on_disk(root: Path, asset: str, key: str | None) -> bool:
    """Whether the output of (asset, partition) exists under the root (a deleted file makes a partition missing
    whatever the instance remembers)."""
    path = output_path(root, asset, key)
    if path is None:
        return True
    if asset in FOLDERS:
        from assets.io_managers import folder_fingerprint

        alternatives = [path] + ([Path(root) / FOLDERS["clip_model_configured"]] if asset == "clip_model" else [])
        return any(folder_fingerprint(p) is not None for p in alternatives)
    return path.is_file()
