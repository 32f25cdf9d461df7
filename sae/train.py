"""Train an SAE on difference pairs (u, t) with Adam, a held-out split and early stopping on its FVU.

    from sae import SaeConfig, TrainConfig, train_sae
    sae, history = train_sae(u, t, SaeConfig(dv=512, dt=512), TrainConfig())
    sae.save("data/sae/fused")

u (N, Dv) = h_v(m_p) - h_v(m_i) for (positive, retrieved candidate) pairs, t (N, Dt) = h_t(x) of each pair's prompt.
Deterministic under `SaeConfig.seed` on one device. `history` is plain data (lists, dicts, floats).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from sae.autoencoder import SparseAutoencoder, prepare_pairs
from sae.config import SaeConfig
from sae.metrics import evaluate, fires
from sae.rank_one import fused_mean


@dataclass
class TrainConfig:
    lr: float = 5e-3
    """Adam learning rate of b_enc; the d_in-sized tensors get lr * min(1, sqrt(1024 / d_in)) (see `param_groups`)."""

    batch_size: int = 256
    """Pairs per optimizer step."""

    max_epochs: int = 30
    """Upper bound on passes over the training split."""

    patience: int = 3
    """Stop after this many epochs without a val FVU improvement larger than `min_delta`."""

    min_delta: float = 1e-3
    """Smallest decrease of val FVU that counts as an improvement."""

    val_fraction: float = 0.1
    """Fraction of pairs held out for early stopping and the reported metrics."""

    init: str = "data"
    """`data`: decoder and encoder rows start at random training pairs' d - mean (see `init_from_data`); `random`."""

    fit_input_scale: bool = True
    """Set SaeConfig.input_scale so that mean ||d||^2 = 1 on the training split (else keep the given scale)."""

    dead_after: int | None = None
    """topk: a latent that has not fired for this many training pairs is dead and gets the AuxK loss; None = one epoch."""

    eval_batch_size: int = 1024
    """Pairs per batch when evaluating the held-out split."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r} must be > 0")
        for name in ("batch_size", "max_epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.patience < 1:
            raise ValueError(f"TrainConfig.patience={self.patience} must be >= 1")
        if self.init not in ("data", "random"):
            raise ValueError(f"TrainConfig.init={self.init!r} is unknown; use 'data' or 'random'")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction={self.val_fraction} must lie strictly between 0 and 1")
        if self.dead_after is not None and self.dead_after < 1:
            raise ValueError(f"TrainConfig.dead_after={self.dead_after} must be >= 1 (or None for one epoch)")


def param_groups(sae: SparseAutoencoder, lr: float) -> list[dict]:
    """Adam moves every coordinate by about lr per step, so a row of d_in coordinates by about lr * sqrt(d_in):
    the d_in-sized tensors get lr * sqrt(1024 / d_in) so that a step moves a row alike at any size, while b_enc
    keeps lr (sigmoid latents must move their bias far from logit(rho)). In a scan on planted data with data
    initialisation, the best base lr was the same (1e-2, of 1e-3..3e-2) at d_in = 1k, 9k and 262k for both
    kinds, and 3e-2 diverged; the default 5e-3 keeps a margin (docs/sae.md)."""
    weight_lr = lr * min(1.0, math.sqrt(1024 / sae.cfg.d_in))
    return [{"params": [sae.W_enc, sae.W_dec, sae.b_dec], "lr": weight_lr}, {"params": [sae.b_enc], "lr": lr}]


@torch.no_grad()
def init_from_data(sae: SparseAutoencoder, u: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> None:
    """Tied rows W_enc[j] = W_dec[j] = unit(d_i - b_dec) for k random training pairs i.

    Every d lies in the small set of rank-one matrices, while a random row of Dv*Dt coordinates is almost orthogonal
    to all of them (pre-activations ~ 1/sqrt(Dv Dt)): a row starting on a data point starts inside that set. At
    Dv = Dt = 512 (planted data, 6 epochs, lr 3e-3) this took val FVU from 1.01 to 0.68 (sigmoid) and from 0.63
    to 0.52 (topk).
    """
    k = sae.cfg.num_latents
    n = u.shape[0]
    pick = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    pick = pick.to(u.device)
    rows = sae.cfg.input_scale * u[pick][:, :, None] * t[pick][:, None, :] - sae.b_dec
    norms = rows.flatten(1).norm(dim=1)
    # a pair equal to the mean gives a zero row: keep the random initialisation there
    ok = norms > 1e-6 * norms.max().clamp_min(1e-30)
    rows = rows[ok] / norms[ok][:, None, None]
    sae.W_dec[ok] = rows
    sae.W_enc[ok] = rows


def fit_input_scale(u: torch.Tensor, t: torch.Tensor) -> float:
    """s such that mean_i ||s vec(u_i t_i^T)||^2 = s^2 mean_i ||u_i||^2 ||t_i||^2 = 1."""
    mean_sq = float(((u.double() ** 2).sum(-1) * (t.double() ** 2).sum(-1)).mean())
    if not mean_sq > 0:
        raise ValueError("all training pairs have d = 0 (u or t is zero everywhere); cannot fit an input scale")
    return 1.0 / math.sqrt(mean_sq)


def split_indices(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation cut into (train, val); both non-empty."""
    if n < 2:
        raise ValueError(f"need at least 2 pairs to train with a held-out split, got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:], perm[:n_val]


def train_sae(
    u,
    t,
    cfg: SaeConfig,
    train: TrainConfig | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[SparseAutoencoder, dict]:
    """Train an SAE on pairs u (N, Dv), t (N, Dt) (t ignored for space='image'); return it (best val FVU epoch,
    on `device`, eval mode) and the history: per-epoch records, best epoch, final val metrics, configs."""
    # The backward of the per-prompt gathers (P[inverse], Q[inverse]) sums in a thread-dependent order on CPU:
    # without deterministic algorithms, two runs on the same pairs gave different weights (and shards).
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train_sae(u, t, cfg, train, device=device, dtype=dtype, progress=progress)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train_sae(u, t, cfg: SaeConfig, train: TrainConfig | None, *, device, dtype, progress):
    train = train or TrainConfig()
    device = torch.device(device or "cpu")
    generator = torch.Generator().manual_seed(cfg.seed)

    u, t = prepare_pairs(cfg, u, t, device=device, dtype=dtype)
    train_idx, val_idx = split_indices(u.shape[0], train.val_fraction, generator)
    if train.fit_input_scale:
        cfg = replace(cfg, input_scale=fit_input_scale(u[train_idx], t[train_idx]))

    sae = SparseAutoencoder(cfg, device=device, dtype=dtype, generator=generator)
    with torch.no_grad():
        # Start the decoder bias at the data mean: the encoder then sees deviations from the typical difference,
        # and the latents spend no capacity on the mean.
        sae.b_dec.copy_(fused_mean(u[train_idx], t[train_idx], cfg.input_scale))
    if train.init == "data":
        init_from_data(sae, u[train_idx], t[train_idx], generator)
    opt = torch.optim.Adam(param_groups(sae, train.lr))
    n_train = len(train_idx)
    dead_after = train.dead_after or n_train
    since_fired = torch.zeros(cfg.num_latents, dtype=torch.long, device=device)
    steps_per_epoch = math.ceil(n_train / train.batch_size)

    records: list[dict] = []
    best = (math.inf, 0, copy.deepcopy(sae.state_dict()))
    stale, stopped_early = 0, False
    bar = tqdm(total=train.max_epochs * steps_per_epoch, desc=f"sae {cfg.kind}/{cfg.space}", disable=not progress)
    for epoch in range(1, train.max_epochs + 1):
        start = time.perf_counter()
        sae.train()
        order = train_idx[torch.randperm(n_train, generator=generator)]
        fired_epoch = torch.zeros(cfg.num_latents, dtype=torch.bool, device=device)
        sums = {"loss": 0.0, "recon": 0.0, "sparsity": 0.0, "auxk": 0.0, "fvu": 0.0}
        for step in range(steps_per_epoch):
            idx = order[step * train.batch_size : (step + 1) * train.batch_size].to(device)
            dead_mask = since_fired >= dead_after if cfg.kind == "topk" else None
            out = sae(u[idx], t[idx], dead_mask=dead_mask)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.unit_norm_decoder:
                sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            if cfg.unit_norm_decoder:
                sae.set_decoder_norm_to_unit_norm()

            on = fires(out.latents.detach(), cfg.kind).any(0)
            fired_epoch |= on
            since_fired += len(idx)
            since_fired[on] = 0
            for key, value in (("loss", out.loss), ("recon", out.recon_loss), ("sparsity", out.sparsity_loss),
                               ("auxk", out.auxk_loss), ("fvu", out.fvu)):
                sums[key] += float(value.detach()) * len(idx)
            bar.update(1)

        sae.eval()
        val = evaluate(sae, u[val_idx], t[val_idx], batch_size=train.eval_batch_size).metrics
        record = {
            "epoch": epoch,
            **{f"train_{key}": value / n_train for key, value in sums.items()},
            "train_dead_fraction": float((~fired_epoch).float().mean()),
            **{f"val_{key}": value for key, value in val._asdict().items() if key != "n"},
            "seconds": time.perf_counter() - start,
        }
        records.append(record)
        bar.set_postfix(val_fvu=f"{val.fvu:.4f}", dead=f"{val.dead_fraction:.2f}")
        if not math.isfinite(val.fvu):
            raise FloatingPointError(f"val FVU is {val.fvu} at epoch {epoch}; lower TrainConfig.lr (now {train.lr:g})")
        if val.fvu < best[0] - train.min_delta:
            best, stale = (val.fvu, epoch, copy.deepcopy(sae.state_dict())), 0
        else:
            stale += 1
            if stale >= train.patience:
                stopped_early = True
                break
    bar.close()

    sae.load_state_dict(best[2])
    sae.eval()
    final = evaluate(sae, u[val_idx], t[val_idx], batch_size=train.eval_batch_size).metrics
    history = {
        "epochs": records,
        "best_epoch": best[1],
        "stopped_early": stopped_early,
        "final_val": final._asdict(),
        "mean_baseline_val_fvu": 1.0,
        "lr": {"weights": opt.param_groups[0]["lr"], "b_enc": opt.param_groups[1]["lr"]},
        "input_scale": cfg.input_scale,
        "n_train": n_train,
        "n_val": len(val_idx),
        "sae_config": cfg.to_dict(),
        "train_config": asdict(train),
    }
    return sae, history

