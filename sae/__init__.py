"""Sparse autoencoder over prompt-conditioned embedding differences d = vec(u t^T), with an exact rank-one fast path
(SPEC §2 steps 3-5). No Dagster here: the `sae` asset calls `train_sae`, `SparseAutoencoder.save/load`,
`SparseAutoencoder.score_candidates` and the tables of `sae.interpret`. See docs/sae.md."""

from sae.autoencoder import (
    EncoderOutput,
    ForwardOutput,
    ScoreOutput,
    Scorer,
    SparseAutoencoder,
    kl_sparsity,
    prepare_pairs,
    semantic_deviation,
)
from sae.config import SCHEMA_VERSION, SaeConfig, SchemaVersionError
from sae.metrics import Evaluation, SaeMetrics, encode_all, evaluate
from sae.train import TrainConfig, train_sae

__all__ = [
    "SCHEMA_VERSION",
    "EncoderOutput",
    "Evaluation",
    "ForwardOutput",
    "SaeConfig",
    "SaeMetrics",
    "SchemaVersionError",
    "ScoreOutput",
    "Scorer",
    "SparseAutoencoder",
    "TrainConfig",
    "encode_all",
    "evaluate",
    "kl_sparsity",
    "prepare_pairs",
    "semantic_deviation",
    "train_sae",
]
