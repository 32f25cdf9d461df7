"""Everything a run needs before its first step, built by one function: `build(cfg)` loads the shards and the model,
makes the chosen weights trainable, sets up the reference (a precomputed cache or an online frozen copy), AdamW with
transformers' warmup + cosine schedule, the IS generator and the learned proposal, and returns a `TrainState` that
`trainer.step.step` advances. Benchmarks pass their own examples, model or cache (see `build`)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from store.parquet_io import read_metadata, write_json_atomic
from store.paths import data_root
from store.safe_image import require_ledger
from trainer.config import TrainConfig
from trainer.losses import LossConfig
from trainer.model_loading import load_vlm
from trainer.proposal import LearnedProposal
from trainer.ref_cache import RefCache, cache_key, fill, fill_batch, model_fingerprint
from trainer.reference import OnlineReference
from trainer.rows import Rows, build_rows
from trainer.shards import load_shards, read_manifest
from trainer.step import Probe, batch_indices, micro_batch_indices
from trainer.trainable import prepare_trainable


class Paths(NamedTuple):
    """Where a run reads and writes (TrainConfig's empty paths resolved under the data root)."""

    root: Path
    """The data root."""
    model: Path
    """The starting VLM folder (save_pretrained)."""
    shards: Path
    """The preference shards (manifest.json + shard=*.parquet)."""
    out: Path
    """The run folder: metrics.jsonl, tensorboard/, checkpoints/, final/."""


def resolve_paths(cfg: TrainConfig) -> Paths:
    root = data_root(cfg.data_root or None)
    return Paths(root=root,
                 model=Path(cfg.model).expanduser() if cfg.model else root / "models" / "base",
                 shards=Path(cfg.shards).expanduser() if cfg.shards else root / "shards",
                 out=Path(cfg.output_dir).expanduser() if cfg.output_dir else root / "runs" / cfg.run_name)


def require_model(cfg: TrainConfig, folder: Path) -> None:
    """The trainer trains a model it is given; it never builds one. A missing folder says how to get one."""
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return
    if cfg.model:
        raise FileNotFoundError(f"model={cfg.model!r}: no VLM folder there (no config.json); pass --model a local "
                                "save_pretrained folder, e.g. --model /models/llava-1.5-7b-hf")
    raise FileNotFoundError(f"no model configured and no world base model in {folder}: run `make base` first (it "
                            "trains the scene world's base VLM there), or pass --model a local save_pretrained "
                            "folder (e.g. --model /models/llava-1.5-7b-hf)")


@dataclass
class TrainState:
    """A run ready to step: the config, the prepared model and optimizer, the reference, the examples."""

    cfg: TrainConfig
    """The run's config (`cfg.loss` is its LossConfig)."""
    paths: Paths
    """Where it reads and writes."""
    acc: Accelerator
    """Devices, processes, mixed precision."""
    model: torch.nn.Module
    """The policy, prepared by accelerate (wrapped for DDP with several processes; `acc.unwrap_model` for the
    module itself)."""
    processor: Any
    """The model's processor (tokenizer + image processor)."""
    params: list[torch.nn.Parameter]
    """The trained parameters (clipped together)."""
    optimizer: torch.optim.Optimizer
    """AdamW over `params`."""
    scheduler: torch.optim.lr_scheduler.LambdaLR
    """transformers' `get_cosine_schedule_with_warmup` over `cfg.max_steps` steps."""
    examples: list[dict]
    """The preference examples (shard rows), indexed by `trainer.step.batch_indices`."""
    manifest: dict
    """The shards' manifest.json ({} when a benchmark passes its own examples without one)."""
    precision: str
    """`no`, `bf16` or `fp16`: what `cfg.precision` resolved to."""
    cache: RefCache | None
    """Precomputed reference log-probs (reference mode `cached`), else None."""
    online_ref: OnlineReference | None
    """The frozen reference computed every step (reference mode `online`), else None."""
    proposal: LearnedProposal | None
    """q_phi for `is_mode: learned`, else None."""
    is_gen: torch.Generator
    """The importance-sampling draws' generator (seeded per process; checkpointed)."""
    probe: Probe | None = None
    """`reference_check_every`: the fixed batch whose reference must not move."""

    def checkpoint_objects(self) -> tuple:
        """What a checkpoint saves and a resume restores, in `save_checkpoint` / `load_checkpoint` order after the
        folder (and the step): module, optimizer, scheduler, generators, extra modules, extra optimizers."""
        extras = ({"proposal": self.proposal.net}, {"proposal": self.proposal.opt}) if self.proposal else ({}, {})
        return (self.acc.unwrap_model(self.model), self.optimizer, self.scheduler, {"is": self.is_gen}, *extras)


def build(cfg: TrainConfig, *, progress: bool = True, accelerator: Accelerator | None = None,
          examples: list[dict] | None = None, model: torch.nn.Module | None = None, processor: Any = None,
          cache: RefCache | None = None) -> TrainState:
    """The state of a run before its first step. A cached reference is precomputed here (on the main process,
    written to <data root>/ref_cache/ and shared by runs with the same key; the cost goes to reference.json).

    Benchmarks pass their own pieces: `examples` (instead of the shards' rows), `model` with its `processor` (an
    in-memory model already made trainable by `prepare_trainable`, instead of loading `cfg.model`), `cache` (a
    RefCache they fill with `precompute_reference`, instead of the run's own)."""
    paths = resolve_paths(cfg)
    if model is None:
        require_model(cfg, paths.model)
    require_ledger(paths.root)  # images are checked against what ingest recorded: fail now, not at step 1
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    acc = accelerator or Accelerator(mixed_precision=precision)
    if cfg.batch_size % (acc.num_processes * cfg.grad_accum):
        raise ValueError(f"batch_size={cfg.batch_size} must divide by processes ({acc.num_processes}) x grad_accum "
                         f"({cfg.grad_accum})")
    if examples is None:
        manifest = read_manifest(paths.shards)
        table = load_shards(paths.shards, limit=cfg.max_examples)
        check_shard_rule(cfg.loss, paths.shards)
        examples = table.to_dicts()
    else:
        manifest = read_manifest(paths.shards) if (paths.shards / "manifest.json").is_file() else {}
    torch.manual_seed(cfg.seed)
    dtype = "bfloat16" if precision == "bf16" and cfg.lora else "float32"
    if model is None:
        model, processor = load_vlm(paths.model, dtype=dtype, device=acc.device,
                                    trust_remote_code=cfg.trust_remote_code)
        model = prepare_trainable(model, cfg)
    elif processor is None:
        raise ValueError("build(model=...) needs the model's processor too: pass processor=")
    reference_mode = cfg.reference_mode()
    online_ref = None
    if reference_mode == "online":
        online_ref = OnlineReference(model, lora=cfg.lora, distributed_type=str(acc.distributed_type.value))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    state = TrainState(cfg=cfg, paths=paths, acc=acc, model=model, processor=processor, params=params,
                       optimizer=optimizer, scheduler=scheduler, examples=examples, manifest=manifest,
                       precision=precision, cache=None, online_ref=online_ref, proposal=None,
                       is_gen=torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + acc.process_index))
    if reference_mode == "cached":
        state.cache = cache if cache is not None else _run_cache(state, dtype, progress)
    state.probe = Probe.start(state) if cfg.reference_check_every else None
    state.model, state.optimizer = acc.prepare(model, optimizer)
    if cfg.loss.is_mode == "learned":
        state.proposal = LearnedProposal.from_config(cfg.loss, int(manifest.get("sae", {}).get("num_latents", 128)))
    return state


def _run_cache(state: TrainState, dtype: str, progress: bool) -> RefCache:
    """The run's reference cache, keyed by the starting weights, the shards, precision and batch layout, filled
    by the main process before the first update (other processes wait, then read it)."""
    cfg, acc, paths = state.cfg, state.acc, state.paths
    if not state.manifest:
        raise ValueError("a cached reference is keyed by the shards' manifest.json; pass build(cache=...) with "
                         "examples that have none")
    key = cache_key(model_fingerprint(paths.model), [s["sha256"] for s in state.manifest["shards"]],
                    max_length=cfg.max_length, seed=cfg.seed, precision=state.precision, dtype=dtype,
                    layout=batch_layout(cfg, cfg.loss, acc.num_processes))
    if acc.is_main_process:
        t_ref = time.perf_counter()
        needed, computed = precompute_reference(state, RefCache(paths.root / "ref_cache", key), progress)
        # What the reference cost this run (rows computed now may be fewer: the cache is shared by runs).
        paths.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic({"rows_needed": needed, "rows_computed": computed,
                           "seconds": time.perf_counter() - t_ref}, paths.out / "reference.json")
    acc.wait_for_everyone()
    return RefCache(paths.root / "ref_cache", key)


def check_shard_rule(loss_cfg: LossConfig, shards_dir: Path) -> None:
    """A preset that needs shards of one mining rule (random_multi: random_pool) refuses shards of another."""
    if loss_cfg.image_negatives != "shard" or loss_cfg.shard_rule is None:
        return
    files = sorted(Path(shards_dir).glob("shard=*.parquet"))
    rules = {(read_metadata(f).get("config") or {}).get("rule") for f in files}
    if rules != {loss_cfg.shard_rule}:
        raise ValueError(f"the preset needs shards mined with rule={loss_cfg.shard_rule!r} but {shards_dir} holds "
                         f"{sorted(map(str, rules))}; point --shards at a shard set mined with that rule (each mining recipe "
                         "has its own, e.g. <data root>/shards/recipes/random for random_pool: docs/shards.md), or "
                         "choose another preset")


def batch_layout(cfg: TrainConfig, loss_cfg: LossConfig, num_processes: int) -> dict:
    """What decides which rows share a forward: part of the cache key, because a row's log-prob depends on its
    batch-mates in the last bits (GEMM blocking, padding), and at step 0 the cached value must equal the policy's."""
    if loss_cfg.uses_pool:  # draws are random: reference rows are computed per example's pool, not per step
        return {"rows": "pool", "negatives": loss_cfg.image_negatives}
    return {"rows": "steps", "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": num_processes,
            "negatives": loss_cfg.image_negatives, "num_negatives": loss_cfg.num_negatives,
            "fresh": loss_cfg.fresh_negatives, "text": loss_cfg.lambda_text > 0}


def precompute_reference(state: TrainState, cache: RefCache | None = None, progress: bool = True) -> tuple[int, int]:
    """Reference log-probs of every row the run will need, into `cache` (default: the state's), before the first
    update (the model is the reference then), under the policy's autocast. Without IS, each micro-batch of the
    schedule is forwarded exactly as the step will forward it (so at step 0 the rewards are exactly 0); with IS,
    every candidate of each example's pool (a one-off cost, reused by later runs). Returns (rows the run needs,
    rows computed now)."""
    cfg, loss_cfg, acc, examples = state.cfg, state.cfg.loss, state.acc, state.examples
    cache = cache if cache is not None else state.cache
    model = acc.unwrap_model(state.model)
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
                computed = fill(cache, _concat_rows(todo), model, state.processor, max_length=cfg.max_length,
                                progress=progress, autocast=acc.autocast)
        else:
            for s in tqdm(range(cfg.max_steps), desc="reference log-probs", unit="step", disable=not progress):
                for per_process in micro_batch_indices(s, cfg, len(examples), acc.num_processes):
                    for part in per_process:
                        rows = build_rows([examples[i] for i in part], loss_cfg, cfg.seed, with_text=with_text,
                                          step=s)
                        needed.update(rows.keys)
                        computed += fill_batch(cache, rows, model, state.processor, max_length=cfg.max_length,
                                               autocast=acc.autocast)
    cache.save()
    return len(needed), computed


def _concat_rows(parts: list[Rows]) -> Rows:
    fields = {f: list(itertools.chain.from_iterable(getattr(p, f) for p in parts))
              for f in ("images", "prompts", "responses", "example_ids", "keys", "noise")}
    empty = torch.zeros(0, dtype=torch.long)
    return Rows(**fields, chosen=empty, rejected=empty, neg=empty.view(0, 0))


def _adapters_off(model):
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    from contextlib import nullcontext

    return nullcontext()
