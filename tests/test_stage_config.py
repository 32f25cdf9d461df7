"""One config class per stage: the Dagster run configs are built from the stage's dataclass (fields, defaults,
docstrings) and convert back to it, with its checks."""

import dataclasses

import pytest

from assets.mining import CandidatesConfig, MiningRunConfig
from assets.sparse_autoencoder import SaeTrainingConfig
from assets.stage_config import field_docs, to
from pipeline.mine import MiningConfig
from sae import SaeConfig, TrainConfig


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_dagster_configs_carry_the_dataclass_defaults_and_docstrings():
    mining = _defaults(MiningConfig)
    for config in (CandidatesConfig, MiningRunConfig):
        for name, field in config.model_fields.items():
            assert field.default == mining[name], (config.__name__, name)
            assert field.description == field_docs(MiningConfig)[name]
    sae, train = _defaults(SaeConfig), _defaults(TrainConfig)
    fields = SaeTrainingConfig.model_fields
    assert {n: fields[n].default for n in ("kind", "num_latents", "rho", "gamma", "k_active", "seed")} == \
        {n: sae[n] for n in ("kind", "num_latents", "rho", "gamma", "k_active", "seed")}
    assert fields["lr"].default == train["lr"] and fields["max_epochs"].default == train["max_epochs"]
    assert "rule" not in MiningRunConfig.model_fields and "space" not in fields  # the partition decides those


def test_configs_convert_back_with_the_stage_checks():
    cfg = to(MiningConfig, MiningRunConfig(k=5, tau=0.5), m=16, rule="similarity")
    assert (cfg.k, cfg.tau, cfg.m, cfg.rule, cfg.lambda_div) == (5, 0.5, 16, "similarity", 0.5)
    with pytest.raises(ValueError, match=r"k \(3\) <= m \(2\)"):
        to(MiningConfig, CandidatesConfig(m=2))
    sae_cfg = to(SaeConfig, SaeTrainingConfig(kind="topk", k_active=4), space="image", dv=8, dt=8)
    assert (sae_cfg.kind, sae_cfg.k_active, sae_cfg.space) == ("topk", 4, "image")
    with pytest.raises(ValueError, match="unknown"):
        to(SaeConfig, SaeTrainingConfig(kind="relu"), space="fused", dv=8, dt=8)
