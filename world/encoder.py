"""The world vision encoder: a CLIP vision tower of the world VLM's kind, trained with direct per-cell supervision
from the scene's ground truth, then frozen. LLaVA starts from a vision encoder that already sees; this is the
world's stand-in for it.

    python -m world.encoder --world data/world/prior-seed0 --out data/models/encoder --preset prior   # minutes

Training: every scene's image goes through `CLIPVisionModel`; the features LLaVA reads (last layer, CLS dropped,
`vision_feature_layer=-1`) are averaged over the patches of each of the 3x3 grid cells, and four linear heads read
each cell: present, shape, colour and size (shape / colour / size only where an object is). Images: the world's
pool and train splits plus `extra_scenes` scenes rendered in memory from the `encoder` seed stream (never the test
split). The heads are dropped: the artifact is the tower alone (`save_pretrained` folder) and `encoder_report.json`,
written last, with the probe's accuracies on the held-out test split (which the heads measured before they went).
A folder whose report records the same config and world is reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModel

from store.fingerprint import fingerprint, sha256_file
from store.parquet_io import write_json_atomic
from world import vocab
from world.config import WorldConfig
from world.generate import build_scene, read_scenes, read_world_json
from world.scene import Scene

REPORT = "encoder_report.json"
ENCODER_VERSION = 1
"""Bump when a change to the heads, data or training makes the same config train another encoder."""
GRID = 3
"""The world's grid: 3x3 cells, one object at most in each (`world.vocab.POSITIONS`)."""


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture and budget of the world vision encoder."""

    image_size: int = 48
    """Input resolution (the world's `image_size`)."""
    patch_size: int = 16
    """Patch side; `image_size // patch_size` must be a multiple of 3 so that patches tile the grid cells."""
    width: int = 128
    """CLIP vision width (the world VLM's `vision_width`)."""
    layers: int = 4
    """CLIP vision depth."""
    heads: int = 4
    """Attention heads."""
    steps: int = 2000
    """Optimiser steps (1,500 at batch 128: shape ~90%, colour ~100% on the prior world; 4,000: shape ~98%)."""
    batch_size: int = 128
    """Images per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (warmup, cosine decay to 0)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    extra_scenes: int = 20000
    """Scenes rendered in memory from the `encoder` seed stream on top of the pool and train splits."""
    eval_scenes: int = 1000
    """Most test-split scenes the probe accuracies are measured on."""
    seed: int = 0
    """Seed of init, extra scenes and batch order."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) % GRID:
            raise ValueError(f"image_size {self.image_size} / patch_size {self.patch_size} must give a multiple of "
                             f"{GRID} patches per side, so that patches tile the {GRID}x{GRID} cells; e.g. 48 / 16")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.steps < 1 or self.batch_size < 1 or self.extra_scenes < 0:
            raise ValueError("steps and batch_size must be >= 1 and extra_scenes >= 0")

    def vision_config(self) -> CLIPVisionConfig:
        """The tower's config; `world.vlm.build_model` builds the same one from a `WorldVLMConfig`."""
        return CLIPVisionConfig(hidden_size=self.width, intermediate_size=4 * self.width,
                                num_hidden_layers=self.layers, num_attention_heads=self.heads,
                                image_size=self.image_size, patch_size=self.patch_size, projection_dim=self.width)


ENCODER_PRESETS: dict[str, EncoderConfig] = {
    # Tests: a probe that beats chance in seconds.
    "tiny": EncoderConfig(width=32, layers=1, heads=2, steps=60, batch_size=32, lr=3e-3, warmup_steps=5,
                          extra_scenes=500, eval_scenes=200),
    "prior": EncoderConfig(),
}


class CellLabels(NamedTuple):
    """Per-cell targets of a batch, each (B, 9) int64; -100 where undefined (no object in the cell)."""

    present: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor


def label_space(world: WorldConfig) -> dict[str, tuple[str, ...]]:
    """The classes of each head: the world's shapes, its colours (plus the hidden look when `uncertain_p` > 0)."""
    colours = world.colours + ((vocab.UNCERTAIN_COLOUR,) if world.uncertain_p > 0 else ())
    return {"present": ("no", "yes"), "shape": world.shapes, "colour": colours, "size": vocab.SIZES}


def cell_labels(scenes: Sequence[Scene], space: dict[str, tuple[str, ...]]) -> CellLabels:
    n = len(scenes)
    out = {k: torch.full((n, GRID * GRID), -100, dtype=torch.long) for k in ("shape", "colour", "size")}
    present = torch.zeros((n, GRID * GRID), dtype=torch.long)
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            c = vocab.POSITIONS.index(o.position)
            present[b, c] = 1
            for attr in ("shape", "colour", "size"):
                out[attr][b, c] = space[attr].index(getattr(o, attr))
    return CellLabels(present, out["shape"], out["colour"], out["size"])


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) float, normalised like the world VLM's processor ((x/255 - 0.5)/0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x / 255.0 - 0.5) / 0.5


def cell_features(tower: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 9, width): the last layer's patch features (what LLaVA reads, CLS dropped) averaged per grid cell."""
    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    b, n, w = hidden.shape
    side = int(math.isqrt(n))
    per = side // GRID
    grid = hidden.reshape(b, GRID, per, GRID, per, w)
    return grid.mean(dim=(2, 4)).reshape(b, GRID * GRID, w)


class CellProbe(nn.Module):
    """Four linear heads on each cell feature; trained with the tower, dropped before it is saved."""

    def __init__(self, width: int, space: dict[str, tuple[str, ...]]):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in space.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(feats) for k, head in self.heads.items()}


def probe_loss(logits: dict[str, torch.Tensor], labels: CellLabels) -> torch.Tensor:
    return sum(nn.functional.cross_entropy(logits[k].flatten(0, 1), getattr(labels, k).flatten(), ignore_index=-100)
               for k in logits)


@torch.no_grad()
def probe_accuracy(tower: CLIPVisionModel, probe: CellProbe, images: np.ndarray, scenes: Sequence[Scene],
                   space: dict[str, tuple[str, ...]], batch_size: int = 256) -> dict[str, float]:
    """Accuracy of each head on the cells where it is defined (present: every cell); `shape_small` and
    `colour_uncertain` break shape down by size and colour onto hidden objects."""
    tower.eval()
    hits: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(scenes), batch_size):
        labels = cell_labels(scenes[i:i + batch_size], space)
        logits = probe(cell_features(tower, pixel_values(images[i:i + batch_size])))
        for k in logits:
            y = getattr(labels, k)
            ok = logits[k].argmax(-1) == y
            hits.setdefault(k, []).append(ok[y != -100])
        small = labels.size == vocab.SIZES.index("small")
        hits.setdefault("shape_small", []).append((logits["shape"].argmax(-1) == labels.shape)[small])
        if vocab.UNCERTAIN_COLOUR in space["colour"]:
            grey = labels.colour == space["colour"].index(vocab.UNCERTAIN_COLOUR)
            hits.setdefault("colour_uncertain", []).append((logits["colour"].argmax(-1) == labels.colour)[grey])
    out = {}
    for k, v in hits.items():
        cat = torch.cat(v)
        out[k] = float(cat.float().mean()) if cat.numel() else float("nan")
    return out


def chance_accuracy(scenes: Sequence[Scene], space: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """What always answering the most frequent class scores on these scenes, per head: the probe's floor."""
    labels = cell_labels(scenes, space)
    out = {}
    for k in ("present", "shape", "colour", "size"):
        y = getattr(labels, k).flatten()
        y = y[y != -100]
        out[k] = float(torch.bincount(y).max() / y.numel()) if y.numel() else float("nan")
    return out


# ---------------------------------------------------------------------------------------------- data
def render_scenes(world: WorldConfig, split: str, count: int) -> tuple[np.ndarray, list[Scene]]:
    """`count` scenes of `split` built and drawn in memory (as generation would), stacked uint8 images."""
    built = [build_scene(world, split, i) for i in range(count)]
    return np.stack([b.image for b in built]), [b.scene for b in built]


def world_images(world_dir: Path, split: str, limit: int | None = None) -> tuple[np.ndarray, list[Scene]]:
    """The written images and scenes of a split of a generated world (sorted by scene id, at most `limit`)."""
    from PIL import Image

    from world.generate import scene_id, image_path

    scenes = read_scenes(world_dir, split)
    ids = sorted(scenes)[:limit]
    images = []
    for sid in ids:
        with Image.open(world_dir / image_path(split, int(sid.rsplit("-", 1)[1]))) as im:
            images.append(np.array(im.convert("RGB")))
    assert all(scene_id(split, int(s.rsplit("-", 1)[1])) == s for s in ids)
    return (np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)), [scenes[s] for s in ids]


def world_config(world_dir: Path) -> WorldConfig:
    info = read_world_json(Path(world_dir))
    if info is None:
        raise FileNotFoundError(f"{world_dir} has no readable world.json: generate the world first (`make world`)")
    return WorldConfig.from_dict(info["config"])


# ---------------------------------------------------------------------------------------------- training
class EncoderReport(NamedTuple):
    folder: str
    trained: bool
    fingerprint: str
    config: dict[str, Any]
    labels: dict[str, list[str]]
    n_train_images: int
    n_eval_scenes: int
    probe_accuracy: dict[str, float]
    """Accuracy of each head on held-out test-split cells (the heads are dropped after this)."""
    chance_accuracy: dict[str, float]
    """Majority-class accuracy of each head on the same cells."""
    seconds: float
    final_loss: float

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def read_encoder_report(out_dir: Path) -> EncoderReport | None:
    try:
        return EncoderReport(**json.loads((Path(out_dir) / REPORT).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _lr(step: int, cfg: EncoderConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def train_encoder(world_dir: str | Path, out_dir: str | Path, cfg: EncoderConfig = ENCODER_PRESETS["prior"],
                  progress: bool = True, device: str | torch.device = "cpu") -> EncoderReport:
    """Train (or reuse) the world vision encoder in `out_dir`; returns its report."""
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    world = world_config(world_dir)
    if world.image_size != cfg.image_size:
        raise ValueError(f"the world draws {world.image_size} px images but the encoder expects {cfg.image_size}; "
                         "set EncoderConfig.image_size to the world's image_size")
    fp = fingerprint(asdict(cfg), sha256_file(world_dir / "world.json"), ENCODER_VERSION)
    old = read_encoder_report(out_dir)
    if old is not None and old.fingerprint == fp and (out_dir / "model.safetensors").is_file():
        return old._replace(trained=False)
    (out_dir / REPORT).unlink(missing_ok=True)  # the report marks a complete folder
    t0 = time.perf_counter()
    space = label_space(world)
    parts = [world_images(world_dir, s) for s in ("pool", "train")]
    extra = dataclasses.replace(world, seed=world.seed * 7919 + cfg.seed)  # own stream, same distribution
    parts.append(render_scenes(extra, "encoder", cfg.extra_scenes) if cfg.extra_scenes else
                 (np.zeros((0, *parts[0][0].shape[1:]), np.uint8), []))
    images = np.concatenate([p[0] for p in parts if len(p[1])])
    scenes = [s for p in parts for s in p[1]]
    labels = cell_labels(scenes, space)
    torch.manual_seed(cfg.seed)
    tower = CLIPVisionModel(cfg.vision_config()).to(device)
    probe = CellProbe(cfg.width, space).to(device)
    unused = [p for n, p in tower.named_parameters() if "post_layernorm" in n]  # feeds only the pooled CLS
    for p in unused:
        p.requires_grad_(False)
    params = [p for p in (*tower.parameters(), *probe.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor, losses = torch.randperm(len(scenes), generator=gen), 0, []
    tower.train()
    for step in tqdm(range(cfg.steps), desc="world encoder", unit="step", disable=not progress):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(scenes), generator=gen), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        batch = CellLabels(*(t[idx].to(device) for t in labels))
        loss = probe_loss(probe(cell_features(tower, pixel_values(images[idx.numpy()]).to(device))), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    test_images, test_scenes = world_images(world_dir, "test", cfg.eval_scenes)
    tower.cpu(), probe.cpu()
    acc = probe_accuracy(tower, probe, test_images, test_scenes, space) if test_scenes else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out_dir)  # the heads are not part of the artifact
    report = EncoderReport(
        folder=str(out_dir), trained=True, fingerprint=fp, config=asdict(cfg),
        labels={k: list(v) for k, v in space.items()}, n_train_images=len(scenes), n_eval_scenes=len(test_scenes),
        probe_accuracy=acc, chance_accuracy=chance_accuracy(test_scenes, space) if test_scenes else {},
        seconds=time.perf_counter() - t0, final_loss=float(np.mean(losses[-20:])))
    write_json_atomic(report.to_dict(), out_dir / REPORT)
    return report


def load_encoder(folder: str | Path) -> CLIPVisionModel:
    """The saved tower, frozen, in eval mode."""
    tower = CLIPVisionModel.from_pretrained(Path(folder))
    tower.requires_grad_(False)
    return tower.eval()


def main(argv: Sequence[str] | None = None) -> EncoderReport:
    ap = argparse.ArgumentParser(prog="python -m world.encoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="a generated world folder (holds world.json)")
    ap.add_argument("--out", required=True, help="output folder (save_pretrained + encoder_report.json)")
    ap.add_argument("--preset", default="prior", choices=sorted(ENCODER_PRESETS))
    ap.add_argument("--steps", type=int, default=None, help="override the preset's optimiser steps")
    args = ap.parse_args(argv)
    cfg = ENCODER_PRESETS[args.preset]
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    report = train_encoder(args.world, args.out, cfg)
    print(json.dumps({"probe_accuracy": report.probe_accuracy, "chance": report.chance_accuracy,
                      "seconds": round(report.seconds, 1)}, indent=1))
    return report


if __name__ == "__main__":
    main()
