"""Helpers for tests that run the pipeline the way a user does, as separate processes: `python -m
assets.run_pipeline` and `dagster asset materialize` against a temp DAGSTER_HOME, on the tiny world with 2 shards.

The uninterrupted reference run is made once per test session (`reference_run`) and shared by test_faults.py and
test_parallel_shards.py. Tables written under two data roots hold different absolute paths; `relocated` makes them
comparable.

This module is also a code location (`defs`, `dagster asset materialize -m cli_runs`): the project's assets and
resources with Dagster's multiprocess executor started through a forkserver that has imported them once. With the
default `spawn` every step process imports torch, open_clip and Dagster again (about 10 s of CPU each here), which
made one round of two shards take 88 s instead of 25 s."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl

from assets.definitions import all_assets
from assets.resources import resources_from_env

REPO = Path(__file__).resolve().parents[1]
SHARDS = ["000", "001"]
_REFERENCE: dict[str, Path] = {}

defs = dg.Definitions(assets=all_assets, resources=resources_from_env(), executor=dg.multiprocess_executor.configured(
    {"max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": ["assets.definitions"]}}}))


def cli_env(root: Path, home: Path, **extra: str) -> dict[str, str]:
    """The environment of one pipeline process: the tiny world, 2 shards, a fresh instance in `home`, one thread.

    One intra-op thread because SAE training is not reproducible with several on CPU: the backward of the gather
    `P[inverse]` in sae/autoencoder.py accumulates in a thread-dependent order, so two uninterrupted runs already
    train different SAEs. With one thread every stage is deterministic, and any difference is the fault's."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISP_")}
    env.update({"MISP_DATA_ROOT": str(root), "MISP_WORLD_PRESET": "tiny", "MISP_SHARDS": str(len(SHARDS)),
                "DAGSTER_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A child in its own process group (so that a kill reaches its step processes too), stdout+stderr piped."""
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> int:
    """SIGKILL the process group of `proc` (the process and everything it started) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait(timeout=60)


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    """Run to completion; fail with the output's tail when it does not succeed."""
    proc = start(args, env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"{args} ran over {timeout}s") from None
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{args} exited with {proc.returncode}:\n{text[-4000:]}"
    return text


def run_until(args: list[str], env: dict[str, str], patterns: list[str], timeout: float = 600) -> str:
    """Run `args`, reading its output as it comes, and SIGKILL its process group as soon as the regular
    expressions `patterns` have appeared in that order (progress bars included: the output is read in raw chunks,
    not lines). Returns everything the process printed before it died; fails if it ends, or runs past `timeout`,
    first."""
    proc = start(args, env)
    fd, buf, pos, want = proc.stdout.fileno(), b"", 0, list(patterns)
    deadline = time.monotonic() + timeout
    try:
        while want:
            if time.monotonic() > deadline:
                raise AssertionError(f"{args} ran {timeout}s without printing {want[0]!r}:\n"
                                     f"{buf[-4000:].decode(errors='replace')}")
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                proc.wait()
                raise AssertionError(f"{args} ended (exit {proc.returncode}) before printing {want[0]!r}:\n"
                                     f"{buf[-4000:].decode(errors='replace')}")
            buf += chunk
            while want and (m := re.compile(want[0].encode()).search(buf, pos)):
                pos, want = m.end(), want[1:]
    finally:
        code = kill_group(proc)
        buf += proc.stdout.read()  # what it printed between the match and its death
        proc.stdout.close()
    assert code == -signal.SIGKILL, f"expected death by SIGKILL, got exit {code}"
    return buf.decode(errors="replace")


def pipeline_args(until: str = "shards", in_process: bool = True, verbose: bool = True) -> list[str]:
    """`python -m assets.run_pipeline` (`make mine`). The tests' default is every step in one process, sequentially,
    with Dagster's DEBUG log: they read its events (STEP_START) and the assets' info lines ("... is current")."""
    return [sys.executable, "-m", "assets.run_pipeline", "--until", until,
            *(["--in-process"] if in_process else []), *(["--verbose"] if verbose else [])]


def materialize_args(selection: str, partition: str) -> list[str]:
    """`dagster asset materialize` of `selection` for one shard, on the code location of this module."""
    return [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "cli_runs", "-d",
            str(REPO / "tests"), "--select", selection, "--partition", partition]


def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted, sequential run of the whole chain (`python -m assets.run_pipeline`), once per session.
    Returns its data root; its instance is `<root>/../home`."""
    if "root" not in _REFERENCE:
        base = tmp_path_factory.mktemp("reference")
        run(pipeline_args(), cli_env(base / "data", base / "home"))
        _REFERENCE["root"] = base / "data"
    return _REFERENCE["root"]


def seed_root(reference: Path, root: Path) -> None:
    """Start a data root with the reference's scene world and world CLIP (`source_data` and `clip_model` then find
    them current and skip): the slowest stage, and not the one the tests here exercise."""
    for sub in ("world", "models/clip"):
        shutil.copytree(reference / sub, root / sub)


def tables(root: Path, folders: tuple[str, ...]) -> dict[str, pl.DataFrame]:
    """Every Parquet table under `root/<folder>` for each folder, by relative path, with paths relocated."""
    return {f.relative_to(root).as_posix(): relocated(pl.read_parquet(f), root)
            for folder in folders for f in sorted((root / folder).rglob("*.parquet"))}


def relocated(df: pl.DataFrame, root: Path) -> pl.DataFrame:
    """`df` with the absolute path of `root` replaced by `<root>` in every string, nested ones included."""
    prefix = str(Path(root).resolve())

    def fix(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
        if dtype == pl.String:
            return expr.str.replace_all(prefix, "<root>", literal=True)
        if isinstance(dtype, pl.Struct):
            return pl.struct([fix(expr.struct.field(f.name), f.dtype).alias(f.name) for f in dtype.fields])
        if isinstance(dtype, pl.List):
            return expr.list.eval(fix(pl.element(), dtype.inner))
        return expr

    return df.select([fix(pl.col(c), t).alias(c) for c, t in df.schema.items()])


def assert_same_tables(got: dict[str, pl.DataFrame], want: dict[str, pl.DataFrame]) -> None:
    assert sorted(got) == sorted(want)
    different = [name for name in want if not got[name].equals(want[name])]
    assert not different, f"tables differ from the reference: {different}"
