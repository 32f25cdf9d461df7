"""The trainer on the tiny world's shards and the tiny world VLM: every trainable parameter moves, a killed and
resumed run ends with the same weights, the reference cache round-trips and follows the weights, a corrupted
shard is named, and two DDP processes agree with one on the first step."""

import json
import math
import os
import socket
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
def base(world_base):
    """The tiny world base VLM trained once (what `make base` does), reused by every test here."""
    assert (world_base / "models" / "base" / "base_report.json").exists()
    return world_base


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


def test_yaml_nests_the_loss_and_the_command_line_overrides_it(tmp_path):
    import yaml

    from trainer.config import TrainConfig
    from trainer.losses import LossConfig

    run = tmp_path / "run.yaml"
    run.write_text("preset: misp\nlr: 1e-4\nloss:\n  beta: 0.3\n  is_mode: fixed\n")
    cfg = load_config(run, ["--loss.k_prime", "2", "--max_steps", "7", "--lora", "true"])
    assert (cfg.lr, cfg.max_steps, cfg.lora) == (1e-4, 7, True)
    assert cfg.loss == LossConfig.from_preset("misp", beta=0.3, is_mode="fixed", k_prime=2)
    beta = tmp_path / "beta.yaml"
    beta.write_text("loss:\n  beta: 0.3\n")
    assert load_config(beta, ["--preset", "mdpo"]).loss == LossConfig.from_preset("mdpo", beta=0.3)
    assert load_config(beta, ["--loss.beta=0.7"]).loss.beta == 0.7  # the command line wins over the file
    assert TrainConfig(preset="dpo").loss == LossConfig.from_preset("dpo")
    cfg.save(tmp_path / "config.yaml")  # what a run writes beside itself reads back to the same config
    assert TrainConfig.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  bta: 1\n")
    with pytest.raises(ValueError, match=r"loss: unknown keys \['bta'\]"):
        load_config(bad)
    with pytest.raises(ValueError, match="LossConfig.from_preset"):
        TrainConfig(loss={"beta": 0.3})


def test_a_missing_model_asks_for_make_base(mined, tmp_path):
    """The trainer trains the model it is given; with none it says how to get one and builds nothing."""
    args = ["--data_root", str(tmp_path), "--shards", str(mined[0] / "shards"), "--max_steps", "1"]
    with pytest.raises(FileNotFoundError, match="run `make base` first"):
        train(load_config(None, args), progress=False)
    with pytest.raises(FileNotFoundError, match="pass --model a local save_pretrained folder"):
        train(load_config(None, args + ["--model", str(tmp_path / "nothing")]), progress=False)
    assert not (tmp_path / "models").exists()


def test_the_loop_is_build_then_step_with_the_transformers_schedule(base):
    """`train()` is `build` + `step`: steps run by hand on a built state give exactly the metrics the loop logs
    for the same config, and the LR follows transformers' warmup + cosine: lr * s / warmup for s < warmup (0 at
    the first step), then lr * 0.5 (1 + cos(pi (s - warmup) / (max_steps - warmup)))."""
    from trainer.state import build
    from trainer.step import batch_at, step

    args = ["--max_steps", "3", "--warmup_steps", "2", "--resume", "false"]
    state = build(_cfg(base, "by-hand", *args), progress=False)
    assert state.scheduler.get_last_lr() == [0.0]
    outs = [step(state, batch_at(state, s)) for s in range(3)]
    # `lr` is logged after the step: the LR of the next one (s = 1, 2, 3)
    assert [o.metrics["lr"] for o in outs] == pytest.approx([0.5e-3, 1e-3, 0.0], abs=1e-15)
    assert all(o.rows > 0 and o.loss == o.metrics["loss"] for o in outs)
    train(_cfg(base, "by-loop", *args), progress=False)
    logged = [{k: v for k, v in row.items() if k not in ("forward_rows", "seconds")}
              for row in _metrics(base, "by-loop")]
    assert [o.metrics for o in outs] == logged


def _two_processes(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m trainer` in 2 CPU processes (DDP over gloo). `accelerate launch --cpu --num_processes 2` starts
    ONE process on a machine without MPI (its simple launcher), so torchrun starts the two and
    ACCELERATE_USE_CPU makes accelerate join them as MULTI_CPU (checkpoints record how many processes ran)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    with socket.socket() as sock:  # a free port: other test sessions on this machine may hold torchrun's 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                           "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_ddp_processes_agree_with_one_on_the_first_step(base, tmp_path):
    """`accelerate launch` with 2 CPU processes: each takes half of the batch; the gathered loss of step 1
    equals the single-process loss of the same batch."""
    common = ["--data_root", str(base), "--max_steps", "1", "--batch_size", "4", "--warmup_steps", "1",
              "--save_every", "1"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "trainer", *common, "--run_name", "one"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _two_processes([*common, "--run_name", "two"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    state = json.loads((base / "runs" / "two" / "checkpoints" / "step-0000001" / "state.json").read_text())
    assert state["processes"] == 2
    one = json.loads((base / "runs" / "one" / "metrics.jsonl").read_text().splitlines()[0])
    two = json.loads((base / "runs" / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["rewards/margins"] == pytest.approx(two["rewards/margins"], abs=1e-5)


# ------------------------------------------------------------------------- issue 11: reference, precision, baselines

@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; a run in another precision
    starts from a clean one (as a new process would), and leaves a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _metrics(root, name):
    return [json.loads(line) for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]


REFERENCE_MODES = [  # (reference, lora, precision)
    ("cached", False, "no"), ("online", False, "no"), ("online", True, "no"), ("cached", True, "no"),
    ("cached", False, "bf16"), ("online", False, "bf16"), ("online", True, "bf16"),
]


@pytest.mark.parametrize("reference,lora,precision", REFERENCE_MODES)
def test_reference_never_moves_and_rewards_start_at_exactly_zero(base, reference, lora, precision,
                                                                  fresh_accelerate_state):
    """3 steps at lr 1e-2 (the projector trains outside the adapters with LoRA): the reference log-probs of a
    fixed probe batch stay the same to the bit while the policy's move by nats; at step 0 every reward is 0
    (to 1e-6) under fp32 and bf16 autocast, cached and online alike."""
    name = f"ref-{reference}-{'lora' if lora else 'full'}-{precision}"
    train(_cfg(base, name, "--max_steps", "3", "--lr", "1e-2", "--reference", reference, "--lora", str(lora).lower(),
               "--precision", precision, "--reference_check_every", "1", "--resume", "false"), progress=False)
    m = _metrics(base, name)
    for key in ("rewards/chosen", "rewards/margins", "rewards/img_margin"):
        assert abs(m[0][key]) <= 1e-6, (key, m[0][key])
    assert m[0]["loss/text"] == pytest.approx(math.log(2), abs=1e-6)
    assert [row["ref/probe_drift"] for row in m] == [0.0, 0.0, 0.0]
    assert m[-1]["ref/probe_policy_change"] > 0.5  # the steps did move the policy


def test_a_reference_that_follows_the_policy_is_caught_by_the_probe(base, monkeypatch):
    """The control of the test above: a reference that is the policy itself (no frozen copy) moves, and the same
    probe catches it; so the zeros above are the reference standing still, not a probe that cannot see."""
    import trainer.reference

    def the_policy_itself(self, policy, batch, autocast=None):
        with torch.no_grad():
            return trainer.reference.response_logps_from_model(policy, batch).double()

    monkeypatch.setattr(trainer.reference.OnlineReference, "logps", the_policy_itself)
    train(_cfg(base, "ref-follows", "--max_steps", "3", "--lr", "1e-2", "--reference", "online",
               "--reference_check_every", "1", "--resume", "false"), progress=False)
    assert _metrics(base, "ref-follows")[-1]["ref/probe_drift"] > 0.1


def test_cache_key_follows_precision_and_every_weight_file(base, tmp_path):
    from safetensors.torch import save_file

    from trainer.ref_cache import cache_key

    key = dict(max_length=512, seed=0, precision="no", dtype="float32", layout={"rows": "steps", "batch_size": 4})
    k0 = cache_key("fp", ["sha"], **key)
    assert cache_key("fp", ["sha"], **{**key, "precision": "bf16"}) != k0
    assert cache_key("fp", ["sha"], **{**key, "dtype": "bfloat16"}) != k0
    assert cache_key("fp", ["sha"], **{**key, "layout": {"rows": "steps", "batch_size": 8}}) != k0
    assert cache_key("fp", ["sha"], **key) == k0
    # a folder with PyTorch .bin weights (and a sharded index): changing either changes the fingerprint
    folder = tmp_path / "bin-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(3)}, folder / "pytorch_model-00001-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": {"w": "pytorch_model-00001-of-00002.bin"}}')
    before = model_fingerprint(folder)
    torch.save({"w": torch.ones(3)}, folder / "pytorch_model-00001-of-00002.bin")
    after = model_fingerprint(folder)
    assert after != before
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    assert model_fingerprint(folder) != after
    save_file({"w": torch.zeros(1)}, str(folder / "extra.safetensors"))
    assert model_fingerprint(folder) not in (before, after)


def test_chip_schedule_coefficients_against_hand_values():
    from trainer.image_negatives import noise_coefficients

    # t = 0 by hand: beta_0 = 1e-5 + (5e-3 - 1e-5) / (1 + e^6), alpha_bar_0 = 1 - beta_0
    beta0 = 1e-5 + (5e-3 - 1e-5) / (1 + math.exp(6))
    assert noise_coefficients(0) == pytest.approx((math.sqrt(1 - beta0), math.sqrt(beta0)), abs=1e-12)
    # t = 500 and 999: the product of (1 - beta_s), s <= t, written out in float64 with math (independent of numpy)
    for t_, steps in ((500, 1000), (999, 1000)):
        abar = 1.0
        for s_ in range(t_ + 1):
            u = -6 + 12 * s_ / (steps - 1)
            abar *= 1 - (1e-5 + (5e-3 - 1e-5) / (1 + math.exp(-u)))
        assert noise_coefficients(t_) == pytest.approx((math.sqrt(abar), math.sqrt(1 - abar)), abs=1e-12)
    # the values the issue quotes for CHiP / VCD at t = 500 (the old linear DDPM schedule gave 0.28 / 0.96)
    assert noise_coefficients(500) == pytest.approx((0.8630, 0.5052), abs=1e-4)
    assert noise_coefficients(999) == pytest.approx((0.2850, 0.9585), abs=1e-4)
    with pytest.raises(ValueError, match="noise step"):
        noise_coefficients(1000)


def test_chip_noise_is_added_to_the_processors_pixel_values(base):
    from trainer.image_negatives import noise_coefficients
    from trainer.losses import PRESETS
    from trainer.model_loading import load_vlm
    from trainer.rows import build_rows, encode_rows

    _, processor = load_vlm(base / "models" / "base")
    examples = load_shards(base / "shards").to_dicts()[:2]
    rows = build_rows(examples, PRESETS["chip"], seed=0, step=0)
    enc = encode_rows(processor, rows, max_length=512)
    pv = enc.extras["pixel_values"].double()
    clean, noised = pv[rows.chosen[0]], pv[rows.neg[0, 0]]
    signal, noise = noise_coefficients(500)
    eps = (noised - signal * clean) / noise  # what was added must be standard normal noise
    assert abs(eps.mean().item()) < 0.05 and eps.std().item() == pytest.approx(1.0, abs=0.05)
    assert noised.max() > clean.max() + 1  # not clipped to the image range: noise on the normalised tensor
    # fresh per step (CHiP draws new noise every forward), fixed per (seed, example, step)
    again = encode_rows(processor, build_rows(examples, PRESETS["chip"], seed=0, step=0), max_length=512)
    later = encode_rows(processor, build_rows(examples, PRESETS["chip"], seed=0, step=1), max_length=512)
    assert torch.equal(again.extras["pixel_values"], enc.extras["pixel_values"])
    assert not torch.equal(later.extras["pixel_values"][rows.neg[0, 0]], enc.extras["pixel_values"][rows.neg[0, 0]])
    assert rows.keys[rows.neg[0, 0]] != build_rows(examples, PRESETS["chip"], seed=0, step=1).keys[rows.neg[0, 0]]


def test_mdpo_crop_is_fresh_every_step_and_needs_the_online_reference(base):
    from trainer.losses import LossConfig, PRESETS
    from trainer.rows import build_rows

    ex = load_shards(base / "shards").to_dicts()[:1]
    crops = [build_rows(ex, PRESETS["mdpo"], seed=0, step=s) for s in (0, 1)]
    a, b = (r.images[r.neg[0, 0]] for r in crops)
    assert a.tobytes() != b.tobytes() and crops[0].keys[crops[0].neg[0, 0]] != crops[1].keys[crops[1].neg[0, 0]]
    fixed = LossConfig.from_preset("mdpo", fresh_negatives=False)
    r0, r5 = build_rows(ex, fixed, 0, step=0), build_rows(ex, fixed, 0, step=5)
    assert r0.images[r0.neg[0, 0]].tobytes() == r5.images[r5.neg[0, 0]].tobytes()
    with pytest.raises(ValueError, match="reference: online"):
        load_config(None, ["--preset", "mdpo", "--reference", "cached"])
    assert load_config(None, ["--preset", "mdpo"]).reference_mode() == "online"
    assert load_config(None, ["--preset", "mdpo", "--loss.fresh_negatives", "false"]).reference_mode() == "cached"


@pytest.mark.parametrize("preset", ["mdpo", "chip"])
def test_fresh_negative_presets_train_with_the_online_reference(base, preset):
    name = f"fresh-{preset}"
    train(_cfg(base, name, "--preset", preset, "--max_steps", "2", "--resume", "false"), progress=False)
    m = _metrics(base, name)
    assert abs(m[0]["rewards/chosen"]) <= 1e-6 and abs(m[0]["rewards/img_margin"]) <= 1e-6
    key = "loss/chip_joint" if preset == "chip" else "loss/img"
    assert m[0][key] == pytest.approx(math.log(2), abs=1e-6)  # one negative, policy = reference
    ref = json.loads((base / "runs" / name / "reference.json").read_text())
    assert ref["mode"] == "online" and ref["rows_computed"] == m[-1]["forward_rows"]


def test_two_ddp_processes_hold_the_same_learned_proposal(base, tmp_path):
    """`accelerate launch` with 2 CPU processes, learned IS: each process draws for its own examples, and the
    all-reduced q_phi gradient keeps both copies bit-identical after every step."""
    ddp = _two_processes(["--data_root", str(base), "--max_steps", "3", "--batch_size", "4", "--warmup_steps", "1",
                          "--save_every", "3", "--loss.is_mode", "learned", "--loss.k_prime", "2",
                          "--loss.proposal_lr", "1e-1", "--run_name", "ddp-learned"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    state = json.loads((base / "runs" / "ddp-learned" / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["processes"] == 2
    m = _metrics(base, "ddp-learned")
    assert [row["proposal/process_disagreement"] for row in m] == [0.0, 0.0, 0.0]
    assert all(row["proposal/loss"] > 0 for row in m)
    proposal = load_file(str(base / "runs" / "ddp-learned" / "checkpoints" / "step-0000003" / "proposal.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in proposal.items() if k.endswith("mlp.2.weight"))  # it trained


def test_online_lora_reference_keeps_the_projector_and_refuses_sharded_training(base):
    """With LoRA the projector trains as peft's `modules_to_save` (saved in the adapter folder, switched off with
    the adapters), so nothing trains outside the adapters and nothing is kept aside; a weight that does train
    outside them is kept, and refused under sharded training."""
    from trainer.model_loading import load_vlm
    from trainer.reference import OnlineReference
    from trainer.trainable import prepare_trainable

    model, _ = load_vlm(base / "models" / "base")
    lora = prepare_trainable(model, load_config(None, ["--lora", "true"]))
    assert any("modules_to_save" in n and "multi_modal_projector" in n
               for n, p in lora.named_parameters() if p.requires_grad)
    assert OnlineReference(lora, lora=True, distributed_type="FSDP").kept_parameters == []
    head = next(n for n, p in lora.named_parameters() if n.endswith("lm_head.weight"))
    dict(lora.named_parameters())[head].requires_grad_(True)
    assert OnlineReference(lora, lora=True).kept_parameters == [head]
    with pytest.raises(ValueError, match="freeze_projector: true"):
        OnlineReference(lora, lora=True, distributed_type="FSDP")
