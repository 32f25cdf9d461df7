"""The training loop, top to bottom: data, forward, loss, backward, step, log, checkpoint.

    python -m trainer --config configs/world.yaml                       # one CPU or one GPU
    accelerate launch --num_processes 2 -m trainer --config configs/world.yaml   # DDP (CPU or GPU)

Each step takes `batch_size` examples (split over processes), forwards all their rows (y_p with the positive and
every image negative, y_n with the positive) in one batch, looks up or computes reference log-probs, and applies
the preset's loss (trainer/losses.py). Outputs go to <data root>/runs/<run_name>/: metrics.jsonl (TRL's names),
tensorboard/, checkpoints/ (exact resume), final/ (save_pretrained)."""

from __future__ import annotations

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
from pipeline.safe_image import require_ledger
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.losses import LossInputs, compute_loss, sample_from_proposal
from trainer.model_loading import load_vlm, response_logps_from_model
from trainer.pool_features import pool_tensors
from trainer.proposal import LearnedProposal
from trainer.ref_cache import RefCache, cache_key, fill, fill_batch, model_fingerprint
from trainer.reference import OnlineReference
from trainer.rows import build_rows, encode_rows, gather
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
    require_ledger(paths["root"])  # images are checked against what ingest recorded: fail now, not at step 1
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
    reference_mode = cfg.reference_mode()
    if reference_mode == "online":
        online_ref = OnlineReference(model, lora=cfg.lora, distributed_type=str(acc.distributed_type.value))

    cache = None
    if reference_mode == "cached":
        layout = _batch_layout(cfg, loss_cfg, acc.num_processes)
        key = cache_key(ref_fp, [s["sha256"] for s in manifest["shards"]], max_length=cfg.max_length,
                        seed=cfg.seed, precision=precision, dtype=dtype, layout=layout)
        cache = RefCache(paths["root"] / "ref_cache", key)
        if acc.is_main_process:
            t_ref = time.perf_counter()
            needed, computed = _precompute(cache, examples, loss_cfg, cfg, model, processor, acc, progress)
            # What the reference cost this run (rows computed now may be fewer: the cache is shared by runs).
            out_ref = {"rows_needed": needed, "rows_computed": computed, "seconds": time.perf_counter() - t_ref}
            paths["out"].mkdir(parents=True, exist_ok=True)
            write_json_atomic(out_ref, paths["out"] / "reference.json")
        acc.wait_for_everyone()
        cache = RefCache(paths["root"] / "ref_cache", key)
    probe = _Probe.start(cfg, loss_cfg, examples, processor, model, cache, online_ref, acc) \
        if cfg.reference_check_every else None

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
                                       is_gen, acc, step)
                acc.backward(result.loss / cfg.grad_accum)
            rows_forwarded += n_rows
            step_metrics.append(result.metrics)
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if probe is not None and (step + 1) % cfg.reference_check_every == 0:
            step_metrics[-1].update(probe.check(model, cache, online_ref, acc))
        if proposal is not None and acc.num_processes > 1:
            # q_phi is trained on each process's own draws with all-reduced gradients: every copy must be equal.
            copies = acc.gather(proposal.flat_parameters().to(acc.device)[None]).cpu()
            step_metrics[-1]["proposal/process_disagreement"] = float((copies - copies[:1]).abs().max())
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
                                *extras, state={"preset": cfg.preset, "processes": acc.num_processes},
                                keep=cfg.keep_checkpoints)
        if online_ref is not None and (stopping or step + 1 == cfg.max_steps):
            _write_online_cost(online_ref, acc, out)
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


def _batch_layout(cfg: TrainConfig, loss_cfg, num_processes: int) -> dict:
    """What decides which rows share a forward: part of the cache key, because a row's log-prob depends on its
    batch-mates in the last bits (GEMM blocking, padding), and at step 0 the cached value must equal the policy's."""
    if loss_cfg.uses_pool:  # draws are random: reference rows are computed per example's pool, not per step
        return {"rows": "pool", "negatives": loss_cfg.image_negatives}
    return {"rows": "steps", "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": num_processes,
            "negatives": loss_cfg.image_negatives, "num_negatives": loss_cfg.num_negatives,
            "fresh": loss_cfg.fresh_negatives, "text": loss_cfg.lambda_text > 0}


def _micro_batches(step: int, cfg: TrainConfig, n_examples: int, num_processes: int):
    """The example indices of each (process, micro-batch) of `step`, in the order the loop forwards them."""
    idx = batch_indices(step, n_examples, cfg.batch_size, cfg.seed)
    per_proc = cfg.batch_size // num_processes
    micro = per_proc // cfg.grad_accum
    for p in range(num_processes):
        mine = idx[p * per_proc:(p + 1) * per_proc]
        for m in range(cfg.grad_accum):
            yield mine[m * micro:(m + 1) * micro]


def _precompute(cache: RefCache, examples: list[dict], loss_cfg, cfg: TrainConfig, model, processor, acc,
                progress: bool) -> tuple[int, int]:
    """Reference log-probs of every row the run will need, before the first update (the model is the reference
    then), under the policy's autocast. Without IS, each micro-batch of the schedule is forwarded exactly as the
    loop will forward it (so at step 0 the rewards are exactly 0); with IS, every candidate of each example's pool
    (a one-off cost, reused by later runs). Returns (rows the run needs, rows computed now)."""
    model.eval()
    needed: set = set()
    computed = 0
    with_text = loss_cfg.lambda_text > 0
    with _adapters_off(model):
        if loss_cfg.uses_pool:
            todo = []
            for i in sorted({i for s in range(cfg.max_steps)
                             for i in batch_indices(s, len(examples), cfg.batch_size, cfg.seed)}):
                ex = examples[i]
                rows = build_rows([ex], loss_cfg, cfg.seed, pool_positions=[list(range(len(ex["pool"])))],
                                  with_text=with_text)
                needed.update(rows.keys)
                if cache.missing(rows.keys):
                    todo.append(rows)
            if todo:
                computed = fill(cache, _concat_rows(todo), model, processor, max_length=cfg.max_length,
                                progress=progress, autocast=acc.autocast)
        else:
            steps = tqdm(range(cfg.max_steps), desc="reference log-probs", unit="step", disable=not progress)
            for step in steps:
                for part in _micro_batches(step, cfg, len(examples), acc.num_processes):
                    rows = build_rows([examples[i] for i in part], loss_cfg, cfg.seed, with_text=with_text,
                                      step=step)
                    needed.update(rows.keys)
                    computed += fill_batch(cache, rows, model, processor, max_length=cfg.max_length,
                                           autocast=acc.autocast)
    cache.save()
    return len(needed), computed


def _concat_rows(parts):
    from trainer.rows import Rows

    fields = {f: list(itertools.chain.from_iterable(getattr(p, f) for p in parts))
              for f in ("images", "prompts", "responses", "example_ids", "keys", "noise")}
    empty = torch.zeros(0, dtype=torch.long)
    return Rows(**fields, chosen=empty, rejected=empty, neg=empty.view(0, 0))


def _adapters_off(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else _null()


def _reference_logps(rows, enc, cache, online_ref, model, acc) -> torch.Tensor:
    """Reference log-probs of the rows: looked up in the cache, or computed by the online reference."""
    if cache is not None:
        missing = cache.missing(rows.keys)
        if missing:
            raise KeyError(f"reference cache lacks {len(missing)} rows (e.g. {missing[0]}); delete the run's "
                           "ref_cache file or use reference=online")
        return cache.lookup(rows.keys).to(enc.input_ids.device)
    return online_ref.logps(acc.unwrap_model(model), enc, acc.autocast)


class _Probe:
    """`reference_check_every`: the reference and policy log-probs of a fixed batch (the first example of step
    0) at step 0, compared with later ones. The reference must not move at all."""

    def __init__(self, rows, enc, ref0, pol0):
        self.rows, self.enc, self.ref0, self.pol0 = rows, enc, ref0, pol0

    @classmethod
    def start(cls, cfg, loss_cfg, examples, processor, model, cache, online_ref, acc) -> "_Probe":
        first = examples[batch_indices(0, len(examples), cfg.batch_size, cfg.seed)[0]]
        rows = build_rows([first], loss_cfg, cfg.seed, with_text=loss_cfg.lambda_text > 0, step=0)
        enc = encode_rows(processor, rows, max_length=cfg.max_length).to(acc.device)
        probe = cls(rows, enc, None, None)
        probe.ref0, probe.pol0 = probe._measure(model, cache, online_ref, acc)
        return probe

    def _measure(self, model, cache, online_ref, acc):
        ref = _reference_logps(self.rows, self.enc, cache, online_ref, model, acc)
        with torch.no_grad(), acc.autocast():
            pol = response_logps_from_model(acc.unwrap_model(model), self.enc).double()
        return ref, pol

    def check(self, model, cache, online_ref, acc) -> dict[str, float]:
        ref, pol = self._measure(model, cache, online_ref, acc)
        return {"ref/probe_drift": float((ref - self.ref0).abs().max()),
                "ref/probe_policy_change": float((pol - self.pol0).abs().max())}


def _loss(batch_ex, loss_cfg, cfg, model, processor, cache, online_ref, proposal, is_gen, acc, step):
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
    rows = build_rows(batch_ex, loss_cfg, cfg.seed, pool_positions=positions, with_text=loss_cfg.lambda_text > 0,
                      step=step)
    enc = encode_rows(processor, rows, max_length=cfg.max_length).to(acc.device)
    with acc.autocast():
        logps = response_logps_from_model(model, enc).double()
    ref = _reference_logps(rows, enc, cache, online_ref, model, acc).to(logps.device)
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
        average = (lambda t: acc.reduce(t.to(acc.device), reduction="mean").cpu()) if acc.num_processes > 1 else None
        result.metrics.update(proposal.update(feats, q_fixed.float(), pool_mask, sample.idx_bk,
                                              result.is_weights.detach().cpu(), sample.mask_bk, average=average))
    return result, len(rows.keys)


def _write_online_cost(online_ref: OnlineReference, acc: Accelerator, out: Path) -> None:
    """reference.json of an online reference: the rows it forwarded in this invocation over all processes (the
    cached mode writes the same file from its precompute)."""
    totals = acc.reduce(torch.tensor([float(online_ref.rows), online_ref.seconds], dtype=torch.float64,
                                     device=acc.device), reduction="sum").cpu().tolist()
    if acc.is_main_process:
        write_json_atomic({"mode": "online", "rows_needed": int(totals[0]), "rows_computed": int(totals[0]),
                           "seconds": totals[1]}, out / "reference.json")


def _reduce_metrics(parts: list[dict], acc: Accelerator) -> dict:
    keys = sorted({k for p in parts for k in p})
    local = torch.tensor([[np.nanmean([p.get(k, np.nan) for p in parts]) for k in keys]], dtype=torch.float64,
                         device=acc.device)
    everyone = acc.gather(local)
    return {k: float(np.nanmean(everyone[:, i].cpu().numpy())) for i, k in enumerate(keys)}


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))
