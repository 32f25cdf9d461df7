"""What `make experiment` and `make ablations` train: the conditions, as trainer presets plus overrides.

Every trained condition starts from the same base model, sees the same examples in the same order for the same
number of steps (the order is a function of the seed, shared by all conditions of a seed) and carries the same
SFT term (`sft_weight`): the `sft` control is that run with every preference term off, so a difference between
a preset and the control is the preference terms' doing and not more supervised training (WORLD.md, "Measured").

The baselines are built as their papers build them (trainer.losses.PRESETS, docs/losses.md): `mdpo` a fresh random
crop every step, `chip` fresh diffusion noise at t = 500 of VCD's schedule on the processor's pixel_values and
CHiP's joint loss form (both with the online reference, which the trainer's `reference: auto` picks), and
`random_multi` K negatives drawn uniformly from the whole gallery (shard set `random`, rule `random_pool`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from assets.recipes import RECIPES

SHARD_SETS: dict[str, tuple[str, str]] = {name: (RECIPES[name].rule, RECIPES[name].space)
                                          for name in ("greedy", "similarity", "random", "greedy_image")}
"""The mining recipes (assets/recipes.py) the conditions use -> (selection rule, SAE space): `greedy` SAE score +
diversity, `similarity` top-K CLIP, `random` uniform from the whole gallery (`random_pool`, the papers' random
baseline); `greedy_image` is greedy with an SAE trained in the image space instead of the fused one. Each is a
partition of the shard assets, mined once into its own folder."""


@dataclass(frozen=True)
class Condition:
    """One arm of the experiment."""

    name: str
    """Row label of the report, e.g. `misp`, `K=5`."""
    preset: str | None
    """Trainer loss preset (trainer.losses.PRESETS, plus `sft`); None: the base model, not trained."""
    loss: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's LossConfig."""
    shards: str = "greedy"
    """Which mined shard set the run reads (SHARD_SETS)."""
    group: str = "main"
    """Report section: `main` or the ablation's name."""

    def __post_init__(self) -> None:
        if self.shards not in SHARD_SETS:
            raise ValueError(f"condition {self.name!r}: shards={self.shards!r} is not one of {tuple(SHARD_SETS)}")

    def run_key(self) -> str:
        """What identifies the training run (name and group excluded): conditions of two groups that train the
        same thing share one run."""
        if self.preset is None:
            return "base"
        return json.dumps({"preset": self.preset, "loss": self.loss, "shards": self.shards}, sort_keys=True)

    def with_group(self, group: str, name: str | None = None) -> "Condition":
        return Condition(name or self.name, self.preset, dict(self.loss), self.shards, group)


MAIN: tuple[Condition, ...] = (
    Condition("base", None),
    Condition("sft", "sft"),
    Condition("dpo", "dpo"),
    Condition("mdpo", "mdpo"),
    Condition("chip", "chip"),
    Condition("random_multi", "random_multi", shards="random"),
    Condition("misp", "misp"),
    Condition("misp_is", "misp", {"is_mode": "learned", "k_prime": 4}),
)
CONTROL = "sft"
BASELINE = "base"

PAPER_GROUP = "no_sft"
PAPER_CONTROL = "dpo"
PAPER_FORM: tuple[Condition, ...] = tuple(
    c.with_group(PAPER_GROUP) if c.preset is None else
    Condition(c.name, c.preset, {**c.loss, "sft_weight": 0.0}, c.shards, PAPER_GROUP)
    for c in MAIN if c.name in ("base", "dpo", "random_multi", "misp"))
"""An ablation of the SFT term: the arms the paper's two claims are about (multi-negative over single-negative
`dpo`, mined over random negatives) as their papers run them, with no SFT term (SPEC §4: MISP-DPO's SFT term is off
by default), against `dpo`. Measured on the `prior` base: 200 steps of the shared SFT term alone take the prior
probe from 28% to about 1%, so with it every arm sits at that floor and the preference terms have nothing left to
show. Like the other ablations it runs the first `ablation_seeds` seeds."""
LOW_SFT_GROUP = "low_sft"
LOW_SFT_WEIGHT = 0.1
LOW_SFT: tuple[Condition, ...] = tuple(
    c.with_group(LOW_SFT_GROUP) if c.preset in (None, "sft") else
    Condition(c.name, c.preset, {**c.loss, "sft_weight": LOW_SFT_WEIGHT}, c.shards, LOW_SFT_GROUP)
    for c in MAIN if c.name in ("base", "sft", "dpo", "random_multi", "misp"))
"""The paper's two claims (multi-negative over `dpo`, mined over random negatives) in the regime between the main
comparison and the paper form: the SFT term kept at a tenth of the preference terms' weight, so the captions stay
well-formed (the paper form loses them on some seeds) while the SFT term no longer removes the prior by itself.
Against `dpo`, every seed, like the main conditions. `base` and `sft` are the main runs under this group (the SFT-only
control does not change with its one term's weight: Adam's steps are invariant to it). Measured on one seed before
it became a group: `misp` took the prior probe to 0.2% (well-formed 96.7%), `dpo` to 11.0% (83.7%)."""
FULL_SEED_GROUPS: tuple[str, ...] = ("main", LOW_SFT_GROUP)
"""Groups that run every seed of `ExperimentConfig.seeds`; the others (ablations, the paper form) the first
`ablation_seeds`."""

ABLATION_REFERENCES: dict[str, str] = {"K": "K=3", "rule": "greedy (SAE + diversity)", "sae_space": "fused",
                                       "beta": "beta=0.5"}
"""Each ablation group's arm equal to `misp` itself: the others differ from it in one setting, so the group's
differences are taken against it (the `is` group's against the full pool, `full_pool_name`)."""


def full_pool_name(pool_size: int) -> str:
    """The `is` group's arm that forwards every candidate: what the IS arms estimate at a fraction of its cost."""
    return f"full pool ({pool_size})"


def group_controls(pool_size: int) -> dict[str, str]:
    """The condition each group's differences are taken against, where it is not `CONTROL`."""
    return {PAPER_GROUP: PAPER_CONTROL, LOW_SFT_GROUP: "dpo", **ABLATION_REFERENCES, "is": full_pool_name(pool_size)}


GROUP_TITLES: dict[str, str] = {
    PAPER_GROUP: "Paper form: preference terms only (no SFT term), against `dpo`",
    LOW_SFT_GROUP: f"Low SFT weight ({LOW_SFT_WEIGHT}): preference terms with a small SFT term, against `dpo`"}


def ablations(pool_size: int) -> tuple[Condition, ...]:
    """The ablation grid of issue 7 around `misp` (K = 3, greedy, fused SAE space, beta 0.5, no IS), in the paper
    form (no SFT term, `PAPER_FORM`): with the SFT term every variant sits at the floor it reaches alone.
    `pool_size`: candidates per example in the shards, the "full pool" the IS arms are compared with."""
    misp = next(c for c in PAPER_FORM if c.name == "misp")
    no_sft = {"sft_weight": 0.0}
    # the arm equal to `misp` itself (K = 3, beta 0.5) is `misp`'s run under another label, not a second run
    ref = ABLATION_REFERENCES
    out = [misp.with_group("K", ref["K"]) if k == 3 else Condition(f"K={k}", "misp", {**no_sft, "num_negatives": k},
                                                                    group="K") for k in (1, 2, 3, 5, 8)]
    out += [misp.with_group("rule", ref["rule"]),
            Condition("similarity (top-K CLIP)", "misp", {**no_sft, "shard_rule": "similarity"}, "similarity", "rule"),
            next(c for c in PAPER_FORM if c.name == "random_multi").with_group("rule", "random")]
    out += [misp.with_group("sae_space", ref["sae_space"]),
            Condition("image", "misp", dict(no_sft), "greedy_image", "sae_space")]
    out += [misp.with_group("beta", ref["beta"]) if b == 0.5 else Condition(f"beta={b}", "misp", {**no_sft, "beta": b},
                                                                            group="beta") for b in (0.1, 0.5, 1.0)]
    out += [Condition(f"IS K'={k}", "misp", {**no_sft, "is_mode": "fixed", "k_prime": k}, group="is")
            for k in (2, 4, 8)]
    out += [Condition(full_pool_name(pool_size), "misp", {**no_sft, "num_negatives": pool_size}, group="is")]
    return tuple(out)


def train_overrides(cond: Condition, sft_weight: float) -> dict[str, Any]:
    """The TrainConfig `preset` and `loss` of a trained condition (the shared SFT term added)."""
    if cond.preset is None:
        raise ValueError(f"condition {cond.name!r} is the untrained base model")
    loss = {**cond.loss}
    if cond.preset != "sft":
        loss.setdefault("sft_weight", sft_weight)
    return {"preset": cond.preset, "loss": loss}
