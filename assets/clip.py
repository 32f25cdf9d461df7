"""The CLIP encoder asset: trains the world CLIP when none is configured, or fingerprints the user's."""


import json
from typing import NamedTuple, Optional

import dagster as dg
import polars as pl

from assets import layout
from assets.io_managers import StagedFolder, folder_fingerprint, folder_io, staging_dir
from assets.resources import ClipModel, DataRoot, DataSource
from assets.source import source_data
from pipeline.clip_encoder import LOCAL_DIR, ClipEncoder, ClipSpec, checkpoint_fingerprint
from world.clip import WorldClipConfig, retrieval_from_embeddings, train_world_clip
from store.fingerprint import fingerprint, sha256_file
from store.parquet_io import write_json_atomic

# Training budget per world preset: seconds for tests, minutes for the demo.
CLIP_PRESETS = {
    "tiny": WorldClipConfig(steps=30, batch_size=32, warmup_steps=5, eval_size=64),
    "default": WorldClipConfig(),
    "large": WorldClipConfig(steps=1500, batch_size=256, warmup_steps=100),
    # The `prior` world is 48 px with large objects: one 16-px patch per grid cell.
    "prior": WorldClipConfig(image_size=48, patch_size=16, steps=300),
    "prior_tiny": WorldClipConfig(image_size=48, patch_size=16, steps=30, batch_size=32, warmup_steps=5, eval_size=64),
}


class ClipTrainConfig(dg.Config):
    """Overrides of the world-CLIP training budget (empty: the preset's)."""

    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    seed: Optional[int] = None


def _world_pairs(world_dir, split: str) -> tuple[list[str], list[str]]:
    scenes = pl.read_parquet(world_dir / "scenes.parquet").filter(pl.col("split") == split).sort("image")
    return [str(world_dir / p) for p in scenes["image"]], scenes["caption"].to_list()


CODE_VERSION = "2"
"""Of `clip_model`: bump when a change to CLIP training changes the weights (2: folder IO manager)."""


@dg.asset(group_name="clip", deps=[source_data], kinds={"pytorch", "safetensors"}, io_manager_def=folder_io,
          code_version=CODE_VERSION)
def clip_model(context: dg.AssetExecutionContext, config: ClipTrainConfig, data_root: DataRoot,
               source: DataSource, clip: ClipModel) -> dg.Output:
    """The CLIP used to embed everything. With none configured, a small open_clip model trained
    contrastively on the world's pool images and captions, with its zero-shot retrieval accuracy (its folder,
    `models/clip`, is written by the folder IO manager). With a CLIP configured, only its fingerprint is stamped
    in `models/clip-configured`: the weights stay where they are."""
    root = data_root.root()
    folder = layout.folder(root, "clip_model")
    if clip.is_world:
        if source.kind != "world":
            raise ValueError("no CLIP is configured and the data source is not the scene world: set "
                             "MISP_CLIP_MODEL (e.g. 'local-dir:/models/clip-vit-b-32' or 'ViT-B-32' with "
                             "MISP_CLIP_PRETRAINED=/path/open_clip_model.safetensors)")
        base = CLIP_PRESETS.get(source.world_preset, WorldClipConfig())
        overrides = {k: v for k, v in config.model_dump().items() if v is not None}
        cfg = WorldClipConfig(**{**base.__dict__, **overrides})
        world_dir = source.world_dir(root)
        want = fingerprint(cfg.__dict__, sha256_file(world_dir / "world.json"), CODE_VERSION)
        if folder_fingerprint(folder) == want and (folder / "open_clip_model.safetensors").exists():
            context.log.info(f"world CLIP at {folder} is current; not retraining")
            output, info_dir = StagedFolder(want), folder
        else:
            staged = staging_dir(folder)
            train = _world_pairs(world_dir, "pool")
            test = _world_pairs(world_dir, "test")
            result = train_world_clip(*train, *test, staged, cfg, progress=True)
            info = json.loads((staged / "metrics.json").read_text())
            info["loss_curve"] = result.losses[:: max(1, len(result.losses) // 50)]
            write_json_atomic(info, staged / "metrics.json")
            output, info_dir = StagedFolder(want, staged), staged
        info = json.loads((info_dir / "metrics.json").read_text())
        spec_dir = info_dir
        retrieval, baseline = info["retrieval"], info["random_init_retrieval"]
        meta = {
            "retrieval/image_to_text_top1": retrieval["image_to_text_top1"],
            "retrieval/text_to_image_top1": retrieval["text_to_image_top1"],
            "retrieval/candidates": retrieval["n"],
            "random_init/image_to_text_top1": baseline["image_to_text_top1"],
            "num_parameters": info["num_parameters"],
            "train_seconds": round(info["seconds"], 1),
            "final_loss": info["final_loss"],
            "loss_curve": dg.MetadataValue.json(info.get("loss_curve", [])),
            "folder": dg.MetadataValue.path(str(folder)),
        }
        # Read from where it is now (the staging folder until the IO manager moves it): same files, same hash.
        spec = ClipSpec(model=f"{LOCAL_DIR}{spec_dir}", device=clip.device, precision=clip.precision)
        encoder, clip_fp = ClipEncoder(spec), checkpoint_fingerprint(spec)
    else:
        encoder = ClipEncoder(clip.spec(root))
        clip_fp = encoder.fingerprint
        meta = {"model": clip.model, "pretrained": clip.pretrained or "(random init)"}
        if source.kind == "world":  # a user's CLIP on the world: still worth knowing how well it reads it
            images, captions = _world_pairs(source.world_dir(root), "test")
            images, captions = images[:1000], captions[:1000]
            m = retrieval_from_embeddings(encoder.embed_images(images, progress=False),
                                          encoder.embed_texts(captions, progress=False), captions)
            meta["retrieval/image_to_text_top1"] = m.image_to_text_top1
            meta["retrieval/text_to_image_top1"] = m.text_to_image_top1
        output = _Stamp(fingerprint(clip_fp, CODE_VERSION))
    meta.update({"fingerprint": encoder.fingerprint, "embedding_dim": encoder.dim, "device": str(encoder.device)})
    # The weights' content hash is the data version: retraining to the same weights leaves the embeddings fresh.
    return dg.Output(output, data_version=dg.DataVersion(clip_fp), metadata=meta)


class _Stamp(NamedTuple):
    """A configured (not trained) CLIP: only the stamp of which CLIP was used, in its own folder (a world CLIP
    trained earlier stays in `models/clip`)."""

    fingerprint: str
    layout_name: str = "clip_model_configured"

    def save(self, folder) -> None:
        return None
