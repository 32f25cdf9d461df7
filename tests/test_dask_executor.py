"""The mining chain on a distributed executor: `make mine` with MISP_EXECUTOR=dask sends every step to a local
`dask.distributed` cluster of 2 worker processes (dagster-dask, the `dask` extra), and the tables, the FAISS index
and the SAE equal the sequential in-process run's (`reference_run` of cli_runs.py, shared with test_faults.py and
test_parallel_shards.py).

The workers are started here, with this process's environment set to the run's (data root, tiny world, 2 shards,
one thread): like the machines of a real cluster, they import `assets.definitions` and build their resources from
their own environment (docs/scaling.md)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

from cli_runs import assert_same_tables, cli_env, pipeline_args, reference_run, run, seed_root, tables

pytest.importorskip("dagster_dask", reason="the `dask` extra is not installed (docs/scaling.md)")
distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.dask, pytest.mark.slow]

FOLDERS = ("ingest", "embeddings", "index", "mining", "shards")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


def test_the_chain_on_a_two_worker_dask_cluster_equals_the_in_process_run(reference, tmp_path, monkeypatch):
    root, home = tmp_path / "data", tmp_path / "home"
    seed_root(reference, root)  # the world and its CLIP: found current, not the subject here
    env = cli_env(root, home, MISP_EXECUTOR="dask")
    for name in [n for n in os.environ if n.startswith("MISP_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # what the worker processes inherit

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        env["MISP_DASK_ADDRESS"] = cluster.scheduler_address
        with distributed.Client(cluster) as client:
            workers = set(client.run(os.getpid).values())
        out = run(pipeline_args(in_process=False, verbose=False), env, timeout=900)

    assert len(workers) == 2
    # Quiet: the run lines and the summary, no Dagster DEBUG events.
    assert "=== [11/11] shards_manifest" in out and " - DEBUG - " not in out and "STEP_START" not in out
    assert "open them in Polars" in out  # the summary

    # Every step of every run started in one of the two workers, and both did work.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 11 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        starts = [e for r in runs for e in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.STEP_START)]
    assert len(starts) == 2 + 2 * 5 + 1 + 2 + 1 + 1 + 2 + 1  # 13 assets, the per-shard ones once per shard
    assert {e.dagster_event.pid for e in starts} == workers

    assert_same_tables(tables(root, FOLDERS), tables(reference, FOLDERS))
    for model in ("index/pool.faiss", "models/sae/sae.safetensors"):
        assert (root / model).read_bytes() == (reference / model).read_bytes(), model
