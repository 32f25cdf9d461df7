"""Benchmark the trainer (SPEC §3–4): seconds per optimizer step against K, importance sampling against the whole
pool, cached against online reference, and our `dpo` preset against TRL's DPOTrainer on the same tiny LLaVA.

    .venv/bin/python bench/train.py            # ~11 min on 2 cores at load 4.5 (~6-7 quiet); first run +~40 s
    .venv/bin/python bench/train.py --quick    # smoke run (tiny model, 1 timed step per config), temp JSON

Data (nothing downloaded, HF_HUB_OFFLINE=1): the tiny scene world mined into preference shards by the real
pipeline (`assets.run_pipeline.materialise("*")`, as tests/conftest.py does): 96 examples, each with 3 mined
negatives and a retrieved pool of 64 candidates with the shard's proposal q. Built once under --data-root
(default data/bench/train, gitignored) and reused. Synthetic variants of the examples, only for this bench:
  K negatives     `negatives` = the first K entries of the example's pool (K = 1..8; the shards hold 3).
  pool of C       `pool` truncated to its first C entries (C = 16, 64); the IS draws renormalise q over them.
  whole pool      PL over all C pool candidates: is_mode none with K = C negatives (the first C pool entries).

Model: the world VLM (a stock `LlavaForConditionalGeneration`: CLIP-style tower + Llama, 64 image tokens) with
`--arch default` (~4.4 M parameters, what `make base` trains) or `--arch tiny` (the tests' model), RANDOMLY
INITIALISED and saved with save_pretrained plus its processor (step time does not depend on the weights: rows
are teacher-forced, so their lengths are fixed by the data). fp32, full fine-tuning, vision tower frozen
(the trainer's defaults); batch 8 examples, max_length 192, AdamW, clip 1.0, `--threads` torch threads.

What one timed step covers (ours): exactly what the loop in `trainer.train.train` runs per step, the trainer's
own `trainer.step.step` on a state built by `trainer.state.build`: pick the step's examples (`batch_at`), per
micro-batch the IS draws from the proposal, `build_rows`, `encode_rows` with the processor on the images, the
policy forward `response_logps_from_model`, the reference lookup in `RefCache` or the online frozen copy's forward
under no_grad, `compute_loss` (with `learned`, the proposal's own update) and `backward`; then gradient clipping,
`optimizer.step`, the scheduler step, `zero_grad` and the metrics' reduction. Not covered: logging, TensorBoard,
checkpoints (the `train()` cross-check row has them). Images are decoded once before timing (`load_image`'s LRU
cache, as in a long run on a small pool), so PNG decoding is excluded. Each configuration has its own model,
optimizer and reference, all from the same weights, and takes the same batches (steps 0, 1, 2, ... of the seed-0
schedule): --warmup untimed steps, then --steps timed ones (fewer for expensive configurations once --budget
seconds are spent, never fewer than --min-steps). The configurations of one table step round-robin, interleaved,
so that a change of the machine's background load hits all of them alike; medians are reported, and each table's
ratio is to its baseline.

Reference: `cached` = lookups in a RefCache filled beforehand by the trainer's own precompute pass
(`trainer.state.precompute_reference`, the pass `build` runs before the first step); its cost is reported
separately as a one-off (seconds per example, for the rows a configuration needs: 2 + K, or 2 + C with IS).
`online` = a second forward per step through a frozen deep copy (what `reference: online` does for full fine-tuning).

TRL (optional bench extra, "unavailable: <reason>" otherwise): `trl.DPOTrainer` on the same saved model folder and
processor, the same 96 examples as a `datasets.Dataset` of (images, prompt, chosen, rejected) with the prompt
already in the model's chat format (`format_prompt`, what our rows use) and the eos token appended to each answer
(our rows add it too), batch 8, max_length 192, beta 0.5, sigmoid loss, lr 5e-5, clip 1.0, fp32 (bf16=False),
no gradient checkpointing, vision tower frozen, precompute_ref_log_probs=False (TRL refuses it for vision data)
and TRL's own reference: a second copy of the model loaded from the folder. Its step = the time between two
`on_step_end` callbacks: data loading (datasets decodes the PNG) + its collator (processor) + policy and reference
forwards + backward + clip + optimizer + scheduler + its per-step metrics. It is compared with our `dpo` preset
with `reference: online` (the same work: 2 rows per example, policy + reference forward); ours cached is listed too.
Ours and TRL are timed in the order ours, TRL, TRL, ours (each a fresh setup); s/step = the mean of the
medians of the two runs.

Prints tables; writes reports/bench/train.json (machine, load, versions, settings, every step time)."""

from __future__ import annotations

import os

# Before any Hugging Face / torch import: never reach the network; processes sharing cores must not busy-wait.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accelerate import Accelerator  # noqa: E402

from store.parquet_io import write_json_atomic  # noqa: E402
from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.model_loading import format_prompt, load_vlm  # noqa: E402
from trainer.ref_cache import RefCache  # noqa: E402
from trainer.rows import load_image  # noqa: E402
from trainer.shards import load_shards, read_manifest  # noqa: E402
from trainer.state import build, precompute_reference  # noqa: E402
from trainer.step import batch_at, batch_indices, step  # noqa: E402
from trainer.trainable import prepare_trainable  # noqa: E402

BATCH = 8
MAX_LENGTH = 192
LR = 5e-5


# ---------------------------------------------------------------- data and model


def ensure_data(root: Path) -> Path:
    """The tiny world's shards under root/shards (mined once, reused)."""
    shards = root / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    import dagster as dg

    from assets.resources import ClipModel, DataRoot, DataSource
    from assets.run_pipeline import materialise

    root.mkdir(parents=True, exist_ok=True)
    print(f"mining the tiny world into {root} (once; ~40 s) ...", flush=True)
    resources = {"data_root": DataRoot(path=str(root)), "source": DataSource(kind="world", world_preset="tiny"),
                 "clip": ClipModel(device="cpu")}
    logging.getLogger("dagster").setLevel(logging.WARNING)
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        results = materialise("*", instance=dg.DagsterInstance.ephemeral(), resources=resources)
    failed = [label for label, r in results if not r.success]
    if failed:
        sys.stderr.write(log.getvalue()[-5000:])
        raise RuntimeError(f"mining the bench data failed at {failed}")
    return shards


def ensure_model(root: Path, manifest: dict, arch: str) -> Path:
    """A randomly initialised world VLM (`arch`: a BASE_PRESETS architecture) saved with its processor."""
    from world.base_model import BASE_PRESETS, build_world_vlm

    folder = root / "models" / f"bench-{arch}-random"
    if (folder / "config.json").is_file():
        return folder
    source = manifest["source"]
    world = root / "world" / f"{source['world_preset']}-seed{source['world_seed']}"
    model, processor = build_world_vlm(world, BASE_PRESETS[arch])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def with_negatives(ex: dict, k: int) -> dict:
    return {**ex, "negatives": ex["pool"][:k]}


def with_pool(ex: dict, c: int) -> dict:
    return {**ex, "pool": ex["pool"][:c]}


def warm_images(examples: list[dict]) -> None:
    for ex in examples:
        load_image(ex["image_path"])
        for c in ex["pool"]:
            load_image(c["path"])


# ---------------------------------------------------------------- our step


def train_cfg(root: Path, model_dir: Path, preset: str, reference: str, **loss) -> TrainConfig:
    args = ["--data_root", str(root), "--model", str(model_dir), "--preset", preset, "--reference", reference,
            "--batch_size", str(BATCH), "--max_length", str(MAX_LENGTH), "--lr", str(LR), "--warmup_steps", "1",
            "--max_steps", "100"]
    for k, v in loss.items():
        args += [f"--loss.{k}", str(v)]
    return load_config(None, args)


class Runner:
    """One configuration of our loop: a `trainer.state.build` state (its own model, optimizer, scheduler,
    reference and IS generator) from the same saved weights as every other, on these examples with the shared
    cache; `step()` runs one timed `trainer.step.step` (module docstring)."""

    def __init__(self, name: str, examples: list[dict], cfg: TrainConfig, acc: Accelerator, cache: RefCache | None,
                 **extra):
        self.name, self.cfg, self.extra = name, cfg, extra
        self.state = build(cfg, progress=False, accelerator=acc, examples=examples, cache=cache)
        self.n_steps, self.times, self.rows = 0, [], []

    def step(self, timed: bool = True) -> None:
        t0 = time.perf_counter()
        out = step(self.state, batch_at(self.state, self.n_steps))
        dt = time.perf_counter() - t0
        if not math.isfinite(out.loss):
            raise RuntimeError(f"{self.name}: non-finite loss at step {self.n_steps}")
        self.n_steps += 1
        if timed:
            self.times.append(dt)
            self.rows.append(out.rows)

    def done(self, args) -> bool:
        return len(self.times) >= args.steps or (len(self.times) >= args.min_steps and sum(self.times) >= args.budget)

    def result(self) -> dict:
        med = statistics.median(self.times)
        return {"name": self.name, "s_per_step": med, "steps_per_s": 1 / med, "step_times": self.times,
                "rows_per_step": statistics.mean(self.rows), "examples_per_step": self.cfg.batch_size,
                "preset": self.cfg.preset, "reference": self.cfg.reference, "loss": dataclasses.asdict(self.cfg.loss),
                **self.extra}


def run_interleaved(runners: list[Runner], args) -> list[dict]:
    """Warm every runner up, then time them round-robin (the order rotating each round) until each has --steps
    timed steps, or --min-steps once --budget seconds are spent: a change in the machine's background load hits
    every configuration of a table alike, so the ratios stay fair."""
    for r in runners:
        for _ in range(args.warmup):
            r.step(timed=False)
    active, rnd = list(runners), 0
    while active:
        shift = rnd % len(active)
        for r in active[shift:] + active[:shift]:
            r.step()
        active = [r for r in active if not r.done(args)]
        rnd += 1
    out = [r.result() for r in runners]
    for r in out:
        print(f"  {r['name']:44s} {r['s_per_step']:7.3f} s/step  ({len(r['step_times'])} steps, "
              f"{r['rows_per_step']:.0f} rows/step)", flush=True)
    runners.clear()
    args.acc.free_memory()
    return out


def precompute(examples: list[dict], cfg: TrainConfig, folder: Path, key: str,
               acc: Accelerator) -> tuple[RefCache, dict]:
    """The trainer's precompute pass into a fresh cache, timed (one-off cost)."""
    cache = RefCache(folder, key)
    state = build(cfg, progress=False, accelerator=acc, examples=examples, cache=cache)
    t0 = time.perf_counter()
    precompute_reference(state, progress=False)
    seconds = time.perf_counter() - t0
    del state
    acc.free_memory()
    return cache, {"examples": len(examples), "rows": len(cache), "seconds": seconds,
                   "s_per_example": seconds / len(examples), "rows_per_s": len(cache) / seconds}


def touched(n_examples: int, args) -> list[int]:
    return sorted({i for s in range(args.warmup + args.steps) for i in batch_indices(s, n_examples, BATCH, 0)})


# ---------------------------------------------------------------- train() cross-check


def time_train_loop(root: Path, model_dir: Path, shards: Path, args) -> dict:
    """`trainer.train.train` itself (misp, K = 3, cached): median per-step delta of `seconds` in metrics.jsonl."""
    from trainer.train import train

    with tempfile.TemporaryDirectory() as tmp:
        steps = args.warmup + args.steps
        cfg = load_config(None, ["--data_root", str(root), "--model", str(model_dir), "--shards", str(shards),
                                 "--output_dir", tmp, "--preset", "misp", "--reference", "cached",
                                 "--batch_size", str(BATCH), "--max_length", str(MAX_LENGTH), "--lr", str(LR),
                                 "--warmup_steps", "1", "--max_steps", str(steps), "--save_every", "1000000"])
        t0 = time.perf_counter()
        train(cfg, progress=False)
        total = time.perf_counter() - t0
        secs = [json.loads(line)["seconds"] for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    per_step = [secs[0]] + [b - a for a, b in zip(secs, secs[1:])]  # `seconds` is cumulative from the loop start
    deltas = per_step[args.warmup:]
    med = statistics.median(deltas)
    print(f"  {'train() loop, misp K=3 cached':44s} {med:7.3f} s/step  ({len(deltas)} steps; whole call "
          f"{total:.1f} s incl. load, precompute if not cached, final save)", flush=True)
    return {"name": "train() loop, misp K=3, cached", "s_per_step": med, "step_times": deltas,
            "whole_call_s": total}


# ---------------------------------------------------------------- TRL


def trl_or_reason():
    try:
        import datasets
        import trl
        from trl import DPOConfig, DPOTrainer
    except ImportError as exc:
        return None, f"not installed ({exc.name}; pip install -e '.[bench]')"
    return (datasets, trl, DPOConfig, DPOTrainer), None


def time_trl(examples: list[dict], model_dir: Path, cfg: TrainConfig, args) -> dict:
    """TRL's DPOTrainer on the same model folder and examples; step time between on_step_end callbacks."""
    found, reason = trl_or_reason()
    if found is None:
        print(f"  {'TRL DPOTrainer':44s} unavailable: {reason}", flush=True)
        return {"name": "TRL DPOTrainer", "status": f"unavailable: {reason}"}
    datasets, trl, DPOConfig, DPOTrainer = found
    from transformers import TrainerCallback
    import transformers

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    try:
        model, processor = load_vlm(model_dir, dtype="float32")
        model = prepare_trainable(model, cfg).train()  # same trainable set as ours: vision tower frozen
        eos = processor.tokenizer.eos_token
        ds = datasets.Dataset.from_list([
            {"images": [load_image(e["image_path"])], "prompt": format_prompt(processor, e["prompt"]),
             "chosen": e["chosen"] + eos, "rejected": e["rejected"] + eos} for e in examples])
        clock = Clock()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n_steps = args.warmup + args.steps
            dpo_args = DPOConfig(
                output_dir=tmp, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_steps=n_steps,
                learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0, weight_decay=0.0,
                beta=cfg.loss.beta, loss_type=["sigmoid"], max_length=MAX_LENGTH,
                bf16=acc_bf16(), gradient_checkpointing=False, precompute_ref_log_probs=False,
                logging_steps=10_000, save_strategy="no", report_to="none", dataloader_num_workers=0,
                disable_tqdm=True, seed=0)
            trainer = DPOTrainer(model=model, args=dpo_args, train_dataset=ds, processing_class=processor,
                                 callbacks=[clock])
            if trainer.ref_model is None:
                raise RuntimeError("DPOTrainer made no reference model")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.train()
            total = time.perf_counter() - t0
            batch = trainer.data_collator([ds[0]])
            row_len = int(batch["attention_mask"][0].sum())
    except Exception as exc:  # report exactly why, keep the rest of the bench
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"  {'TRL DPOTrainer':44s} unavailable: {reason}", flush=True)
        return {"name": "TRL DPOTrainer", "status": f"unavailable: {reason}"}
    deltas = [b - a for a, b in zip(clock.ends, clock.ends[1:])][max(0, args.warmup - 1):]
    med = statistics.median(deltas)
    print(f"  {'TRL DPOTrainer (its own reference copy)':44s} {med:7.3f} s/step  ({len(deltas)} steps)", flush=True)
    return {"name": f"TRL {trl.__version__} DPOTrainer", "s_per_step": med, "steps_per_s": 1 / med,
            "step_times": deltas, "whole_train_call_s": total, "rows_per_step": 2 * BATCH,
            "first_row_tokens": row_len, "versions": {"trl": trl.__version__, "datasets": datasets.__version__,
                                                      "transformers": transformers.__version__}}


def acc_bf16() -> bool:
    return torch.cuda.is_available()  # what precision=auto gives ours: bf16 autocast on CUDA, fp32 on CPU


# ---------------------------------------------------------------- report


def fmt_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [f"\n{title}", line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def ratio(x: dict, base: dict) -> str:
    return f"{x['s_per_step'] / base['s_per_step']:.2f}x" if "s_per_step" in x and "s_per_step" in base else "-"


def report(res: dict) -> str:
    parts = []
    k1 = next(r for r in res["negatives"] if r["K"] == 1)
    parts.append(fmt_table(
        "Seconds per step against the number of image negatives K (PL over K; cached reference; x = / K=1)",
        ["preset", "K", "rows/step", "s/step", "x K=1"],
        [[r["preset"], str(r["K"]), f"{r['rows_per_step']:.0f}", f"{r['s_per_step']:.3f}", ratio(r, k1)]
         for r in res["negatives"]]))
    rows = []
    for pool in res["importance_sampling"]:
        full = pool["rows"][0]
        for r in pool["rows"]:
            rows.append([r["label"], str(pool["C"]), r["Kp"], f"{r['rows_per_step']:.1f}", f"{r['s_per_step']:.3f}",
                         ratio(r, full)])
    parts.append(fmt_table(
        "Importance sampling: K' draws from pools of C against PL over the whole pool (cached; x = / whole pool)",
        ["mode", "C", "K'", "rows/step", "s/step", "x whole"], rows))
    rows = []
    for r in res["reference"]:
        c, o, pre = r["cached"], r["online"], r["precompute"]
        extra = (o["s_per_step"] - c["s_per_step"]) / BATCH
        even = f"{pre['s_per_example'] / extra:.1f}" if extra > 0 else "never"
        rows.append([r["label"], f"{c['s_per_step']:.3f}", f"{o['s_per_step']:.3f}", f"{o['s_per_step'] / c['s_per_step']:.2f}x",
                     f"{pre['rows'] / pre['examples']:.0f}", f"{pre['s_per_example']:.3f}", even])
    parts.append(fmt_table(
        "Cached against online reference (precompute: one-off, per example; break-even: epochs after which "
        "caching has paid off)",
        ["config", "cached s/step", "online s/step", "online/cached", "ref rows/ex", "precompute s/ex",
         "break-even epochs"], rows))
    base = res["trl"]["ours_online"]
    rows = []
    for r in (res["trl"]["ours_online"], res["trl"]["ours_cached"], res["trl"]["trl"]):
        if "s_per_step" in r:
            runs = " / ".join(f"{m:.3f}" for m in r.get("run_medians", [r["s_per_step"]]))
            rows.append([r["name"], f"{r['s_per_step']:.3f}", f"{r['steps_per_s']:.2f}", ratio(r, base), runs])
        else:
            rows.append([r["name"], r["status"], "-", "-", "-"])
    parts.append(fmt_table(
        f"Text DPO, same model, data, batch {BATCH}, max_length {MAX_LENGTH} (s/step: mean of the runs' medians, "
        "runs ordered ours, TRL, TRL, ours; x = / ours dpo online)",
        ["trainer", "s/step", "steps/s", "x ours online", "per-run medians"], rows))
    if res.get("train_loop"):
        direct = res["reference"][0]["cached"]
        t = res["train_loop"]
        parts.append(fmt_table(
            "Cross-check: the whole train() loop (metrics, TensorBoard) against the timed loop body",
            ["what", "s/step", "x body"],
            [["loop body (this bench), misp K=3 cached", f"{direct['s_per_step']:.3f}", "1.00x"],
             [t["name"], f"{t['s_per_step']:.3f}", ratio(t, direct)]]))
    return "\n".join(parts)


def machine_info(args) -> dict:
    import accelerate
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "load_average_1_5_15_start": list(os.getloadavg())}


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 timed step, fewer configs; temp JSON")
    p.add_argument("--data-root", default=str(REPO / "data" / "bench" / "train"),
                   help="where the tiny world's shards and the bench model live (built once, reused)")
    p.add_argument("--arch", choices=("default", "tiny"), default=None,
                   help="world VLM architecture (default: 'default', 'tiny' with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5; quick 1)")
    p.add_argument("--min-steps", type=int, default=None, help="fewest timed steps once --budget is spent (2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--budget", type=float, default=15.0, help="seconds of timed steps per configuration after "
                                                                "which it stops at --min-steps")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    p.add_argument("--out", default=None, help="JSON path (default reports/bench/train.json; quick: a temp file)")
    args = p.parse_args()
    args.arch = args.arch or ("tiny" if args.quick else "default")
    args.steps = args.steps or (1 if args.quick else 5)
    args.min_steps = args.min_steps or (1 if args.quick else 2)
    if args.out is None:
        args.out = (tempfile.mkstemp(prefix="bench-train-", suffix=".json")[1] if args.quick
                    else str(REPO / "reports" / "bench" / "train.json"))
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    root = Path(args.data_root).resolve()
    shards = ensure_data(root)
    manifest = read_manifest(shards)
    model_dir = ensure_model(root, manifest, args.arch)
    base = load_shards(shards).to_dicts()
    pool_size = min(len(e["pool"]) for e in base)
    warm_images(base)
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    info = machine_info(args)
    print(f"{len(base)} examples, pools of {pool_size}; model {model_dir} ({args.arch} world VLM, random init); "
          f"{args.threads} threads; load average {info['load_average_1_5_15_start']}", flush=True)

    args.acc = acc
    ks = (1, 2, 8) if args.quick else tuple(range(1, 9))
    pools = [c for c in ((16,) if args.quick else (16, 64)) if c <= pool_size]
    kps = (1, 4) if args.quick else (1, 2, 3, 4)
    big, kp_max = max(pools), max(kps)
    res: dict = {"settings": {"batch_size": BATCH, "max_length": MAX_LENGTH, "lr": LR, "arch": args.arch,
                              "model": str(model_dir), "model_random_init": True, "steps": args.steps,
                              "min_steps": args.min_steps, "warmup": args.warmup, "budget_s": args.budget,
                              "threads": args.threads, "quick": args.quick, "examples": len(base),
                              "pool_size": pool_size, "interleaved": True}}

    def cfg_of(preset: str, reference: str = "cached", **loss) -> TrainConfig:
        return train_cfg(root, model_dir, preset, reference, **loss)

    def runner(name: str, examples: list[dict], cfg: TrainConfig, **extra) -> Runner:
        return Runner(name, examples, cfg, acc, cache, **extra)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        idx = touched(len(base), args)
        # One-off precompute costs (fresh caches, the trainer's own pass): the rows of misp K=3 (2 + 3 per
        # example), and of IS over the whole pool (2 + C per example).
        print("reference precompute (one-off, the trainer's own pass):", flush=True)
        _, pre_k3 = precompute([with_negatives(base[i], 3) for i in idx], cfg_of("misp"), tmp, "k3", acc)
        pool_cfg = cfg_of("misp", is_mode="fixed", k_prime=kp_max)
        cache, pre_big = precompute([with_pool(base[i], big) for i in idx], pool_cfg, tmp, "pool", acc)
        for name, pre in (("misp K=3", pre_k3), (f"IS over the pool of {big}", pre_big)):
            print(f"  {name:44s} {pre['seconds']:7.2f} s for {pre['examples']} examples ({pre['rows']} rows, "
                  f"{pre['rows_per_s']:.0f} rows/s)", flush=True)
        # `cache` now holds every row any cached configuration looks up (first-K negatives are pool entries too).

        print("negatives K (cached reference):", flush=True)
        group = [runner("dpo K=0 (text only)", base, cfg_of("dpo"), K=0)]
        group += [runner(f"misp K={k}", [with_negatives(e, k) for e in base], cfg_of("misp", num_negatives=k), K=k)
                  for k in ks]
        res["negatives"] = run_interleaved(group, args)

        print("importance sampling (cached reference):", flush=True)
        res["importance_sampling"] = []
        for c in pools:
            exs = [with_pool(e, c) for e in base]
            group = [runner(f"whole pool C={c} (PL over {c} negatives)", [with_negatives(e, c) for e in exs],
                            cfg_of("misp", num_negatives=c), label="whole pool (PL, no IS)", Kp=str(c))]
            group += [runner(f"IS fixed C={c} K'={kp}", exs, cfg_of("misp", is_mode="fixed", k_prime=kp),
                             label="IS, fixed q", Kp=str(kp)) for kp in kps]
            if not args.quick and c == big:
                group.append(runner(f"IS learned C={c} K'={kp_max}", exs,
                                    cfg_of("misp", is_mode="learned", k_prime=kp_max), label="IS, learned q",
                                    Kp=str(kp_max)))
            res["importance_sampling"].append({"C": c, "rows": run_interleaved(group, args)})

        print("cached against online reference:", flush=True)
        k3 = [with_negatives(e, 3) for e in base]
        is_exs = [with_pool(e, big) for e in base]
        group = [runner("misp K=3, cached", k3, cfg_of("misp")),
                 runner("misp K=3, online", k3, cfg_of("misp", "online")),
                 runner(f"IS fixed C={big} K'={kp_max}, cached", is_exs, pool_cfg),
                 runner(f"IS fixed C={big} K'={kp_max}, online", is_exs,
                        cfg_of("misp", "online", is_mode="fixed", k_prime=kp_max))]
        r = run_interleaved(group, args)
        res["reference"] = [
            {"label": "misp K=3", "cached": r[0], "online": r[1], "precompute": pre_k3},
            {"label": f"IS fixed C={big} K'={kp_max}", "cached": r[2], "online": r[3], "precompute": pre_big}]

        # Ours and TRL alternate (ours, TRL, TRL, ours): a drift in the background load cancels out.
        print("text DPO against TRL (ours, TRL, TRL, ours):", flush=True)
        ours_runs, trl_runs = [], []
        for turn in ("ours", "trl", "trl", "ours")[: 2 if args.quick else 4]:
            if turn == "ours":
                ours_runs.append(run_interleaved([runner("misp-dpo `dpo`, online reference", base,
                                                         cfg_of("dpo", "online")),
                                                  runner("misp-dpo `dpo`, cached reference", base, cfg_of("dpo"))],
                                                 args))
            elif args.no_trl:
                trl_runs.append({"name": "TRL DPOTrainer", "status": "unavailable: skipped (--no-trl)"})
            else:
                trl_runs.append(time_trl(base, model_dir, cfg_of("dpo", "online"), args))
        res["trl"] = {"ours_online": pooled([o[0] for o in ours_runs]),
                      "ours_cached": pooled([o[1] for o in ours_runs]), "trl": pooled(trl_runs)}

    print("the train() loop:", flush=True)
    res["train_loop"] = None if args.quick else time_train_loop(root, model_dir, shards, args)

    res["machine"] = {**info, "load_average_1_5_15_end": list(os.getloadavg())}
    res["precompute"] = {"misp_K3": pre_k3, f"is_pool_{big}": pre_big}
    text = report(res)
    print(text)
    out = Path(args.out)
    del args.acc
    res["settings"]["argv"] = sys.argv[1:]
    write_json_atomic(res, out)
    print(f"\nwrote {out}")


def pooled(runs: list[dict]) -> dict:
    """One result from the ABBA-ordered runs of a configuration: the mean of the runs' medians (equal weight per
    run is what cancels a linear drift of the background load; a median over the pooled steps would not)."""
    if any("s_per_step" not in r for r in runs):
        return next(r for r in runs if "s_per_step" not in r)
    medians = [r["s_per_step"] for r in runs]
    mean = statistics.mean(medians)
    return {**runs[0], "s_per_step": mean, "steps_per_s": 1 / mean, "run_medians": medians,
            "step_times": [t for r in runs for t in r["step_times"]], "runs": len(runs)}


if __name__ == "__main__":
    main()
