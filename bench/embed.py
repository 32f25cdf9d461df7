"""Embedding throughput (images/s, end to end: decode + preprocess + forward), world CLIP vs ViT-B-32.

    .venv/bin/python bench/embed.py [--repeats 3] [--quick]

Both models embed the same PNG files through `ClipEncoder.embed_images`, the code path of the
`pool_embeddings` asset. Weights are random (throughput does not depend on them; no download needed).
Prints a table and writes reports/bench/embed.json. Run serially on a quiet machine; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from pipeline.clip_encoder import ClipEncoder, ClipSpec
from world.clip import WorldClipConfig, save_world_clip


def make_images(folder: Path, n: int, size: int = 64) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def throughput(encoder: ClipEncoder, paths: list[Path], batch_size: int, repeats: int) -> tuple[float, list[float]]:
    encoder.embed_images(paths[:batch_size], batch_size=batch_size, progress=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoder.embed_images(paths, batch_size=batch_size, progress=False)
        rates.append(len(paths) / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer images (smoke run)")
    parser.add_argument("--out", default="reports/bench/embed.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp, 256 if args.quick else 1024)
        world_dir = tmp / "world-clip"
        cfg = WorldClipConfig()
        torch.manual_seed(0)
        save_world_clip(open_clip.CLIP(**cfg.model_cfg()), cfg, world_dir, {"note": "random init for bench"})
        models = {
            "world CLIP (64 px, ~2M vision+text)": ClipSpec(model=f"local-dir:{world_dir}", device="cpu"),
            "ViT-B-32 (224 px, random init)": ClipSpec(model="ViT-B-32", pretrained="random", device="cpu"),
        }
        rows = []
        for name, spec in models.items():
            encoder = ClipEncoder(spec)
            n = len(paths) if "world" in name else len(paths) // 4  # ViT-B-32 is ~50x slower per image
            for bs in (32, 128):
                median, rates = throughput(encoder, paths[:n], bs, args.repeats)
                rows.append({"model": name, "batch_size": bs, "images": n, "images_per_s": round(median, 1),
                             "runs": [round(r, 1) for r in rates]})
            del encoder

    base = next(r["images_per_s"] for r in rows if r["model"].startswith("ViT") and r["batch_size"] == 32)
    print(f"\n{'model':40s} {'batch':>5s} {'images':>6s} {'img/s (median)':>15s} {'x ViT-B-32@32':>14s}")
    for r in rows:
        print(f"{r['model']:40s} {r['batch_size']:5d} {r['images']:6d} {r['images_per_s']:15.1f} "
              f"{r['images_per_s'] / base:14.1f}")
    report = {"bench": "embed", "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "processor": platform.processor(), "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
