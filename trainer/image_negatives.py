"""Image negatives made on the fly for the single-negative baselines (SPEC §4): mDPO's random crop and CHiP's
forward-diffusion noise. Deterministic per (seed, example id) so every run sees the same negatives."""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image


def example_rng(seed: int, example_id: str, salt: str = "") -> np.random.Generator:
    digest = hashlib.sha1(f"{seed}:{salt}:{example_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_crop(image: Image.Image, rng: np.random.Generator, min_area: float = 0.01,
                max_area: float = 0.20) -> Image.Image:
    """mDPO's negative: a random crop keeping `min_area`..`max_area` of the image area, resized back."""
    w, h = image.size
    area = rng.uniform(min_area, max_area) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(min(w, max(1, math.sqrt(area * aspect)))))
    ch = int(round(min(h, max(1, math.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)


def diffusion_noise(image: Image.Image, rng: np.random.Generator, t: int = 500, steps: int = 1000,
                    beta_start: float = 1e-4, beta_end: float = 0.02) -> Image.Image:
    """CHiP's negative: the image after t of `steps` forward-diffusion steps (DDPM linear schedule),
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with x_0 scaled to [-1, 1]."""
    if not 0 <= t < steps:
        raise ValueError(f"t={t} must be in [0, {steps})")
    abar = float(np.prod(1.0 - np.linspace(beta_start, beta_end, steps)[: t + 1]))
    x0 = np.asarray(image.convert("RGB"), dtype=np.float64) / 127.5 - 1.0
    xt = math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * rng.standard_normal(x0.shape)
    return Image.fromarray(np.clip((xt + 1.0) * 127.5, 0, 255).round().astype(np.uint8))
