"""Shard partitions materialised at the same time give the same tables as the sequential run.

What a user does to use several cores: one `dagster asset materialize --partition k` per shard, started together
against one instance; each run's steps execute in processes of their own under Dagster's multiprocess executor
(the code location in cli_runs.py: the project's assets and resources, forkserver start). The reference is the
sequential, in-process run (`python -m assets.run_pipeline`) shared with test_faults.py."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest

from assets.recipes import DEFAULT_RECIPE
from cli_runs import (SHARDS, assert_same_tables, cli_env, kill_group, materialize_args, pipeline_args,
                      reference_run, run, seed_root, start, tables)

PER_SHARD_EMBEDDING = "pool_images,preference_examples,pool_embeddings,positive_embeddings,prompt_embeddings"
PER_SHARD_CANDIDATES = "candidates"
PER_SHARD_MINING = "preference_shards"
"""Partitioned per (recipe, shard): its runs are keyed `greedy|000`... (the default recipe)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


def materialise_shards_at_once(selection: str, env: dict[str, str], timeout: float = 400,
                               recipe: str | None = None) -> dict[str, str]:
    """One `dagster asset materialize --partition k` per shard (`<recipe>|k` for the assets partitioned per recipe
    and shard), all started together; {shard: output}. Fails naming the shard whose run failed."""
    procs = {k: start(materialize_args(selection, f"{recipe}|{k}" if recipe else k), env) for k in SHARDS}
    deadline, outputs = time.monotonic() + timeout, {}
    try:
        for k, proc in procs.items():
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs[k] = out.decode(errors="replace")
            assert proc.returncode == 0, f"shard {k}: exit {proc.returncode}\n{outputs[k][-4000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                kill_group(proc)
    for k, out in outputs.items():  # every step ran in a process of its own, and the run succeeded
        assert "Multiprocess executor: parent process exiting" in out and "RUN_SUCCESS" in out, out[-4000:]
        assert out.count("STEP_WORKER_STARTED") == selection.count(",") + 1, k
    return outputs


def _run_span(out: str) -> tuple[str, str]:
    """Timestamps (to the second) of a run's RUN_START and RUN_SUCCESS lines."""
    stamps = [line[:19] for line in out.splitlines() if " - RUN_START - " in line or " - RUN_SUCCESS - " in line]
    return stamps[0], stamps[-1]


def test_shards_materialised_at_once_equal_the_sequential_run(reference, tmp_path, monkeypatch):
    root, home = tmp_path / "data", tmp_path / "home"
    seed_root(reference, root)
    env = cli_env(root, home)
    # Create the instance's SQLite tables first: two processes that both find a fresh DAGSTER_HOME race to create
    # them, and one fails with "table secondary_indexes already exists".
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)

    outputs = materialise_shards_at_once(PER_SHARD_EMBEDDING, env)
    (a0, a1), (b0, b1) = (_run_span(out) for out in outputs.values())
    assert a0 <= b1 and b0 <= a1  # the two runs were in flight at the same time
    folders = ("ingest", "embeddings")
    assert_same_tables(tables(root, folders), tables(reference, folders))

    # The non-partitioned stages (pool index, SAE, manifest) in sequence, each run's steps under the multiprocess
    # executor (`make mine`'s default): they find the embeddings current.
    out = run(pipeline_args(in_process=False), env)
    assert f"{root / 'embeddings' / 'prompts' / 'shard=001.parquet'} is current" in out
    # Then the per-shard mining assets again, for all shards at once.
    for k in SHARDS:
        for folder in ("mining/candidates", "shards"):
            (root / folder / f"shard={k}.parquet").unlink()
    materialise_shards_at_once(PER_SHARD_CANDIDATES, env)
    materialise_shards_at_once(PER_SHARD_MINING, env, recipe=DEFAULT_RECIPE)
    folders = ("ingest", "embeddings", "index", "mining", "shards")
    assert_same_tables(tables(root, folders), tables(reference, folders))
    with dg.DagsterInstance.get() as instance:
        for k in SHARDS:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": k}))
            assert len(runs) >= 4 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
