"""Dagster definitions that wire the pipeline's stages (thin: the work is in `pipeline/`, `sae/`, `world/`)."""

import os

# Several run processes share a few cores (shards in parallel). OpenMP's default busy-wait then makes
# every torch op spin against the other process: measured 7.1 s/step instead of 0.9 s on 2 shared cores.
# This must be set before torch is first imported in the process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import warnings

# Data versions on outputs, IO managers bound per asset and the recipe -> shard partition mapping are marked beta
# in Dagster 1.13; they are what the staleness of the catalog rests on (docs/mining.md), so say it once here
# instead of once per asset at every import.
warnings.filterwarnings("ignore", message=r".*(`data_version`|`io_manager_def`|`observable_source_asset`|MultiToSingleDimensionPartitionMapping)"
                                          r".* is currently in beta")
