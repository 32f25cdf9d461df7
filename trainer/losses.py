"""The losses of MISP-DPO and its baselines (SPEC §3–4), pure torch on summed response log-probs.

No model, no data, no I/O: the loop computes log pi(y | x, m) for the policy (`logp_*`) and the reference (`ref_*`),
summed over response tokens, and this module turns them into the loss and TRL-named metrics. One place per formula:
`image_pl_loss` (Plackett-Luce over K image negatives), `importance_sampled_pl_loss` (the same over a whole pool,
estimated from K' draws of a proposal), `text_dpo_loss`, `anchor_loss`, `sft_loss`; `LossConfig` and `PRESETS` say
which terms a run uses; `compute_loss` does one batch. docs/losses.md has the formulas and the decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_NEGATIVES = ("none", "crop", "diffusion_noise", "shard")
IS_MODES = ("none", "fixed", "learned")
LOSS_FORMS = ("sum", "chip_joint")

Reduction = Literal["mean", "none"]


# --- helpers -------------------------------------------------------------------------------------------------------

def _promote(x: Tensor) -> Tensor:
    """At least float32: bf16 sums over hundreds of tokens lose the small differences DPO is made of."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _mask_like(mask: Tensor | None, x: Tensor) -> Tensor:
    return torch.ones_like(x, dtype=torch.bool) if mask is None else mask.to(device=x.device, dtype=torch.bool)


def _zero_where_invalid(x: Tensor, mask: Tensor) -> Tensor:
    """Padding may hold anything (0, NaN, inf); `where` gives it an exact zero gradient, `x * mask` would not."""
    return torch.where(mask, x, torch.zeros_like(x))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask; 0 when nothing is valid, still attached to the graph so backward (and DDP) run."""
    return _zero_where_invalid(x, mask).sum() / mask.sum().clamp(min=1).to(x.dtype)


def _masked_logsumexp(x_bk: Tensor, mask_bk: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise logsumexp over the valid entries, and whether a row has any.

    A row with none is computed on zeros and must be discarded by the caller: logsumexp over all -inf is -inf
    with a NaN gradient (exp(-inf - -inf))."""
    has_b = mask_bk.any(-1)
    x = torch.where(mask_bk, x_bk, torch.full_like(x_bk, -math.inf))
    x = torch.where(has_b[:, None], x, torch.zeros_like(x))
    return torch.logsumexp(x, dim=-1), has_b


def _reduce(loss_b: Tensor, valid_b: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return loss_b
    if reduction == "mean":
        return masked_mean(loss_b, valid_b)
    raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")


# --- the losses ----------------------------------------------------------------------------------------------------

def image_pl_loss(r_p_b: Tensor, r_neg_bk: Tensor, neg_mask_bk: Tensor | None = None, beta: float = 0.5,
                  reduction: Reduction = "mean") -> Tensor:
    """Plackett-Luce image loss (SPEC §3): `softplus(logsumexp_i a_i)`, `a_i = beta (r_i - r_p)`, over valid i.

    Equals `-log(e^{beta r_p} / (e^{beta r_p} + sum_i e^{beta r_i}))`; with one negative it is mDPO's pairwise
    image term `-logsigmoid(beta (r_p - r_neg))`. An example without a valid negative contributes 0 and is left
    out of the mean (it has nothing to compare with). `reduction="none"` gives the (B,) per-example losses."""
    r_p_b, r_neg_bk = _promote(r_p_b), _promote(r_neg_bk)
    mask_bk = _mask_like(neg_mask_bk, r_neg_bk)
    a_bk = beta * (_zero_where_invalid(r_neg_bk, mask_bk) - r_p_b[:, None])
    lse_b, has_b = _masked_logsumexp(a_bk, mask_bk)
    loss_b = torch.where(has_b, F.softplus(lse_b), torch.zeros_like(lse_b))
    return _reduce(loss_b, has_b, reduction)


class ISLoss(NamedTuple):
    """Output of `importance_sampled_pl_loss`."""

    loss: Tensor
    """() mean over examples with samples, or (B,) with reduction='none'."""
    log_z_hat_b: Tensor
    """(B,) log of Z_hat, the estimate of sum over the pool of e^{a_i}; 0 where an example has no sample."""
    weights_bk: Tensor
    """(B, K') normalised IS weights softmax_k(a_k - log q_k), detached; 0 at masked draws."""
    ess_b: Tensor
    """(B,) effective sample size (sum w)^2 / sum w^2, in [1, K']; 0 where an example has no sample."""
    max_weight_b: Tensor
    """(B,) the largest normalised weight max_k w_k, in [1/K', 1] (1: one draw carries the estimate)."""
    valid_b: Tensor
    """(B,) bool: the example has at least one draw."""


def importance_sampled_pl_loss(r_p_b: Tensor, r_samp_bk: Tensor, q_samp_bk: Tensor, beta: float = 0.5,
                               samp_mask_bk: Tensor | None = None, reduction: Reduction = "mean") -> ISLoss:
    """PL loss over a whole pool from K' draws i_1..i_K' (with replacement) of a proposal q (SPEC §3, Decision).

    `Z_hat = (1/K') sum_k e^{a_{i_k}} / q_{i_k}` is unbiased for `sum_{i in pool} e^{a_i}`; the loss is
    `softplus(log Z_hat)`, computed as `softplus(logsumexp_k(a_k - log q_k) - log K')`. Its gradient weights
    draw k by the normalised weight w_k = softmax_k(a_k - log q_k): consistent, not unbiased (a ratio of
    estimates); bias and spread shrink as K' grows. Masked draws are ignored (K' then counts the valid ones)."""
    r_p_b, r_samp_bk = _promote(r_p_b), _promote(r_samp_bk)
    mask_bk = _mask_like(samp_mask_bk, r_samp_bk)
    a_bk = beta * (_zero_where_invalid(r_samp_bk, mask_bk) - r_p_b[:, None])
    q_bk = _promote(q_samp_bk).detach().to(a_bk.device)  # data (what was sampled with), never differentiated
    if (mask_bk & ~(q_bk > 0)).any():
        raise ValueError("a sampled candidate has proposal q <= 0 or NaN: a draw's weight is e^a / q, so pass the "
                         "q each candidate was drawn with (> 0 wherever it was drawn)")
    logw_bk = a_bk - torch.log(torch.where(mask_bk, q_bk, torch.ones_like(q_bk)))
    lse_b, has_b = _masked_logsumexp(logw_bk, mask_bk)
    n_b = mask_bk.sum(-1).clamp(min=1).to(lse_b.dtype)
    log_z_hat_b = torch.where(has_b, lse_b - torch.log(n_b), torch.zeros_like(lse_b))
    loss_b = torch.where(has_b, F.softplus(log_z_hat_b), torch.zeros_like(lse_b))
    with torch.no_grad():
        w_bk = _zero_where_invalid(torch.exp(logw_bk - lse_b[:, None]), mask_bk)
        ess_b = torch.where(has_b, 1.0 / (w_bk ** 2).sum(-1).clamp_min(1e-30), torch.zeros_like(lse_b))
        max_w_b = w_bk.max(-1).values if w_bk.shape[-1] else torch.zeros_like(lse_b)
    return ISLoss(_reduce(loss_b, has_b, reduction), log_z_hat_b, w_bk, ess_b, max_w_b, has_b)


def text_dpo_loss(r_chosen_b: Tensor, r_rejected_b: Tensor, beta: float = 0.5, has_rejected_b: Tensor | None = None,
                  reduction: Reduction = "mean") -> Tensor:
    """Sigmoid DPO with the positive image fixed: `-logsigmoid(beta (r_c - r_r))` (TRL's `sigmoid`, label
    smoothing 0). Examples without a rejected response contribute 0 and are left out of the mean."""
    r_chosen_b, r_rejected_b = _promote(r_chosen_b), _promote(r_rejected_b)
    mask_b = _mask_like(has_rejected_b, r_rejected_b)
    loss_b = -F.logsigmoid(beta * (r_chosen_b - _zero_where_invalid(r_rejected_b, mask_b)))
    return _reduce(_zero_where_invalid(loss_b, mask_b), mask_b, reduction)


def chip_joint_loss(r_chosen_b: Tensor, r_rejected_b: Tensor, r_neg_b: Tensor, beta: float = 0.5,
                    has_rejected_b: Tensor | None = None, text_weight: float = 1.0,
                    reduction: Reduction = "mean") -> Tensor:
    """CHiP's own form: ONE sigmoid over the summed response-level and image-level margins,
    `-logsigmoid(text_weight beta (r_c - r_r) + beta (r_c - r_neg))`, r_neg the reward of y_p with the noised
    image. An example without y_n keeps the image margin alone. (The `sum` form adds two separate sigmoids,
    `text_dpo_loss + image_pl_loss`, whose gradients saturate independently.)"""
    r_chosen_b, r_rejected_b, r_neg_b = _promote(r_chosen_b), _promote(r_rejected_b), _promote(r_neg_b)
    mask_b = _mask_like(has_rejected_b, r_rejected_b)
    text_b = _zero_where_invalid(text_weight * beta * (r_chosen_b - _zero_where_invalid(r_rejected_b, mask_b)),
                                 mask_b)
    loss_b = -F.logsigmoid(text_b + beta * (r_chosen_b - r_neg_b))
    return _reduce(loss_b, torch.ones_like(loss_b, dtype=torch.bool), reduction)


def anchor_loss(r_chosen_b: Tensor, beta: float = 0.5, delta: float = 0.0, reduction: Reduction = "mean") -> Tensor:
    """mDPO's anchor `-logsigmoid(beta r_c - delta)`: keeps the chosen reward from falling while both sides of a
    comparison drop together (mDPO's reason for it)."""
    loss_b = -F.logsigmoid(beta * _promote(r_chosen_b) - delta)
    return _reduce(loss_b, torch.ones_like(loss_b, dtype=torch.bool), reduction)


def sft_loss(logp_chosen_b: Tensor, n_tokens_b: Tensor) -> Tensor:
    """Per-token NLL of y_p given the positive image, `sum_b -logp_b / sum_b n_b`: a token-level mean like TRL's
    `rpo_alpha` NLL, so long responses weigh by their length."""
    n_tokens_b = n_tokens_b.to(logp_chosen_b.device)
    if (n_tokens_b <= 0).any():
        raise ValueError("n_tokens_chosen must be > 0 for every example (the response token count of y_p)")
    logp_chosen_b = _promote(logp_chosen_b)
    return -logp_chosen_b.sum() / n_tokens_b.to(logp_chosen_b.dtype).sum()


# --- sampling from a proposal --------------------------------------------------------------------------------------

class ProposalSample(NamedTuple):
    """K' draws with replacement from each example's pool."""

    idx_bk: Tensor
    """(B, K') long: positions in the example's pool (0 for an example with an empty pool)."""
    q_bk: Tensor
    """(B, K') the (renormalised) proposal probability of each draw (1 for an empty pool)."""
    mask_bk: Tensor
    """(B, K') bool: False for every draw of an example with an empty pool."""


def sample_from_proposal(q_pool_bc: Tensor, pool_mask_bc: Tensor | None, k_prime: int,
                         generator: torch.Generator | None = None) -> ProposalSample:
    """Draw K' candidates per example from q over its valid pool, with replacement; deterministic under
    `generator` (which must live on q's device). q is renormalised over the valid entries (the shard stores it
    rounded, and padding must never be drawn)."""
    if not isinstance(k_prime, int) or k_prime < 1:
        raise ValueError(f"k_prime={k_prime!r} must be an integer >= 1 (draws per example)")
    q_bc = _promote(q_pool_bc).detach()
    mask_bc = _mask_like(pool_mask_bc, q_bc)
    bad = mask_bc & ~(torch.isfinite(q_bc) & (q_bc > 0))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} valid pool candidates have q <= 0 or non-finite: such a candidate can "
                         "never be drawn and Z_hat would miss it; use a larger mining tau, or is_mode='learned' "
                         "whose mixture keeps q > 0")
    q_bc = _zero_where_invalid(q_bc, mask_bc)
    has_b = mask_bc.any(-1)
    q_bc = q_bc / q_bc.sum(-1, keepdim=True).clamp_min(1e-300)
    bsz = q_bc.shape[0]
    if q_bc.shape[1] == 0:
        zeros = torch.zeros(bsz, k_prime, dtype=torch.long, device=q_bc.device)
        return ProposalSample(zeros, torch.ones(bsz, k_prime, dtype=q_bc.dtype, device=q_bc.device), zeros.bool())
    # multinomial refuses an all-zero row; an empty pool draws from a dummy row and is masked out
    probs_bc = torch.where(has_b[:, None], q_bc, torch.ones_like(q_bc))
    idx_bk = torch.multinomial(probs_bc, k_prime, replacement=True, generator=generator)
    mask_bk = has_b[:, None].expand(-1, k_prime).clone()
    q_bk = torch.where(mask_bk, q_bc.gather(1, idx_bk), torch.ones_like(idx_bk, dtype=q_bc.dtype))
    return ProposalSample(_zero_where_invalid(idx_bk, mask_bk), q_bk, mask_bk)


def proposal_entropy(q_pool_bc: Tensor, pool_mask_bc: Tensor | None = None) -> Tensor:
    """(B,) entropy in nats of q over each valid pool (log C for uniform; low means few candidates get drawn)."""
    q_bc = _promote(q_pool_bc).detach()
    mask_bc = _mask_like(pool_mask_bc, q_bc)
    q_bc = _zero_where_invalid(q_bc, mask_bc)
    q_bc = q_bc / q_bc.sum(-1, keepdim=True).clamp_min(1e-300)
    return -torch.where(q_bc > 0, q_bc * torch.log(q_bc.clamp_min(1e-300)), torch.zeros_like(q_bc)).sum(-1)


# --- configuration -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossConfig:
    """Which loss terms a run uses (SPEC §3–4). Defaults are the `misp` preset."""

    beta: float = 0.5
    """DPO temperature (paper sweep: 0.45-0.75 best, 0.5 chosen)."""
    lambda_text: float = 1.0
    """Weight of the text DPO term; 0 turns it off."""
    use_image: bool = True
    """Add the image-side term (pairwise when one negative, Plackett-Luce when several)."""
    image_negatives: Literal["none", "crop", "diffusion_noise", "shard"] = "shard"
    """Where the negatives come from: made on the fly from the positive (`crop`, `diffusion_noise`) or read from
    preference shards (`shard`, the only source with candidate pools)."""
    num_negatives: int = 3
    """K: negatives per example (the paper's K = 3; the pairwise presets use 1)."""
    fresh_negatives: bool = False
    """`crop` / `diffusion_noise`: a new crop or noise draw every step, as mDPO and CHiP do (their reference
    log-probs then change every step: the run needs `reference: online`). False: one fixed negative per example,
    which a cached reference can hold."""
    loss_form: Literal["sum", "chip_joint"] = "sum"
    """`sum`: L_img + lambda_text L_text, two sigmoids (our decomposed form). `chip_joint`: CHiP's own form, one
    sigmoid over lambda_text beta (r_c - r_r) + beta (r_c - r_neg) (`chip_joint_loss`); needs one image
    negative and no IS."""
    shard_rule: str | None = "greedy"
    """The mining rule the shards must have been written with (`pipeline.selection.RULES`; checked when the run is
    built against the rule recorded in the shards, so a new rule needs no change here); None unless
    image_negatives = 'shard'."""
    is_mode: Literal["none", "fixed", "learned"] = "none"
    """`none`: PL over the K selected negatives. `fixed`: PL over the pool, K' draws from the shard's q.
    `learned`: K' draws from (1 - eps) q_phi + eps q_fixed, q_phi trained online (trainer/proposal.py)."""
    k_prime: int = 4
    """K': draws per example for importance sampling (ignored when is_mode = 'none')."""
    anchor_weight: float = 0.0
    """Weight of mDPO's anchor -logsigmoid(beta r_c - anchor_delta); 0 turns it off."""
    anchor_delta: float = 0.0
    """mDPO's anchor threshold delta (mDPO: 0)."""
    sft_weight: float = 0.0
    """Weight of the per-token NLL of the chosen response; 0 turns it off."""
    proposal_eps: float = 0.1
    """learned: mixture weight of q_fixed; keeps q >= eps * q_fixed > 0 so the weights e^a / q stay bounded."""
    proposal_hidden: int = 64
    """learned: hidden width of g_phi."""
    proposal_lr: float = 1e-3
    """learned: Adam learning rate of g_phi (its own optimiser, stepped by the loop)."""
    seed: int = 0
    """Seed of the IS draws and of g_phi's initialisation."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta!r} must be > 0 (paper: 0.5)")
        for name in ("lambda_text", "anchor_weight", "sft_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0 (0 turns the term off)")
        if self.image_negatives not in IMAGE_NEGATIVES:
            raise ValueError(f"image_negatives={self.image_negatives!r}: use one of {IMAGE_NEGATIVES}")
        if self.is_mode not in IS_MODES:
            raise ValueError(f"is_mode={self.is_mode!r}: use one of {IS_MODES}")
        for name in ("num_negatives", "k_prime", "proposal_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.use_image == (self.image_negatives == "none"):
            raise ValueError(f"use_image={self.use_image} with image_negatives={self.image_negatives!r}: an image "
                             "term needs a negative source and a source needs the term; set both or neither")
        if self.is_mode != "none" and self.image_negatives != "shard":
            raise ValueError(f"is_mode={self.is_mode!r} samples from candidate pools, which only shards have: set "
                             f"image_negatives='shard' (now {self.image_negatives!r}) or is_mode='none'")
        if (self.shard_rule is None) == (self.image_negatives == "shard"):
            raise ValueError(f"shard_rule={self.shard_rule!r} with image_negatives={self.image_negatives!r}: name the "
                             f"mining rule (e.g. 'greedy') exactly when negatives come from shards, else None")
        if self.fresh_negatives and self.image_negatives not in ("crop", "diffusion_noise"):
            raise ValueError(f"fresh_negatives=True remakes a crop or noise every step, but image_negatives="
                             f"{self.image_negatives!r} has nothing to remake: set fresh_negatives=False")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form={self.loss_form!r}: use one of {LOSS_FORMS}")
        if self.loss_form == "chip_joint" and not (self.use_image and self.num_negatives == 1 and
                                                   self.is_mode == "none" and self.lambda_text > 0):
            raise ValueError("loss_form='chip_joint' (CHiP's one sigmoid over the text and image margins) needs "
                             "use_image=True, num_negatives=1, is_mode='none' and lambda_text > 0; use "
                             "loss_form='sum' otherwise")
        if self.is_mode == "learned":
            if not 0 < self.proposal_eps <= 1:
                raise ValueError(f"proposal_eps={self.proposal_eps!r} must be in (0, 1]: at 0 nothing bounds q "
                                 "away from 0 and a weight e^a / q can blow up")
            if not self.proposal_lr > 0:
                raise ValueError(f"proposal_lr={self.proposal_lr!r} must be > 0")
        if self.lambda_text == 0 and not self.use_image and self.anchor_weight == 0 and self.sft_weight == 0:
            raise ValueError("every loss term is off: set lambda_text > 0, use_image=True, anchor_weight > 0 or "
                             "sft_weight > 0")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LossConfig":
        """A preset with some fields changed; the combination is validated again."""
        if name not in PRESETS:
            raise ValueError(f"unknown loss preset {name!r}: use one of {tuple(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @property
    def uses_pool(self) -> bool:
        """The loop must forward K' sampled pool candidates (and have reference log-probs for the whole pool)."""
        return self.use_image and self.is_mode != "none"


PRESETS: dict[str, LossConfig] = {
    # The control of every comparison (docs/experiment.md): the chosen response's NLL alone, no preference term.
    "sft": LossConfig(lambda_text=0.0, use_image=False, image_negatives="none", shard_rule=None, num_negatives=1,
                      sft_weight=1.0),
    # SPEC §4. mdpo / chip: one negative made from the positive, so the PL term is the pairwise one. Both remake it
    # every step as their papers' code does (a new crop; new noise at t = 500 of VCD's schedule), so they need the
    # online reference; chip uses CHiP's joint loss form. random_multi: K uniform draws from the whole gallery.
    "dpo": LossConfig(use_image=False, image_negatives="none", shard_rule=None, num_negatives=1),
    "mdpo": LossConfig(image_negatives="crop", shard_rule=None, num_negatives=1, anchor_weight=1.0, anchor_delta=0.0,
                       fresh_negatives=True),
    "chip": LossConfig(image_negatives="diffusion_noise", shard_rule=None, num_negatives=1, fresh_negatives=True,
                       loss_form="chip_joint"),
    "random_multi": LossConfig(image_negatives="shard", shard_rule="random_pool", num_negatives=3),
    "misp": LossConfig(image_negatives="shard", shard_rule="greedy", num_negatives=3),
}


# --- one batch -----------------------------------------------------------------------------------------------------

@dataclass
class LossInputs:
    """One batch of B examples: response log-probs summed over tokens, policy (`logp_*`) and reference (`ref_*`).

    Padding (masked entries) may hold any finite or non-finite value; it gets an exact zero gradient."""

    logp_chosen: Tensor  # (B,) log pi(y_p | x, m_p)
    ref_chosen: Tensor  # (B,)
    logp_rejected: Tensor | None = None  # (B,) log pi(y_n | x, m_p)
    ref_rejected: Tensor | None = None  # (B,)
    has_rejected: Tensor | None = None  # (B,) bool; None = all present
    logp_neg: Tensor | None = None  # (B, K) log pi(y_p | x, m_i), image negatives (is_mode none)
    ref_neg: Tensor | None = None  # (B, K)
    neg_mask: Tensor | None = None  # (B, K) bool; None = all valid
    logp_samp: Tensor | None = None  # (B, K') log pi(y_p | x, m_{i_k}), sampled pool candidates (IS)
    ref_samp: Tensor | None = None  # (B, K')
    q_samp: Tensor | None = None  # (B, K') proposal probability each draw was made with
    samp_mask: Tensor | None = None  # (B, K') bool; None = all valid
    q_pool: Tensor | None = None  # (B, C) the proposal sampled from (only for the is/q_entropy metric)
    pool_mask: Tensor | None = None  # (B, C) bool
    n_tokens_chosen: Tensor | None = None  # (B,) response tokens of y_p (sft term)

    def __post_init__(self) -> None:
        bsz = self.logp_chosen.shape[0]
        expect = {"logp_chosen": 1, "ref_chosen": 1, "logp_rejected": 1, "ref_rejected": 1, "has_rejected": 1,
                  "logp_neg": 2, "ref_neg": 2, "neg_mask": 2, "logp_samp": 2, "ref_samp": 2, "q_samp": 2,
                  "samp_mask": 2, "q_pool": 2, "pool_mask": 2, "n_tokens_chosen": 1}
        for name, ndim in expect.items():
            x = getattr(self, name)
            if x is not None and (x.ndim != ndim or x.shape[0] != bsz):
                raise ValueError(f"LossInputs.{name} has shape {tuple(x.shape)}; expected {ndim} dims with B={bsz} "
                                 "first (see the shape comments of LossInputs)")
        for group in (("logp_rejected", "ref_rejected", "has_rejected"), ("logp_neg", "ref_neg", "neg_mask"),
                      ("logp_samp", "ref_samp", "q_samp", "samp_mask"), ("q_pool", "pool_mask")):
            shapes = {tuple(getattr(self, n).shape) for n in group if getattr(self, n) is not None}
            if len(shapes) > 1:
                raise ValueError(f"LossInputs fields {group} must share one shape, got {sorted(shapes)}")


class LossOutput(NamedTuple):
    loss: Tensor
    """() the total loss to backpropagate."""
    metrics: dict[str, float]
    """TRL's names (`loss`, `rewards/*`, `logps/*`) plus ours (`loss/*`, `rewards/img_*`, `is/*`); a metric whose
    inputs the batch lacks (no rejected response, no negatives) is left out, not NaN."""
    is_weights: Tensor | None
    """(B, K') normalised IS weights (detached) for LearnedProposal.update; None without importance sampling."""


def _require(inputs: LossInputs, names: tuple[str, ...], why: str) -> None:
    missing = [n for n in names if getattr(inputs, n) is None]
    if missing:
        raise ValueError(f"{why} needs LossInputs.{', '.join(missing)}")


def compute_loss(cfg: LossConfig, inputs: LossInputs) -> LossOutput:
    """`L = L_img + lambda_text L_text + anchor_weight L_anchor + sft_weight L_sft` for one batch, each term a
    mean over the examples it applies to, and the metrics."""
    beta = cfg.beta
    logp_c = _promote(inputs.logp_chosen)
    r_c = logp_c - _promote(inputs.ref_chosen).to(logp_c.device)
    total = torch.zeros((), dtype=r_c.dtype, device=r_c.device)
    logs: dict[str, Tensor] = {"rewards/chosen": beta * r_c.mean(), "logps/chosen": logp_c.mean()}

    if cfg.lambda_text > 0:
        _require(inputs, ("logp_rejected", "ref_rejected"), f"lambda_text={cfg.lambda_text} (the text DPO term)")
    if inputs.logp_rejected is not None and inputs.ref_rejected is not None:
        has_b = _mask_like(inputs.has_rejected, inputs.logp_rejected)
        logp_r = _zero_where_invalid(_promote(inputs.logp_rejected), has_b)
        r_r = _zero_where_invalid(logp_r - _promote(inputs.ref_rejected), has_b)
        if cfg.lambda_text > 0 and cfg.loss_form == "sum":
            l_text = text_dpo_loss(r_c, r_r, beta, has_b)
            total = total + cfg.lambda_text * l_text
            logs["loss/text"] = l_text
        if has_b.any():
            logs["rewards/rejected"] = masked_mean(beta * r_r, has_b)
            logs["rewards/margins"] = masked_mean(beta * (r_c - r_r), has_b)
            logs["rewards/accuracies"] = masked_mean((r_c > r_r).to(r_c.dtype), has_b)
            logs["logps/rejected"] = masked_mean(logp_r, has_b)

    r_r_b, has_r_b = (r_r, has_b) if inputs.logp_rejected is not None and inputs.ref_rejected is not None \
        else (None, None)
    is_weights = None
    # The image metrics describe the negatives the image term saw: the K selected ones, or the K' draws with IS.
    # Without an image term they are still logged when the batch carries negatives (to watch what DPO alone does).
    img_logp = img_ref = img_mask = None
    if cfg.uses_pool:
        _require(inputs, ("logp_samp", "ref_samp", "q_samp"), f"is_mode={cfg.is_mode!r}")
        img_logp, img_ref = _promote(inputs.logp_samp), _promote(inputs.ref_samp)
        img_mask = _mask_like(inputs.samp_mask, img_logp)
        out = importance_sampled_pl_loss(r_c, img_logp - img_ref, inputs.q_samp, beta, img_mask)
        total = total + out.loss
        logs["loss/img"] = out.loss
        logs["is/ess"] = masked_mean(out.ess_b / img_mask.sum(-1).clamp(min=1), out.valid_b)
        logs["is/max_weight"] = masked_mean(out.max_weight_b, out.valid_b)
        is_weights = out.weights_bk
    elif cfg.use_image:
        _require(inputs, ("logp_neg", "ref_neg"), f"the image term (image_negatives={cfg.image_negatives!r})")
    if not cfg.uses_pool and inputs.logp_neg is not None and inputs.ref_neg is not None:
        img_logp, img_ref = _promote(inputs.logp_neg), _promote(inputs.ref_neg)
        img_mask = _mask_like(inputs.neg_mask, img_logp)
        if cfg.use_image and cfg.loss_form == "chip_joint":
            if img_logp.shape[1] != 1 or not img_mask.all():
                raise ValueError(f"loss_form='chip_joint' needs exactly one valid image negative per example; got "
                                 f"shape {tuple(img_logp.shape)} with {int((~img_mask).sum())} masked")
            l_joint = chip_joint_loss(r_c, r_r_b, (img_logp - img_ref)[:, 0], beta, has_r_b, cfg.lambda_text)
            total = total + l_joint
            logs["loss/chip_joint"] = l_joint
        elif cfg.use_image:
            l_img = image_pl_loss(r_c, img_logp - img_ref, img_mask, beta)
            total = total + l_img
            logs["loss/img"] = l_img
    if img_logp is not None and img_mask.any():
        r_i = img_logp - img_ref
        logs["rewards/img_margin"] = masked_mean(beta * (r_c[:, None] - r_i), img_mask)
        logs["rewards/img_accuracy"] = masked_mean((r_c[:, None] > r_i).to(r_c.dtype), img_mask)
        logs["logps/img_negatives"] = masked_mean(img_logp, img_mask)
    if inputs.q_pool is not None:
        pool_mask = _mask_like(inputs.pool_mask, inputs.q_pool)
        logs["is/q_entropy"] = masked_mean(proposal_entropy(inputs.q_pool, pool_mask), pool_mask.any(-1))

    if cfg.anchor_weight > 0:
        l_anchor = anchor_loss(r_c, beta, cfg.anchor_delta)
        total = total + cfg.anchor_weight * l_anchor
        logs["loss/anchor"] = l_anchor
    if cfg.sft_weight > 0:
        _require(inputs, ("n_tokens_chosen",), f"sft_weight={cfg.sft_weight}")
        l_sft = sft_loss(logp_c, inputs.n_tokens_chosen)
        total = total + cfg.sft_weight * l_sft
        logs["loss/sft"] = l_sft

    logs = {"loss": total, **logs}
    # one device->host transfer for all metrics instead of one per .item()
    values = torch.stack([v.detach().to(total.dtype).reshape(()) for v in logs.values()]).tolist()
    return LossOutput(total, dict(zip(logs, values)), is_weights)
