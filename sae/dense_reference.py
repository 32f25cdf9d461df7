"""The SAE written naively: materialise d = s vec(u t^T) (n x Dv*Dt) and use flat matrices. Tests and the
benchmark compare the rank-one path against this; never use it for real data (262,144 floats per pair at 512-d)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sae.autoencoder import SparseAutoencoder


class DenseOutput(NamedTuple):
    latents: Tensor  # (n, k)
    pre_acts: Tensor  # (n, k)
    recon_error: Tensor  # (n,)


def fused_inputs(u: Tensor, t: Tensor, scale: float) -> Tensor:
    """d = s vec(u t^T) per row: u (n, Dv), t (n, Dt') -> (n, Dv*Dt'), row-major like the weights' reshape."""
    return scale * (u[:, :, None] * t[:, None, :]).reshape(u.shape[0], -1)


def dense_forward(sae: SparseAutoencoder, u, t=None) -> DenseOutput:
    """Pre-activations, codes and squared reconstruction error with d materialised."""
    u, t = sae.prepare(u, t)
    k = sae.cfg.num_latents
    d = fused_inputs(u, t, sae.cfg.input_scale)
    b = sae.b_dec.reshape(-1)
    pre = (d - b) @ sae.W_enc.reshape(k, -1).T + sae.b_enc
    z = sae.activation(pre)
    recon = z @ sae.W_dec.reshape(k, -1) + b
    return DenseOutput(z, pre, ((d - recon) ** 2).sum(-1))


@torch.no_grad()
def dense_score_candidates(sae: SparseAutoencoder, u_c, t=None) -> tuple[Tensor, Tensor]:
    """(recon_error (C,), codes (C, k)) of one prompt's candidates, materialising d: the benchmark's baseline."""
    out = dense_forward(sae, u_c, t)
    return out.recon_error, out.latents
