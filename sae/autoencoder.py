"""The SAE over prompt-conditioned differences: one module for both kinds (sigmoid + KL, TopK + AuxK).

Inputs are pairs (u, t): u = h_v(m_p) - h_v(m_i) (n, Dv), t = h_t(x) (n, Dt) or one prompt (Dt,). The SAE input
d = s vec(u t^T) is never materialised: every computation goes through `sae.rank_one` (see its docstring and
docs/sae.md). `sae.dense_reference` is the same model written naively, for tests.
"""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from sae.config import SCHEMA_VERSION, SaeConfig, SchemaVersionError
from sae.rank_one import (
    WeightTerms,
    group_prompts,
    pre_activations,
    project,
    prompt_terms,
    residual_dot_decoder,
    squared_error,
    weight_terms,
)

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
SIGMOID_FIRE_THRESHOLD = 0.5
"""A sigmoid latent counts as firing (for L0 and dead latents) when its activation exceeds this."""


class EncoderOutput(NamedTuple):
    latents: Tensor  # (..., k) codes z = E(d): sigmoid(pre) or the TopK of relu(pre), zeros elsewhere
    pre_acts: Tensor  # (..., k) encoder pre-activations W_enc (d - b_dec) + b_enc


class ForwardOutput(NamedTuple):
    latents: Tensor  # (n, k)
    pre_acts: Tensor  # (n, k)
    recon_error: Tensor  # (n,) ||d - D(E(d))||^2 per row, in units of the scaled input
    fvu: Tensor  # () batch fraction of variance unexplained: sum recon_error / sum ||d - mean_batch d||^2
    recon_loss: Tensor  # () mean recon_error (the paper's reconstruction term)
    sparsity_loss: Tensor  # () sigmoid: gamma * sum_j KL(rho || rho_hat_j); topk: 0
    auxk_loss: Tensor  # () topk: aux_coef * normalised AuxK loss when dead latents are given; else 0
    loss: Tensor  # () recon_loss + sparsity_loss + auxk_loss


class ScoreOutput(NamedTuple):
    recon_error: Tensor  # (C,) or (E, C): reconstruction difficulty l_i
    codes: Tensor  # (C, k) or (E, C, k): z_i = E(d_i)


def kl_sparsity(latents: Tensor, rho: float, eps: float = 1e-6) -> Tensor:
    """sum_j KL(rho || rho_hat_j), rho_hat_j = mean activation of latent j over the rows of `latents` (n, k)."""
    rho_hat = latents.mean(0).clamp(eps, 1 - eps)
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return kl.sum()


def semantic_deviation(codes: Tensor) -> Tensor:
    """v_i = ||z_i||_1 over the last dimension (SPEC §2.5)."""
    return codes.abs().sum(-1)


def library_versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "numpy": np.__version__, "safetensors": safetensors.__version__}
    try:
        out["misp-dpo"] = metadata.version("misp-dpo")
    except metadata.PackageNotFoundError:  # running from a checkout that was not pip-installed
        out["misp-dpo"] = "unknown"
    return out


def as_input(x, name: str, *, device=None, dtype=None) -> Tensor:
    """`x` as a tensor; NaN or infinite entries raise a ValueError naming the input and the first bad rows."""
    x = torch.as_tensor(x).to(device=device, dtype=dtype)
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten()[:5].tolist() if x.ndim else []
        raise ValueError(f"{name} contains NaN or infinite values (first bad rows: {bad}); drop or re-embed those items")
    return x


def check_dim(x: Tensor, name: str, want: int, field: str) -> None:
    if x.shape[-1] != want:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but the SAE expects last dimension {want} (SaeConfig.{field}); "
            "use embeddings from the CLIP model the SAE was trained on, or train an SAE for this dimension"
        )


def prepare_pairs(cfg: SaeConfig, u, t=None, *, device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """Validate pairs: u (n, Dv), t (n, Dt) or one prompt (Dt,) -> tensors u (n, Dv), t (n, Dt').

    For space = 'image' t is ignored (d = u) and replaced by ones (n, 1), so that one code path serves both spaces.
    """
    u = as_input(u, "u", device=device, dtype=dtype)
    if u.ndim != 2:
        raise ValueError(f"u has shape {tuple(u.shape)}; expected (n, dv={cfg.dv})")
    check_dim(u, "u", cfg.dv, "dv")
    if cfg.space == "image":
        return u, torch.ones(u.shape[0], 1, device=u.device, dtype=u.dtype)
    if t is None:
        raise ValueError("space='fused' needs the prompt embeddings t; pass t (n, dt) or (dt,)")
    t = as_input(t, "t", device=u.device, dtype=u.dtype)
    check_dim(t, "t", cfg.dt, "dt")
    if t.ndim == 1:
        t = t.expand(u.shape[0], -1)
    if t.ndim != 2 or t.shape[0] != u.shape[0]:
        raise ValueError(f"u has shape {tuple(u.shape)} and t {tuple(t.shape)}: expected one prompt row per u row")
    return u, t


class SparseAutoencoder(nn.Module):
    """W_enc, W_dec (k, Dv, Dt'), b_enc (k,), b_dec (Dv, Dt') with Dt' = Dt (fused) or 1 (image).

    Row j of the encoder / decoder of the flat SAE is vec(W_enc[j]) / vec(W_dec[j]); b_dec is the decoder bias
    and also the pre-encoder bias (subtracted before encoding), as in sparsify.
    """

    def __init__(self, cfg: SaeConfig, *, device=None, dtype=None, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        shape = (cfg.num_latents, cfg.dv, cfg.dt_eff)
        self.W_enc = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.empty(cfg.num_latents, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.empty(cfg.dv, cfg.dt_eff, device=device, dtype=dtype))
        self._scorer_cache: tuple[tuple, Scorer] | None = None
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float64)
        w /= w.flatten(1).norm(dim=1)[:, None, None]
        # Tied initialisation (OpenAI's recipe): each latent starts by reading the direction it writes.
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        # A sigmoid latent starts at the target rate, so the KL term starts near 0 and does not swamp reconstruction.
        self.b_enc.fill_(math.log(self.cfg.rho / (1 - self.cfg.rho)) if self.cfg.kind == "sigmoid" else 0.0)
        self.b_dec.zero_()

    # ---------------------------------------------------------------- inputs

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def prepare(self, u, t=None) -> tuple[Tensor, Tensor]:
        """Validated pairs on this SAE's device and dtype; see `prepare_pairs`."""
        return prepare_pairs(self.cfg, u, t, device=self.device, dtype=self.dtype)

    # ---------------------------------------------------------------- model

    def activation(self, pre_acts: Tensor) -> Tensor:
        if self.cfg.kind == "sigmoid":
            return torch.sigmoid(pre_acts)
        acts = torch.relu(pre_acts)
        top = acts.topk(self.cfg.k_active, dim=-1, sorted=False)
        return torch.zeros_like(acts).scatter(-1, top.indices, top.values)

    def weight_terms(self) -> WeightTerms:
        return weight_terms(self.W_enc, self.W_dec, self.b_dec)

    def _row_terms(self, u: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """uP, uQ (n, k), u.(b t), ||t||^2 (n,) for validated pairs, projecting each distinct prompt once."""
        prompts, inverse = group_prompts(t)
        pt = prompt_terms(self.W_enc, self.W_dec, self.b_dec, prompts)
        uP = torch.einsum("bv,bkv->bk", u, pt.P[inverse])
        uQ = torch.einsum("bv,bkv->bk", u, pt.Q[inverse])
        return uP, uQ, (u * pt.bt[inverse]).sum(-1), pt.tt[inverse]

    def encode(self, u, t=None) -> EncoderOutput:
        """Codes of pairs u (n, Dv), t (n, Dt) or (Dt,). Memory O(n k Dv): batch large arrays."""
        u, t = self.prepare(u, t)
        prompts, inverse = group_prompts(t)
        P = project(self.W_enc, prompts)
        uP = torch.einsum("bv,bkv->bk", u, P[inverse])
        enc_bias = self.W_enc.flatten(1) @ self.b_dec.reshape(-1)
        pre = pre_activations(uP, self.cfg.input_scale, enc_bias, self.b_enc)
        return EncoderOutput(self.activation(pre), pre)

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruction W_dec^T z + b_dec as flat vectors (n, Dv*Dt'). This materialises d-sized rows: for
        inspection only; scoring and training never call it."""
        k = self.cfg.num_latents
        return latents @ self.W_dec.reshape(k, -1) + self.b_dec.reshape(-1)

    def pair_terms(self, u: Tensor, t: Tensor, wt: WeightTerms) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """pre-activations, codes, squared error (n,) and u^T Q of validated pairs (see `prepare`), given the
        weight terms (pass them in to compute the k x k Gram matrix once for many batches)."""
        s = self.cfg.input_scale
        uP, uQ, ubt, tt = self._row_terms(u, t)
        pre = pre_activations(uP, s, wt.enc_bias, self.b_enc)
        z = self.activation(pre)
        return pre, z, squared_error(u, z, uQ, ubt, tt, s, wt), uQ

    def forward(self, u, t=None, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Encode, reconstruct and compute the losses of a batch of pairs, all in rank-one form.

        `dead_mask` (k,) bool marks latents that have not fired for a while; TopK then adds the AuxK loss.
        """
        cfg = self.cfg
        s = cfg.input_scale
        u, t = self.prepare(u, t)
        pre, z, err, uQ = self.pair_terms(u, t, self.weight_terms())
        tt = (t * t).sum(-1)
        # Batch total variance sum ||d - mean d||^2 through the Gram matrices of u and t (n^2 instead of n Dv Dt).
        d_sq = s**2 * (u * u).sum(-1) * tt
        mean_sq = s**2 * ((u @ u.T) * (t @ t.T)).sum() / u.shape[0] ** 2
        total_var = (d_sq.sum() - u.shape[0] * mean_sq).clamp_min(torch.finfo(u.dtype).tiny)
        recon_loss = err.mean()
        zero = recon_loss.new_zeros(())
        sparsity = cfg.gamma * kl_sparsity(z, cfg.rho) if cfg.kind == "sigmoid" else zero
        auxk = zero
        if cfg.kind == "topk" and dead_mask is not None and cfg.aux_k > 0 and cfg.aux_coef > 0 and dead_mask.any():
            auxk = cfg.aux_coef * self._auxk(pre, z, err, uQ, dead_mask)
        return ForwardOutput(
            latents=z,
            pre_acts=pre,
            recon_error=err,
            fvu=err.sum() / total_var,
            recon_loss=recon_loss,
            sparsity_loss=sparsity,
            auxk_loss=auxk,
            loss=recon_loss + sparsity + auxk,
        )

    def _auxk(self, pre: Tensor, z: Tensor, err: Tensor, uQ: Tensor, dead_mask: Tensor) -> Tensor:
        """||e - W_dec^T z_aux||^2 / ||e||^2 summed over the batch, e = the (detached) residual, z_aux = the top
        aux_k dead latents by relu pre-activation (Gao et al. 2024, as in sparsify). Rank-one form:
        ||e||^2 - 2 <e, W_dec^T z_aux> + z_aux^T G_dead z_aux, with only the dead decoder rows live."""
        dead = dead_mask.nonzero().flatten()
        r = min(self.cfg.aux_k, dead.numel())
        acts = torch.relu(pre[:, dead])
        top = acts.topk(r, dim=-1, sorted=False)
        z_aux = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        k = self.cfg.num_latents
        B = self.W_dec.reshape(k, -1)
        B_dead = B[dead]
        e_dot = residual_dot_decoder(
            uQ[:, dead],
            z.detach(),
            self.cfg.input_scale,
            gram_cross=B.detach() @ B_dead.T,
            dec_bias=B_dead @ self.b_dec.detach().reshape(-1),
        )
        e_sq = err.detach()
        aux_err = e_sq - 2 * (z_aux * e_dot).sum(-1) + ((z_aux @ (B_dead @ B_dead.T)) * z_aux).sum(-1)
        return aux_err.sum() / e_sq.sum().clamp_min(torch.finfo(e_sq.dtype).tiny)

    # ---------------------------------------------------------------- topk decoder constraint

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        norm = self.W_dec.flatten(1).norm(dim=1).clamp_min(torch.finfo(self.dtype).eps)
        self.W_dec /= norm[:, None, None]

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Drop the part of each decoder row's gradient that would only change its norm (renormalised anyway)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec.flatten(1)
        g = self.W_dec.grad.flatten(1)
        g -= (g * w).sum(1, keepdim=True) * w / (w * w).sum(1, keepdim=True)

    # ---------------------------------------------------------------- scoring

    def scorer(self) -> "Scorer":
        """A `Scorer` for the current weights, cached until a parameter changes in place (optimizer step, load)."""
        key = tuple((id(p), p._version) for p in self.parameters())  # _version counts in-place writes
        if self._scorer_cache is None or self._scorer_cache[0] != key:
            self._scorer_cache = (key, Scorer(self))
        return self._scorer_cache[1]

    def score_candidates(self, u_c, t=None) -> ScoreOutput:
        """Reconstruction error and codes of the candidates of one prompt, u_c (C, Dv) with t (Dt,), or of E prompts
        at once, u_c (E, C, Dv) with t (E, Dt). See `Scorer.score_candidates`."""
        return self.scorer().score_candidates(u_c, t)

    # ---------------------------------------------------------------- save / load

    def save(self, folder: str | Path) -> Path:
        """Write `sae.safetensors` + `cfg.json` (config, schema version, library versions) atomically."""
        from store.parquet_io import write_bytes_atomic

        folder = Path(folder)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        blob = safetensors.torch.save(tensors, metadata={"schema_version": str(SCHEMA_VERSION)})
        write_bytes_atomic(blob, folder / WEIGHTS_FILE)
        cfg = {**self.cfg.to_dict(), "library_versions": library_versions()}
        write_bytes_atomic((json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(), folder / CONFIG_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device=None) -> "SparseAutoencoder":
        folder = Path(folder)
        cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (cfg_path, weights_path):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing; an SAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        raw = json.loads(cfg_path.read_text())
        raw.pop("library_versions", None)
        cfg = SaeConfig.from_dict(raw, source=str(cfg_path))
        tensors = safetensors.torch.load_file(weights_path, device=str(device or "cpu"))
        with safetensors.safe_open(weights_path, framework="pt") as fh:
            file_version = (fh.metadata() or {}).get("schema_version")
        if file_version != str(SCHEMA_VERSION):
            raise SchemaVersionError(
                f"{weights_path} has schema version {file_version!r}, this library reads {SCHEMA_VERSION}; retrain"
            )
        dtype = tensors["W_enc"].dtype if "W_enc" in tensors else None
        sae = cls(cfg, device=device, dtype=dtype)
        expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
        found = {name: tuple(x.shape) for name, x in tensors.items()}
        if expected != found:
            raise ValueError(f"{weights_path} holds tensors {found}, but {cfg_path} describes {expected}")
        sae.load_state_dict(tensors)
        return sae


class Scorer:
    """Scores candidates with frozen weights: the prompt-independent terms (Gram matrix, bias products) are
    computed once here, the per-prompt P and Q once per prompt, then each candidate costs O(Dv k + k^2)."""

    def __init__(self, sae: SparseAutoencoder):
        self.sae = sae
        with torch.no_grad():
            self.terms = sae.weight_terms()

    @torch.no_grad()
    def score_candidates(self, u_c, t=None) -> ScoreOutput:
        """u_c (C, Dv) with t (Dt,) -> recon_error (C,), codes (C, k); or u_c (E, C, Dv) with t (E, Dt) -> (E, C),
        (E, C, k). Costs O(E k Dv Dt) for the prompts (one matrix product for all E) + O(E C Dv k)."""
        sae, cfg = self.sae, self.sae.cfg
        u = as_input(u_c, "u_c", device=sae.device, dtype=sae.dtype)
        single = u.ndim == 2
        if u.ndim not in (2, 3):
            raise ValueError(f"u_c has shape {tuple(u.shape)}; expected (C, dv) or (E, C, dv) with dv={cfg.dv}")
        check_dim(u, "u_c", cfg.dv, "dv")
        if single:
            u = u[None]
        if cfg.space == "image":
            t = torch.ones(u.shape[0], 1, device=sae.device, dtype=sae.dtype)
        else:
            if t is None:
                raise ValueError("space='fused' needs the prompt embedding t")
            t = as_input(t, "t", device=sae.device, dtype=sae.dtype)
            check_dim(t, "t", cfg.dt, "dt")
            if t.ndim == 1:
                t = t[None]
            if t.ndim != 2 or t.shape[0] != u.shape[0]:
                raise ValueError(f"u_c has shape {tuple(u_c.shape)} and t {tuple(t.shape)}: one prompt per group")
        pt = prompt_terms(sae.W_enc, sae.W_dec, sae.b_dec, t)
        s = cfg.input_scale
        pre = pre_activations(torch.bmm(u, pt.P.transpose(1, 2)), s, self.terms.enc_bias, sae.b_enc)
        z = sae.activation(pre)
        ubt = (u * pt.bt[:, None, :]).sum(-1)
        err = squared_error(u, z, torch.bmm(u, pt.Q.transpose(1, 2)), ubt, pt.tt[:, None], s, self.terms)
        err = err.clamp_min(0)  # a float32 difference of O(||d||^2) terms can dip a hair below 0
        if single:
            return ScoreOutput(err[0], z[0])
        return ScoreOutput(err, z)
