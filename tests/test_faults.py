"""Faults: a pipeline killed with SIGKILL mid-embedding and mid-mining, then rerun, ends with the same tables as an
uninterrupted run, and no partial file ever sits under a final name; a training run killed mid-step resumes to the
same final weights; a full disk during a write leaves the previous file intact and no temp file behind.

Everything that can be real is: the pipeline and the trainer run as separate processes (`python -m
assets.run_pipeline`, `python -m trainer`) whose process groups get SIGKILL; the file size limit of a child process
(RLIMIT_FSIZE) makes a real write fail mid-file. Only ENOSPC itself is injected, since a full disk cannot be made
safely here."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import store.parquet_io as parquet_io
from cli_runs import (REPO, assert_same_tables, cli_env, kill_group, pipeline_args, reference_run, run, run_until,
                      seed_root, tables)
from store.parquet_io import is_current, write_json_atomic, write_parquet_atomic
from trainer.shards import load_shards

TABLE_FOLDERS = ("ingest", "embeddings", "index", "mining", "models/sae", "shards")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def reference_with_base(reference) -> Path:
    """The reference run's data root with the tiny world base VLM (what `make base` builds before `make train`)."""
    from world.base_model import BASE_PRESETS, train_base_model

    train_base_model(reference / "world" / "tiny-seed0", reference / "models" / "base", BASE_PRESETS["tiny"],
                     progress=False)
    return reference


def assert_every_final_file_is_whole(root: Path) -> None:
    """Every file under a final name reads completely. (A killed writer may leave `.<name>.<random>.tmp` files or
    staged model folders behind: no reader's pattern matches them.)"""
    for f in root.rglob("*"):
        if any(part.startswith(".") for part in f.relative_to(root).parts) or not f.is_file():
            continue  # a staged model folder (`.sae.<random>.staging/`) is not under its final name either
        if f.suffix == ".parquet":
            pq.read_table(f)  # a truncated file has no footer and raises
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".safetensors":
            load_file(str(f))
        elif f.suffix == ".png" and "shards" in f.parts:
            with Image.open(f) as im:
                im.load()


# -------------------------------------------------------------------------------------------------- the pipeline


def test_pipeline_killed_mid_embedding_and_mid_mining_reruns_to_identical_shards(reference, tmp_path):
    root, home = tmp_path / "data", tmp_path / "home"
    seed_root(reference, root)
    env = cli_env(root, home)

    # 1. SIGKILL while shard 001's pool images are being embedded (its progress bar has started).
    stage = r"=== \[3/11\] pool_images, preference_examples, pool_embeddings, positive_embeddings, prompt_embeddings"
    out = run_until(pipeline_args(), env, [stage + r" \[partition 001\]", r"embed pool:"])
    assert "=== [4/11]" not in out, "the kill came after the embedding stage"
    assert (root / "embeddings" / "prompts" / "shard=000.parquet").exists()  # shard 000 finished before
    assert not (root / "embeddings" / "prompts" / "shard=001.parquet").exists()
    assert_every_final_file_is_whole(root)

    # 2. Rerun: finished work is skipped; SIGKILL once shard 001's mining step has started.
    out = run_until(pipeline_args(), env, [r"=== \[10/11\] preference_shards \[partition greedy\|001\]",
                                           r"preference_shards - STEP_START"])
    assert "=== [11/11]" not in out, "the kill came after the mining stage"
    assert f"{root / 'embeddings' / 'pool' / 'shard=000.parquet'} is current" in out
    assert (root / "shards" / "shard=000.parquet").exists() and not (root / "shards" / "manifest.json").exists()
    assert_every_final_file_is_whole(root)

    # 3. Rerun to the end: every table equals the uninterrupted run's, and the trainer accepts the shards.
    run(pipeline_args(), env)
    assert_every_final_file_is_whole(root)
    assert_same_tables(tables(root, TABLE_FOLDERS), tables(reference, TABLE_FOLDERS))
    assert (root / "models" / "sae" / "sae.safetensors").read_bytes() == \
        (reference / "models" / "sae" / "sae.safetensors").read_bytes()
    assert load_shards(root / "shards").height == load_shards(reference / "shards").height


def test_sigkill_mid_write_never_leaves_a_partial_file_under_the_final_name(tmp_path):
    """A process rewriting a large table in a loop is killed halfway through a write (timed from the writes
    before it): the file under the final name is one whole version, never a prefix."""
    path, n = tmp_path / "table.parquet", 2_000_000
    script = (
        "import sys, numpy as np, polars as pl\n"
        "from store.parquet_io import write_parquet_atomic\n"
        "for v in range(1000):\n"
        f"    df = pl.DataFrame({{'version': np.full({n}, v), 'x': np.random.default_rng(v).random({n})}})\n"
        "    print('start', v, flush=True)\n"
        "    write_parquet_atomic(df, sys.argv[1], {'version': v})\n"
        "    print('done', v, flush=True)\n"
    )
    log = tmp_path / "log.txt"
    seen: dict[str, float] = {}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while "start 2" not in seen:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            for line in log.read_text().splitlines():
                seen.setdefault(line, time.monotonic())
            time.sleep(0.001)
        time.sleep((seen["done 1"] - seen["start 1"]) / 2)  # halfway through writing version 2
    finally:
        kill_group(proc)
    assert "done 2" not in log.read_text(), "the write finished before the kill; the machine is too slow for this"
    df = pl.read_parquet(path)  # a file cut short has no footer and raises
    version = parquet_io.read_metadata(path)["version"]
    assert version in (1, 2) and df.height == n and (df["version"] == version).all()
    assert np.array_equal(df["x"].to_numpy(), np.random.default_rng(version).random(n))


# --------------------------------------------------------------------------------------------------- the trainer


def test_training_killed_mid_step_resumes_to_the_same_final_weights(reference_with_base, tmp_path):
    reference = reference_with_base
    steps = 20
    args = [sys.executable, "-m", "trainer", "--data_root", str(reference), "--max_steps", str(steps),
            "--batch_size", "4", "--warmup_steps", "1", "--save_every", "1", "--lr", "1e-3"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    run_dir = reference / "runs" / "killed"
    # Killed first, then resumed; the straight run is the control.
    log = tmp_path / "killed.txt"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*args, "--run_name", "killed"], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step-0000002" / "state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.002)
    finally:
        code = kill_group(proc)
    assert code == -9 and not (run_dir / "final").exists(), log.read_text()[-3000:]
    done = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                  if (p / "state.json").exists())
    assert 2 <= done[-1] < steps

    resumed = run([*args, "--run_name", "killed"], env)
    assert f"at step {done[-1]}" in resumed
    run([*args, "--run_name", "straight"], env)
    a = load_file(str(reference / "runs" / "straight" / "final" / "model.safetensors"))
    b = load_file(str(run_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------------------- a full disk


def _partial_then_enospc(real_write):
    """pyarrow's write_table that writes the first half of the file, then finds the disk full."""

    def write_table(table, where, **kwargs):
        buf = io.BytesIO()
        real_write(table, buf, **kwargs)
        with open(where, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    return write_table


class _FullDiskFile(io.FileIO):
    """A file whose disk fills up halfway through the first write."""

    def write(self, data) -> int:
        super().write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_write_leaves_the_previous_state_intact(tmp_path, monkeypatch):
    table, manifest = tmp_path / "shard=000.parquet", tmp_path / "manifest.json"
    write_parquet_atomic(pl.DataFrame({"x": [1, 2, 3]}), table, {"fingerprint": "old"})
    write_json_atomic({"version": 1}, manifest)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    monkeypatch.setattr(pq, "write_table", _partial_then_enospc(pq.write_table))
    with pytest.raises(OSError) as exc:
        write_parquet_atomic(pl.DataFrame({"x": np.arange(100_000)}), table, {"fingerprint": "new"})
    assert exc.value.errno == errno.ENOSPC

    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake_os.fdopen = lambda fd, mode="wb": _FullDiskFile(fd, "wb")
    monkeypatch.setattr(parquet_io, "os", fake_os)
    with pytest.raises(OSError) as exc:
        write_json_atomic({"version": 2, "payload": "x" * 10_000}, manifest)
    assert exc.value.errno == errno.ENOSPC

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # same files, same bytes, no temp file
    assert is_current(table, "old") and json.loads(manifest.read_text()) == {"version": 1}


def test_a_real_failed_write_leaves_the_previous_state_intact(tmp_path):
    """The kernel refuses the write halfway: a child process whose file size limit (RLIMIT_FSIZE) is below the size
    of the new file gets EFBIG from write(2), exactly where a full disk would give ENOSPC."""
    table, manifest = tmp_path / "shard=000.parquet", tmp_path / "manifest.json"
    write_parquet_atomic(pl.DataFrame({"x": [1, 2, 3]}), table, {"fingerprint": "old"})
    write_json_atomic({"version": 1}, manifest)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    script = (
        "import resource, signal, sys, numpy as np, polars as pl\n"
        "from store.parquet_io import write_json_atomic, write_parquet_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
        "big = pl.DataFrame({'x': np.random.default_rng(0).random(200_000)})\n"
        "for write, args in ((write_parquet_atomic, (big, sys.argv[1], {'fingerprint': 'new'})),\n"
        "                    (write_json_atomic, ({'payload': 'x' * 200_000}, sys.argv[2]))):\n"
        "    try:\n"
        "        write(*args)\n"
        "    except OSError as exc:\n"
        "        print('refused:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(table), str(manifest)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("refused:") == 2 and out.stdout.count("File too large") >= 2, out.stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
