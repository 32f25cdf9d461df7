"""Resources: where the data lives, what the data source is, which CLIP to use.

Each is configurable in the Dagster UI's launchpad; defaults come from environment variables so that the
make targets and the CLI need no run config (see README, "Bring your own data").
"""


import os
from pathlib import Path

import dagster as dg

from pipeline.clip_encoder import LOCAL_DIR, ClipSpec
from store.paths import data_root

SOURCE_KINDS = ("world", "files")


class DataRoot(dg.ConfigurableResource):
    """The folder under which every artifact of the pipeline is written."""

    path: str = ""
    """Empty: `$MISP_DATA_ROOT`, else `./data`."""

    def root(self) -> Path:
        return data_root(self.path or None)


class DataSource(dg.ConfigurableResource):
    """The inputs: the generated scene world, or a user's image pool folder + preference manifest."""

    kind: str = "world"
    """`world` (generate the scene world) or `files` (pool_dir + manifest + image_root)."""
    world_preset: str = "default"
    """Scene-world scale: `tiny`, `default` or `large`."""
    world_seed: int = 0
    """Seed of the scene world."""
    pool_dir: str = ""
    """files: folder of candidate-negative images (e.g. COCO train2017)."""
    manifest: str = ""
    """files: preference manifest, JSONL / JSON / Parquet."""
    image_root: str = ""
    """files: folder the manifest's image paths are relative to (default: the manifest's folder)."""
    column_mapping: str = "canonical"
    """files: a mapping preset name (see docs/ingest.md) or a JSON object {canonical: source column}."""

    def validate(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"data source kind {self.kind!r} is not one of {SOURCE_KINDS}; set MISP_SOURCE")
        if self.kind == "files" and not (self.pool_dir and self.manifest):
            raise ValueError("MISP_SOURCE=files needs MISP_POOL_DIR (image folder) and MISP_MANIFEST "
                             "(preference manifest); see README, 'Bring your own data'")

    def world_dir(self, root: Path) -> Path:
        return root / "world" / f"{self.world_preset}-seed{self.world_seed}"

    def inputs(self, root: Path) -> tuple[Path, Path, Path]:
        """(pool_dir, manifest, image_root) of the configured source."""
        self.validate()
        if self.kind == "world":
            w = self.world_dir(root)
            return w / "images" / "pool", w / "preferences.parquet", w
        manifest = Path(self.manifest).expanduser().resolve()
        image_root = Path(self.image_root).expanduser().resolve() if self.image_root else manifest.parent
        return Path(self.pool_dir).expanduser().resolve(), manifest, image_root


class ClipModel(dg.ConfigurableResource):
    """The CLIP encoder. Nothing configured: the world CLIP that the `clip_model` asset trains."""

    model: str = ""
    """open_clip architecture (`ViT-B-32`) or `local-dir:<folder>`; empty = train/use the world CLIP."""
    pretrained: str = ""
    """Local weights file for a built-in architecture (an open_clip tag works only online)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`."""
    precision: str = "fp32"
    """`fp32`, `bf16`, `fp16`."""
    batch_size: int = 256
    """Images per forward pass when embedding."""

    @property
    def is_world(self) -> bool:
        return not self.model

    def world_clip_dir(self, root: Path) -> Path:
        from assets.layout import folder

        return folder(root, "clip_model")

    def spec(self, root: Path) -> ClipSpec:
        model = f"{LOCAL_DIR}{self.world_clip_dir(root)}" if self.is_world else self.model
        return ClipSpec(model=model, pretrained=self.pretrained or None, device=self.device,
                        precision=self.precision)


def resources_from_env(env: dict[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """Resources configured from MISP_* environment variables (documented in the README)."""
    env = dict(os.environ if env is None else env)
    return {
        "data_root": DataRoot(path=env.get("MISP_DATA_ROOT", "")),
        "source": DataSource(
            kind=env.get("MISP_SOURCE", "world"),
            world_preset=env.get("MISP_WORLD_PRESET", "default"),
            world_seed=int(env.get("MISP_WORLD_SEED", "0")),
            pool_dir=env.get("MISP_POOL_DIR", ""),
            manifest=env.get("MISP_MANIFEST", ""),
            image_root=env.get("MISP_IMAGE_ROOT", ""),
            column_mapping=env.get("MISP_COLUMN_MAPPING", "canonical"),
        ),
        "clip": ClipModel(
            model=env.get("MISP_CLIP_MODEL", ""),
            pretrained=env.get("MISP_CLIP_PRETRAINED", ""),
            device=env.get("MISP_DEVICE", "auto"),
            batch_size=int(env.get("MISP_CLIP_BATCH_SIZE", "256")),
        ),
    }
