"""`python -m assets.run_pipeline`: materialise an asset selection over all of its partitions, on the instance in
$DAGSTER_HOME, so that every run, its logs, metadata and asset checks are in the UI (`make ui`).

What `make embed` and `make mine` run. No stage list is kept by hand: the runs are derived from the asset graph
(`plan_runs`) the way Dagster's own backfills split a selection:
- assets that are unpartitioned, or partitioned with `BackfillPolicy.single_run()` (their step receives the whole
  partition range, `context.partition_keys`), share ONE run with the assets around them;
- assets partitioned one key at a time (`context.partition_key`) run once per partition key, each run holding
  every consecutive asset of the same partitioning.
So a selection whose partitioned assets all take ranges is a single run; today's per-shard assets read one key
and a 2-shard `make mine` is 10 runs, 4 shards 16 (docs/scaling.md says why Dagster cannot put one step per
partition in a single run).

Steps run in processes of their own (the multiprocess executor of `assets.definitions`, or the one named by
$MISP_EXECUTOR: `dask` for a Dask cluster), or all in this process with `--in-process`. Output is quiet by default:
one line per run, the progress bars, warnings and errors, the summary; `--verbose` shows Dagster's DEBUG log.

Rerunning resumes: each asset compares the fingerprint of its inputs, config and code version with what its IO
manager stored and returns the stored output when they match (nothing recomputed or rewritten, the same data
version, so the UI shows the partition materialised and not stale); a rerun after success or an interruption
redoes only what is missing or changed. The runs themselves are still made: Dagster's staleness
(`assets.staleness.stale_or_missing`) does not see run config or resources, so it cannot alone decide to skip one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.instance.ref import InstanceRef

from assets.definitions import all_assets, defs
from assets.partitions import partition_keys
from assets.resources import resources_from_env
from pipeline.summary import main as print_summary

if TYPE_CHECKING:
    from dagster._core.execution.execution_result import ExecutionResult

REPO = Path(__file__).resolve().parents[1]
# The selection `--until` names: everything up to the embeddings, or the whole chain.
UNTIL = {"embeddings": dg.AssetSelection.groups("embeddings").upstream(), "shards": dg.AssetSelection.all()}
# Run tags of a run that covers a range of partitions (what `dagster asset materialize --partition-range` sets).
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
# Tag shared by every run of one `run_pipeline` invocation: filter on it in the UI's run list.
INVOCATION_TAG = "misp/pipeline_invocation"


class PlannedRun(NamedTuple):
    """One Dagster run of the plan."""
    assets: tuple[dg.AssetKey, ...]  # in topological order
    partitions_def: dg.PartitionsDefinition | None  # of its partitioned assets; None when it has none
    partition_key: str | None  # a one-key run
    partition_range: tuple[str, str] | None  # a run over every key, for assets that take ranges

    @property
    def label(self) -> str:
        names = ", ".join(k.to_user_string() for k in self.assets)
        if self.partition_key is not None:
            return f"{names} [partition {self.partition_key}]"
        if self.partition_range is not None:
            return f"{names} [partitions {self.partition_range[0]}...{self.partition_range[1]}]"
        return names


def _takes_ranges(node) -> bool:
    """Whether the asset's step takes a whole partition range (`BackfillPolicy.single_run()`)."""
    policy = node.backfill_policy
    return policy is not None and policy.max_partitions_per_run is None


def plan_runs(asset_graph, selected: set[dg.AssetKey], instance: dg.DagsterInstance | None = None,
              keys_of=None) -> list[PlannedRun]:
    """The runs that materialise `selected` over all partitions, in dependency order.

    Walks the selection in topological order; each stage starts at the first asset not yet planned and takes
    every later asset whose parents are planned or in the stage, as long as it can share the stage's runs:
    - a one-key stage (assets that read `context.partition_key`) takes assets of the same partitions definition,
      themselves one-key, whose parents in the stage map partition k to partition k; it becomes one run per key;
    - any other stage takes unpartitioned assets and range-taking assets of one partitions definition; it becomes
      one run, over the whole key range when it has partitioned assets.
    `keys_of(asset key, partitions definition)`: the keys to materialise (default: all of them)."""
    order = [k for k in asset_graph.toposorted_asset_keys if k in selected]
    planned: set[dg.AssetKey] = set()
    runs: list[PlannedRun] = []
    while len(planned) < len(order):
        stage: list[dg.AssetKey] = []
        partitions_def, per_key = None, False
        for key in order:
            if key in planned:
                continue
            node = asset_graph.get(key)
            parents = set(node.parent_keys) & selected
            if not parents <= planned | set(stage):
                continue
            node_def = node.partitions_def
            if not stage:
                partitions_def, per_key = node_def, node_def is not None and not _takes_ranges(node)
            elif per_key:
                if node_def != partitions_def or _takes_ranges(node) or not all(
                        isinstance(asset_graph.get_partition_mapping(key, p), dg.IdentityPartitionMapping)
                        for p in parents if p in stage):
                    continue
            elif node_def is not None:
                if not _takes_ranges(node) or partitions_def not in (None, node_def):
                    continue
                partitions_def = node_def
            stage.append(key)
        planned.update(stage)
        keys = [] if partitions_def is None else (
            keys_of(stage[0], partitions_def) if keys_of is not None
            else partitions_def.get_partition_keys(dynamic_partitions_store=instance))
        if partitions_def is not None and not keys:
            raise ValueError(f"{stage[0].to_user_string()} has no partitions to materialise: add its partition keys "
                             "(e.g. MISP_SHARDS) or leave it out of the selection")
        if per_key:
            runs += [PlannedRun(tuple(stage), partitions_def, key, None) for key in keys]
        else:
            runs.append(PlannedRun(tuple(stage), partitions_def, None, (keys[0], keys[-1]) if keys else None))
    return runs


def _reconstructable(job_name: str) -> ReconstructableJob:
    """`job_name` of the code location `assets.definitions`, by reference: the executor's processes (multiprocess,
    Dask workers) import the module and rebuild the job, as `dagster asset materialize` does."""
    return ReconstructableRepository.for_module("assets.definitions", "defs", working_directory=str(REPO)
                                                ).get_reconstructable_job(job_name)


def _instance(verbose: bool) -> dg.DagsterInstance:
    """The instance in $DAGSTER_HOME. Quiet, with the python log level INFO: the executor's step processes get the
    instance by reference, and their first log lines come from loggers at that level (DEBUG by default, one
    STEP_WORKER_STARTED line per step). Events are stored whatever the level, and INFO messages too."""
    home = os.environ.get("DAGSTER_HOME")
    if verbose or not home:
        return dg.DagsterInstance.get()  # without DAGSTER_HOME: Dagster's own error, which says to set it
    quiet = {"python_logs": {"python_log_level": "INFO"}}
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(home, overrides=quiet))


def _run_tags(run: PlannedRun, invocation: str) -> dict[str, str]:
    tags = {INVOCATION_TAG: invocation}
    if run.partition_key is not None:
        tags.update(run.partitions_def.get_tags_for_partition_key(run.partition_key))
    elif run.partition_range is not None:
        tags.update({RANGE_START_TAG: run.partition_range[0], RANGE_END_TAG: run.partition_range[1]})
    return tags


def _run_config(run: PlannedRun, configs: Mapping[str, dict], verbose: bool) -> dict:
    """Op config of the run's assets, and Dagster's console log level: DEBUG shows every event (~350 lines for a
    4-shard chain), WARNING keeps what needs attention."""
    names = [k.to_user_string() for k in run.assets]
    return {"ops": {name: {"config": configs[name]} for name in names if name in configs},
            "loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "WARNING"}}}}


def _recipe_keys(recipes: Sequence[str] | None):
    """Keys of the pipeline's assets that the given mining recipes need (`assets.partitions.partition_keys`: every
    shard, and only those recipes / SAE spaces); other assets (a test's own) get all their keys."""

    def keys_of(key: dg.AssetKey, partitions_def: dg.PartitionsDefinition) -> list[str]:
        ours = partition_keys(key.to_user_string(), list(recipes) if recipes else None)
        if ours == [None]:
            return partitions_def.get_partition_keys()
        return [str(k) for k in ours]

    return keys_of


def plan_pipeline(graph, selection: dg.AssetSelection, instance: dg.DagsterInstance | None = None,
                  recipes: Sequence[str] | None = None) -> list[PlannedRun]:
    """The runs of `selection` over the partitions the recipes need. Observable sources (the per-shard data
    versions) are observed, not materialised, so they are left out."""
    selected = {k for k in selection.resolve(graph) if graph.get(k).is_materializable}
    return plan_runs(graph, selected, instance, keys_of=_recipe_keys(recipes))


def materialise(selection: dg.AssetSelection | str | Sequence[str] = "*", instance: dg.DagsterInstance | None = None,
                resources: Mapping[str, object] | None = None, configs: Mapping[str, dict] | None = None,
                in_process: bool | None = None, verbose: bool = False,
                assets: Sequence[dg.AssetsDefinition] | None = None,
                recipes: Sequence[str] | None = None) -> list[tuple[str, ExecutionResult]]:
    """Materialise `selection` (asset names, a Dagster selection string such as "*shards_manifest", or an
    AssetSelection) over all partitions; stops at the first failed run. Returns (label, result) per run made.

    `resources`: resource objects to use instead of the environment's (tests, the experiment). `assets`: asset
    definitions to use instead of the pipeline's. Both live in this process, so they imply `in_process`.
    `configs`: asset name -> its config (what the UI's launchpad takes), e.g. {"pool_index": {"kind":
    "hnsw"}} (the recipe, not a config, decides a shard set's rule). `in_process`: every step in this process (default: only with `resources` or `assets`);
    otherwise steps run under the executor of `assets.definitions.defs` ($MISP_EXECUTOR). `recipes`: the mining
    recipes (`assets/recipes.py`) whose partitions to make (default: the default recipe, what `make train` reads)."""
    instance = instance or _instance(verbose)
    configs = configs or {}
    if in_process is None:
        in_process = resources is not None or assets is not None
    if resources is not None and not in_process:
        raise ValueError("resource objects given with in_process=False: step processes build their resources from "
                         "the environment (MISP_* variables); pass in_process=True or set the variables instead")
    if assets is not None and not in_process:
        raise ValueError("asset definitions given with in_process=False: executor processes import them from "
                         "assets.definitions; pass in_process=True")
    if in_process:
        job = dg.Definitions(assets=assets or all_assets, resources=resources or resources_from_env()
                             ).resolve_implicit_global_asset_job_def()
    else:
        job = defs.resolve_implicit_global_asset_job_def()
    if isinstance(selection, str):
        selection = dg.AssetSelection.from_string(selection)
    elif not isinstance(selection, dg.AssetSelection):
        selection = dg.AssetSelection.assets(*selection)
    graph = job.asset_layer.asset_graph
    runs = plan_pipeline(graph, selection, instance, recipes)
    selected = {k for run in runs for k in run.assets}
    invocation = uuid.uuid4().hex[:8]
    where = "an ephemeral instance" if instance.is_ephemeral else instance.root_directory
    print(f"materialising {len(selected)} assets in {len(runs)} run(s) on {where} "
          f"(tag {INVOCATION_TAG}={invocation})", flush=True)

    def execute(i: int, run: PlannedRun) -> tuple[str, ExecutionResult]:
        print(f"\n=== [{i}/{len(runs)}] {run.label}", flush=True)
        t0 = time.perf_counter()
        tags, run_config = _run_tags(run, invocation), _run_config(run, configs, verbose)
        if in_process:
            result = job.execute_in_process(run_config=run_config, instance=instance, tags=tags,
                                            asset_selection=list(run.assets), raise_on_error=False)
        else:
            # The run's assets as an op selection, not an asset selection: executors that rebuild the job in
            # their workers (dagster-dask) subset it by the run's op selection only; with an asset selection they
            # would plan every upstream step and read inputs of another partitioning (sae by space, candidates
            # by shard) through the wrong partition range.
            ops = [job.asset_layer.get_op_output_handle(key).node_handle.name for key in run.assets]
            result = dg.execute_job(_reconstructable(job.name).get_subset(op_selection=ops), instance,
                                    run_config=run_config, tags=tags)
        if result.success:
            failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
            if failed:
                print(f"WARNING: asset checks failed at {run.label}: {failed}", file=sys.stderr)
            print(f"=== [{i}/{len(runs)}] done in {time.perf_counter() - t0:.1f}s (run {result.run_id})", flush=True)
        return run.label, result

    done: list[tuple[str, ExecutionResult]] = []
    for i, run in enumerate(runs, 1):
        done.append(execute(i, run))
        if not done[-1][1].success:
            print(f"run {done[-1][1].run_id} failed at {run.label}; see its logs in the UI (make ui) or rerun with "
                  "--verbose. Fix the cause and rerun: finished work is kept.", file=sys.stderr)
            break
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--until", choices=sorted(UNTIL), default="shards",
                        help="materialise everything up to the embeddings, or the whole chain (default: shards)")
    target.add_argument("--select", default=None,
                        help="a Dagster asset selection instead, e.g. 'sae+' (the SAE and what depends on it)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every step in this process (default: the executor of assets.definitions)")
    parser.add_argument("--verbose", action="store_true", help="show Dagster's DEBUG log (every event of every run)")
    args = parser.parse_args(argv)
    selection = dg.AssetSelection.from_string(args.select) if args.select else UNTIL[args.until]
    results = materialise(selection, in_process=args.in_process, verbose=args.verbose)
    if not all(r.success for _, r in results):
        return 1
    return print_summary([])


if __name__ == "__main__":
    sys.exit(main())
