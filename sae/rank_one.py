"""The rank-one identities of SPEC §2.3: every linear map of d = s * vec(u t^T) without materialising d.

Weights are stored as matrices per latent: the encoder row j of W_enc (k x Dv*Dt) is A_j = W_enc[j] (Dv x Dt),
the decoder row j is B_j = W_dec[j] (Dv x Dt), the decoder bias b (Dv x Dt) is also subtracted before encoding.
With d = s vec(u t^T):

    (W_enc (d - b))_j = s u^T A_j t - <A_j, b>                      = s (u^T P)_j - e_j,   P = [A_j t]_j
    ||d - b - W_dec^T z||^2 = s^2 ||u||^2 ||t||^2 - 2 s u^T (b t) + ||b||^2
                              - 2 s u^T Q z + 2 c^T z + z^T G z,     Q = [B_j t]_j, c_j = <B_j, b>, G = B B^T

P and Q (stored transposed, (k, Dv) per prompt) cost O(k Dv Dt) per prompt; after that a candidate costs O(Dv k + k^2). `e`, `c`, `G` and `||b||^2`
depend on the weights only. The image space is the same algebra with Dt = 1 and t = [1].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class WeightTerms(NamedTuple):
    """Prompt-independent terms: functions of the weights only."""

    enc_bias: Tensor  # (k,) e_j = <A_j, b>, what the pre-encoder bias contributes to pre-activation j
    gram: Tensor  # (k, k) G = B B^T, the decoder Gram matrix
    dec_bias: Tensor  # (k,) c_j = <B_j, b>
    bias_sq: Tensor  # () ||b||^2


class PromptTerms(NamedTuple):
    """Per-prompt terms for m distinct prompts."""

    P: Tensor  # (m, k, Dv) encoder matrices applied to t: P[e, j] = A_j t_e
    Q: Tensor  # (m, k, Dv) decoder matrices applied to t: Q[e, j] = B_j t_e
    bt: Tensor  # (m, Dv) b t
    tt: Tensor  # (m,) ||t||^2


def weight_terms(W_enc: Tensor, W_dec: Tensor, b_dec: Tensor) -> WeightTerms:
    """`WeightTerms` of weights W_enc, W_dec (k, Dv, Dt) and bias b_dec (Dv, Dt): O(k^2 Dv Dt), once per weights."""
    k = W_dec.shape[0]
    B = W_dec.reshape(k, -1)
    b = b_dec.reshape(-1)
    return WeightTerms(
        enc_bias=W_enc.reshape(k, -1) @ b,
        gram=B @ B.T,
        dec_bias=B @ b,
        bias_sq=b @ b,
    )


def project(W: Tensor, t: Tensor) -> Tensor:
    """[W_j t]_j for every prompt: W (k, Dv, Dt), t (m, Dt) -> (m, k, Dv), i.e. P^T per prompt.

    One (m x Dt)(Dt x k Dv) product whose output is already contiguous in this layout; the (m, Dv, k) layout would
    need a permuted view, and torch's batched matmul on that view was ~40x slower than on a contiguous one.
    """
    k, dv, dt = W.shape
    return (t @ W.reshape(k * dv, dt).T).reshape(-1, k, dv)


def prompt_terms(W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, t: Tensor) -> PromptTerms:
    """`PromptTerms` for prompts t (m, Dt): O(m k Dv Dt)."""
    return PromptTerms(P=project(W_enc, t), Q=project(W_dec, t), bt=t @ b_dec.T, tt=(t * t).sum(-1))


def pre_activations(uP: Tensor, scale: float, enc_bias: Tensor, b_enc: Tensor) -> Tensor:
    """Encoder pre-activations (n, k) from uP = u^T P (n, k) and e = `WeightTerms.enc_bias`: s u^T A_j t - e_j + b_enc_j."""
    return scale * uP - enc_bias + b_enc


def squared_error(
    u: Tensor, z: Tensor, uQ: Tensor, ubt: Tensor, tt: Tensor, scale: float, wt: WeightTerms
) -> Tensor:
    """||d - b - W_dec^T z||^2 per row (n,), from uQ = u^T Q (n, k), ubt = u . (b t) (n,), tt = ||t||^2 (n,).

    In float32 this is a difference of O(||d||^2) terms, so its absolute error is ~1e-7 ||d||^2; it is not clamped
    at zero so that gradients stay exact.
    """
    d_sq = scale**2 * (u * u).sum(-1) * tt
    zGz = ((z @ wt.gram) * z).sum(-1)
    return d_sq - 2 * scale * ubt + wt.bias_sq - 2 * scale * (uQ * z).sum(-1) + 2 * (z @ wt.dec_bias) + zGz


def residual_dot_decoder(uQ: Tensor, z: Tensor, scale: float, gram_cross: Tensor, dec_bias: Tensor) -> Tensor:
    """<d - b - W_dec^T z, B_j> per row and chosen decoder row j (n, r), with uQ = u^T [B_j t]_j (n, r).

    `gram_cross` (k, r) = <B_l, B_j> between the rows that made the residual and the chosen rows, `dec_bias` (r,)
    = <B_j, b>. AuxK passes the residual's weights detached and the chosen rows live.
    """
    return scale * uQ - dec_bias - z @ gram_cross


def group_prompts(t: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of t (m, Dt) and, per input row, the index of its prompt (n,).

    Pairs of one example share their prompt, so a batch usually holds few distinct prompts: projecting each once
    makes a training step cost O(m k Dv Dt) instead of O(n k Dv Dt).
    """
    unique, inverse = torch.unique(t, dim=0, return_inverse=True)
    return unique, inverse


def fused_mean(u: Tensor, t: Tensor, scale: float) -> Tensor:
    """Mean of d over the rows, as a (Dv, Dt) matrix: (s / n) U^T T."""
    return scale * (u.T @ t) / u.shape[0]


def total_variance(u: Tensor, t: Tensor, scale: float) -> Tensor:
    """sum_i ||d_i - mean d||^2 = sum_i s^2 ||u_i||^2 ||t_i||^2 - n ||mean d||^2, in float64."""
    u64, t64 = u.double(), t.double()
    sq = scale**2 * ((u64 * u64).sum(-1) * (t64 * t64).sum(-1)).sum()
    mean = fused_mean(u64, t64, scale)
    return sq - u.shape[0] * (mean * mean).sum()
