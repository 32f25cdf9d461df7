"""Mining recipes: which selection rule over which SAE space. Each recipe is a partition of `preference_shards`
and `shards_manifest`, each SAE space a partition of `sae`, so that every variant coexists on disk and in the
catalog (no re-mining over one location, no copies aside). No Dagster here: the experiment names recipes too."""

from __future__ import annotations

from typing import NamedTuple


class Recipe(NamedTuple):
    """How one shard set is mined."""

    rule: str
    """Selection rule (`pipeline.mine.RULES`)."""
    space: str
    """SAE space the scores come from (`sae.config.SPACES`): a partition of the `sae` asset."""


RECIPES: dict[str, Recipe] = {
    "greedy": Recipe("greedy", "fused"),
    "similarity": Recipe("similarity", "fused"),
    "random": Recipe("random_pool", "fused"),
    "random_neighbours": Recipe("random_neighbours", "fused"),
    "greedy_image": Recipe("greedy", "image"),
}
"""Recipe name -> (rule, SAE space). `greedy`: SAE score + diversity (MISP); `similarity`: top-K CLIP; `random`:
uniform from the whole gallery (the papers' random baseline); `random_neighbours`: uniform among the m candidates;
`greedy_image`: greedy with the SAE trained in the image space (ablation). Add a recipe here and it is a new
partition of the shard assets."""

DEFAULT_RECIPE = "greedy"
"""What `make mine` materialises and `make train` reads (`<data root>/shards/`)."""

SPACES: tuple[str, ...] = ("fused", "image")
DEFAULT_SPACE = "fused"


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown mining recipe {name!r}; use one of {sorted(RECIPES)} (assets/recipes.py)")
    return RECIPES[name]


def recipes_of_space(space: str) -> list[str]:
    return [name for name, r in RECIPES.items() if r.space == space]
