"""The Dagster code location: `dagster dev` and `dagster asset materialize` load this module
(`[tool.dagster] module_name` in pyproject.toml)."""

import dagster as dg

from assets.clip import clip_model
from assets.embeddings import pool_embeddings, positive_embeddings, prompt_embeddings
from assets.mining import candidates, mining_recipe, pool_index, preference_shards, shards_manifest
from assets.sparse_autoencoder import sae
from assets.resources import resources_from_env
from assets.source import examples_source, pool_images, pool_source, preference_examples, source_data

all_assets = [source_data, pool_source, examples_source, pool_images, preference_examples, clip_model,
              pool_embeddings, positive_embeddings, prompt_embeddings,
              pool_index, candidates, sae, mining_recipe, preference_shards, shards_manifest]

defs = dg.Definitions(
    assets=all_assets,
    resources=resources_from_env(),
    # Steps of a run execute in parallel processes (`max_concurrent` bounds memory on small machines); a
    # forkserver that has imported the definitions once spares every step re-importing torch and open_clip
    # (measured: 25 s instead of 88 s for one round of two shards on 2 cores).
    executor=dg.multiprocess_executor.configured(
        {"max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": ["assets.definitions"]}}}),
)
