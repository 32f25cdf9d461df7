"""Train a small open_clip model on the scene world when the user configures no pretrained CLIP.

The result is saved in open_clip's `local-dir:` layout (open_clip_config.json + open_clip_model.safetensors),
so it loads through exactly the code path a user's own checkpoint takes (`pipeline.clip_encoder`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from store.parquet_io import write_json_atomic

# Normalisation of the world CLIP; written into preprocess_cfg so that embedding uses the same.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class WorldClipConfig:
    """Architecture and training budget of the world CLIP (defaults: ~2 M parameters, minutes on 2 cores)."""

    image_size: int = 64
    """Input resolution; world images are rendered at this size."""
    patch_size: int = 8
    """ViT patch size: 64 px / 8 = 8x8 patches."""
    vision_width: int = 128
    """ViT width."""
    vision_layers: int = 4
    """ViT depth."""
    text_width: int = 128
    """Text transformer width."""
    text_layers: int = 4
    """Text transformer depth."""
    text_heads: int = 4
    """Text attention heads."""
    embed_dim: int = 128
    """Joint embedding size D."""
    context_length: int = 32
    """Text tokens; world captions are under 30 BPE tokens."""
    steps: int = 400
    """Optimiser steps (400 at batch 128: ~4 min on 2 cores, 67% top-1 image->text among 1,000 captions)."""
    batch_size: int = 128
    """Contrastive batch size."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warmup, cosine decay)."""
    warmup_steps: int = 40
    """Warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to gains, biases and embeddings)."""
    seed: int = 0
    """Seed of init and batch order."""
    eval_size: int = 1000
    """Held-out scenes used for the retrieval metric."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps must be >= 1 and batch_size >= 2 (a contrastive batch needs pairs)")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}")

    def model_cfg(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers,
                           "width": self.vision_width, "patch_size": self.patch_size, "head_width": 32},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers},
        }


class RetrievalMetrics(NamedTuple):
    image_to_text_top1: float
    text_to_image_top1: float
    n: int


class WorldClipResult(NamedTuple):
    folder: Path
    metrics: RetrievalMetrics
    random_init_metrics: RetrievalMetrics
    losses: list[float]
    seconds: float
    num_parameters: int


def load_images_uint8(paths: Sequence[str | Path], size: int, progress: bool = True) -> torch.Tensor:
    """(N, 3, size, size) uint8: small enough to keep the whole world pool in memory."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(tqdm(paths, desc="load images", unit="img", disable=not progress)):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            out[i] = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    return out


def _normalise(images_u8: torch.Tensor) -> torch.Tensor:
    x = images_u8.float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def retrieval_from_embeddings(img: np.ndarray, txt: np.ndarray, captions: Sequence[str]) -> RetrievalMetrics:
    """Top-1 image->text and text->image among paired embeddings (row i of `img` goes with caption i).
    A hit is any item with the true caption: two scenes can share a caption, and then either one is right."""
    sims = np.asarray(img, dtype=np.float32) @ np.asarray(txt, dtype=np.float32).T
    caps = np.asarray(captions, dtype=object)
    i2t = float(np.mean(caps[sims.argmax(1)] == caps))
    t2i = float(np.mean(caps[sims.argmax(0)] == caps))
    return RetrievalMetrics(i2t, t2i, len(captions))


@torch.inference_mode()
def retrieval_accuracy(model: torch.nn.Module, tokenizer, images_u8: torch.Tensor,
                       captions: Sequence[str], batch_size: int = 256) -> RetrievalMetrics:
    """Retrieval metrics of a model being trained (images already in memory)."""
    model.eval()
    img = torch.cat([model.encode_image(_normalise(images_u8[i:i + batch_size]), normalize=True)
                     for i in range(0, len(images_u8), batch_size)])
    txt = torch.cat([model.encode_text(tokenizer(list(captions[i:i + batch_size])), normalize=True)
                     for i in range(0, len(captions), batch_size)])
    return retrieval_from_embeddings(img.numpy(), txt.numpy(), captions)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Gains, biases, embeddings and the temperature are not regularised (CLIP's recipe).
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_world_clip(
    train_images: Sequence[str | Path],
    train_captions: Sequence[str],
    eval_images: Sequence[str | Path],
    eval_captions: Sequence[str],
    out_dir: Path,
    cfg: WorldClipConfig = WorldClipConfig(),
    *,
    progress: bool = True,
) -> WorldClipResult:
    """Contrastively train a small CLIP from scratch and save it as an open_clip `local-dir:` folder."""
    if len(train_images) != len(train_captions) or len(eval_images) != len(eval_captions):
        raise ValueError("images and captions must be the same length")
    if len(train_images) < cfg.batch_size:
        raise ValueError(f"{len(train_images)} training pairs is fewer than batch_size={cfg.batch_size}; "
                         "lower the batch size or generate a larger world")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = open_clip.CLIP(**cfg.model_cfg())
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    n_eval = min(cfg.eval_size, len(eval_images))
    eval_u8 = load_images_uint8(eval_images[:n_eval], cfg.image_size, progress)
    eval_caps = list(eval_captions[:n_eval])
    random_metrics = retrieval_accuracy(model, tokenizer, eval_u8, eval_caps)

    images_u8 = load_images_uint8(train_images, cfg.image_size, progress)
    tokens = tokenizer(list(train_captions))
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * frac))

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(images_u8), generator=gen)
    cursor, losses = 0, []
    model.train()
    bar = tqdm(range(cfg.steps), desc="train world CLIP", unit="step", disable=not progress)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(images_u8), generator=gen), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        image_features, text_features, logit_scale = model(_normalise(images_u8[idx]), tokens[idx])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP clamps the temperature so that logits cannot blow up
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()

    metrics = retrieval_accuracy(model, tokenizer, eval_u8, eval_caps)
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    save_world_clip(model, cfg, out_dir, {
        "retrieval": metrics._asdict(), "random_init_retrieval": random_metrics._asdict(),
        "train_pairs": len(train_images), "seconds": seconds, "num_parameters": n_params,
        "final_loss": float(np.mean(losses[-20:])), "config": asdict(cfg),
    })
    return WorldClipResult(Path(out_dir), metrics, random_metrics, losses, seconds, n_params)


def save_world_clip(model: torch.nn.Module, cfg: WorldClipConfig, out_dir: Path, metrics: dict) -> None:
    """Write open_clip's local-dir layout. Weights go last so a folder with weights is a complete one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic({
        "model_cfg": cfg.model_cfg(),
        "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }, out_dir / "open_clip_config.json")
    write_json_atomic(metrics, out_dir / "metrics.json")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out_dir / ".open_clip_model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "misp-dpo world CLIP"})
    os.replace(tmp, out_dir / "open_clip_model.safetensors")
