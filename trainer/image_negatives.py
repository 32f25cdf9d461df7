"""Image negatives made on the fly for the single-negative baselines (SPEC §4): mDPO's random crop and CHiP's
forward-diffusion noise. Deterministic per (seed, example id[, step]): a fixed negative per example (cacheable) or,
as mDPO and CHiP do, a fresh one every step (`LossConfig.fresh_negatives`)."""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

NOISE_STEPS = 1000
"""Length of the diffusion schedule (VCD / CHiP)."""
NOISE_T = 500
"""The step CHiP's image-level negative is noised to (VCD's default `noise_step`)."""


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


@lru_cache(maxsize=8)
def _alpha_bar(steps: int) -> np.ndarray:
    # The schedule of VCD (Leng et al., CVPR 2024, `add_diffusion_noise` in github.com/DAMO-NLP-SG/VCD), which CHiP
    # (Fu et al., ICLR 2025) reuses for its image-level negative: beta_s = 1e-5 + (5e-3 - 1e-5) sigmoid(u_s), u
    # evenly spaced over [-6, 6] in `steps` points, and alpha_bar_t = prod_{s <= t} (1 - beta_s) (index t included).
    u = np.linspace(-6.0, 6.0, steps)
    betas = 1e-5 + (5e-3 - 1e-5) / (1.0 + np.exp(-u))
    return np.cumprod(1.0 - betas)


def noise_coefficients(t: int = NOISE_T, steps: int = NOISE_STEPS) -> tuple[float, float]:
    """(signal, noise) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) of the VCD/CHiP schedule at step t:
    (0.8630, 0.5052) at t = 500 of 1000. (A linear DDPM schedule, 1e-4..0.02, gives (0.28, 0.96) there: about 35x
    less signal-to-noise, which is what this module used before.)"""
    if not 0 <= t < steps:
        raise ValueError(f"noise step t={t} must be in [0, {steps})")
    abar = float(_alpha_bar(steps)[t])
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def diffusion_noise(pixel_values: torch.Tensor, rng: np.random.Generator, t: int = NOISE_T,
                    steps: int = NOISE_STEPS) -> torch.Tensor:
    """CHiP's negative: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` applied, as VCD and CHiP do, to the image
    processor's normalised `pixel_values` of one image (any shape; no clipping, no round trip through uint8).
    eps ~ N(0, 1) from `rng`, drawn in float64 and cast to the tensor's dtype."""
    signal, noise = noise_coefficients(t, steps)
    eps = torch.from_numpy(rng.standard_normal(tuple(pixel_values.shape))).to(pixel_values)
    return signal * pixel_values + noise * eps
