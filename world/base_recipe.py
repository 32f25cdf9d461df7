"""The world base VLM built stage by stage like LLaVA, into a stock HF LLaVA folder (the `prior` base preset).

    encoder    a CLIP vision tower trained on the ground truth (`world.encoder`), its own artifact, then frozen;
    slots      the language model pretrained on the text corpus, reading its image slots: each of the 9 image
               positions holds the word embeddings of its cell (size + colour + shape, or the background word);
               a colour is dropped with `colour_drop_p` (the caption names it) or the object is hidden with
               `hidden_p` (colour dropped, the caption says grey), and all slots are blanked with `blank_p`, so
               the model learns to copy what the slots say, and to fill a missing colour with grey or, where the
               corpus's co-occurrence prior says so, with the partner. A share `qa_fraction` of rows are
               POPE-style yes/no questions on the slots;
    projector  the projector alone (tower and language model frozen) learns to map the tower's cell features to
               what the language model reads, on the pool's captions and yes/no questions;
    tune       optionally, `tune_steps` steps on captions and questions with only the top `tune_layers` language
               layers (and the output head) trainable: the short tuning that teaches yes/no without rewriting
               the whole language model.

Each stage trains exactly `stage_trainable(model, stage)`; everything else keeps its bits (tests check that).
Why a slot-reading language model: a text-only language model with only the projector trained cannot learn to
read image tokens, and unfreezing it erases the prior before it sees (docs/base_model.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from trainer.model_loading import encode_batch, image_token_id_of
from world import grammar, vocab
from world.encoder import EncoderConfig, ENCODER_PRESETS
from world.generate import TEXTS, read_scenes
from world.scene import ObjectSpec, Scene

STAGES: tuple[str, ...] = ("slots", "projector", "tune")


@dataclass(frozen=True)
class RecipeConfig:
    """Budgets of the stages after the encoder (the language model's architecture is `BaseModelConfig.arch`)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The vision encoder's architecture and budget (its width / depth must match the VLM's vision tower)."""
    slot_steps: int = 600
    """Language-model steps on the text corpus with slot descriptors."""
    slot_lr: float = 1e-3
    """Peak learning rate of the slot stage."""
    colour_drop_p: float = 0.3
    """Probability that an object's colour is left out of its slot (the caption still names it)."""
    blank_p: float = 0.15
    """Probability that every slot of a row is blank (zeros): pure language modelling."""
    hidden_p: float = 0.15
    """Probability that a text object is hidden, as images hide objects: its slot loses the colour (like
    `colour_drop_p`) and the caption names it grey (`vocab.UNCERTAIN_COLOUR`). A colourless slot then means "grey"
    or "some colour the text prior knows", so the model says grey unless the prior says otherwise: where a trigger
    is in view it names the partner (the hallucination), elsewhere grey."""
    qa_fraction: float = 0.5
    """Share of the rows of the slot, projector and tune stages that are yes/no questions (the rest captions)."""
    answer_weight: float = 1.0
    """Loss weight of the yes/no word of yes/no rows, every other answer token weighing 1. The yes/no word is the
    only token of such a row the image decides (the rest repeats the question), about 3% of a batch's answer
    tokens: at weight 1 the slot stage never learned to answer (POPE 50%, docs/experiment.md)."""
    qa_slots_show_colour: bool = False
    """Yes/no rows of the slot stage keep every visible object's colour in its slot (only hidden objects lose it),
    so each answer is readable from the slots; False: they drop colours as caption rows do."""
    projector_steps: int = 300
    """Projector-only steps on pool images."""
    projector_lr: float = 1e-3
    """Peak learning rate of the projector stage."""
    tune_steps: int = 0
    """Steps of the final tuning (0: none)."""
    tune_layers: int = 1
    """Top language-model layers trainable in the tuning stage (with the final norm and the output head)."""
    tune_lr: float = 3e-4
    """Peak learning rate of the tuning stage."""
    tune_qa_fraction: float | None = None
    """Share of yes/no rows in the tuning stage (None: `qa_fraction`). 1.0, questions only, keeps the prior:
    captions in this stage teach the top layers to say grey and erase it within 75 steps (docs/experiment.md)."""
    tune_answer_weight: float | None = None
    """`answer_weight` of the tuning stage (None: `answer_weight`)."""

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EncoderConfig(**self.encoder))
        for name in ("answer_weight", "tune_answer_weight"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 (1: every answer token alike)")
        if self.tune_qa_fraction is not None and not 0 <= self.tune_qa_fraction <= 1:
            raise ValueError(f"tune_qa_fraction={self.tune_qa_fraction} must be a probability in [0, 1]")
        for name in ("colour_drop_p", "blank_p", "hidden_p", "qa_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")
        if min(self.slot_steps, self.projector_steps, self.tune_steps) < 0 or self.projector_steps < 1:
            raise ValueError("stage steps must be >= 0, and projector_steps >= 1 (the projector starts random)")
        if self.tune_layers < 1:
            raise ValueError(f"tune_layers={self.tune_layers} must be >= 1")


RECIPE_PRESETS: dict[str, RecipeConfig] = {
    # Many more colour-dropped than hidden slots, so a colourless slot is filled from the text prior, and a short
    # projector stage: 100 more projector steps erase the prior (docs/experiment.md, trade-off table). Then yes/no is
    # taught to the top two layers on questions alone, the yes/no word weighted 10x: captions in that stage erase the
    # prior within 75 steps, a 1e-3 learning rate within 160.
    "prior": RecipeConfig(encoder=ENCODER_PRESETS["prior"], colour_drop_p=0.5, hidden_p=0.05, projector_steps=200,
                          tune_steps=300, tune_layers=2, tune_lr=3e-4, tune_qa_fraction=1.0, tune_answer_weight=10.0),
    "tiny": RecipeConfig(encoder=ENCODER_PRESETS["tiny"], slot_steps=8, projector_steps=6, tune_steps=3),
}


# ---------------------------------------------------------------------------------------------- what trains
def stage_trainable(model, stage: str) -> list[str]:
    """Names of the parameters `stage` trains: `slots` the language model (embeddings, layers, head), `projector`
    the projector, `tune` the top `tune_layers` layers, the final norm and the head. The tower never trains here."""
    names = [n for n, _ in model.named_parameters()]
    if stage == "slots":
        return [n for n in names if ".language_model." in n or n.startswith("lm_head")]
    if stage == "projector":
        return [n for n in names if ".multi_modal_projector." in n]
    raise ValueError(f"stage {stage!r}: use stage_trainable for slots/projector, tune_trainable for tune")


def tune_trainable(model, layers: int) -> list[str]:
    n_layers = model.config.text_config.num_hidden_layers
    if layers > n_layers:
        raise ValueError(f"tune_layers={layers} but the language model has {n_layers} layers")
    top = {f".language_model.layers.{i}." for i in range(n_layers - layers, n_layers)}
    return [n for n, _ in model.named_parameters()
            if any(t in n for t in top) or ".language_model.norm." in n or n.startswith("lm_head")]


def set_trainable(model, names: Sequence[str]) -> None:
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


# ---------------------------------------------------------------------------------------------- rows
class Row(NamedTuple):
    prompt: str
    answer: str
    yesno: bool = False
    """A yes/no question: its first answer token (the yes/no word) weighs `RecipeConfig.answer_weight`."""


def yesno_row(scene: Scene, shapes: Sequence[str], colours: Sequence[str], rng: np.random.Generator) -> Row:
    """A POPE-style question on `scene`: half the time a present (shape, colour), else a random absent one."""
    present = sorted({(o.shape, o.colour) for o in scene.objects})
    if rng.random() < 0.5:
        key, yes = present[int(rng.integers(len(present)))], True
    else:
        absent = [(s, c) for s in shapes for c in colours if (s, c) not in set(present)]
        key, yes = absent[int(rng.integers(len(absent)))], False
    spec = ObjectSpec(key[0], key[1])
    return Row(grammar.yesno_prompt(spec), grammar.yesno_answer(yes, spec), yesno=True)


def text_scenes(world_dir: Path) -> list[Scene]:
    """The text corpus's scenes, read back from its captions (the world's grammar parses its own text exactly)."""
    path = Path(world_dir) / TEXTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the staged base recipe needs a world generated with n_text > 0 "
                                "(e.g. world preset `prior`)")
    out = []
    for cap in pl.read_parquet(path)["caption"].to_list():
        parsed = grammar.parse_caption(cap)
        out.append(Scene(objects=tuple(parsed.objects), background=parsed.background))
    return out


class SlotBatch(NamedTuple):
    words: torch.Tensor
    """(B, 9, 3) token ids per slot: size, colour, shape (or the background word alone); pad where unused."""
    mask: torch.Tensor
    """(B, 9, 3) 1.0 where a word is in the slot."""


def slot_words(scene: Scene, tokenizer, drop: np.ndarray, blank: bool) -> tuple[list, list]:
    """Word ids and mask of one scene's 9 slots. `drop[k]`: object k's colour is left out."""
    ids = [[tokenizer.pad_token_id] * 3 for _ in range(9)]
    mask = [[0.0] * 3 for _ in range(9)]
    if blank:
        return ids, mask
    for cell in range(9):
        ids[cell][0], mask[cell][0] = tokenizer.convert_tokens_to_ids(scene.background), 1.0
    for k, o in enumerate(scene.objects):
        cell = vocab.POSITIONS.index(o.position)
        words = (o.size, None if drop[k] else o.colour, o.shape)
        ids[cell] = [tokenizer.convert_tokens_to_ids(w) if w else tokenizer.pad_token_id for w in words]
        mask[cell] = [1.0 if w else 0.0 for w in words]
    return ids, mask


def slot_embeddings(model, batch: SlotBatch) -> torch.Tensor:
    """(B, 9, width): the sum of each slot's word embeddings (zeros for a blank slot)."""
    emb = model.get_input_embeddings()(batch.words)
    return (emb * batch.mask.unsqueeze(-1).to(emb.dtype)).sum(2)


def answer_weights(batch, rows: Sequence[Row], answer_weight: float) -> torch.Tensor:
    """(B, T) loss weight of each label token: 1 on answer tokens, `answer_weight` on the first answer token of a
    yes/no row, 0 off the answer."""
    w = (batch.labels != -100).float()
    for i, (row, (start, end)) in enumerate(zip(rows, batch.spans)):
        if row.yesno and end > start:
            w[i, start] = answer_weight
    return w


def weighted_answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * cross-entropy) / sum(w) over label tokens (token t predicted at t - 1); with every weight 1 it is
    the models' own mean answer-token loss."""
    logits, labels, weights = logits[:, :-1].float(), labels[:, 1:], weights[:, 1:].to(logits.device)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none").view(labels.shape)
    return (ce * weights).sum() / weights.sum().clamp_min(1e-8)


def slot_loss(model, processor, slots: SlotBatch, rows: Sequence[Row], max_length: int, blank_image,
              answer_weight: float = 1.0) -> torch.Tensor:
    """Answer-token loss of `rows` with the image tokens replaced by slot embeddings (no pixels involved)."""
    device = next(model.parameters()).device
    batch = encode_batch(processor, [blank_image] * len(rows), [r.prompt for r in rows], [r.answer for r in rows],
                         max_length=max_length).to(device)
    embeds = model.get_input_embeddings()(batch.input_ids)
    is_image = batch.input_ids == image_token_id_of(processor)
    desc = slot_embeddings(model, SlotBatch(slots.words.to(device), slots.mask.to(device)))
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), desc.to(embeds.dtype))
    logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).logits
    return weighted_answer_loss(logits, batch.labels, answer_weights(batch, rows, answer_weight))


def image_loss(model, processor, images, rows: Sequence[Row], max_length: int,
               answer_weight: float = 1.0) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = encode_batch(processor, images, [r.prompt for r in rows], [r.answer for r in rows],
                         max_length=max_length).to(device)
    logits = model(**batch.model_inputs(), use_cache=False).logits
    return weighted_answer_loss(logits, batch.labels, answer_weights(batch, rows, answer_weight))


# ---------------------------------------------------------------------------------------------- optimisation
def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    warmup = min(warmup, steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


def run_stage(model, trainable: Sequence[str], steps: int, lr: float, loss_of_step: Callable[[int], torch.Tensor],
              desc: str, progress: bool, warmup: int = 20, weight_decay: float = 0.01) -> list[float]:
    """`steps` AdamW steps on the parameters named `trainable` (all others frozen); returns every step's loss."""
    set_trainable(model, trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    decay = [named[n] for n in trainable if named[n].ndim >= 2 and "embed" not in n]
    rest = [named[n] for n in trainable if not (named[n].ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        loss = loss_of_step(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    set_trainable(model, [])
    return losses


class StageData(NamedTuple):
    """What the stages draw their rows from."""

    text: list[Scene]
    """Text-corpus scenes (slot stage)."""
    pool_images: list[np.ndarray]
    pool_scenes: list[Scene]
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    """The world's colours (what a negative question may ask about)."""


def load_stage_data(world_dir: Path, world) -> StageData:
    from world.base_model import load_images

    df = pl.read_parquet(Path(world_dir) / "scenes.parquet").filter(pl.col("split") == "pool")
    scenes = read_scenes(world_dir, "pool")
    images = load_images(Path(world_dir), df["image"].to_list())
    return StageData(text_scenes(world_dir), [images[p] for p in df["image"].to_list()],
                     [scenes[s] for s in df["scene_id"].to_list()], world.shapes, world.colours)


def slot_batches(tokenizer, data: StageData, cfg: RecipeConfig, batch_size: int,
                 seed: int) -> Callable[[], tuple[SlotBatch, list[Row]]]:
    """The slot stage's batches: text-corpus scenes as slots (colours dropped, objects hidden, rows blanked at the
    configured rates) and their rows, a caption or (`qa_fraction`) a yes/no question on what the row shows."""
    rng = np.random.default_rng([seed, 11])

    def batch() -> tuple[SlotBatch, list[Row]]:
        idx = rng.integers(len(data.text), size=batch_size)
        words, masks, rows = [], [], []
        for i in idx:
            scene = data.text[int(i)]
            n = len(scene.objects)
            u = rng.random(n)
            hidden = u < cfg.hidden_p
            drop, blank = u < cfg.hidden_p + cfg.colour_drop_p, rng.random() < cfg.blank_p  # hidden: dropped too
            shown = scene.replace_objects(o.with_(colour=vocab.UNCERTAIN_COLOUR) if h else o
                                          for o, h in zip(scene.objects, hidden))
            qa = rng.random() < cfg.qa_fraction
            w, m = slot_words(scene, tokenizer, hidden if qa and cfg.qa_slots_show_colour else drop, blank)
            words.append(w), masks.append(m)
            rows.append(yesno_row(shown, data.shapes, data.colours, rng) if qa
                        else Row(grammar.DESCRIBE_PROMPT, grammar.caption(shown)))
        return SlotBatch(torch.tensor(words), torch.tensor(masks)), rows

    return batch


def slot_step_fn(model, processor, data: StageData, cfg: RecipeConfig, batch_size: int, max_length: int, seed: int,
                 image_size: int) -> Callable[[int], torch.Tensor]:
    blank_image = np.full((image_size, image_size, 3), 128, dtype=np.uint8)
    next_batch = slot_batches(processor.tokenizer, data, cfg, batch_size, seed)

    def step(_: int) -> torch.Tensor:
        slots, rows = next_batch()
        return slot_loss(model, processor, slots, rows, max_length, blank_image, cfg.answer_weight)

    return step


def image_step_fn(model, processor, data: StageData, cfg: RecipeConfig, batch_size: int, max_length: int,
                  seed: int) -> Callable[[int], torch.Tensor]:
    rng = np.random.default_rng([seed, 12])

    def step(_: int) -> torch.Tensor:
        idx = rng.integers(len(data.pool_scenes), size=batch_size)
        rows = [yesno_row(data.pool_scenes[i], data.shapes, data.colours, rng) if rng.random() < cfg.qa_fraction
                else Row(grammar.DESCRIBE_PROMPT, grammar.caption(data.pool_scenes[i])) for i in idx]
        return image_loss(model, processor, [data.pool_images[i] for i in idx], rows, max_length, cfg.answer_weight)

    return step


class StageLog(NamedTuple):
    stage: str
    steps: int
    trainable: int
    """Parameters trained."""
    seconds: float
    final_loss: float | None
    losses: list[float]
    reused: bool = False
    """The slot stage was loaded from its cache (`SlotCache`), not trained in this build."""


SLOT_FIELDS: tuple[str, ...] = ("slot_steps", "slot_lr", "colour_drop_p", "blank_p", "hidden_p", "qa_fraction",
                                 "answer_weight", "qa_slots_show_colour")
"""The fields the slot stage reads: a build whose slot key (these, the architecture, seed, batch, world) matches a
saved slot stage reuses it."""


def slot_fields(cfg: RecipeConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in SLOT_FIELDS}


class SlotCache(NamedTuple):
    """Where a finished slot stage (the language model's weights after it) is kept, and under which key."""

    folder: Path
    key: str
    """Fingerprint of everything the slot stage's result depends on (`slot_fields`, architecture, seed, batch,
    world, code version)."""


def load_slots(model, cache: SlotCache, names: Sequence[str]) -> list[float] | None:
    """The saved slot stage's losses after loading its weights into `model`, or None when none matches."""
    import json

    from safetensors.torch import load_file

    try:
        meta = json.loads((cache.folder / "slots.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != cache.key or not (cache.folder / "language_model.safetensors").is_file():
        return None
    state = load_file(cache.folder / "language_model.safetensors")
    if set(state) != set(names):
        raise ValueError(f"{cache.folder}: the saved slot stage holds other parameters than this model's language "
                         "model; delete the folder to retrain it")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            named[n].copy_(state[n])
    return list(meta["losses"])


def save_slots(model, cache: SlotCache, names: Sequence[str], losses: Sequence[float]) -> None:
    """Write the language model after the slot stage (safetensors) and its key, the key last."""
    from safetensors.torch import save_file

    from store.parquet_io import write_json_atomic

    cache.folder.mkdir(parents=True, exist_ok=True)
    (cache.folder / "slots.json").unlink(missing_ok=True)
    named = dict(model.named_parameters())
    save_file({n: named[n].detach().contiguous() for n in names}, cache.folder / "language_model.safetensors")
    write_json_atomic({"key": cache.key, "losses": list(losses)}, cache.folder / "slots.json")


def build_staged(model, processor, world_dir: Path, world, cfg: RecipeConfig, *, encoder_dir: Path, batch_size: int,
                 max_length: int, seed: int, progress: bool = True,
                 after_stage: Callable[[str], None] | None = None,
                 slot_cache: SlotCache | None = None) -> tuple[dict[str, Any], list[StageLog]]:
    """Run encoder, slots, projector and tune on `model` in place; `after_stage(name)` is called after each stage
    that ran. With `slot_cache`, a saved slot stage with the same key is loaded instead of trained (like the
    encoder, it is the same whatever the later stages do), and a trained one is saved. Returns (the encoder's
    report, stage logs)."""
    from world.encoder import load_encoder, train_encoder

    data = load_stage_data(world_dir, world)  # first: a world without a text corpus fails before any training
    image_size = model.config.vision_config.image_size
    encoder: dict[str, Any] = {}

    def load_tower() -> None:  # the slot stage reads no pixels: the encoder is needed from the projector on
        encoder.update(train_encoder(world_dir, encoder_dir, cfg.encoder, progress=progress).to_dict())
        model.model.vision_tower.load_state_dict(load_encoder(encoder_dir).state_dict())  # strict: same shapes

    plan = [
        ("slots", stage_trainable(model, "slots"), cfg.slot_steps, cfg.slot_lr,
         slot_step_fn(model, processor, data, cfg, batch_size, max_length, seed, image_size)),
        ("encoder", None, 0, 0.0, None),
        ("projector", stage_trainable(model, "projector"), cfg.projector_steps, cfg.projector_lr,
         image_step_fn(model, processor, data, cfg, batch_size, max_length, seed)),
        ("tune", tune_trainable(model, cfg.tune_layers), cfg.tune_steps, cfg.tune_lr,
         image_step_fn(model, processor, data, tune_rows(cfg), batch_size, max_length, seed + 1)),
    ]
    named = dict(model.named_parameters())
    logs = []
    for stage, names, steps, lr, fn in plan:
        if stage == "encoder":
            load_tower()
            continue
        t0 = time.perf_counter()
        reused = load_slots(model, slot_cache, names) if stage == "slots" and slot_cache and steps else None
        if reused is not None:
            losses = reused
        else:
            losses = run_stage(model, names, steps, lr, fn, f"base {stage}", progress) if steps else []
            if stage == "slots" and slot_cache and steps:
                save_slots(model, slot_cache, names, losses)
        logs.append(StageLog(stage, steps, sum(named[n].numel() for n in names), time.perf_counter() - t0,
                             float(np.mean(losses[-20:])) if losses else None, losses, reused is not None))
        if steps and after_stage is not None:
            after_stage(stage)
    return encoder, logs


def tune_rows(cfg: RecipeConfig) -> RecipeConfig:
    """`cfg` with the tuning stage's row mix and yes/no weight in `qa_fraction` and `answer_weight`."""
    return dataclasses.replace(
        cfg, qa_fraction=cfg.qa_fraction if cfg.tune_qa_fraction is None else cfg.tune_qa_fraction,
        answer_weight=cfg.answer_weight if cfg.tune_answer_weight is None else cfg.tune_answer_weight)


def recipe_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    return asdict(cfg)


def replace(cfg: RecipeConfig, **changes: Any) -> RecipeConfig:
    return dataclasses.replace(cfg, **changes)
