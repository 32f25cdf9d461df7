"""The training loop, top to bottom: data, forward, loss, backward, step, log, checkpoint.

    python -m trainer --config configs/world.yaml                       # one CPU or one GPU
    accelerate launch --num_processes 2 -m trainer --config configs/world.yaml   # DDP (CPU or GPU)

Each step takes `batch_size` examples (split over processes), forwards all their rows (y_p with the positive and
every image negative, y_n with the positive) in one batch, looks up or computes reference log-probs, and applies
the preset's loss (trainer/losses.py). Outputs go to <data root>/runs/<run_name>/: metrics.jsonl (TRL's names),
tensorboard/, checkpoints/ (exact resume), final/ (save_pretrained)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from pipeline.parquet_io import write_json_atomic
from pipeline.paths import data_root
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.losses import LossInputs, compute_loss, sample_from_proposal
from trainer.model_loading import encode_batch, load_vlm, response_logps_from_model
from trainer.pool_features import pool_tensors
from trainer.proposal import LearnedProposal
from trainer.ref_cache import RefCache, fill, model_fingerprint
from trainer.rows import build_rows, gather
from trainer.shards import load_shards, read_manifest
from trainer.trainable import prepare_trainable, save_final


def resolve_paths(cfg: TrainConfig) -> dict[str, Path]:
    root = data_root(cfg.data_root or None)
    return {"root": root,
            "model": Path(cfg.model).expanduser() if cfg.model else root / "models" / "base",
            "shards": Path(cfg.shards).expanduser() if cfg.shards else root / "shards",
            "out": Path(cfg.output_dir).expanduser() if cfg.output_dir else root / "runs" / cfg.run_name}


def ensure_base_model(cfg: TrainConfig, paths: dict[str, Path], manifest: dict) -> None:
    """No model configured: the world base model, trained when missing or stale (what `make base` does; a
    current one is reused in milliseconds, keyed on its config and the world)."""
    if cfg.model:
        return
    source = manifest.get("source", {})
    if source.get("kind") != "world":
        raise ValueError("no model configured and the shards are not from the scene world: set `model` to a local "
                         "VLM folder (save_pretrained), e.g. --model /models/llava-1.5-7b-hf")
    from trainer.base_model import BASE_PRESETS, train_base_model

    world = paths["root"] / "world" / f"{source['world_preset']}-seed{source['world_seed']}"
    preset = "tiny" if source["world_preset"] == "tiny" else "default"
    train_base_model(world, paths["model"], BASE_PRESETS[preset], progress=True)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Examples of optimizer step `step`: epochs are seeded permutations, so any step is known without state
    (resume needs only the step number) and every process agrees on it."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    if n < batch_size:
        perm = (perm * math.ceil(batch_size / n))[:batch_size]
        pos = 0
    return perm[pos * batch_size:(pos + 1) * batch_size]


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return f


def _row_logps(rows, values: torch.Tensor, loss_cfg) -> dict[str, torch.Tensor]:
    """Per-role tensors of one batch from per-row log-probs."""
    out = {"chosen": values[rows.chosen]}
    rej, has = gather(values, rows.rejected)
    out["rejected"], out["has_rejected"] = rej, has
    if rows.neg.shape[1]:
        out["neg"], out["neg_mask"] = gather(values, rows.neg)
    return out


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    paths = resolve_paths(cfg)
    loss_cfg = cfg.loss_config()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    acc = Accelerator(mixed_precision=precision)
    manifest = read_manifest(paths["shards"])
    if acc.is_main_process:
        ensure_base_model(cfg, paths, manifest)
    acc.wait_for_everyone()
    table = load_shards(paths["shards"], limit=cfg.max_examples)
    _check_rule(loss_cfg, table, paths["shards"])
    examples = table.to_dicts()
    if cfg.batch_size % (acc.num_processes * cfg.grad_accum):
        raise ValueError(f"batch_size={cfg.batch_size} must divide by processes ({acc.num_processes}) x grad_accum "
                         f"({cfg.grad_accum})")
    out = paths["out"]
    torch.manual_seed(cfg.seed)
    dtype = "bfloat16" if precision == "bf16" and cfg.lora else "float32"
    model, processor = load_vlm(paths["model"], dtype=dtype, device=acc.device,
                                trust_remote_code=cfg.trust_remote_code)
    ref_fp = model_fingerprint(paths["model"])
    model = prepare_trainable(model, cfg)
    online_ref = None
    if cfg.reference == "online" and not cfg.lora:
        online_ref = copy.deepcopy(model).eval().requires_grad_(False)

    schedule = sorted({i for s in range(cfg.max_steps) for i in batch_indices(s, len(examples), cfg.batch_size,
                                                                               cfg.seed)})
    cache = None
    if cfg.reference == "cached":
        cache_key = _cache_key(ref_fp, manifest, cfg)
        cache = RefCache(paths["root"] / "ref_cache", cache_key)
        if acc.is_main_process:
            t_ref = time.perf_counter()
            needed, computed = _precompute(cache, [examples[i] for i in schedule], loss_cfg, cfg, model, processor,
                                           progress)
            # What the reference cost this run (rows computed now may be fewer: the cache is shared by runs).
            out_ref = {"rows_needed": needed, "rows_computed": computed, "seconds": time.perf_counter() - t_ref}
            paths["out"].mkdir(parents=True, exist_ok=True)
            write_json_atomic(out_ref, paths["out"] / "reference.json")
        acc.wait_for_everyone()
        cache = RefCache(paths["root"] / "ref_cache", cache_key)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer = acc.prepare(model, optimizer)
    is_gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + acc.process_index)
    proposal = None
    if loss_cfg.is_mode == "learned":
        proposal = LearnedProposal.from_config(loss_cfg, int(manifest.get("sae", {}).get("num_latents", 128)))
    extras = ({"proposal": proposal.net}, {"proposal": proposal.opt}) if proposal else ({}, {})

    start = 0
    ckpt_dir = out / "checkpoints"
    if cfg.resume and (last := latest_checkpoint(ckpt_dir)):
        state = load_checkpoint(last, acc.unwrap_model(model), optimizer, scheduler, {"is": is_gen}, *extras)
        start = state["step"]
        acc.print(f"resumed from {last} at step {start}")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    writer = _tensorboard(out) if acc.is_main_process else None
    metrics_file = open(out / "metrics.jsonl", "a") if acc.is_main_process else None
    bar = tqdm(range(start, cfg.max_steps), desc=f"train {cfg.preset}", unit="step",
               disable=not progress or not acc.is_main_process, initial=start, total=cfg.max_steps)
    per_proc = cfg.batch_size // acc.num_processes
    micro = per_proc // cfg.grad_accum
    t0, rows_forwarded = time.perf_counter(), 0
    for step in bar:
        model.train()
        idx = batch_indices(step, len(examples), cfg.batch_size, cfg.seed)
        mine = idx[acc.process_index * per_proc:(acc.process_index + 1) * per_proc]
        step_metrics: list[dict] = []
        for m in range(cfg.grad_accum):
            batch_ex = [examples[i] for i in mine[m * micro:(m + 1) * micro]]
            sync = m == cfg.grad_accum - 1
            ctx = acc.no_sync(model) if not sync else _null()
            with ctx:
                result, n_rows = _loss(batch_ex, loss_cfg, cfg, model, processor, cache, online_ref, proposal,
                                       is_gen, acc)
                acc.backward(result.loss / cfg.grad_accum)
            rows_forwarded += n_rows
            step_metrics.append(result.metrics)
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = _reduce_metrics(step_metrics, acc)
        metrics.update({"step": step + 1, "lr": scheduler.get_last_lr()[0],
                        "epoch": (step + 1) * cfg.batch_size / len(examples),
                        "forward_rows": rows_forwarded * acc.num_processes,
                        "seconds": time.perf_counter() - t0})
        if acc.is_main_process and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps):
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            for k, v in metrics.items():
                writer.add_scalar(k, v, step + 1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                        img_acc=f"{metrics.get('rewards/img_accuracy', float('nan')):.2f}")
        stopping = cfg.stop_after_steps is not None and step + 1 - start >= cfg.stop_after_steps
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stopping:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(ckpt_dir, step + 1, acc.unwrap_model(model), optimizer, scheduler, {"is": is_gen},
                                *extras, state={"preset": cfg.preset}, keep=cfg.keep_checkpoints)
        if stopping and step + 1 < cfg.max_steps:
            acc.print(f"stopping after {cfg.stop_after_steps} steps at step {step + 1}; rerun to resume")
            bar.close()
            if metrics_file:
                metrics_file.close()
                writer.close()
            acc.end_training()
            return ckpt_dir
    bar.close()
    if metrics_file:
        metrics_file.close()
        writer.close()
    acc.wait_for_everyone()
    final = out / "final"
    if acc.is_main_process:
        save_final(acc.unwrap_model(model), processor, final, merged=cfg.save_merged)
    acc.end_training()
    return final


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _check_rule(loss_cfg, table, shards_dir) -> None:
    if loss_cfg.image_negatives != "shard" or loss_cfg.shard_rule is None:
        return
    from pipeline.parquet_io import read_metadata

    files = sorted(Path(shards_dir).glob("shard=*.parquet"))
    rules = {(read_metadata(f).get("config") or {}).get("rule") for f in files}
    if rules != {loss_cfg.shard_rule}:
        raise ValueError(f"the preset needs shards mined with rule={loss_cfg.shard_rule!r} but {shards_dir} holds "
                         f"{sorted(map(str, rules))}; mine them with that rule (preference_shards config `rule`) "
                         "into another data root, or choose another preset")


def _cache_key(ref_fp: str, manifest: dict, cfg: TrainConfig) -> str:
    from pipeline.fingerprint import fingerprint

    return fingerprint("ref", ref_fp, [s["sha256"] for s in manifest["shards"]], cfg.max_length, cfg.seed)


def _all_rows(ex: dict, loss_cfg, cfg: TrainConfig):
    positions = [list(range(len(ex["pool"])))] if loss_cfg.uses_pool else None
    return build_rows([ex], loss_cfg, cfg.seed, pool_positions=positions, with_text=loss_cfg.lambda_text > 0)


def _precompute(cache: RefCache, examples: list[dict], loss_cfg, cfg: TrainConfig, model, processor,
                progress: bool) -> tuple[int, int]:
    """Reference log-probs of every row the run will need, before the first update (the model is the reference
    then). With IS that is the whole candidate pool of each example: a one-off cost, reused by later runs.
    Returns (rows the run needs, rows computed now)."""
    model.eval()
    todo, needed = [], 0
    for ex in examples:
        rows = _all_rows(ex, loss_cfg, cfg)
        needed += len(rows.keys)
        if cache.missing(rows.keys):
            todo.append(rows)
    if not todo:
        return needed, 0
    merged = _concat_rows(todo)
    with _adapters_off(model):
        computed = fill(cache, merged, model, processor, max_length=cfg.max_length, progress=progress)
    cache.save()
    return needed, computed


def _concat_rows(parts):
    from trainer.rows import Rows

    fields = {f: list(itertools.chain.from_iterable(getattr(p, f) for p in parts))
              for f in ("images", "prompts", "responses", "example_ids", "keys")}
    empty = torch.zeros(0, dtype=torch.long)
    return Rows(**fields, chosen=empty, rejected=empty, neg=empty.view(0, 0))


def _adapters_off(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else _null()


def _loss(batch_ex, loss_cfg, cfg, model, processor, cache, online_ref, proposal, is_gen, acc):
    """Forward one micro-batch and compute the preset's loss."""
    pool_q = pool_mask = feats = sample = q_fixed = None
    positions = None
    if loss_cfg.uses_pool:
        q_fixed, pool_mask, feats = pool_tensors(batch_ex, proposal.num_latents if proposal else 1,
                                                 with_features=proposal is not None)
        # Sample from the learned mixture (or the shard's q) and weight each draw by the q it was drawn with.
        pool_q = proposal.mixture(feats, q_fixed.float(), pool_mask).double() if proposal else q_fixed
        sample = sample_from_proposal(pool_q, pool_mask, loss_cfg.k_prime, is_gen)
        positions = sample.idx_bk.tolist()
    rows = build_rows(batch_ex, loss_cfg, cfg.seed, pool_positions=positions, with_text=loss_cfg.lambda_text > 0)
    enc = encode_batch(processor, rows.images, rows.prompts, rows.responses, max_length=cfg.max_length,
                       example_ids=rows.example_ids).to(acc.device)
    with acc.autocast():
        logps = response_logps_from_model(model, enc).double()
    if cache is not None:
        missing = cache.missing(rows.keys)
        if missing:
            raise KeyError(f"reference cache lacks {len(missing)} rows (e.g. {missing[0]}); delete the run's "
                           "ref_cache file or use reference=online")
        ref = cache.lookup(rows.keys).to(logps.device)
    else:
        with torch.no_grad(), acc.autocast():
            ref_model = online_ref if online_ref is not None else model
            with _adapters_off(acc.unwrap_model(ref_model)):
                ref = response_logps_from_model(ref_model, enc).double()
    pol, rf = _row_logps(rows, logps, loss_cfg), _row_logps(rows, ref, loss_cfg)
    n_tokens = torch.tensor([e - s for s, e in enc.spans], device=logps.device)[rows.chosen]
    inputs = dict(logp_chosen=pol["chosen"], ref_chosen=rf["chosen"], n_tokens_chosen=n_tokens.double())
    if loss_cfg.lambda_text > 0:
        inputs.update(logp_rejected=pol["rejected"], ref_rejected=rf["rejected"],
                      has_rejected=pol["has_rejected"])
    if "neg" in pol:
        if sample is not None:
            inputs.update(logp_samp=pol["neg"], ref_samp=rf["neg"], q_samp=sample.q_bk.to(logps.device),
                          samp_mask=sample.mask_bk.to(logps.device) & pol["neg_mask"],
                          q_pool=pool_q.to(logps.device), pool_mask=pool_mask.to(logps.device))
        else:
            inputs.update(logp_neg=pol["neg"], ref_neg=rf["neg"], neg_mask=pol["neg_mask"])
    result = compute_loss(loss_cfg, LossInputs(**inputs))
    if proposal is not None and result.is_weights is not None:
        result.metrics.update(proposal.update(feats, q_fixed.float(), pool_mask, sample.idx_bk,
                                              result.is_weights.detach().cpu(), sample.mask_bk))
    return result, len(rows.keys)


def _reduce_metrics(parts: list[dict], acc: Accelerator) -> dict:
    keys = sorted({k for p in parts for k in p})
    local = torch.tensor([[np.nanmean([p.get(k, np.nan) for p in parts]) for k in keys]], dtype=torch.float64,
                         device=acc.device)
    everyone = acc.gather(local)
    return {k: float(np.nanmean(everyone[:, i].cpu().numpy())) for i, k in enumerate(keys)}


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))
