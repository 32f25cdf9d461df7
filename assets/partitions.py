"""Partitions: one per shard (every per-shard asset resumes shard by shard and shards run in parallel), one per
mining recipe (`assets/recipes.py`) and one per SAE space, so that every recipe's shard set coexists with the
others on disk and in the catalog."""

import dagster as dg

from assets.recipes import DEFAULT_RECIPE, DEFAULT_SPACE, RECIPES, SPACES, recipes_of_space
from pipeline.sharding import shard_keys

shard_partitions = dg.StaticPartitionsDefinition(shard_keys())
recipe_partitions = dg.StaticPartitionsDefinition(list(RECIPES))
space_partitions = dg.StaticPartitionsDefinition(list(SPACES))
recipe_shard_partitions = dg.MultiPartitionsDefinition({"recipe": recipe_partitions, "shard": shard_partitions})
"""`preference_shards`: one partition per (recipe, shard); its keys read `greedy|000`."""


def recipe_shard_key(recipe_name: str, shard: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"recipe": recipe_name, "shard": shard})


def space_to_recipes() -> dg.StaticPartitionMapping:
    """`sae` (per space) -> `shards_manifest` (per recipe)."""
    return dg.StaticPartitionMapping({space: recipes_of_space(space) for space in SPACES})


def recipe_of_shards() -> dg.MultiToSingleDimensionPartitionMapping:
    """`preference_shards` (recipe x shard) -> `shards_manifest` (recipe): a manifest covers its recipe's shards."""
    return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="recipe")


def shard_index(context: dg.AssetExecutionContext) -> tuple[int, int]:
    """(this shard, number of shards) of the running partition (a shard key, or the shard of a recipe x shard key)."""
    key = context.partition_key
    shard = key.keys_by_dimension["shard"] if isinstance(key, dg.MultiPartitionKey) else key
    keys = shard_partitions.get_partition_keys()
    return keys.index(shard), len(keys)


def partition_keys(asset: str, recipes: list[str] | None = None) -> list[str | None]:
    """The partitions of `asset` that a run of the given recipes (default: the default recipe) needs, in order:
    every shard, the recipes' spaces for `sae`, (recipe, shard) pairs for `preference_shards`; [None] for an
    unpartitioned asset."""
    recipes = recipes or [DEFAULT_RECIPE]
    if asset in ("pool_images", "preference_examples", "pool_embeddings", "positive_embeddings",
                 "prompt_embeddings", "candidates"):
        return list(shard_keys())
    if asset == "sae":
        return list(dict.fromkeys(RECIPES[r].space for r in recipes)) or [DEFAULT_SPACE]
    if asset == "preference_shards":
        return [recipe_shard_key(r, s) for r in recipes for s in shard_keys()]
    if asset in ("mining_recipe", "shards_manifest"):
        return list(recipes)
    return [None]
