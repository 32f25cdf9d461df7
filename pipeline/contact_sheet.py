"""A contact sheet of mined examples: the positive beside its K negatives with their scores (PNG).

People judge mined negatives faster by looking at them than by reading ids."""

from __future__ import annotations

import io
import textwrap

import polars as pl
from PIL import Image, ImageDraw, ImageFont

from store.safe_image import UnsafeImageError, open_ingested

TILE = 128
LABEL_H = 30
PROMPT_H = 16


def _tile(path: str) -> Image.Image:
    try:
        with open_ingested(path) as im:  # the checked, upright image (store/safe_image.py)
            return im.convert("RGB").resize((TILE, TILE), Image.NEAREST if min(im.size) <= TILE else Image.BICUBIC)
    except (OSError, UnsafeImageError):  # deleted or changed since ingest: a grey tile, never the changed file
        return Image.new("RGB", (TILE, TILE), (128, 128, 128))


def contact_sheet(shard: pl.DataFrame, n_examples: int = 6) -> bytes:
    """PNG bytes: one row per example (prompt above; positive, then negatives in greedy order)."""
    rows = shard.head(n_examples)
    k = max([len(n) for n in rows["negatives"].to_list()] + [1])
    width = (k + 1) * (TILE + 4) + 4
    row_h = PROMPT_H + TILE + LABEL_H + 6
    sheet = Image.new("RGB", (width, max(1, rows.height) * row_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, ex in enumerate(rows.iter_rows(named=True)):
        y = 4 + r * row_h
        draw.text((4, y), textwrap.shorten(f"{ex['example_id']}: {ex['prompt']}", width // 6), fill=(0, 0, 0),
                  font=font)
        y += PROMPT_H
        sheet.paste(_tile(ex["image_path"]), (4, y))
        draw.text((4, y + TILE + 2), "positive", fill=(0, 100, 0), font=font)
        for j, neg in enumerate(ex["negatives"]):
            x = 4 + (j + 1) * (TILE + 4)
            sheet.paste(_tile(neg["path"]), (x, y))
            # a random_pool negative outside the retrieved candidates has no score or proposal
            scored = f"s={neg['score']:.2f} q={neg['q']:.3f}" if neg["score"] is not None else "gallery draw"
            draw.text((x, y + TILE + 2), f"#{j + 1} {scored}", fill=(150, 0, 0), font=font)
            draw.text((x, y + TILE + 14), f"sim={neg['clip_sim']:.2f}", fill=(80, 80, 80), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
