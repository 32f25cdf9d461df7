"""The training loop, top to bottom: build, then per step: data, forward, loss, backward, step, log, checkpoint.

    python -m trainer --config configs/world.yaml                       # one CPU or one GPU
    accelerate launch --num_processes 2 -m trainer --config configs/world.yaml   # DDP (CPU or GPU)

`trainer.state.build` loads the shards and the model and sets up the reference, AdamW and the schedule;
`trainer.step.step` runs one optimizer step (the same function the benchmarks time). Each step takes `batch_size`
examples (split over processes), forwards all their rows (y_p with the positive and every image negative, y_n with
the positive) in one batch, looks up or computes reference log-probs, and applies the preset's loss
(trainer/losses.py). Outputs go to <data root>/runs/<run_name>/: metrics.jsonl (TRL's names), tensorboard/,
checkpoints/ (exact resume), final/ (save_pretrained)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from store.parquet_io import write_json_atomic
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.state import TrainState, build
from trainer.step import batch_at, step
from trainer.trainable import save_final


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Train `cfg` to `max_steps` (resuming from the run's newest checkpoint when `resume`); returns final/, or the
    checkpoints folder when `stop_after_steps` ends this invocation early."""
    state = build(cfg, progress=progress)
    acc, out = state.acc, state.paths.out
    start = 0
    ckpt_dir = out / "checkpoints"
    if cfg.resume and (last := latest_checkpoint(ckpt_dir)):
        start = load_checkpoint(last, *state.checkpoint_objects())["step"]
        acc.print(f"resumed from {last} at step {start}")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    writer = _tensorboard(out) if acc.is_main_process else None
    metrics_file = open(out / "metrics.jsonl", "a") if acc.is_main_process else None
    bar = tqdm(range(start, cfg.max_steps), desc=f"train {cfg.preset}", unit="step",
               disable=not progress or not acc.is_main_process, initial=start, total=cfg.max_steps)
    t0, rows_forwarded = time.perf_counter(), 0
    stopped_early = False
    for s in bar:
        result = step(state, batch_at(state, s))
        rows_forwarded += result.rows
        metrics = {**result.metrics, "forward_rows": rows_forwarded * acc.num_processes,
                   "seconds": time.perf_counter() - t0}
        if acc.is_main_process and ((s + 1) % cfg.log_every == 0 or s + 1 == cfg.max_steps):
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            for k, v in metrics.items():
                writer.add_scalar(k, v, s + 1)
        bar.set_postfix(loss=f"{result.loss:.4f}",
                        img_acc=f"{metrics.get('rewards/img_accuracy', float('nan')):.2f}")
        stopping = cfg.stop_after_steps is not None and s + 1 - start >= cfg.stop_after_steps
        if (s + 1) % cfg.save_every == 0 or s + 1 == cfg.max_steps or stopping:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(ckpt_dir, s + 1, *state.checkpoint_objects(),
                                state={"preset": cfg.preset, "processes": acc.num_processes},
                                keep=cfg.keep_checkpoints)
        if state.online_ref is not None and (stopping or s + 1 == cfg.max_steps):
            _write_online_cost(state)
        if stopping and s + 1 < cfg.max_steps:
            acc.print(f"stopping after {cfg.stop_after_steps} steps at step {s + 1}; rerun to resume")
            stopped_early = True
            break
    bar.close()
    if metrics_file:
        metrics_file.close()
        writer.close()
    if stopped_early:
        acc.end_training()
        return ckpt_dir
    acc.wait_for_everyone()
    final = out / "final"
    if acc.is_main_process:
        save_final(acc.unwrap_model(state.model), state.processor, final, merged=cfg.save_merged)
    acc.end_training()
    return final


def _write_online_cost(state: TrainState) -> None:
    """reference.json of an online reference: the rows it forwarded in this invocation over all processes (the
    cached mode writes the same file from its precompute)."""
    acc, online_ref = state.acc, state.online_ref
    totals = acc.reduce(torch.tensor([float(online_ref.rows), online_ref.seconds], dtype=torch.float64,
                                     device=acc.device), reduction="sum").cpu().tolist()
    if acc.is_main_process:
        write_json_atomic({"mode": "online", "rows_needed": int(totals[0]), "rows_computed": int(totals[0]),
                           "seconds": totals[1]}, state.paths.out / "reference.json")


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))
