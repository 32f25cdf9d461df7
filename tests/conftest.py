"""Shared fixtures. Everything runs offline on CPU: a hub miss must fail at once, never hang."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see assets/__init__.py

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The tiny scene world, generated once per test session (read-only for tests)."""
    from world import PRESETS, generate_world

    out = tmp_path_factory.mktemp("world") / "tiny-seed0"
    generate_world(PRESETS["tiny"], out, progress=False)
    return out


def tiny_resources(root):
    from assets.resources import ClipModel, DataRoot, DataSource

    return {"data_root": DataRoot(path=str(root)), "source": DataSource(kind="world", world_preset="tiny"),
            "clip": ClipModel(device="cpu")}


@pytest.fixture(scope="session")
def mined(tmp_path_factory):
    """The whole chain (world -> CLIP -> ingest -> embeddings -> index -> candidates -> SAE -> shards ->
    manifest) materialised once on the tiny world, on a real ephemeral Dagster instance.
    Returns (data root, instance, resources, [(label, result)])."""
    import dagster as dg

    from assets.run_pipeline import materialise

    root = tmp_path_factory.mktemp("data")
    instance = dg.DagsterInstance.ephemeral()
    resources = tiny_resources(root)
    results = materialise("*", instance=instance, resources=resources)
    assert all(r.success for _, r in results), [label for label, r in results if not r.success]
    return root, instance, resources, results


@pytest.fixture(scope="session")
def world_base(mined):
    """`mined`'s data root with the tiny world base VLM in models/base, trained once per session as `make base`
    does (the trainer requires a model; it no longer builds one). Returns the data root."""
    from world.base_model import BASE_PRESETS, train_base_model

    root = mined[0]
    train_base_model(root / "world" / "tiny-seed0", root / "models" / "base", BASE_PRESETS["tiny"], progress=False)
    return root
