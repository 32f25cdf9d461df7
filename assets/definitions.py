"""The Dagster code location: `dagster dev` and `dagster asset materialize` load this module
(`[tool.dagster] module_name` in pyproject.toml)."""

import os
from collections.abc import Mapping

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

EXECUTORS = ("multiprocess", "dask")


def executor_from_env(env: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor named by $MISP_EXECUTOR (default `multiprocess`), read when the definitions load.

    - `multiprocess`: steps of a run in parallel processes on this machine. `max_concurrent` bounds memory on small
      machines; a forkserver that has imported the definitions once spares every step re-importing torch and
      open_clip (measured: 25 s instead of 88 s for one round of two shards on 2 cores).
    - `dask`: each step is a task on a Dask cluster (the `dask` extra: dagster-dask). $MISP_DASK_ADDRESS is the
      scheduler of an existing cluster (`tcp://host:8786`); without it every run starts a local cluster of
      $MISP_DASK_WORKERS (default 2) single-threaded worker processes. Workers import this module and build their
      resources from their own environment, so they need the same MISP_* variables (docs/scaling.md)."""
    env = os.environ if env is None else env
    kind = env.get("MISP_EXECUTOR", "multiprocess")
    if kind == "multiprocess":
        return dg.multiprocess_executor.configured(
            {"max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": ["assets.definitions"]}}})
    if kind == "dask":
        try:
            from dagster_dask import dask_executor
        except ImportError as e:
            raise ValueError(f"MISP_EXECUTOR=dask needs dagster-dask ({e}); install the `dask` extra "
                             "(see docs/scaling.md), or unset MISP_EXECUTOR for the multiprocess executor") from None
        address = env.get("MISP_DASK_ADDRESS", "")
        cluster = ({"existing": {"address": address}} if address else
                   {"local": {"n_workers": int(env.get("MISP_DASK_WORKERS", "2")), "threads_per_worker": 1}})
        return dask_executor.configured({"cluster": cluster})
    raise ValueError(f"MISP_EXECUTOR={kind!r} is not one of {EXECUTORS}; unset it for the multiprocess executor")


defs = dg.Definitions(assets=all_assets, resources=resources_from_env(), executor=executor_from_env())

