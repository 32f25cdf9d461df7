"""The default base model: the world VLM trained by supervised fine-tuning on the scene world.

    python -m world.base_model --world data/world/default-seed0 --out data/models/base          # minutes
    python -m world.base_model --world data/world/tiny-seed0 --out /tmp/base --preset tiny      # seconds

Data: the train split's preference examples (prompt -> chosen answer, every prompt kind) and the pool's
captions ("Describe the image." -> caption); the loss is on answer tokens only (the end-of-sequence token
included). The folder is a `save_pretrained` LLaVA (model.safetensors, config, processor) plus
`base_report.json`, written last: per prompt kind accuracy of greedy answers on the held-out test split
(judged by `world.truth.judge`) and, for captions, exact match and per-attribute accuracy. A folder whose
report records the same config and world is reused without training. See docs/base_model.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import torch
import transformers
from PIL import Image
from tqdm.auto import tqdm

from store import SCHEMA_VERSION
from store.fingerprint import fingerprint, sha256_file
from store.parquet_io import write_json_atomic
from trainer.model_loading import encode_batch, greedy_generate
from world.vlm import WorldVLMConfig, build_model, build_processor, build_tokenizer, num_parameters, \
    unused_parameters
from world import grammar
from world.base_recipe import RECIPE_PRESETS, RecipeConfig
from world.generate import TEXTS, read_scenes
from world.scene import Scene
from world.truth import judge

REPORT = "base_report.json"
# Bump when a change to the tokenizer, model or training makes the same config train a different model: a folder
# trained by another version is retrained, not reused.
BASE_VERSION = 1
CAPTION_ATTRIBUTES = ("count", "colour", "size", "position", "shape", "background")


@dataclass(frozen=True)
class BaseModelConfig:
    """Architecture, SFT budget and evaluation of the world base model."""

    arch: WorldVLMConfig = field(default_factory=WorldVLMConfig)
    """The world VLM's architecture."""
    staged: RecipeConfig | None = None
    """Build the model stage by stage like LLaVA (`world.base_recipe`: a vision encoder trained on the ground
    truth, a language model that reads slots, projector alignment, a short tuning) instead of one SFT run; the
    language-prior regime (docs/base_model.md). None: plain SFT (`steps`, `qa_fraction`, `lr`, `warmup_steps`)."""
    steps: int = 900
    """Optimiser steps (900 at batch 32: ~6 min on 2 idle cores; count, colour, size, position ~95%+, shape
    near chance: the base model hallucinates shapes)."""
    batch_size: int = 32
    """Rows per step."""
    qa_fraction: float = 0.5
    """Share of each batch drawn from the train split's examples; the rest are pool captions."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 50
    """Warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on gains, biases, embeddings)."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    bf16_autocast: bool = True
    """Run forward/backward under bf16 autocast where the processor has native bf16 (avx512_bf16/AMX or a
    GPU): ~2x faster on such CPUs; the weights stay float32 and are saved as float32."""
    max_length: int = 192
    """Longest row (64 image tokens + prompt + answer is ~130 in the default world)."""
    seed: int = 0
    """Seed of init and batch order."""
    eval_size: int = 2000
    """Most held-out test examples evaluated (all kinds, in manifest order)."""
    eval_batch_size: int = 128
    """Rows per generation batch."""
    max_new_tokens: int = 64
    """Longest generated answer (a 4-object caption is ~45 tokens)."""

    def __post_init__(self) -> None:
        if isinstance(self.arch, dict):
            object.__setattr__(self, "arch", WorldVLMConfig(**self.arch))
        if isinstance(self.staged, dict):
            object.__setattr__(self, "staged", RecipeConfig(**self.staged))
        if self.staged is not None:
            e, a = self.staged.encoder, self.arch
            if (e.image_size, e.patch_size, e.width, e.layers, e.heads) != (
                    a.image_size, a.patch_size, a.vision_width, a.vision_layers, a.vision_heads):
                raise ValueError("staged.encoder must build the VLM's vision tower: its image_size, patch_size, "
                                 "width, layers and heads must equal arch's image_size, patch_size, vision_width, "
                                 "vision_layers and vision_heads")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")
        if not 0 <= self.qa_fraction <= 1:
            raise ValueError(f"qa_fraction={self.qa_fraction} must be in [0, 1]")
        if self.max_length <= self.arch.num_image_tokens:
            raise ValueError(f"max_length={self.max_length} cannot hold the {self.arch.num_image_tokens} image "
                             "tokens and a prompt; raise it")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["staged"] is None:  # plain SFT configs keep the fingerprints they had before `staged` existed
            del d["staged"]
        return d


BASE_PRESETS: dict[str, BaseModelConfig] = {
    # Tests: a smaller model, seconds.
    "tiny": BaseModelConfig(
        arch=WorldVLMConfig(vision_width=32, vision_layers=1, vision_heads=2, text_width=64, text_layers=2,
                            text_heads=2, text_intermediate=128),
        steps=12, batch_size=8, lr=3e-3, warmup_steps=2, eval_size=24, eval_batch_size=24, max_new_tokens=48),
    "default": BaseModelConfig(),
    # The language-prior regime (world preset `prior`): 9 image tokens (48 px, one 16-px patch per cell), built
    # stage by stage like LLaVA (world.base_recipe; docs/base_model.md): it sees, and defers to its text prior
    # where the pixels leave a colour open.
    "prior": BaseModelConfig(
        arch=WorldVLMConfig(image_size=48, patch_size=16, max_positions=96), staged=RECIPE_PRESETS["prior"],
        max_length=80, eval_size=600),
}
BASE_PRESETS["prior_tiny"] = dataclasses.replace(
    BASE_PRESETS["tiny"], arch=dataclasses.replace(BASE_PRESETS["tiny"].arch, image_size=48, patch_size=16,
                                                   max_positions=96), staged=RECIPE_PRESETS["tiny"], max_length=80)


@dataclass
class BaseReport:
    """What `train_base_model` did and how good the model is (saved as base_report.json)."""

    folder: str
    trained: bool
    """False when the folder already held this model and training was skipped."""
    config: dict[str, Any]
    world_fingerprint: str
    fingerprint: str
    num_parameters: int
    num_image_tokens: int
    train_rows: dict[str, int]
    """Examples available: `qa` (train split), `captions` (pool) and `texts` (text corpus)."""
    seconds_train: float
    seconds_eval: float
    steps_per_second: float
    final_loss: float
    """Mean loss of the last 20 steps."""
    losses: list[float]
    accuracy_by_kind: dict[str, float]
    """Fraction of greedy answers `world.truth.judge` finds true, per prompt kind of the test split."""
    n_by_kind: dict[str, int]
    caption: dict[str, float]
    """Describe answers: exact_match, well_formed, mention_error_rate and per-attribute accuracy."""
    samples: list[dict[str, str]]
    """A few test answers next to the truth, for a look."""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    text_losses: list[float] = dataclasses.field(default_factory=list)
    """Losses of the language model's slot-reading stage (staged recipe; empty for plain SFT)."""
    seconds_text: float = 0.0
    encoder: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The vision encoder's report (staged recipe): folder and probe accuracies on held-out scenes."""
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per stage of the staged recipe: steps, parameters trained, seconds, final loss."""
    figures_before_tune: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The same figures after the projector stage, when a tuning stage follows (its trade-off)."""
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The issue-15 target figures on the test split (`world.base_targets`; staged recipe): `targets` (value,
    target, met), per-object accuracy on visible and hidden objects, the prior split, CHAIR, POPE."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseReport:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------- data
def load_images(world_dir: Path, rel_paths: Sequence[str]) -> dict[str, np.ndarray]:
    """rel path -> uint8 (H, W, 3); each file read once."""
    out = {}
    for rel in dict.fromkeys(rel_paths):
        with Image.open(world_dir / rel) as im:
            out[rel] = np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only
    return out


def world_texts(world_dir: Path) -> list[str]:
    """Every prompt, answer and caption the world wrote: the tokenizer's training corpus."""
    prefs = pl.concat([pl.read_parquet(world_dir / f) for f in ("preferences.parquet", "preferences_test.parquet")])
    texts = pl.read_parquet(world_dir / "scenes.parquet")["caption"].to_list()
    for col in ("prompt", "chosen", "rejected"):
        texts += [t for t in prefs[col].to_list() if t]
    return texts


def sft_rows(world_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(qa, captions): columns image, prompt, answer. qa = train-split examples, captions = the pool."""
    qa = pl.read_parquet(world_dir / "preferences.parquet").select(
        "image", "prompt", pl.col("chosen").alias("answer"))
    caps = pl.read_parquet(world_dir / "scenes.parquet").filter(pl.col("split") == "pool").select(
        "image", pl.lit(grammar.DESCRIBE_PROMPT).alias("prompt"), pl.col("caption").alias("answer"))
    return qa, caps


class BatchSampler:
    """Deterministic batches: `n_qa` rows from a cycling permutation of the QA examples, the rest from one of
    the pool captions (each reshuffled when exhausted)."""

    def __init__(self, n_qa: int, n_caps: int, batch_size: int, qa_fraction: float, seed: int):
        if n_qa == 0 and n_caps == 0:
            raise ValueError("the world has no train examples and no pool captions to train on")
        self.k_qa = round(batch_size * qa_fraction) if n_caps else batch_size
        self.k_qa = 0 if n_qa == 0 else self.k_qa
        self.k_caps = batch_size - self.k_qa
        self.gen = torch.Generator().manual_seed(seed)
        self.sizes = {"qa": n_qa, "caps": n_caps}
        self.order = {k: torch.randperm(n, generator=self.gen).tolist() if n else [] for k, n in self.sizes.items()}
        self.cursor = {"qa": 0, "caps": 0}

    def _take(self, key: str, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.cursor[key] >= self.sizes[key]:
                self.order[key], self.cursor[key] = torch.randperm(self.sizes[key], generator=self.gen).tolist(), 0
            out.append(self.order[key][self.cursor[key]])
            self.cursor[key] += 1
        return out

    def next(self) -> tuple[list[int], list[int]]:
        return self._take("qa", self.k_qa), self._take("caps", self.k_caps)


# ---------------------------------------------------------------------------------------------- training
def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: BaseModelConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


def use_bf16(cfg: BaseModelConfig, device: torch.device) -> bool:
    if not cfg.bf16_autocast:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without native bf16 the CPU emulates it, which is slower than float32.
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def sft_loss(model, processor, images: Sequence[np.ndarray], prompts: Sequence[str], answers: Sequence[str],
             max_length: int, bf16: bool = False) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (and the eos) of a batch."""
    device = next(model.parameters()).device
    batch = encode_batch(processor, images, prompts, answers, max_length=max_length).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(**batch.model_inputs(), labels=batch.labels, use_cache=False).loss


def _optimise(model, processor, steps: int, cfg: BaseModelConfig, next_rows, desc: str,
              progress: bool) -> list[float]:
    """`steps` AdamW steps of the answer-token loss on the rows `next_rows()` returns (images, prompts,
    answers); warmup + cosine over these steps. Returns every step's loss."""
    for name in unused_parameters(model):  # no loss reaches them; freezing keeps "trainable" honest
        model.get_parameter(name).requires_grad_(False)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    schedule = dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps))
    losses: list[float] = []
    bf16 = use_bf16(cfg, next(model.parameters()).device)
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        images, prompts, answers = next_rows()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss = sft_loss(model, processor, images, prompts, answers, cfg.max_length, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == len(bar) - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    return losses


def sft_steps(model, processor, world_dir: Path, cfg: BaseModelConfig, steps: int | None = None,
              progress: bool = True) -> list[float]:
    """Run `steps` (default cfg.steps) SFT steps on `model` in place; returns the loss of every step."""
    world_dir = Path(world_dir)
    qa, caps = sft_rows(world_dir)
    images = load_images(world_dir, qa["image"].to_list() + caps["image"].to_list())
    qa_rows, cap_rows = qa.rows(), caps.rows()
    sampler = BatchSampler(len(qa_rows), len(cap_rows), cfg.batch_size, cfg.qa_fraction, cfg.seed)

    def next_rows():
        i_qa, i_caps = sampler.next()
        rows = [qa_rows[i] for i in i_qa] + [cap_rows[i] for i in i_caps]
        return [images[r[0]] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    return _optimise(model, processor, cfg.steps if steps is None else steps, cfg, next_rows, "train base VLM",
                     progress)


# ---------------------------------------------------------------------------------------------- evaluation
def caption_scores(scene: Scene, text: str) -> dict[str, float | None]:
    """Per-attribute correctness of one generated caption, 1.0/0.0 (None where undefined).

    count: as many object mentions as objects; position: the set of mentioned cells is the true one;
    shape/colour/size: fraction of true objects whose cell is mentioned with the right value (an object
    whose cell is not mentioned counts as wrong); shape_small/shape_large: shape over the objects of one size;
    background: the right context."""
    parsed = grammar.parse_caption(text)
    said = {}
    for o in parsed.objects:
        said.setdefault(o.position, o)
    out: dict[str, float | None] = {
        "count": float(len(parsed.objects) == len(scene.objects)),
        "position": float({o.position for o in parsed.objects} == {o.position for o in scene.objects}),
        "background": float(parsed.background == scene.background),
    }
    for attr in ("shape", "colour", "size"):
        out[attr] = float(np.mean([getattr(said.get(o.position), attr, None) == getattr(o, attr)
                                   for o in scene.objects]))
    for size in ("small", "large"):  # shape is hard to see at small size: is it learned where it is visible?
        hits = [getattr(said.get(o.position), "shape", None) == o.shape for o in scene.objects if o.size == size]
        out[f"shape_{size}"] = float(np.mean(hits)) if hits else None
    true_objects = set(scene.objects)
    out["mention_error_rate"] = (float(np.mean([o not in true_objects for o in parsed.objects]))
                                 if parsed.objects else None)
    out["well_formed"] = float(parsed.well_formed)
    return out


def evaluate(model, processor, world_dir: Path, cfg: BaseModelConfig, progress: bool = True) -> dict[str, Any]:
    """Greedy answers to the test split's prompts, judged against the scenes."""
    world_dir = Path(world_dir)
    test = pl.read_parquet(world_dir / "preferences_test.parquet").head(cfg.eval_size)
    scenes = read_scenes(world_dir, "test")
    images = load_images(world_dir, test["image"].to_list())
    rows = test.rows(named=True)
    correct: dict[str, list[float]] = {}
    cap_scores: list[dict[str, float | None]] = []
    exact: list[float] = []
    samples: list[dict[str, str]] = []
    kinds = sorted({r["prompt_kind"] for r in rows})
    bar = tqdm(total=len(rows), desc="evaluate base VLM", unit="answer", disable=not progress)
    for kind in kinds:  # one kind per batch: short answers do not wait for captions
        sub = [r for r in rows if r["prompt_kind"] == kind]
        max_new = cfg.max_new_tokens if kind == "describe" else min(cfg.max_new_tokens, 32)
        answers = []
        for i in range(0, len(sub), cfg.eval_batch_size):
            chunk = sub[i:i + cfg.eval_batch_size]
            answers += greedy_generate(model, processor, [images[r["image"]] for r in chunk],
                                       [r["prompt"] for r in chunk], max_new_tokens=max_new,
                                       batch_size=cfg.eval_batch_size)
            bar.update(len(chunk))
        for r, answer in zip(sub, answers):
            scene = scenes[r["scene_id"]]
            correct.setdefault(kind, []).append(float(judge(scene, r["prompt"], answer).true))
            if kind == "describe":
                cap_scores.append(caption_scores(scene, answer))
                exact.append(float(answer == r["chosen"]))
        samples += [{"kind": kind, "prompt": r["prompt"], "truth": r["chosen"], "answer": a}
                    for r, a in list(zip(sub, answers))[:3]]
    bar.close()
    caption: dict[str, float] = {}
    if cap_scores:
        caption["n"] = len(cap_scores)
        caption["exact_match"] = float(np.mean(exact))
        for key in (*CAPTION_ATTRIBUTES, "shape_small", "shape_large", "well_formed", "mention_error_rate"):
            vals = [s[key] for s in cap_scores if s[key] is not None]
            caption[key] = float(np.mean(vals)) if vals else float("nan")
    return {"accuracy_by_kind": {k: float(np.mean(v)) for k, v in correct.items()},
            "n_by_kind": {k: len(v) for k, v in correct.items()}, "caption": caption, "samples": samples}


# ---------------------------------------------------------------------------------------------- entry point
def world_fingerprint(world_dir: Path) -> str:
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{world_dir} has no world.json: generate the world first (`make world`)")
    return sha256_file(path)


def read_report(out_dir: Path) -> BaseReport | None:
    try:
        return BaseReport.from_dict(json.loads((Path(out_dir) / REPORT).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def build_world_vlm(world_dir: Path, cfg: BaseModelConfig):
    """(model, processor): a fresh world VLM whose tokenizer knows every word of this world."""
    tokenizer = build_tokenizer(world_texts(Path(world_dir)))
    processor = build_processor(tokenizer, cfg.arch)
    return build_model(cfg.arch, tokenizer, seed=cfg.seed), processor


def train_base_model(world_dir: str | Path, out_dir: str | Path, cfg: BaseModelConfig = BaseModelConfig(),
                     progress: bool = True, device: str | torch.device = "cpu") -> BaseReport:
    """Train (or reuse) the world base VLM in `out_dir`; returns its report. The device is not part of the
    fingerprint: a model trained on a GPU is reused on CPU and vice versa."""
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    world_fp = world_fingerprint(world_dir)
    fp = fingerprint(cfg.to_dict(), world_fp, BASE_VERSION)
    old = read_report(out_dir)
    if old is not None and old.fingerprint == fp and (out_dir / "model.safetensors").is_file():
        old.trained = False
        return old
    (out_dir / REPORT).unlink(missing_ok=True)  # the report marks a complete folder: gone until we are done
    torch.manual_seed(cfg.seed)
    model, processor = build_world_vlm(world_dir, cfg)
    model.to(device)
    qa, caps = sft_rows(world_dir)
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if cfg.staged is None:
        losses = sft_steps(model, processor, world_dir, cfg, progress=progress)
    else:
        losses, extra = _staged(model, processor, world_dir, out_dir, cfg, progress)
    seconds_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    ev = evaluate(model, processor, world_dir, cfg, progress=progress)
    if cfg.staged is not None:
        from world.base_targets import measure
        from world.encoder import world_config

        extra["figures"] = measure(model, processor, world_dir, world_config(world_dir))
    seconds_eval = time.perf_counter() - t1
    out_dir.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    report = BaseReport(
        folder=str(out_dir), trained=True, config=cfg.to_dict(), world_fingerprint=world_fp, fingerprint=fp,
        num_parameters=num_parameters(model), num_image_tokens=cfg.arch.num_image_tokens,
        train_rows={"qa": qa.height, "captions": caps.height, "texts": extra.pop("texts", 0)},
        seconds_train=seconds_train, seconds_eval=seconds_eval,
        steps_per_second=len(losses) / seconds_train if losses else 0.0,
        final_loss=float(np.mean(losses[-20:])) if losses else float("nan"), losses=losses, **ev, **extra,
        versions={"base": str(BASE_VERSION), "schema": str(SCHEMA_VERSION), "transformers": transformers.__version__,
                  "torch": torch.__version__},
    )
    write_json_atomic(report.to_dict(), out_dir / REPORT)
    return report


def encoder_dir_for(out_dir: Path) -> Path:
    """Where the staged recipe keeps the vision encoder of the base model in `out_dir`: a sibling folder
    (`models/base` -> `models/base-encoder`), its own artifact, reused by every base model built on it."""
    return out_dir.parent / f"{out_dir.name}-encoder"


def slots_dir_for(out_dir: Path) -> Path:
    """Where the staged recipe keeps its slot stage (the language model after it): a sibling folder
    (`models/base` -> `models/base-slots`), reused by builds that differ only in later stages."""
    return out_dir.parent / f"{out_dir.name}-slots"


def _staged(model, processor, world_dir: Path, out_dir: Path, cfg: BaseModelConfig,
            progress: bool) -> tuple[list[float], dict[str, Any]]:
    """Run `world.base_recipe` on `model`; (the last stage's losses, the report's encoder/stages fields)."""
    from world.base_recipe import build_staged
    from world.encoder import world_config

    from world.base_targets import measure

    world = world_config(world_dir)
    before_tune: dict[str, Any] = {}

    def after_stage(stage: str) -> None:  # the trade-off of the tuning stage: the targets before it, too
        if stage == "projector" and cfg.staged.tune_steps:
            before_tune.update(measure(model, processor, world_dir, world))

    from world.base_recipe import SlotCache, slot_fields

    slot_key = fingerprint(slot_fields(cfg.staged), asdict(cfg.arch), cfg.seed, cfg.batch_size, cfg.max_length,
                           world_fingerprint(world_dir), BASE_VERSION)
    enc, logs = build_staged(model, processor, world_dir, world, cfg.staged,
                             encoder_dir=encoder_dir_for(out_dir), batch_size=cfg.batch_size,
                             max_length=cfg.max_length, seed=cfg.seed, progress=progress, after_stage=after_stage,
                             slot_cache=SlotCache(slots_dir_for(out_dir), slot_key))
    slots = next(log for log in logs if log.stage == "slots")
    last = [log for log in logs if log.losses][-1] if any(log.losses for log in logs) else logs[-1]
    return last.losses, {"encoder": enc, "figures_before_tune": before_tune, "text_losses": slots.losses, "seconds_text": slots.seconds,
                         "texts": pl.scan_parquet(Path(world_dir) / TEXTS).select(pl.len()).collect().item(),
                         "stages": [{k: v for k, v in log._asdict().items() if k != "losses"} | {
                             "losses": log.losses[::max(1, len(log.losses) // 50)]} for log in logs]}


def format_report(report: BaseReport) -> str:
    lines = [f"base VLM {report.folder}: {report.num_parameters / 1e6:.2f} M parameters, "
             f"{'trained' if report.trained else 'reused'}, {report.seconds_train:.0f} s train "
             f"({report.steps_per_second:.2f} steps/s), final loss {report.final_loss:.3f}"]
    if report.encoder:
        acc = report.encoder["probe_accuracy"]
        lines.append(f"  encoder probe (held-out cells): " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    for st in report.stages:
        loss = "-" if st["final_loss"] is None else f"{st['final_loss']:.3f}"
        lines.append(f"  stage {st['stage']:<9} {st['steps']:>5} steps, {st['trainable'] / 1e6:.2f} M trained, "
                     f"{st['seconds']:.0f} s, final loss {loss}")
    lines += [f"  {k:<10} accuracy {v:6.1%}  (n={report.n_by_kind[k]})" for k, v in report.accuracy_by_kind.items()]
    if report.caption:
        c = report.caption
        attrs = ", ".join(f"{a} {c[a]:.1%}" for a in CAPTION_ATTRIBUTES if a in c)
        lines.append(f"  captions: exact {c['exact_match']:.1%}, {attrs}, wrong mentions {c['mention_error_rate']:.1%}")
        if "shape_small" in c:
            lines.append(f"  caption shape by size: small {c['shape_small']:.1%}, large {c['shape_large']:.1%}")
    if report.figures:
        from world.base_targets import format_targets

        lines.append(format_targets(report.figures))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> BaseReport:
    ap = argparse.ArgumentParser(prog="python -m world.base_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="a generated world folder (holds world.json)")
    ap.add_argument("--out", required=True, help="output folder (save_pretrained + base_report.json)")
    ap.add_argument("--preset", default="default", choices=sorted(BASE_PRESETS))
    ap.add_argument("--steps", type=int, default=None, help="override the preset's optimiser steps")
    ap.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    args = ap.parse_args(argv)
    cfg = BASE_PRESETS[args.preset]
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    report = train_base_model(args.world, args.out, cfg)
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
