"""The learned proposal q_phi of importance-sampled MISP-DPO (SPEC §3, `is_mode = "learned"`).

`q_phi = softmax over the pool of g_phi(features)`, g_phi a small MLP on each candidate's densified SAE code, its
score s_i and its CLIP similarity to the positive. The loop samples from the defensive mixture
`q = (1 - eps) q_phi + eps q_fixed`, forwards the draws, and then calls `LearnedProposal.update` with the normalised
IS weights of the policy loss, which trains q_phi towards the PL posterior `p = softmax(a)` over the pool.

Why the IS correction in the update: we want `min KL(p || q_phi) = const - sum_i p_i log q_phi_i`, but only see a_i
on K' draws from q. `sum_i p_i f_i = E_q[e^a / q f] / E_q[e^a / q]`, so the self-normalised estimate is
`sum_k w_k f_{i_k}` with `w_k = softmax_k(a_k - log q_k)`, the same weights as the policy loss. Using softmax(a)
over the draws instead (no 1/q) would target p_i q_i (renormalised): the proposal would chase itself.

Why the mixture: a weight is e^a / q, so a q_phi that collapses onto a few candidates would give any other draw an
enormous weight (and one draw would carry the whole estimate). With the mixture, q_i >= eps * q_fixed_i, and q_fixed
= softmax(s / tau) with s in [0, w_rec + w_dev] is itself >= e^{-(w_rec + w_dev)/tau} / C: every weight is bounded.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from trainer.losses import LossConfig, masked_mean


def candidate_features(code_idx_bcn: Tensor, code_val_bcn: Tensor, score_bc: Tensor, clip_sim_bc: Tensor,
                       num_latents: int) -> Tensor:
    """(B, C, num_latents + 2) features of each pool candidate: the shard's compact SAE code (top-n latent indices,
    u16, and their values) scattered into num_latents dense slots, then the score s_i and the CLIP similarity.
    Padding candidates must carry in-range indices (e.g. 0) and are masked later."""
    idx = code_idx_bcn.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_latents):
        raise ValueError(f"SAE code indices span [{int(idx.min())}, {int(idx.max())}] but num_latents={num_latents}: "
                         "pass the num_latents of the SAE the shards were mined with")
    val = code_val_bcn.to(torch.float32)
    dense = torch.zeros(*idx.shape[:2], num_latents, dtype=val.dtype, device=val.device)
    dense.scatter_add_(-1, idx.to(val.device), val)
    extra = torch.stack([score_bc.to(dense), clip_sim_bc.to(dense)], dim=-1)
    return torch.cat([dense, extra], dim=-1)


def _masked_log_normalise(logits_bc: Tensor, mask_bc: Tensor) -> Tensor:
    """log_softmax over valid entries; -inf at padding; an empty row becomes zeros (never used)."""
    logits = torch.where(mask_bc, logits_bc, torch.full_like(logits_bc, -math.inf))
    logits = torch.where(mask_bc.any(-1, keepdim=True), logits, torch.zeros_like(logits))
    return torch.log_softmax(logits, dim=-1)


class ProposalNet(nn.Module):
    """g_phi: per-candidate logit `log q_fixed + MLP(features)`.

    The last layer starts at zero, so q_phi starts as q_fixed and learns a correction: the first steps sample
    exactly as `is_mode = fixed` would, instead of from an arbitrary random proposal. (The score is one of the
    features, so this is still a function of the candidate's features, as SPEC §3 asks.)"""

    def __init__(self, num_features: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, feats_bcf: Tensor, q_fixed_bc: Tensor, pool_mask_bc: Tensor) -> Tensor:
        """(B, C) log q_phi over each valid pool (-inf at padding)."""
        logits_bc = torch.log(q_fixed_bc.to(feats_bcf).clamp_min(1e-30)) + self.mlp(feats_bcf).squeeze(-1)
        return _masked_log_normalise(logits_bc, pool_mask_bc)


class LearnedProposal:
    """q_phi with its own Adam optimiser, apart from the policy's. Per step the loop calls
    `mixture` (what to sample from) -> `losses.sample_from_proposal` -> forward -> `compute_loss` ->
    `update(..., out.is_weights, ...)`. `state_dict`/`load_state_dict` go into the checkpoint."""

    def __init__(self, num_latents: int, *, eps: float = 0.1, hidden: int = 64, lr: float = 1e-3, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if not 0 < eps <= 1:
            raise ValueError(f"eps={eps!r} must be in (0, 1]: it is what keeps q away from 0")
        self.num_latents, self.eps = num_latents, eps
        # seeded without touching the global RNG (the policy's init and dropout must not depend on this)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = ProposalNet(num_latents + 2, hidden).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)

    @classmethod
    def from_config(cls, cfg: LossConfig, num_latents: int, device: str | torch.device = "cpu") -> "LearnedProposal":
        if cfg.is_mode != "learned":
            raise ValueError(f"a learned proposal is used only with is_mode='learned' (got {cfg.is_mode!r})")
        return cls(num_latents, eps=cfg.proposal_eps, hidden=cfg.proposal_hidden, lr=cfg.proposal_lr, seed=cfg.seed,
                   device=device)

    def log_q_phi(self, feats_bcf: Tensor, q_fixed_bc: Tensor, pool_mask_bc: Tensor) -> Tensor:
        """(B, C) log q_phi, differentiable w.r.t. phi."""
        return self.net(feats_bcf, q_fixed_bc, pool_mask_bc.bool())

    @torch.no_grad()
    def mixture(self, feats_bcf: Tensor, q_fixed_bc: Tensor, pool_mask_bc: Tensor) -> Tensor:
        """(B, C) `(1 - eps) q_phi + eps q_fixed` (q_fixed renormalised over the valid pool), 0 at padding:
        sample from this and weight the draws with it."""
        mask_bc = pool_mask_bc.bool()
        q_phi = torch.exp(self.log_q_phi(feats_bcf, q_fixed_bc, mask_bc))
        q_fix = torch.where(mask_bc, q_fixed_bc.to(q_phi), torch.zeros_like(q_phi))
        q_fix = q_fix / q_fix.sum(-1, keepdim=True).clamp_min(1e-30)
        return torch.where(mask_bc, (1 - self.eps) * q_phi + self.eps * q_fix, torch.zeros_like(q_phi))

    def loss(self, feats_bcf: Tensor, q_fixed_bc: Tensor, pool_mask_bc: Tensor, idx_bk: Tensor, weights_bk: Tensor,
             samp_mask_bk: Tensor | None = None) -> Tensor:
        """Self-normalised IS estimate of the cross-entropy `-sum_i p_i log q_phi_i` to the PL posterior:
        `-sum_k w_k log q_phi(i_k)`, w the (stop-gradient) normalised weights the draws got in the policy loss;
        a mean over examples with draws. Equals KL(p || q_phi) up to a constant in phi."""
        log_q_bc = self.log_q_phi(feats_bcf, q_fixed_bc, pool_mask_bc)
        mask_bk = torch.ones_like(idx_bk, dtype=torch.bool) if samp_mask_bk is None else samp_mask_bk.bool()
        log_q_bk = log_q_bc.gather(1, idx_bk.long())
        w_bk = torch.where(mask_bk, weights_bk.detach().to(log_q_bk), torch.zeros_like(log_q_bk))
        ce_b = -(w_bk * torch.where(mask_bk, log_q_bk, torch.zeros_like(log_q_bk))).sum(-1)
        return masked_mean(ce_b, mask_bk.any(-1))

    def update(self, feats_bcf: Tensor, q_fixed_bc: Tensor, pool_mask_bc: Tensor, idx_bk: Tensor, weights_bk: Tensor,
               samp_mask_bk: Tensor | None = None, average: Callable[[Tensor], Tensor] | None = None
               ) -> dict[str, float]:
        """One optimiser step of phi on `loss`; returns `{"proposal/loss": ...}` for the metrics.

        `average`: with several processes, a function returning the mean over processes of a flat tensor (an
        all-reduce). Every process's gradient is replaced by the mean before the step, so copies that start equal
        (same seed) take the same Adam step and stay bit-identical, like DDP does for the policy."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(feats_bcf, q_fixed_bc, pool_mask_bc, idx_bk, weights_bk, samp_mask_bk)
        loss.backward()
        if average is not None:
            params = list(self.net.parameters())
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            flat = average(flat).to(flat)
            for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
        self.opt.step()
        return {"proposal/loss": float(loss.detach())}

    def flat_parameters(self) -> Tensor:
        """All of phi as one float64 vector (to compare copies across processes)."""
        return torch.cat([p.detach().reshape(-1).double() for p in self.net.parameters()])

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "eps": self.eps,
                "num_latents": self.num_latents}

    def load_state_dict(self, state: dict) -> None:
        if state["num_latents"] != self.num_latents or state["eps"] != self.eps:
            raise ValueError(f"proposal checkpoint has num_latents={state['num_latents']}, eps={state['eps']}; this "
                             f"run has {self.num_latents}, {self.eps}: resume with the same SAE and proposal_eps")
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
