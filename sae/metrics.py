"""What a user reads about an SAE: FVU, L0 / mean activation, dead latents — over whole arrays, in batches."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sae.autoencoder import SIGMOID_FIRE_THRESHOLD, SparseAutoencoder
from sae.rank_one import total_variance


class SaeMetrics(NamedTuple):
    fvu: float  # sum ||d - D(E(d))||^2 / sum ||d - mean d||^2; predicting the mean scores 1.0
    recon_mse: float  # mean ||d - D(E(d))||^2 per pair (scaled units, mean ||d||^2 ~ 1 on the training split)
    mean_l0: float  # mean number of firing latents per pair (topk: non-zero; sigmoid: > 0.5)
    mean_activation: float  # mean code value over pairs and latents (sigmoid: compare with rho)
    dead_fraction: float  # fraction of latents that fire on none of these pairs
    n: int  # number of pairs


class Evaluation(NamedTuple):
    metrics: SaeMetrics
    codes: Tensor  # (N, k)
    recon_error: Tensor  # (N,)


def fires(codes: Tensor, kind: str) -> Tensor:
    """Boolean (…, k): which latents count as firing. TopK codes are exactly 0 when off; sigmoid codes never are."""
    return codes > (SIGMOID_FIRE_THRESHOLD if kind == "sigmoid" else 0.0)


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, u, t=None, *, batch_size: int = 1024) -> Evaluation:
    """Codes, per-pair reconstruction error and `SaeMetrics` of pairs u (N, Dv), t (N, Dt) or (Dt,)."""
    u, t = sae.prepare(u, t)
    wt = sae.weight_terms()
    codes, errors = [], []
    for i in range(0, u.shape[0], batch_size):
        _, z, err, _ = sae.pair_terms(u[i : i + batch_size], t[i : i + batch_size], wt)
        codes.append(z)
        errors.append(err)
    z = torch.cat(codes)
    err = torch.cat(errors)
    on = fires(z, sae.cfg.kind)
    tv = total_variance(u, t, sae.cfg.input_scale).clamp_min(torch.finfo(torch.float64).tiny)
    metrics = SaeMetrics(
        fvu=float(err.double().sum() / tv),
        recon_mse=float(err.double().mean()),
        mean_l0=float(on.sum(-1).double().mean()),
        mean_activation=float(z.double().mean()),
        dead_fraction=float((~on.any(0)).double().mean()),
        n=int(u.shape[0]),
    )
    return Evaluation(metrics, z, err)


@torch.no_grad()
def encode_all(sae: SparseAutoencoder, u, t=None, *, batch_size: int = 1024) -> Tensor:
    """Codes (N, k) of many pairs, in batches (encoding materialises O(batch k Dv))."""
    u, t = sae.prepare(u, t)
    return torch.cat([sae.encode(u[i : i + batch_size], t[i : i + batch_size]).latents for i in range(0, len(u), batch_size)])
