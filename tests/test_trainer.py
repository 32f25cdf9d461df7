"""The trainer on the tiny world's shards and the tiny world VLM: every trainable parameter moves, a killed and
resumed run ends with the same weights, the reference cache round-trips and follows the weights, a corrupted
shard is named, and two DDP processes agree with one on the first step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.ref_cache import RefCache, model_fingerprint
from trainer.shards import CorruptShardError, load_shards
from trainer.train import train

REPO = Path(__file__).resolve().parents[1]


def _cfg(root, name, *extra):
    return load_config(None, ["--data_root", str(root), "--run_name", name, "--max_steps", "4", "--batch_size", "4",
                              "--warmup_steps", "1", "--save_every", "2", "--lr", "1e-3", *extra])


@pytest.fixture(scope="module")
def base(mined):
    """The tiny world base VLM trained once (what `make base` does), reused by every test here."""
    root = mined[0]
    train(_cfg(root, "warmup", "--max_steps", "1"), progress=False)
    assert (root / "models" / "base" / "base_report.json").exists()
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_few_steps_change_every_trainable_parameter(base):
    final = train(_cfg(base, "moves"), progress=False)
    before, after = _weights(base / "models" / "base"), _weights(final)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    vision = {k for k in before if "vision_tower" in k}
    trainable = set(before) - vision
    assert trainable and trainable <= changed, sorted(trainable - changed)[:5]
    assert not (vision & changed)  # frozen by default
    metrics = [json.loads(line) for line in (base / "runs" / "moves" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "loss/img", "loss/text", "rewards/img_margin", "rewards/img_accuracy"):
        assert key in metrics[0], key
    # At step 1 the policy is the reference: text loss log 2, PL image loss log(1 + K) with K = 3.
    assert metrics[0]["loss/text"] == pytest.approx(0.6931, abs=1e-3)
    assert metrics[0]["loss/img"] == pytest.approx(1.3863, abs=1e-3)


def test_killed_and_resumed_run_ends_with_the_same_weights(base):
    straight = train(_cfg(base, "straight"), progress=False)
    out = train(_cfg(base, "sliced", "--stop_after_steps", "1"), progress=False)
    assert out.name == "checkpoints" and not (base / "runs" / "sliced" / "final").exists()
    train(_cfg(base, "sliced", "--stop_after_steps", "2"), progress=False)  # resumes at 1, stops at 3
    final = train(_cfg(base, "sliced"), progress=False)  # resumes at 3, ends at 4
    a, b = _weights(straight), _weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_importance_sampling_and_lora_runs(base):
    final = train(_cfg(base, "is-learned", "--loss.is_mode", "learned", "--loss.k_prime", "2", "--lora", "true",
                       "--reference", "online"), progress=False)
    assert (final / "adapter_config.json").exists()
    last = json.loads((base / "runs" / "is-learned" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["is/ess"] <= 1 and "proposal/loss" in last and last["is/q_entropy"] > 0


def test_reference_cache_round_trips_and_follows_the_weights(base, tmp_path):
    cache = RefCache(tmp_path, "k")
    keys = [("e1", "chosen", "pos"), ("e1", "chosen", "pool:/x.png")]
    cache.add(keys, torch.tensor([-1.5, -2.25], dtype=torch.float64))
    cache.save()
    again = RefCache(tmp_path, "k")
    assert torch.equal(again.lookup(keys), torch.tensor([-1.5, -2.25], dtype=torch.float64))
    assert again.missing(keys + [("e2", "rejected", "pos")]) == [("e2", "rejected", "pos")]
    model_dir = base / "models" / "base"
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    assert model_fingerprint(copy) == model_fingerprint(model_dir)
    weights = load_file(str(copy / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    from safetensors.torch import save_file

    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(copy) != model_fingerprint(model_dir)
    # The cached reference of a run is the one written by the precompute pass of `train`.
    assert list((base / "ref_cache").glob("*.parquet"))


def test_corrupted_shard_is_named(mined, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(mined[0] / "shards", shards)
    assert load_shards(shards).height > 0
    victim = shards / "shard=001.parquet"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CorruptShardError, match="shard=001.parquet"):
        load_shards(shards)


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown option --max_stepz"):
        load_config(None, ["--max_stepz", "3"])
    with pytest.raises(ValueError, match="preset"):
        load_config(None, ["--preset", "ppo"])
    with pytest.raises(ValueError, match="is_mode"):
        load_config(None, ["--preset", "mdpo", "--loss.is_mode", "learned"])


def test_two_ddp_processes_agree_with_one_on_the_first_step(base, tmp_path):
    """`accelerate launch` with 2 CPU processes: each takes half of the batch; the gathered loss of step 1
    equals the single-process loss of the same batch."""
    common = ["--data_root", str(base), "--max_steps", "1", "--batch_size", "4", "--warmup_steps", "1",
              "--save_every", "1"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "trainer", *common, "--run_name", "one"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    ddp = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", *common,
                          "--run_name", "two"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = json.loads((base / "runs" / "one" / "metrics.jsonl").read_text().splitlines()[0])
    two = json.loads((base / "runs" / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["rewards/margins"] == pytest.approx(two["rewards/margins"], abs=1e-5)
