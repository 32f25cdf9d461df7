"""The one config object of an SAE: built in code, saved as `cfg.json` beside the weights, read back on load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Literal

SCHEMA_VERSION = 1
"""Bumped whenever the meaning of a saved field or tensor changes; a checkpoint of another version is refused."""

KINDS = ("sigmoid", "topk")
SPACES = ("fused", "image")


class SchemaVersionError(ValueError):
    """A checkpoint written by another schema version of this library."""


@dataclass
class SaeConfig:
    kind: Literal["sigmoid", "topk"] = "sigmoid"
    """`sigmoid`: the paper's SAE (sigmoid latents, KL sparsity to `rho`). `topk`: unit-norm decoder, k_active latents."""

    num_latents: int = 128
    """Number of latents k (the paper uses 128)."""

    space: Literal["fused", "image"] = "fused"
    """`fused`: d = vec(u t^T), prompt-conditioned (SPEC §2.3). `image`: d = u, no prompt (ablation)."""

    dv: int = 512
    """Dimension of the image embedding difference u = h_v(m_p) - h_v(m_i)."""

    dt: int = 512
    """Dimension of the prompt embedding t = h_t(x); unused when space = 'image'."""

    input_scale: float = 1.0
    """d is multiplied by this before the SAE; `train_sae` fits it so that mean ||d||^2 = 1 on its training split."""

    rho: float = 0.05
    """sigmoid: target mean activation of every latent (KL sparsity target)."""

    gamma: float = 1.0
    """sigmoid: weight of the summed KL(rho || rho_hat_j) penalty."""

    unit_norm_decoder: bool = True
    """Keep every decoder row at unit norm (required for topk). For sigmoid it is our addition to the paper: without
    it the latents sit near rho everywhere while the decoder rows grow, and the codes stop telling candidates apart."""

    k_active: int = 8
    """topk: number of latents kept per input."""

    aux_k: int = 32
    """topk: at most this many dead latents the AuxK loss uses per input (0 turns AuxK off)."""

    aux_coef: float = 1 / 32
    """topk: weight of the AuxK loss (OpenAI's 'Scaling and evaluating sparse autoencoders' uses 1/32)."""

    seed: int = 0
    """Seed of the initialisation and of training (split, shuffling)."""

    schema_version: int = SCHEMA_VERSION
    """Version of the checkpoint format; only the current one is accepted."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SaeConfig.kind={self.kind!r} is unknown; use one of {KINDS}")
        if self.space not in SPACES:
            raise ValueError(f"SaeConfig.space={self.space!r} is unknown; use one of {SPACES}")
        for name in ("num_latents", "dv", "dt"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SaeConfig.{name}={value!r} must be a positive integer")
        if not self.input_scale > 0:
            raise ValueError(f"SaeConfig.input_scale={self.input_scale!r} must be > 0")
        if self.kind == "sigmoid":
            if not 0.0 < self.rho < 1.0:
                raise ValueError(f"SaeConfig.rho={self.rho!r} must lie strictly between 0 and 1 (paper: 0.05)")
            if self.gamma < 0:
                raise ValueError(f"SaeConfig.gamma={self.gamma!r} must be >= 0 (paper: 1)")
        if self.kind == "topk":
            if not self.unit_norm_decoder:
                raise ValueError("SaeConfig.kind='topk' needs unit_norm_decoder=True (TopK codes are only comparable "
                                 "across latents when every decoder row has the same norm)")
            if not 1 <= self.k_active <= self.num_latents:
                raise ValueError(
                    f"SaeConfig.k_active={self.k_active} must lie in 1..num_latents={self.num_latents}; "
                    "lower k_active or raise num_latents"
                )
            if self.aux_k < 0:
                raise ValueError(f"SaeConfig.aux_k={self.aux_k} must be >= 0 (0 turns AuxK off)")
            if self.aux_coef < 0:
                raise ValueError(f"SaeConfig.aux_coef={self.aux_coef!r} must be >= 0")
        if self.schema_version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SaeConfig.schema_version={self.schema_version}, but this library reads version {SCHEMA_VERSION}; "
                "retrain the SAE with this version of misp-dpo"
            )

    @property
    def dt_eff(self) -> int:
        """Prompt dimension the weights carry: dt when fused, 1 for the image space (d = u * 1)."""
        return self.dt if self.space == "fused" else 1

    @property
    def d_in(self) -> int:
        """Dimension of d: dv * dt (fused) or dv (image)."""
        return self.dv * self.dt_eff

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "SaeConfig":
        """Build from a dict read from `cfg.json`: the schema version is checked first, unknown keys are refused."""
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{source} was written with SAE schema version {version!r}; this library reads version "
                f"{SCHEMA_VERSION}. Retrain the SAE (or load it with the misp-dpo version that wrote it)"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{source} has unknown SaeConfig fields {unknown}; it was not written by this library")
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
