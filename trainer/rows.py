"""From shard examples to the rows of one batched forward.

Per example: y_p with the positive image ("chosen"), y_n with the positive ("rejected", when present), and y_p
with every image negative ("neg": the K mined negatives, a crop, a noised copy, or K' draws from the pool).
All rows of a batch go through one forward, so an example's image variants share it."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from PIL import Image

from trainer.image_negatives import diffusion_noise, example_rng, random_crop
from trainer.losses import LossConfig


@lru_cache(maxsize=4096)
def load_image(path: str) -> Image.Image:
    from pipeline.safe_image import open_ingested  # checked against ingest's record, EXIF-upright

    return open_ingested(path).convert("RGB")


class Rows(NamedTuple):
    """Rows of one forward plus where each example's rows are."""

    images: list[Image.Image]
    prompts: list[str]
    responses: list[str]
    example_ids: list[str]
    keys: list[tuple[str, str, str]]  # (example_id, response role, image key): the reference-cache key
    chosen: torch.Tensor  # (B,) row of y_p | m_p
    rejected: torch.Tensor  # (B,) row of y_n | m_p, -1 when the example has no y_n
    neg: torch.Tensor  # (B, K) rows of y_p | m_i, -1 on padding


def negative_images(example: dict, cfg: LossConfig, seed: int,
                    pool_positions: list[int] | None = None) -> list[tuple[str, Image.Image]]:
    """(image key, image) of the example's image negatives under `cfg` (or of the given pool positions)."""
    if pool_positions is not None:
        pool = example["pool"]
        return [(f"pool:{pool[i]['path']}", load_image(pool[i]["path"])) for i in pool_positions]
    kind = cfg.image_negatives
    if kind == "none":
        return []
    if kind == "shard":
        negs = example["negatives"][: cfg.num_negatives]
        return [(f"pool:{n['path']}", load_image(n["path"])) for n in negs]
    positive = load_image(example["image_path"])
    rng = example_rng(seed, example["example_id"], kind)
    if kind == "crop":
        return [(f"crop:{seed}", random_crop(positive, rng))]
    if kind == "diffusion_noise":
        return [(f"noise:{seed}", diffusion_noise(positive, rng))]
    raise ValueError(f"unknown image_negatives {kind!r}")


def build_rows(examples: list[dict], cfg: LossConfig, seed: int,
               pool_positions: list[list[int]] | None = None, with_text: bool = True) -> Rows:
    """Rows for a batch of examples. `pool_positions[b]`: the IS draws of example b (replacing the mined
    negatives). Duplicate draws of one candidate are forwarded once and share their row."""
    images, prompts, responses, ids, keys = [], [], [], [], []
    chosen, rejected, neg = [], [], []

    def add(ex: dict, role: str, image_key: str, image: Image.Image) -> int:
        key = (ex["example_id"], role, image_key)
        images.append(image)
        prompts.append(ex["prompt"])
        responses.append(ex["chosen"] if role == "chosen" else ex["rejected"])
        ids.append(ex["example_id"])
        keys.append(key)
        return len(keys) - 1

    for b, ex in enumerate(examples):
        positive = load_image(ex["image_path"])
        chosen.append(add(ex, "chosen", "pos", positive))
        has_rejected = with_text and ex.get("rejected") is not None
        rejected.append(add(ex, "rejected", "pos", positive) if has_rejected else -1)
        seen: dict[str, int] = {}
        row_ids = []
        positions = pool_positions[b] if pool_positions is not None else None
        for image_key, image in negative_images(ex, cfg, seed, positions):
            if image_key not in seen:
                seen[image_key] = add(ex, "chosen", image_key, image)
            row_ids.append(seen[image_key])
        neg.append(row_ids)
    width = max([len(r) for r in neg] + [0])
    neg_t = torch.full((len(examples), width), -1, dtype=torch.long)
    for b, r in enumerate(neg):
        neg_t[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return Rows(images, prompts, responses, ids, keys, torch.tensor(chosen), torch.tensor(rejected), neg_t)


def gather(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values[index] with -1 entries masked: (gathered, mask)."""
    mask = index >= 0
    return values[index.clamp(min=0)] * mask, mask
