"""`python -m assets.run_pipeline`: materialise the whole chain on the configured instance, shard by shard.

What `make embed` and `make mine` run. Each stage is an ordinary Dagster run on the instance in $DAGSTER_HOME,
so every run, its logs, metadata and asset checks are in the UI (`make ui`). Work whose inputs have not changed
is skipped inside each asset (fingerprints in the Parquet metadata), so rerunning after an interruption resumes
where it stopped. For shards in parallel, launch a backfill of the partitioned assets from the UI instead.
"""

import argparse
import sys
import time

import dagster as dg

from assets.definitions import all_assets
from assets.resources import resources_from_env
from assets.layout import split_key
from assets.partitions import partition_keys
from pipeline.summary import main as print_summary

EMBED_STAGES: list[tuple[list[str], bool]] = [
    (["source_data", "clip_model"], False),
    (["pool_images", "preference_examples", "pool_embeddings", "positive_embeddings", "prompt_embeddings"], True),
]
MINE_STAGES: list[tuple[list[str], bool]] = [
    (["pool_index"], False),
    (["candidates"], True),
    (["sae"], False),
    (["mining_recipe"], False),
    (["preference_shards"], True),
    (["shards_manifest"], False),
]
UNTIL = {"embeddings": EMBED_STAGES, "shards": EMBED_STAGES + MINE_STAGES}


def run_stages(until: str = "shards", instance: dg.DagsterInstance | None = None,
               resources: dict | None = None, configs: dict[str, dict] | None = None,
               stages: list[tuple[list[str], bool]] | None = None) -> list[tuple[str, dg.ExecuteInProcessResult]]:
    """Materialise stage after stage; stops at the first failed run. Returns (label, result) per run.

    `configs`: asset name -> its config (what the UI's launchpad takes), e.g. {"preference_shards": {"rule":
    "random_pool"}}. `stages`: the (assets, partitioned) runs to make instead of those of `until`."""
    instance = instance or dg.DagsterInstance.get()
    resources = resources or resources_from_env()
    configs = configs or {}
    plan = UNTIL[until] if stages is None else stages
    # The partitions of the default recipe: every shard (recipe x shard for preference_shards), the default SAE
    # space and recipe for the unsharded `sae` and `shards_manifest`.
    steps = [(sel, key, partitioned) for sel, partitioned in plan for key in partition_keys(sel[0])]
    done = []
    for i, (selection, key, partitioned) in enumerate(steps, 1):
        label = ", ".join(selection) + (f" [shard {split_key(key)[1]}]" if partitioned else "")
        print(f"\n=== [{i}/{len(steps)}] {label}", flush=True)
        t0 = time.perf_counter()
        run_config = {"ops": {name: {"config": configs[name]} for name in selection if name in configs}}
        result = dg.materialize(all_assets, selection=selection, partition_key=key, instance=instance,
                                resources=resources, raise_on_error=False, run_config=run_config)
        done.append((label, result))
        if not result.success:
            print(f"run {result.run_id} failed at {label}; see its logs in the UI (make ui) or above. "
                  "Fix the cause and rerun: finished work is kept.", file=sys.stderr)
            break
        failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        if failed:
            print(f"WARNING: asset checks failed at {label}: {failed}", file=sys.stderr)
        print(f"=== done in {time.perf_counter() - t0:.1f}s (run {result.run_id})", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--until", choices=sorted(UNTIL), default="shards",
                        help="last stage to materialise (default: shards, i.e. the whole mining chain)")
    results = run_stages(parser.parse_args(argv).until)
    if not results[-1][1].success:
        return 1
    return print_summary([])


if __name__ == "__main__":
    sys.exit(main())
