"""Write a world to disk in the layout of docs/data.md: PNGs, `scenes.parquet`, the preference manifests and
`world.json`. `world.json` is written last, so its presence (with a matching config) marks a complete world."""

from __future__ import annotations

import io
import json
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
from PIL import Image
from tqdm import tqdm

from store import SCHEMA_VERSION
from store.parquet_io import write_json_atomic, write_parquet_atomic
from world import grammar
from world.config import SPLITS, WORLD_VERSION, WorldConfig
from world.preferences import Example, make_examples
from world.render import draw
from world.scene import ObjectSpec, Scene, sample_scene, scene_rng

PREFIX = {"pool": "p", "train": "t", "test": "s"}
OBJECT_STRUCT = pl.Struct({"shape": pl.String, "colour": pl.String, "size": pl.String, "position": pl.String})
TEXTS = "texts.parquet"
"""The caption-only corpus of the language-prior regime (written when `n_text` > 0)."""
SCENES_SCHEMA = {"image": pl.String, "split": pl.String, "scene_id": pl.String, "background": pl.String,
                 "objects": pl.List(OBJECT_STRUCT), "caption": pl.String}
PREFERENCES_SCHEMA = {"id": pl.String, "prompt": pl.String, "chosen": pl.String, "rejected": pl.String,
                      "image": pl.String, "scene_id": pl.String, "prompt_kind": pl.String,
                      "error_type": pl.String, "error_detail": pl.String}


class WorldSummary(NamedTuple):
    root: Path
    scenes: Path
    preferences: Path
    preferences_test: Path
    world_json: Path
    n_pool: int
    n_train: int
    n_test: int
    n_preferences: int
    n_preferences_test: int
    generated: bool
    """False when the folder already held this world and nothing was written."""


def library_version() -> str:
    try:
        return metadata.version("misp-dpo")
    except metadata.PackageNotFoundError:
        return "unknown"


def image_path(split: str, index: int) -> str:
    """Path of a scene's PNG relative to the world root, e.g. `images/pool/p0000012.png`."""
    return f"images/{split}/{PREFIX[split]}{index:07d}.png"


def scene_id(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def png_bytes(img: np.ndarray, compress_level: int) -> bytes:
    """PNG without metadata chunks, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _write_file(data: bytes, path: Path) -> None:
    # Temp name + rename, like every other write of the project, but without fsync per image (tens of
    # thousands of fsyncs would dominate the run); world.json, written last with fsync, vouches for them.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _summary(root: Path, counts: dict[str, int], generated: bool) -> WorldSummary:
    return WorldSummary(
        root=root, scenes=root / "scenes.parquet", preferences=root / "preferences.parquet",
        preferences_test=root / "preferences_test.parquet", world_json=root / "world.json",
        n_pool=counts["pool"], n_train=counts["train"], n_test=counts["test"],
        n_preferences=counts["preferences"], n_preferences_test=counts["preferences_test"], generated=generated,
    )


def read_world_json(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(root) / "world.json").read_text())
    except (OSError, ValueError):
        return None


def _same_world(cfg: WorldConfig, info: dict[str, Any] | None) -> bool:
    return info is not None and info.get("world_version") == WORLD_VERSION and info.get("config") == cfg.to_dict()


def _is_complete(root: Path, cfg: WorldConfig, info: dict[str, Any] | None) -> bool:
    if not _same_world(cfg, info):
        return False
    files = ("scenes.parquet", "preferences.parquet", "preferences_test.parquet") + (
        ("texts.parquet",) if cfg.n_text else ())
    if not all((root / f).exists() for f in files):
        return False
    return all(len(_own_images(root / "images" / s, s)) == info["counts"][s] for s in SPLITS)


def _own_images(folder: Path, split: str) -> list[Path]:
    """The PNGs (and leftover temp files) a world writes into `folder`, by their exact name pattern."""
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^\.?{PREFIX[split]}\d{{7}}\.png(\.tmp)?$")
    return [Path(e.path) for e in os.scandir(folder) if pattern.match(e.name)]


def _clear(root: Path) -> None:
    """Remove what a previous world wrote here, and only that: `out_dir` may hold a user's other files."""
    for split in SPLITS:
        for path in _own_images(root / "images" / split, split):
            path.unlink()
    for name in ("world.json", "scenes.parquet", "preferences.parquet", "preferences_test.parquet", TEXTS):
        (root / name).unlink(missing_ok=True)


def generate_world(cfg: WorldConfig, out_dir: str | os.PathLike, *, overwrite: bool = False,
                   progress: bool = True) -> WorldSummary:
    """Generate the world of `cfg` into `out_dir`. A folder that already holds this exact world is left as
    it is (no-op); one that holds another world raises unless `overwrite=True`; a partial one is redone."""
    root = Path(out_dir)
    info = read_world_json(root)
    if not overwrite and _is_complete(root, cfg, info):
        return _summary(root, info["counts"], generated=False)
    if info is not None and not _same_world(cfg, info) and not overwrite:
        raise ValueError(
            f"{root} holds a world generated from another config or generator version; "
            "pass overwrite=True (CLI: --overwrite) to replace it, or choose another folder"
        )
    _clear(root)
    scene_rows: list[dict[str, Any]] = []
    pref_rows: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    n_per_split = {"pool": cfg.n_pool, "train": cfg.n_train, "test": cfg.n_test}
    with tqdm(total=cfg.n_scenes, desc="world", unit="scene", disable=not progress) as bar:
        for split in SPLITS:
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            for index in range(n_per_split[split]):
                scene_rows.append(_make_one(cfg, root, split, index, pref_rows))
                bar.update(1)
    meta = {"world_version": WORLD_VERSION, "config": cfg.to_dict()}
    write_parquet_atomic(pl.DataFrame(scene_rows, schema=SCENES_SCHEMA), root / "scenes.parquet", meta)
    write_parquet_atomic(pl.DataFrame(pref_rows["train"], schema=PREFERENCES_SCHEMA),
                         root / "preferences.parquet", meta)
    write_parquet_atomic(pl.DataFrame(pref_rows["test"], schema=PREFERENCES_SCHEMA),
                         root / "preferences_test.parquet", meta)
    if cfg.n_text:
        write_parquet_atomic(text_corpus(cfg, progress), root / TEXTS, meta)
    counts = {**n_per_split, "preferences": len(pref_rows["train"]),
              "preferences_test": len(pref_rows["test"]), "files": cfg.n_scenes + 3 + bool(cfg.n_text)}
    if cfg.n_text:
        counts["text"] = cfg.n_text
    write_json_atomic({"config": cfg.to_dict(), "world_version": WORLD_VERSION, "schema_version": SCHEMA_VERSION,
                       "library_version": library_version(), "counts": counts}, root / "world.json")
    return _summary(root, counts, generated=True)


def text_corpus(cfg: WorldConfig, progress: bool = False) -> pl.DataFrame:
    """Captions of `cfg.n_text` scenes that are never drawn (columns scene_id, caption, shapes, colours), sampled with
    the text corpus's co-occurrence `cfg.text_cooccur_p`: what a language model reads before it sees images."""
    rows = []
    for index in tqdm(range(cfg.n_text), desc="text corpus", unit="caption", disable=not progress):
        scene = sample_scene(cfg, scene_rng(cfg.seed, "text", index), "text")
        rows.append({"scene_id": scene_id("text", index), "caption": grammar.caption(scene),
                     "shapes": sorted(scene.shapes), "colours": sorted({o.colour for o in scene.objects})})
    return pl.DataFrame(rows, schema={"scene_id": pl.String, "caption": pl.String, "shapes": pl.List(pl.String),
                                      "colours": pl.List(pl.String)})


class Built(NamedTuple):
    scene: Scene
    examples: list[Example]
    """Empty for pool scenes."""
    image: np.ndarray
    """uint8 (image_size, image_size, 3)."""


def build_scene(cfg: WorldConfig, split: str, index: int) -> Built:
    """Scene `index` of `split`, alone: the same result as in a full generation, in any order.
    One generator, drawn in the order scene, text, pixels: so a change of jitter leaves the prompts alone."""
    rng = scene_rng(cfg.seed, split, index)
    scene = sample_scene(cfg, rng, split)
    examples = make_examples(scene, cfg, rng) if split != "pool" else []
    return Built(scene, examples, draw(scene, cfg, rng))


def _make_one(cfg: WorldConfig, root: Path, split: str, index: int,
              pref_rows: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """Build and write one scene; append its preference examples; return its scenes.parquet row."""
    scene, examples, image = build_scene(cfg, split, index)
    rel, sid = image_path(split, index), scene_id(split, index)
    _write_file(png_bytes(image, cfg.png_compress_level), root / rel)
    for k, ex in enumerate(examples):
        pref_rows[split].append({
            "id": f"{sid}-{k}", "prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected,
            "image": rel, "scene_id": sid, "prompt_kind": ex.prompt_kind,
            "error_type": ex.error_type, "error_detail": ex.error_detail,
        })
    return {"image": rel, "split": split, "scene_id": sid, "background": scene.background,
            "objects": scene.objects_rows(), "caption": grammar.caption(scene)}


def read_scenes(root: str | os.PathLike, split: str | None = None) -> dict[str, Scene]:
    """The ground truth of a generated world, `scene_id -> Scene` (optionally one split)."""
    df = pl.read_parquet(Path(root) / "scenes.parquet")
    if split is not None:
        df = df.filter(pl.col("split") == split)
    return {row["scene_id"]: scene_from_row(row) for row in df.iter_rows(named=True)}


def scene_from_row(row: dict[str, Any]) -> Scene:
    """A `Scene` from a row of `scenes.parquet` (background + objects list of structs)."""
    return Scene(objects=tuple(ObjectSpec(**o) for o in row["objects"]), background=row["background"])
