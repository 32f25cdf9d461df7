"""`python -m assets.run_pipeline` (`make mine`): the runs are derived from the asset graph, assets that take
partition ranges share one run, and Dagster's console log level decides how much is printed.

Toy assets on an ephemeral instance stand in where the pipeline's own would take minutes; the whole chain runs
in test_faults.py, test_parallel_shards.py and test_dask_executor.py."""


import dagster as dg
import pytest

from assets.definitions import defs, executor_from_env
from assets.run_pipeline import UNTIL, materialise, plan_pipeline, plan_runs

KEYS = ["000", "001", "002"]
PARTS = dg.StaticPartitionsDefinition(KEYS)
OTHER = dg.StaticPartitionsDefinition(["a", "b"])
SEEN: list = []  # (asset, the partition keys its step received), in execution order


@dg.asset
def raw(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    SEEN.append(("raw", ()))
    return dg.MaterializeResult()


@dg.asset(deps=[raw], partitions_def=PARTS, backfill_policy=dg.BackfillPolicy.single_run())
def cleaned(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    SEEN.append(("cleaned", tuple(context.partition_keys)))
    return dg.MaterializeResult()


@dg.asset(deps=[cleaned], partitions_def=PARTS, backfill_policy=dg.BackfillPolicy.single_run())
def scored(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    SEEN.append(("scored", tuple(context.partition_keys)))
    return dg.MaterializeResult()


@dg.asset(deps=[scored])
def report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    context.log.info("report: an info line")
    context.log.warning("report: a warning line")
    SEEN.append(("report", ()))
    return dg.MaterializeResult()


@dg.asset(deps=[raw], partitions_def=PARTS)
def per_key(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    SEEN.append(("per_key", (context.partition_key,)))
    return dg.MaterializeResult()


@dg.asset(deps=[per_key], partitions_def=OTHER, backfill_policy=dg.BackfillPolicy.single_run())
def elsewhere(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult()


TOY = [raw, cleaned, scored, report, per_key, elsewhere]


def _plan(assets, selection) -> list[str]:
    graph = dg.Definitions(assets=assets).resolve_asset_graph()
    return [run.label for run in plan_runs(graph, dg.AssetSelection.from_coercible(selection).resolve(graph))]


def test_the_chain_is_planned_from_the_asset_graph():
    """The runs `make mine` makes, derived from the graph: unpartitioned neighbours share a run, consecutive
    one-key assets of a shard share one run per shard; only the default recipe's partitions (what `make train`
    reads), and the observable sources are left out (they are observed, not materialised)."""
    graph = defs.resolve_asset_graph()
    labels = [run.label for run in plan_pipeline(graph, UNTIL["shards"])]
    embed = "pool_images, preference_examples, pool_embeddings, positive_embeddings, prompt_embeddings"
    keys = graph.get(dg.AssetKey("candidates")).partitions_def.get_partition_keys()
    assert isinstance(graph.get(dg.AssetKey("candidates")).partitions_def, dg.StaticPartitionsDefinition)
    assert labels == ["source_data, clip_model", *(f"{embed} [partition {k}]" for k in keys), "pool_index",
                      *(f"candidates [partition {k}]" for k in keys), "sae [partition fused]",
                      "mining_recipe [partition greedy]",
                      *(f"preference_shards [partition greedy|{k}]" for k in keys), "shards_manifest [partition greedy]"]
    assert [run.label for run in plan_pipeline(graph, UNTIL["embeddings"])] == labels[:1 + len(keys)]
    # Another recipe in another space: its SAE space and its shard set, nothing of the default's.
    other = [run.label for run in plan_pipeline(graph, UNTIL["shards"], recipes=["greedy_image"])]
    assert "sae [partition image]" in other and "sae [partition fused]" not in other
    assert other[-1] == "shards_manifest [partition greedy_image]"


def test_assets_that_take_ranges_share_one_run_with_their_neighbours():
    assert _plan([raw, cleaned, scored, report], "*") == ["raw, cleaned, scored, report [partitions 000...002]"]
    # A one-key asset runs once per key; an asset of another partitioning cannot share its range run.
    assert _plan(TOY, "*") == ["raw, cleaned, scored, report [partitions 000...002]",
                               "per_key [partition 000]", "per_key [partition 001]", "per_key [partition 002]",
                               "elsewhere [partitions a...b]"]


def test_a_range_run_materialises_every_partition_in_order_in_one_run():
    instance = dg.DagsterInstance.ephemeral()
    SEEN.clear()
    results = materialise("*", instance=instance, assets=[raw, cleaned, scored, report])
    assert [label for label, _ in results] == ["raw, cleaned, scored, report [partitions 000...002]"]
    assert results[0][1].success
    assert SEEN == [("raw", ()), ("cleaned", tuple(KEYS)), ("scored", tuple(KEYS)), ("report", ())]
    for name in ("cleaned", "scored"):
        assert instance.get_materialized_partitions(dg.AssetKey(name)) == set(KEYS)
    assert len(instance.get_runs()) == 1


def test_quiet_by_default_and_dagster_debug_with_verbose(capfd):
    """The console logger's level is the switch: DEBUG events (STEP_START, ...) and info lines only with
    `verbose`, warnings always."""
    materialise("report", instance=dg.DagsterInstance.ephemeral(), assets=TOY)
    quiet = capfd.readouterr().err
    assert "report: a warning line" in quiet
    assert "report: an info line" not in quiet and "STEP_START" not in quiet
    materialise("report", instance=dg.DagsterInstance.ephemeral(), assets=TOY, verbose=True)
    verbose = capfd.readouterr().err
    assert "report: an info line" in verbose and "STEP_START" in verbose


def test_a_failed_run_stops_the_plan_and_says_how_to_resume(capfd):
    @dg.asset(deps=[raw])
    def broken() -> None:
        raise RuntimeError("boom")

    @dg.asset(deps=[broken, per_key])
    def after() -> None:
        raise AssertionError("must not run")

    results = materialise("*", instance=dg.DagsterInstance.ephemeral(), assets=[raw, per_key, broken, after])
    assert [(label, r.success) for label, r in results] == [("raw, broken", False)]
    assert "Fix the cause and rerun: finished work is kept" in capfd.readouterr().err


def test_executor_from_env_names_the_fix():
    assert executor_from_env({}).name == "multiprocess"
    with pytest.raises(ValueError, match="MISP_EXECUTOR='celery' is not one of"):
        executor_from_env({"MISP_EXECUTOR": "celery"})
    with pytest.raises(ValueError, match="pass in_process=True"):
        materialise("raw", instance=dg.DagsterInstance.ephemeral(), assets=TOY, in_process=False)
