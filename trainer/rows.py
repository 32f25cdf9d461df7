"""From shard examples to the rows of one batched forward.

Per example: y_p with the positive image ("chosen"), y_n with the positive ("rejected", when present), and y_p
with every image negative ("neg": the K mined negatives, a crop, a noised copy, or K' draws from the pool).
All rows of a batch go through one forward, so an example's image variants share it. `encode_rows` encodes rows
for the model; CHiP's noised negative is made there, on the processor's normalised `pixel_values`."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from PIL import Image

from trainer.image_negatives import NOISE_T, diffusion_noise, example_rng, random_crop
from trainer.losses import LossConfig
from trainer.model_loading import EncodedBatch, encode_batch


@lru_cache(maxsize=4096)
def load_image(path: str) -> Image.Image:
    from store.safe_image import open_ingested  # checked against ingest's record, EXIF-upright

    return open_ingested(path, required=True).convert("RGB")  # every training image came through ingest


class NoiseSpec(NamedTuple):
    """CHiP's negative of one row: the positive's pixel_values noised to step `t` with eps from
    `example_rng(seed, example_id, salt)`."""

    seed: int
    example_id: str
    salt: str
    t: int = NOISE_T


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
    noise: list[NoiseSpec | None] | None = None  # per row: diffusion noise to add to its pixel_values, or None


def _salt(kind: str, cfg: LossConfig, step: int | None) -> str:
    """Per-example negative (`kind`) or, with fresh negatives, per (example, step) (`kind:step<N>`)."""
    if not cfg.fresh_negatives:
        return kind
    if step is None:
        raise ValueError(f"fresh_negatives makes a new {kind} every step: build_rows needs the step")
    return f"{kind}:step{step}"


def negative_images(example: dict, cfg: LossConfig, seed: int, pool_positions: list[int] | None = None,
                    step: int | None = None) -> list[tuple[str, Image.Image, NoiseSpec | None]]:
    """(image key, image, noise) of the example's image negatives under `cfg` (or of the given pool positions).
    A noised negative is the positive image with a NoiseSpec that `encode_rows` applies to its pixel_values."""
    if pool_positions is not None:
        pool = example["pool"]
        return [(f"pool:{pool[i]['path']}", load_image(pool[i]["path"]), None) for i in pool_positions]
    kind = cfg.image_negatives
    if kind == "none":
        return []
    if kind == "shard":
        negs = example["negatives"][: cfg.num_negatives]
        return [(f"pool:{n['path']}", load_image(n["path"]), None) for n in negs]
    positive = load_image(example["image_path"])
    salt = _salt(kind, cfg, step)
    if kind == "crop":
        return [(f"{salt}:{seed}", random_crop(positive, example_rng(seed, example["example_id"], salt)), None)]
    if kind == "diffusion_noise":
        # The key names the schedule and step: a cache written with another noise can never be reused.
        return [(f"{salt}:vcd-t{NOISE_T}:{seed}", positive, NoiseSpec(seed, example["example_id"], salt))]
    raise ValueError(f"unknown image_negatives {kind!r}")


def build_rows(examples: list[dict], cfg: LossConfig, seed: int,
               pool_positions: list[list[int]] | None = None, with_text: bool = True,
               step: int | None = None) -> Rows:
    """Rows for a batch of examples. `pool_positions[b]`: the IS draws of example b (replacing the mined
    negatives). Duplicate draws of one candidate are forwarded once and share their row. `step`: the optimizer
    step, needed when `cfg.fresh_negatives` makes a new crop or noise every step."""
    images, prompts, responses, ids, keys, noise = [], [], [], [], [], []
    chosen, rejected, neg = [], [], []

    def add(ex: dict, role: str, image_key: str, image: Image.Image, spec: NoiseSpec | None = None) -> int:
        key = (ex["example_id"], role, image_key)
        noise.append(spec)
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
        for image_key, image, spec in negative_images(ex, cfg, seed, positions, step):
            if image_key not in seen:
                seen[image_key] = add(ex, "chosen", image_key, image, spec)
            row_ids.append(seen[image_key])
        neg.append(row_ids)
    width = max([len(r) for r in neg] + [0])
    neg_t = torch.full((len(examples), width), -1, dtype=torch.long)
    for b, r in enumerate(neg):
        neg_t[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return Rows(images, prompts, responses, ids, keys, torch.tensor(chosen), torch.tensor(rejected), neg_t, noise)


def encode_rows(processor, rows: Rows, *, max_length: int, index: list[int] | None = None) -> EncodedBatch:
    """`encode_batch` of rows (all, or those at `index`), then CHiP's diffusion noise on the `pixel_values` of
    the rows that carry a NoiseSpec. VCD and CHiP noise the processor's normalised tensor, not the picture, so
    the noise is added after the processor (no clipping to the pixel range)."""
    idx = list(range(len(rows.keys))) if index is None else list(index)
    enc = encode_batch(processor, [rows.images[i] for i in idx], [rows.prompts[i] for i in idx],
                       [rows.responses[i] for i in idx], max_length=max_length,
                       example_ids=[rows.example_ids[i] for i in idx])
    specs = [rows.noise[i] for i in idx] if rows.noise else []
    if not any(specs):
        return enc
    return enc._replace(extras={**enc.extras, "pixel_values": noised_pixel_values(enc.extras, specs)})


def _image_slices(extras: dict, n_rows: int) -> list[slice]:
    """Where each row's image sits in `pixel_values`: one entry per row (LLaVA: (B, C, H, W)), or, with
    `image_grid_thw` (Qwen2-VL), t*h*w patch rows per image."""
    pv = extras["pixel_values"]
    grid = extras.get("image_grid_thw")
    if grid is not None:
        sizes = grid.prod(-1).tolist()
        if len(sizes) != n_rows or sum(sizes) != pv.shape[0]:
            raise ValueError(f"image_grid_thw gives {len(sizes)} images / {sum(sizes)} patches for {n_rows} rows and "
                             f"pixel_values of {tuple(pv.shape)}: cannot locate each row's image to noise it")
        ends = torch.tensor(sizes).cumsum(0).tolist()
        return [slice(e - s, e) for s, e in zip(sizes, ends)]
    if pv.shape[0] != n_rows:
        raise ValueError(f"pixel_values has shape {tuple(pv.shape)} for {n_rows} rows (one image each): this "
                         "processor's layout is not known to trainer.rows.encode_rows, so CHiP's noise cannot be "
                         "applied; use another image_negatives")
    return [slice(i, i + 1) for i in range(n_rows)]


def noised_pixel_values(extras: dict, specs: list[NoiseSpec | None]) -> torch.Tensor:
    """A copy of `extras["pixel_values"]` with each row that has a NoiseSpec noised (trainer.image_negatives)."""
    if "pixel_values" not in extras:
        raise ValueError("the processor returned no pixel_values: CHiP's diffusion noise has nothing to noise")
    out = extras["pixel_values"].clone()
    for where, spec in zip(_image_slices(extras, len(specs)), specs):
        if spec is not None:
            rng = example_rng(spec.seed, spec.example_id, spec.salt)
            out[where] = diffusion_noise(out[where], rng, spec.t)
    return out


def gather(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values[index] with -1 entries masked: (gathered, mask)."""
    mask = index >= 0
    return values[index.clamp(min=0)] * mask, mask
