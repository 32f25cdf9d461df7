"""Shared fixtures. Everything runs offline on CPU: a hub miss must fail at once, never hang."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

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
