"""One optimizer step of a built run (trainer/state.py): `batch_at(state, s)` picks step s's examples, `step(state,
batch)` forwards them, applies the loss, backpropagates, steps AdamW and the schedule, and returns the loss and the
metrics. The loop (trainer/train.py), the benchmarks (bench/train.py, bench/gpu.py) and through the loop the
experiment run exactly this."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from trainer.losses import LossInputs, LossOutput, compute_loss, sample_from_proposal
from trainer.model_loading import response_logps_from_model
from trainer.pool_features import pool_tensors
from trainer.rows import build_rows, encode_rows, gather

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.state import TrainState


class Batch(NamedTuple):
    """What one process forwards in one optimizer step."""

    step: int
    """The optimizer step, from 0: it fixes the examples, fresh negatives (mdpo, chip) and the reference rows."""
    micro_batches: list[list[dict]]
    """This process's examples of the step, one list per gradient-accumulation micro-batch (`grad_accum` lists)."""


class StepOutput(NamedTuple):
    """One optimizer step's result."""

    loss: float
    """The loss, averaged over micro-batches and processes (the logged `loss`)."""
    metrics: dict[str, float]
    """What the loop logs for the step: the loss's metrics (TRL's names, docs/trainer.md) averaged over
    micro-batches and processes, `ref/probe_*` and `proposal/*` where on, and `step` (1-based), `lr` (of the next
    step), `epoch`."""
    rows: int
    """VLM rows this process forwarded through the policy in the step (the cost figure)."""


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Examples of optimizer step `step`: epochs are seeded permutations, so any step is known without state
    (resume needs only the step number) and every process agrees on it."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    if n < batch_size:
        perm = (perm * math.ceil(batch_size / n))[:batch_size]
        pos = 0
    return perm[pos * batch_size:(pos + 1) * batch_size]


def micro_batch_indices(step: int, cfg: TrainConfig, n_examples: int, num_processes: int) -> list[list[list[int]]]:
    """Example indices of `step` per process, then per micro-batch, in the order the step forwards them."""
    idx = batch_indices(step, n_examples, cfg.batch_size, cfg.seed)
    per_proc = cfg.batch_size // num_processes
    micro = per_proc // cfg.grad_accum
    return [[idx[p * per_proc:(p + 1) * per_proc][m * micro:(m + 1) * micro] for m in range(cfg.grad_accum)]
            for p in range(num_processes)]


def batch_at(state: TrainState, step: int) -> Batch:
    """This process's examples of optimizer step `step`."""
    acc = state.acc
    mine = micro_batch_indices(step, state.cfg, len(state.examples), acc.num_processes)[acc.process_index]
    return Batch(step, [[state.examples[i] for i in part] for part in mine])


def step(state: TrainState, batch: Batch) -> StepOutput:
    """Forward, loss and backward of each micro-batch (gradients synchronised across processes on the last),
    clipping, AdamW, the LR schedule, then the metrics averaged over micro-batches and processes."""
    cfg, acc, model = state.cfg, state.acc, state.model
    model.train()
    parts: list[dict] = []
    rows = 0
    for m, examples in enumerate(batch.micro_batches):
        ctx = acc.no_sync(model) if m < len(batch.micro_batches) - 1 else _null()
        with ctx:
            result, n_rows = micro_batch_loss(state, examples, batch.step)
            acc.backward(result.loss / cfg.grad_accum)
        rows += n_rows
        parts.append(result.metrics)
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(state.params, cfg.max_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.probe is not None and (batch.step + 1) % cfg.reference_check_every == 0:
        parts[-1].update(state.probe.check(state))
    if state.proposal is not None and acc.num_processes > 1:
        # q_phi is trained on each process's own draws with all-reduced gradients: every copy must be equal.
        copies = acc.gather(state.proposal.flat_parameters().to(acc.device)[None]).cpu()
        parts[-1]["proposal/process_disagreement"] = float((copies - copies[:1]).abs().max())
    metrics = _reduce_metrics(parts, acc)
    metrics.update({"step": batch.step + 1, "lr": state.scheduler.get_last_lr()[0],
                    "epoch": (batch.step + 1) * cfg.batch_size / len(state.examples)})
    return StepOutput(metrics["loss"], metrics, rows)


def micro_batch_loss(state: TrainState, examples: list[dict], step: int) -> tuple[LossOutput, int]:
    """Forward one micro-batch and compute the preset's loss (with `learned` IS, also q_phi's own update).
    Returns the loss output and the number of rows forwarded."""
    cfg, loss_cfg, acc, proposal = state.cfg, state.cfg.loss, state.acc, state.proposal
    pool_q = pool_mask = feats = sample = q_fixed = None
    positions = None
    if loss_cfg.uses_pool:
        q_fixed, pool_mask, feats = pool_tensors(examples, proposal.num_latents if proposal else 1,
                                                 with_features=proposal is not None)
        # Sample from the learned mixture (or the shard's q) and weight each draw by the q it was drawn with.
        pool_q = proposal.mixture(feats, q_fixed.float(), pool_mask).double() if proposal else q_fixed
        sample = sample_from_proposal(pool_q, pool_mask, loss_cfg.k_prime, state.is_gen)
        positions = sample.idx_bk.tolist()
    rows = build_rows(examples, loss_cfg, cfg.seed, pool_positions=positions, with_text=loss_cfg.lambda_text > 0,
                      step=step)
    enc = encode_rows(state.processor, rows, max_length=cfg.max_length).to(acc.device)
    with acc.autocast():
        logps = response_logps_from_model(state.model, enc).double()
    ref = reference_logps(state, rows, enc).to(logps.device)
    pol, rf = _row_logps(rows, logps), _row_logps(rows, ref)
    n_tokens = torch.tensor([e - s for s, e in enc.spans], device=logps.device)[rows.chosen]
    inputs = dict(logp_chosen=pol["chosen"], ref_chosen=rf["chosen"], n_tokens_chosen=n_tokens.double())
    if loss_cfg.lambda_text > 0:
        inputs.update(logp_rejected=pol["rejected"], ref_rejected=rf["rejected"],
                      has_rejected=pol["has_rejected"])
    if "neg" in pol:
        if sample is not None:
            inputs.update(logp_samp=pol["neg"], ref_samp=rf["neg"], q_samp=sample.q_bk.to(logps.device),
                          samp_mask=sample.mask_bk.to(logps.device) & pol["neg_mask"],
                          q_pool=pool_q.to(logps.device), pool_mask=pool_mask.to(logps.device))
        else:
            inputs.update(logp_neg=pol["neg"], ref_neg=rf["neg"], neg_mask=pol["neg_mask"])
    result = compute_loss(loss_cfg, LossInputs(**inputs))
    if proposal is not None and result.is_weights is not None:
        average = (lambda t: acc.reduce(t.to(acc.device), reduction="mean").cpu()) if acc.num_processes > 1 else None
        result.metrics.update(proposal.update(feats, q_fixed.float(), pool_mask, sample.idx_bk,
                                              result.is_weights.detach().cpu(), sample.mask_bk, average=average))
    return result, len(rows.keys)


def reference_logps(state: TrainState, rows, enc) -> torch.Tensor:
    """Reference log-probs of the rows: looked up in the cache, or computed by the online reference."""
    if state.cache is not None:
        missing = state.cache.missing(rows.keys)
        if missing:
            raise KeyError(f"reference cache lacks {len(missing)} rows (e.g. {missing[0]}); delete the run's "
                           "ref_cache file or use reference=online")
        return state.cache.lookup(rows.keys).to(enc.input_ids.device)
    return state.online_ref.logps(state.acc.unwrap_model(state.model), enc, state.acc.autocast)


class Probe:
    """`reference_check_every`: the reference and policy log-probs of a fixed batch (the first example of step
    0) at step 0, compared with later ones. The reference must not move at all."""

    def __init__(self, rows, enc):
        self.rows, self.enc = rows, enc
        self.ref0 = self.pol0 = None

    @classmethod
    def start(cls, state: TrainState) -> Probe:
        cfg = state.cfg
        first = state.examples[batch_indices(0, len(state.examples), cfg.batch_size, cfg.seed)[0]]
        rows = build_rows([first], cfg.loss, cfg.seed, with_text=cfg.loss.lambda_text > 0, step=0)
        probe = cls(rows, encode_rows(state.processor, rows, max_length=cfg.max_length).to(state.acc.device))
        probe.ref0, probe.pol0 = probe._measure(state)
        return probe

    def _measure(self, state: TrainState):
        ref = reference_logps(state, self.rows, self.enc)
        with torch.no_grad(), state.acc.autocast():
            pol = response_logps_from_model(state.acc.unwrap_model(state.model), self.enc).double()
        return ref, pol

    def check(self, state: TrainState) -> dict[str, float]:
        ref, pol = self._measure(state)
        return {"ref/probe_drift": float((ref - self.ref0).abs().max()),
                "ref/probe_policy_change": float((pol - self.pol0).abs().max())}


def _row_logps(rows, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-role tensors of one batch from per-row log-probs."""
    out = {"chosen": values[rows.chosen]}
    out["rejected"], out["has_rejected"] = gather(values, rows.rejected)
    if rows.neg.shape[1]:
        out["neg"], out["neg_mask"] = gather(values, rows.neg)
    return out


def _reduce_metrics(parts: list[dict], acc) -> dict:
    keys = sorted({k for p in parts for k in p})
    local = torch.tensor([[np.nanmean([p.get(k, np.nan) for p in parts]) for k in keys]], dtype=torch.float64,
                         device=acc.device)
    everyone = acc.gather(local)
    return {k: float(np.nanmean(everyone[:, i].cpu().numpy())) for i, k in enumerate(keys)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
